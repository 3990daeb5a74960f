//! The embedded SQLite backend: one file, WAL mode, `synchronous=FULL`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use super::migrations::SQLITE as MIGRATIONS;
use super::*;

/// The embedded SQLite backend (one file, bundled SQLite).
pub struct SqliteBackend {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteBackend {
    /// Opens (creating 0600 if absent) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteBackend, StorageError> {
        let db = |source| StorageError::Db {
            path: path.into(),
            source,
        };
        if !path.exists() {
            // Create the file ourselves so that it is 0600 from its first byte; SQLite gives
            // its -wal and -shm files the database file's mode.
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| StorageError::Io {
                    path: path.into(),
                    source,
                })?;
        }
        let mut conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")
            .map_err(db)?;
        let tx = conn.transaction().map_err(db)?;
        let current: u32 = tx
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        if current as usize > MIGRATIONS.len() {
            return Err(StorageError::TooNew {
                path: path.into(),
                found: current,
                supported: MIGRATIONS.len() as u32,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.execute_batch(sql).map_err(db)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [i as u32 + 1],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(SqliteBackend {
            path: path.into(),
            conn: Mutex::new(conn),
        })
    }

    /// The schema version this build migrates to.
    pub fn schema_version() -> u32 {
        MIGRATIONS.len() as u32
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c)
    }

    pub(crate) fn db(&self) -> impl Fn(rusqlite::Error) -> StorageError + '_ {
        |source| StorageError::Db {
            path: self.path.clone(),
            source,
        }
    }
}

