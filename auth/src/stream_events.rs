//! Stream access events shipped by proxies: stored by id (a resent batch stores nothing twice),
//! listed newest first by user and time.

use rusqlite::params;

use crate::storage::{SqliteBackend, StorageError};

/// One stored stream event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRow {
    /// Unique id (proxy id and sequence).
    pub id: String,
    /// Unix milliseconds.
    pub time_ms: u64,
    /// The user.
    pub user: String,
    /// The event, protobuf-encoded (`postern.auth.v1.StreamEvent`).
    pub data: Vec<u8>,
}

impl SqliteBackend {
    /// See [`crate::storage::Backend::append_stream_events`].
    pub(crate) fn insert_stream_events(&self, rows: &[StreamRow]) -> Result<usize, StorageError> {
        self.with(|c| {
            let tx = c.transaction().map_err(self.db())?;
            let mut n = 0;
            {
                let mut st = tx
                    .prepare(
                        "INSERT OR IGNORE INTO stream_events (id, time_ms, user, data)
                         VALUES (?1, ?2, ?3, ?4)",
                    )
                    .map_err(self.db())?;
                for r in rows {
                    n += st
                        .execute(params![r.id, r.time_ms, r.user, r.data])
                        .map_err(self.db())?;
                }
            }
            tx.commit().map_err(self.db())?;
            Ok(n)
        })
    }

    /// See [`crate::storage::Backend::stream_events`].
    pub(crate) fn select_stream_events(
        &self,
        user: Option<&str>,
        since_ms: u64,
        limit: u32,
    ) -> Result<Vec<StreamRow>, StorageError> {
        self.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT id, time_ms, user, data FROM stream_events
                     WHERE (?1 IS NULL OR user = ?1) AND time_ms >= ?2
                     ORDER BY time_ms DESC, id DESC LIMIT ?3",
                )
                .map_err(self.db())?;
            let rows = st
                .query_map(params![user, since_ms, limit], |r| {
                    Ok(StreamRow {
                        id: r.get(0)?,
                        time_ms: r.get(1)?,
                        user: r.get(2)?,
                        data: r.get(3)?,
                    })
                })
                .map_err(self.db())?;
            rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
        })
    }
}
