//! The SQLite side of access requests: TLS certificates recorded with the request whose roles
//! they carry (schema version 4). The requests themselves are ordinary resources.

use rusqlite::{OptionalExtension, params};

use crate::storage::{SqliteBackend, StorageError};

impl SqliteBackend {
    /// See [`crate::storage::Backend::add_elevated_cert`].
    pub(crate) fn insert_elevated_cert(
        &self,
        fingerprint: &str,
        user: &str,
        expires: u64,
        request_id: &str,
    ) -> Result<(), StorageError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO tls_certs (fingerprint, user, expires, request_id)
                 VALUES (?1, ?2, ?3, ?4)",
                params![fingerprint, user, expires, request_id],
            )
            .map_err(self.db())?;
            Ok(())
        })
    }

    /// See [`crate::storage::Backend::cert_request`].
    pub(crate) fn select_cert_request(
        &self,
        fingerprint: &str,
    ) -> Result<Option<String>, StorageError> {
        self.with(|c| {
            c.query_row(
                "SELECT request_id FROM tls_certs WHERE fingerprint = ?1",
                [fingerprint],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map(|r| r.filter(|id| !id.is_empty()))
            .map_err(self.db())
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::migrations::SQLITE as MIGRATIONS;
    use crate::storage::{Backend, Condition, SqliteBackend};

    /// A database of schema version 3 (before access requests) migrates: its certificates keep
    /// working without a request, and access requests join the policy feed.
    #[test]
    fn a_version_3_database_migrates() {
        let dir = std::env::temp_dir().join(format!("postern-reqmig-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.db");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL);")
                .unwrap();
            for (i, sql) in MIGRATIONS[..3].iter().enumerate() {
                c.execute_batch(sql).unwrap();
                c.execute("INSERT INTO schema_version (version) VALUES (?1)", [i + 1])
                    .unwrap();
            }
            c.execute(
                "INSERT INTO tls_certs (fingerprint, user, expires) VALUES ('old', 'alice', 9)",
                [],
            )
            .unwrap();
        }
        let b = SqliteBackend::open(&path).unwrap();
        assert_eq!(SqliteBackend::schema_version(), 4);
        assert_eq!(b.cert_owner("old").unwrap(), Some(("alice".into(), 9)));
        assert_eq!(b.cert_request("old").unwrap(), None);
        b.add_elevated_cert("new", "alice", 10, "r1").unwrap();
        assert_eq!(b.cert_request("new").unwrap().as_deref(), Some("r1"));
        let before = b.changes_since(0, 100).unwrap().newest;
        b.put("access_request", "r1", "{}", Condition::Absent)
            .unwrap();
        let after = b.changes_since(before, 100).unwrap();
        assert_eq!(after.changes.len(), 1);
        assert_eq!(after.changes[0].kind, "access_request");
        let (_, snap) = b.policy_snapshot().unwrap();
        assert!(snap.iter().any(|c| c.kind == "access_request"));
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