impl Backend for SqliteBackend {
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.with(|c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(self.db())
        })
    }

    fn init_meta(
        &self,
        key_guard: &str,
        entries: &[(&str, Vec<u8>)],
    ) -> Result<bool, StorageError> {
        self.with(|c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(self.db())?;
            let exists: bool = tx
                .query_row("SELECT 1 FROM meta WHERE key = ?1", [key_guard], |_| Ok(()))
                .optional()
                .map_err(self.db())?
                .is_some();
            if exists {
                return Ok(false);
            }
            for (k, v) in entries {
                tx.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                    params![k, v],
                )
                .map_err(self.db())?;
            }
            tx.commit().map_err(self.db())?;
            Ok(true)
        })
    }

    fn get(&self, kind: &str, name: &str) -> Result<Option<Item>, StorageError> {
        self.with(|c| {
            c.query_row(
                "SELECT name, revision, value FROM resources WHERE kind = ?1 AND name = ?2",
                [kind, name],
                |r| {
                    Ok(Item {
                        name: r.get(0)?,
                        revision: r.get(1)?,
                        value: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(self.db())
        })
    }

    fn list(&self, kind: &str) -> Result<Vec<Item>, StorageError> {
        self.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT name, revision, value FROM resources WHERE kind = ?1 ORDER BY name",
                )
                .map_err(self.db())?;
            let rows = st
                .query_map([kind], |r| {
                    Ok(Item {
                        name: r.get(0)?,
                        revision: r.get(1)?,
                        value: r.get(2)?,
                    })
                })
                .map_err(self.db())?;
            rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
        })
    }

    fn put(
        &self,
        kind: &str,
        name: &str,
        value: &str,
        cond: Condition,
    ) -> Result<Item, StorageError> {
        self.with(|c| {
            // IMMEDIATE takes the write lock before reading the revision: no other writer can
            // slip in between the check and the write.
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(self.db())?;
            let current: Option<u64> = tx
                .query_row(
                    "SELECT revision FROM resources WHERE kind = ?1 AND name = ?2",
                    [kind, name],
                    |r| r.get(0),
                )
                .optional()
                .map_err(self.db())?;
            let (kind_s, name_s) = (kind.to_string(), name.to_string());
            match (cond, current) {
                (Condition::Absent, Some(_)) => {
                    return Err(StorageError::Exists {
                        kind: kind_s,
                        name: name_s,
                    });
                }
                (Condition::Present | Condition::Revision(_), None) => {
                    return Err(StorageError::NotFound {
                        kind: kind_s,
                        name: name_s,
                    });
                }
                (Condition::Revision(want), Some(have)) if want != have => {
                    return Err(StorageError::Conflict {
                        kind: kind_s,
                        name: name_s,
                        expected: want,
                        actual: have,
                    });
                }
                _ => {}
            }
            let revision = current.unwrap_or(0) + 1;
            tx.execute(
                "INSERT INTO resources (kind, name, revision, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (kind, name) DO UPDATE SET revision = ?3, value = ?4",
                params![kind, name, revision, value],
            )
            .map_err(self.db())?;
            tx.commit().map_err(self.db())?;
            Ok(Item {
                name: name.into(),
                revision,
                value: value.into(),
            })
        })
    }

    fn delete(&self, kind: &str, name: &str) -> Result<bool, StorageError> {
        self.with(|c| {
            let n = c
                .execute(
                    "DELETE FROM resources WHERE kind = ?1 AND name = ?2",
                    [kind, name],
                )
                .map_err(self.db())?;
            Ok(n > 0)
        })
    }

    fn add_cert(&self, fingerprint: &str, user: &str, expires: u64) -> Result<(), StorageError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO tls_certs (fingerprint, user, expires) VALUES (?1, ?2, ?3)",
                params![fingerprint, user, expires],
            )
            .map_err(self.db())?;
            Ok(())
        })
    }

    fn cert_owner(&self, fingerprint: &str) -> Result<Option<(String, u64)>, StorageError> {
        self.with(|c| {
            c.query_row(
                "SELECT user, expires FROM tls_certs WHERE fingerprint = ?1",
                [fingerprint],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.db())
        })
    }

    fn add_elevated_cert(
        &self,
        fingerprint: &str,
        user: &str,
        expires: u64,
        request_id: &str,
    ) -> Result<(), StorageError> {
        self.insert_elevated_cert(fingerprint, user, expires, request_id)
    }

    fn cert_request(&self, fingerprint: &str) -> Result<Option<String>, StorageError> {
        self.select_cert_request(fingerprint)
    }

    fn forget_certs(&self, user: Option<&str>, now: u64) -> Result<usize, StorageError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM tls_certs WHERE user = ?1 OR expires < ?2",
                params![user, now],
            )
            .map_err(self.db())
        })
    }

    fn forget_cert(&self, fingerprint: &str, now: u64) -> Result<bool, StorageError> {
        self.with(|c| {
            let n = c
                .execute(
                    "DELETE FROM tls_certs WHERE fingerprint = ?1",
                    params![fingerprint],
                )
                .map_err(self.db())?;
            c.execute("DELETE FROM tls_certs WHERE expires < ?1", params![now])
                .map_err(self.db())?;
            Ok(n > 0)
        })
    }

    fn append_audit(&self, r: &AuditRecord) -> Result<u64, StorageError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO audit (time_ms, user, action, resource, allowed, error, peer)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    r.time_ms, r.user, r.action, r.resource, r.allowed, r.error, r.peer
                ],
            )
            .map_err(self.db())?;
            Ok(c.last_insert_rowid() as u64)
        })
    }

    fn audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StorageError> {
        self.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT id, time_ms, user, action, resource, allowed, error, peer
                     FROM audit ORDER BY id DESC LIMIT ?1",
                )
                .map_err(self.db())?;
            let rows = st
                .query_map([limit], |r| {
                    Ok(AuditRecord {
                        id: r.get(0)?,
                        time_ms: r.get(1)?,
                        user: r.get(2)?,
                        action: r.get(3)?,
                        resource: r.get(4)?,
                        allowed: r.get(5)?,
                        error: r.get(6)?,
                        peer: r.get(7)?,
                    })
                })
                .map_err(self.db())?;
            rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
        })
    }

    fn changes_since(&self, after: u64, limit: u32) -> Result<Changes, StorageError> {
        self.changes_after(after, limit)
    }

    fn policy_snapshot(&self) -> Result<(u64, Vec<Change>), StorageError> {
        self.snapshot()
    }

    fn append_stream_events(&self, events: &[StreamRow]) -> Result<usize, StorageError> {
        self.insert_stream_events(events)
    }

    fn stream_events(
        &self,
        user: Option<&str>,
        since_ms: u64,
        limit: u32,
    ) -> Result<Vec<StreamRow>, StorageError> {
        self.select_stream_events(user, since_ms, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempdir::Dir, SqliteBackend) {
        let d = tempdir::Dir::new();
        let b = SqliteBackend::open(&d.0.join("auth.db")).unwrap();
        (d, b)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "postern-storage-{}-{}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn conditions_hold() {
        let (_d, b) = open();
        assert_eq!(
            b.put("role", "a", "1", Condition::Absent).unwrap().revision,
            1
        );
        assert!(matches!(
            b.put("role", "a", "2", Condition::Absent),
            Err(StorageError::Exists { .. })
        ));
        assert!(matches!(
            b.put("role", "b", "2", Condition::Present),
            Err(StorageError::NotFound { .. })
        ));
        assert_eq!(
            b.put("role", "a", "2", Condition::Revision(1))
                .unwrap()
                .revision,
            2
        );
        assert!(matches!(
            b.put("role", "a", "3", Condition::Revision(1)),
            Err(StorageError::Conflict {
                expected: 1,
                actual: 2,
                ..
            })
        ));
        assert_eq!(b.get("role", "a").unwrap().unwrap().value, "2");
        assert!(b.delete("role", "a").unwrap());
        assert!(!b.delete("role", "a").unwrap());
    }

    #[test]
    fn reopening_keeps_data_and_does_not_remigrate() {
        let d = tempdir::Dir::new();
        let p = d.0.join("auth.db");
        {
            let b = SqliteBackend::open(&p).unwrap();
            b.put("user", "u", "{}", Condition::Any).unwrap();
        }
        let b = SqliteBackend::open(&p).unwrap();
        assert_eq!(b.list("user").unwrap().len(), 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let d = tempdir::Dir::new();
        let p = d.0.join("auth.db");
        drop(SqliteBackend::open(&p).unwrap());
        let c = Connection::open(&p).unwrap();
        c.execute("INSERT INTO schema_version (version) VALUES (99)", [])
            .unwrap();
        drop(c);
        let e = SqliteBackend::open(&p).err().unwrap();
        assert!(e.to_string().contains("upgrade postern-auth"), "{e}");
    }
}
