//! [`Backend`] on PostgreSQL: one statement (or one short transaction) per method, run by
//! [`PostgresBackend::call`].

use tokio_postgres::IsolationLevel;

use super::*;

fn item(r: &tokio_postgres::Row) -> Item {
    Item {
        name: r.get(0),
        revision: r.get::<_, i64>(1) as u64,
        value: r.get(2),
    }
}

fn change(r: &tokio_postgres::Row) -> Change {
    Change {
        revision: r.get::<_, i64>(0) as u64,
        kind: r.get(1),
        name: r.get(2),
        deleted: r.get(3),
        value: r.get(4),
    }
}

impl Backend for PostgresBackend {
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let key = key.to_owned();
        self.call(move |c, e| async move {
            let row = c
                .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
                .await
                .map_err(|x| e.pg(x))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn init_meta(
        &self,
        key_guard: &str,
        entries: &[(&str, Vec<u8>)],
    ) -> Result<bool, StorageError> {
        let guard = key_guard.to_owned();
        let entries: Vec<(String, Vec<u8>)> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.call(move |mut c, e| async move {
            let tx = c.transaction().await.map_err(|x| e.pg(x))?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&META_LOCK_NS, &guard],
            )
            .await
            .map_err(|x| e.pg(x))?;
            let exists = tx
                .query_opt("SELECT 1 FROM meta WHERE key = $1", &[&guard])
                .await
                .map_err(|x| e.pg(x))?
                .is_some();
            if exists {
                return Ok(false);
            }
            for (k, v) in &entries {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[k, v],
                )
                .await
                .map_err(|x| e.pg(x))?;
            }
            tx.commit().await.map_err(|x| e.pg(x))?;
            Ok(true)
        })
    }

    fn get(&self, kind: &str, name: &str) -> Result<Option<Item>, StorageError> {
        let (kind, name) = (kind.to_owned(), name.to_owned());
        self.call(move |c, e| async move {
            let row = c
                .query_opt(
                    "SELECT name, revision, value FROM resources WHERE kind = $1 AND name = $2",
                    &[&kind, &name],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok(row.as_ref().map(item))
        })
    }

    fn list(&self, kind: &str) -> Result<Vec<Item>, StorageError> {
        let kind = kind.to_owned();
        self.call(move |c, e| async move {
            let rows = c
                .query(
                    "SELECT name, revision, value FROM resources WHERE kind = $1 ORDER BY name",
                    &[&kind],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok(rows.iter().map(item).collect())
        })
    }

    fn put(
        &self,
        kind: &str,
        name: &str,
        value: &str,
        cond: Condition,
    ) -> Result<Item, StorageError> {
        let (kind, name, value) = (kind.to_owned(), name.to_owned(), value.to_owned());
        self.call(move |c, e| async move {
            let insert =
                "INSERT INTO resources (kind, name, revision, value) VALUES ($1, $2, 1, $3)";
            let update = "UPDATE resources SET revision = revision + 1, value = $3
                          WHERE kind = $1 AND name = $2";
            let p: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&kind, &name, &value];
            let row = match cond {
                Condition::Absent => {
                    let sql =
                        format!("{insert} ON CONFLICT (kind, name) DO NOTHING RETURNING revision");
                    c.query_opt(&sql, &p).await
                }
                Condition::Any => {
                    let sql = format!(
                        "{insert} ON CONFLICT (kind, name) DO UPDATE
                         SET revision = resources.revision + 1, value = EXCLUDED.value
                         RETURNING revision"
                    );
                    c.query_opt(&sql, &p).await
                }
                Condition::Present => {
                    c.query_opt(&format!("{update} RETURNING revision"), &p)
                        .await
                }
                Condition::Revision(want) => {
                    let sql = format!("{update} AND revision = $4 RETURNING revision");
                    c.query_opt(&sql, &[&kind, &name, &value, &(want as i64)])
                        .await
                }
            }
            .map_err(|x| e.pg(x))?;
            if let Some(row) = row {
                return Ok(Item {
                    name,
                    revision: row.get::<_, i64>(0) as u64,
                    value,
                });
            }
            // The condition failed: say why (the row may have changed again since; the answer
            // is still a refusal, only its detail is as of this read).
            let now: Option<i64> = c
                .query_opt(
                    "SELECT revision FROM resources WHERE kind = $1 AND name = $2",
                    &[&kind, &name],
                )
                .await
                .map_err(|x| e.pg(x))?
                .map(|r| r.get(0));
            Err(match (cond, now) {
                (Condition::Absent, _) => StorageError::Exists { kind, name },
                (Condition::Revision(want), Some(have)) => StorageError::Conflict {
                    kind,
                    name,
                    expected: want,
                    actual: have as u64,
                },
                _ => StorageError::NotFound { kind, name },
            })
        })
    }

    fn delete(&self, kind: &str, name: &str) -> Result<bool, StorageError> {
        let (kind, name) = (kind.to_owned(), name.to_owned());
        self.call(move |c, e| async move {
            let n = c
                .execute(
                    "DELETE FROM resources WHERE kind = $1 AND name = $2",
                    &[&kind, &name],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok(n > 0)
        })
    }

    fn add_cert(&self, fingerprint: &str, user: &str, expires: u64) -> Result<(), StorageError> {
        let (fp, user) = (fingerprint.to_owned(), user.to_owned());
        self.call(move |c, e| async move {
            c.execute(
                r#"INSERT INTO tls_certs (fingerprint, "user", expires) VALUES ($1, $2, $3)
                   ON CONFLICT (fingerprint) DO UPDATE SET "user" = EXCLUDED."user",
                   expires = EXCLUDED.expires"#,
                &[&fp, &user, &(expires as i64)],
            )
            .await
            .map_err(|x| e.pg(x))?;
            Ok(())
        })
    }

    fn cert_owner(&self, fingerprint: &str) -> Result<Option<(String, u64)>, StorageError> {
        let fp = fingerprint.to_owned();
        self.call(move |c, e| async move {
            let row = c
                .query_opt(
                    r#"SELECT "user", expires FROM tls_certs WHERE fingerprint = $1"#,
                    &[&fp],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok(row.map(|r| (r.get(0), r.get::<_, i64>(1) as u64)))
        })
    }

    fn add_elevated_cert(
        &self,
        fingerprint: &str,
        user: &str,
        expires: u64,
        request_id: &str,
    ) -> Result<(), StorageError> {
        let (fp, user, req) = (
            fingerprint.to_owned(),
            user.to_owned(),
            request_id.to_owned(),
        );
        self.call(move |c, e| async move {
            c.execute(
                r#"INSERT INTO tls_certs (fingerprint, "user", expires, request_id)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (fingerprint) DO UPDATE SET "user" = EXCLUDED."user",
                   expires = EXCLUDED.expires, request_id = EXCLUDED.request_id"#,
                &[&fp, &user, &(expires as i64), &req],
            )
            .await
            .map_err(|x| e.pg(x))?;
            Ok(())
        })
    }

    fn cert_request(&self, fingerprint: &str) -> Result<Option<String>, StorageError> {
        let fp = fingerprint.to_owned();
        self.call(move |c, e| async move {
            let row = c
                .query_opt(
                    "SELECT request_id FROM tls_certs WHERE fingerprint = $1",
                    &[&fp],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok(row
                .map(|r| r.get::<_, String>(0))
                .filter(|id| !id.is_empty()))
        })
    }

    fn forget_certs(&self, user: Option<&str>, now: u64) -> Result<usize, StorageError> {
        let user = user.map(str::to_owned);
        self.call(move |c, e| async move {
            let n = c
                .execute(
                    r#"DELETE FROM tls_certs WHERE "user" = $1 OR expires < $2"#,
                    &[&user, &(now as i64)],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok(n as usize)
        })
    }

    fn forget_cert(&self, fingerprint: &str, now: u64) -> Result<bool, StorageError> {
        let fingerprint = fingerprint.to_owned();
        self.call(move |c, e| async move {
            let n = c
                .execute(
                    "DELETE FROM tls_certs WHERE fingerprint = $1",
                    &[&fingerprint],
                )
                .await
                .map_err(|x| e.pg(x))?;
            c.execute("DELETE FROM tls_certs WHERE expires < $1", &[&(now as i64)])
                .await
                .map_err(|x| e.pg(x))?;
            Ok(n > 0)
        })
    }

    fn append_audit(&self, r: &AuditRecord) -> Result<u64, StorageError> {
        let r = r.clone();
        self.call(move |c, e| async move {
            let row = c
                .query_one(
                    r#"INSERT INTO audit (time_ms, "user", action, resource, allowed, error, peer)
                       VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id"#,
                    &[
                        &(r.time_ms as i64),
                        &r.user,
                        &r.action,
                        &r.resource,
                        &r.allowed,
                        &r.error,
                        &r.peer,
                    ],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok(row.get::<_, i64>(0) as u64)
        })
    }

    fn audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StorageError> {
        self.call(move |c, e| async move {
            let rows = c
                .query(
                    r#"SELECT id, time_ms, "user", action, resource, allowed, error, peer
                       FROM audit ORDER BY id DESC LIMIT $1"#,
                    &[&i64::from(limit)],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok(rows
                .iter()
                .map(|r| AuditRecord {
                    id: r.get::<_, i64>(0) as u64,
                    time_ms: r.get::<_, i64>(1) as u64,
                    user: r.get(2),
                    action: r.get(3),
                    resource: r.get(4),
                    allowed: r.get(5),
                    error: r.get(6),
                    peer: r.get(7),
                })
                .collect())
        })
    }

    fn changes_since(&self, after: u64, limit: u32) -> Result<Changes, StorageError> {
        self.call(move |mut c, e| async move {
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|x| e.pg(x))?;
            let span = tx
                .query_one(
                    "SELECT COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM changes",
                    &[],
                )
                .await
                .map_err(|x| e.pg(x))?;
            let rows = tx
                .query(
                    "SELECT seq, kind, name, deleted, value FROM changes
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&(after as i64), &i64::from(limit)],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok(Changes {
                oldest: span.get::<_, i64>(0) as u64,
                newest: span.get::<_, i64>(1) as u64,
                changes: rows.iter().map(change).collect(),
            })
        })
    }

    fn policy_snapshot(&self) -> Result<(u64, Vec<Change>), StorageError> {
        self.call(move |mut c, e| async move {
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|x| e.pg(x))?;
            let newest: i64 = tx
                .query_one("SELECT COALESCE(MAX(seq), 0) FROM changes", &[])
                .await
                .map_err(|x| e.pg(x))?
                .get(0);
            let rows = tx
                .query(
                    "SELECT 0::BIGINT, kind, name, FALSE, value FROM resources
                     WHERE kind IN ('role', 'user', 'lock') ORDER BY kind, name",
                    &[],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok((newest as u64, rows.iter().map(change).collect()))
        })
    }

    fn append_stream_events(&self, events: &[StreamRow]) -> Result<usize, StorageError> {
        let events = events.to_vec();
        self.call(move |mut c, e| async move {
            let tx = c.transaction().await.map_err(|x| e.pg(x))?;
            let st = tx
                .prepare(
                    r#"INSERT INTO stream_events (id, time_ms, "user", data)
                       VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING"#,
                )
                .await
                .map_err(|x| e.pg(x))?;
            let mut n = 0;
            for r in &events {
                n += tx
                    .execute(&st, &[&r.id, &(r.time_ms as i64), &r.user, &r.data])
                    .await
                    .map_err(|x| e.pg(x))?;
            }
            tx.commit().await.map_err(|x| e.pg(x))?;
            Ok(n as usize)
        })
    }

    fn stream_events(
        &self,
        user: Option<&str>,
        since_ms: u64,
        limit: u32,
    ) -> Result<Vec<StreamRow>, StorageError> {
        let user = user.map(str::to_owned);
        self.call(move |c, e| async move {
            let rows = c
                .query(
                    r#"SELECT id, time_ms, "user", data FROM stream_events
                       WHERE ($1::TEXT IS NULL OR "user" = $1) AND time_ms >= $2
                       ORDER BY time_ms DESC, id DESC LIMIT $3"#,
                    &[&user, &(since_ms as i64), &i64::from(limit)],
                )
                .await
                .map_err(|x| e.pg(x))?;
            Ok(rows
                .iter()
                .map(|r| StreamRow {
                    id: r.get(0),
                    time_ms: r.get::<_, i64>(1) as u64,
                    user: r.get(2),
                    data: r.get(3),
                })
                .collect())
        })
    }
}
