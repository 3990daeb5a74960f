//! The policy change feed: every write to a role, user or lock appends a row to `changes` (by
//! SQLite triggers, in the writer's own transaction), numbered by a revision that only grows.
//! Proxies watch it through `WatchPolicy` and resume from the last revision they applied.

use rusqlite::{OptionalExtension, params};

use crate::storage::{SqliteBackend, StorageError};

/// One change to a role, user or lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its revision (0 in a snapshot, whose revision is given once).
    pub revision: u64,
    /// `role`, `user` or `lock`.
    pub kind: String,
    /// The resource's name.
    pub name: String,
    /// Whether it was removed.
    pub deleted: bool,
    /// The stored JSON (empty when deleted).
    pub value: String,
}

/// A page of the feed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The oldest revision still kept (a watcher further behind needs a snapshot).
    pub oldest: u64,
    /// The newest revision written.
    pub newest: u64,
    /// Changes after the asked revision, oldest first.
    pub changes: Vec<Change>,
}

impl SqliteBackend {
    /// See [`crate::storage::Backend::changes_since`].
    pub(crate) fn changes_after(&self, after: u64, limit: u32) -> Result<Changes, StorageError> {
        self.with(|c| {
            let tx = c.transaction().map_err(self.db())?;
            let (oldest, newest): (Option<u64>, Option<u64>) = tx
                .query_row("SELECT MIN(seq), MAX(seq) FROM changes", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(self.db())?;
            let changes = {
                let mut st = tx
                    .prepare(
                        "SELECT seq, kind, name, deleted, value FROM changes
                         WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                    )
                    .map_err(self.db())?;
                let rows = st
                    .query_map(params![after, limit], |r| {
                        Ok(Change {
                            revision: r.get(0)?,
                            kind: r.get(1)?,
                            name: r.get(2)?,
                            deleted: r.get(3)?,
                            value: r.get(4)?,
                        })
                    })
                    .map_err(self.db())?;
                rows.collect::<Result<Vec<_>, _>>().map_err(self.db())?
            };
            Ok(Changes {
                oldest: oldest.unwrap_or(0),
                newest: newest.unwrap_or(0),
                changes,
            })
        })
    }

    /// See [`crate::storage::Backend::policy_snapshot`].
    pub(crate) fn snapshot(&self) -> Result<(u64, Vec<Change>), StorageError> {
        self.with(|c| {
            let tx = c.transaction().map_err(self.db())?;
            let newest: Option<u64> = tx
                .query_row("SELECT MAX(seq) FROM changes", [], |r| r.get(0))
                .optional()
                .map_err(self.db())?
                .flatten();
            let items = {
                let mut st = tx
                    .prepare(
                        "SELECT kind, name, value FROM resources
                         WHERE kind IN ('role', 'user', 'lock', 'access_request') ORDER BY kind, name",
                    )
                    .map_err(self.db())?;
                let rows = st
                    .query_map([], |r| {
                        Ok(Change {
                            revision: 0,
                            kind: r.get(0)?,
                            name: r.get(1)?,
                            deleted: false,
                            value: r.get(2)?,
                        })
                    })
                    .map_err(self.db())?;
                rows.collect::<Result<Vec<_>, _>>().map_err(self.db())?
            };
            Ok((newest.unwrap_or(0), items))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::{Backend, Condition, SqliteBackend};

    #[test]
    fn writes_to_roles_users_and_locks_are_in_the_feed_in_order() {
        let dir = std::env::temp_dir().join(format!("postern-changes-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let b = SqliteBackend::open(&dir.join("auth.db")).unwrap();
        b.put("role", "r1", "{}", Condition::Absent).unwrap();
        b.put("token", "t1", "{}", Condition::Absent).unwrap();
        b.put("user", "u1", "{}", Condition::Absent).unwrap();
        b.put("role", "r1", "{\"x\":1}", Condition::Any).unwrap();
        b.delete("user", "u1").unwrap();
        b.put("lock", "l1", "{}", Condition::Absent).unwrap();
        let all = b.changes_since(0, 100).unwrap();
        let seen: Vec<(&str, &str, bool)> = all
            .changes
            .iter()
            .map(|c| (c.kind.as_str(), c.name.as_str(), c.deleted))
            .collect();
        assert_eq!(
            seen,
            [
                ("role", "r1", false),
                ("user", "u1", false),
                ("role", "r1", false),
                ("user", "u1", true),
                ("lock", "l1", false)
            ],
            "tokens are not policy"
        );
        let rest = b.changes_since(all.changes[2].revision, 100).unwrap();
        assert_eq!(rest.changes.len(), 2);
        let (rev, snap) = b.policy_snapshot().unwrap();
        assert_eq!(rev, all.newest);
        assert_eq!(snap.len(), 2, "r1 and l1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
