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

mod rpc {
    use postern_api::proto::{
        EmitStreamEventsRequest, EmitStreamEventsResponse, ListStreamEventsRequest,
        ListStreamEventsResponse, StreamEvent,
    };
    use postern_api::rbac::Verb;
    use tonic::{Request, Response, Status};

    use crate::service::{Service, storage_status};

    impl Service {
        pub(crate) async fn emit_stream_events_rpc(
            &self,
            req: Request<EmitStreamEventsRequest>,
        ) -> Result<Response<EmitStreamEventsResponse>, Status> {
            let caller = self
                .authorize(&req, "EmitStreamEvents", "event", "", &[Verb::Create])
                .await?;
            use prost::Message;
            let rows: Vec<crate::storage::StreamRow> = req
                .into_inner()
                .events
                .into_iter()
                .take(10_000)
                .filter(|e| !e.id.is_empty())
                .map(|e| crate::storage::StreamRow {
                    id: e.id.clone(),
                    time_ms: e.time_ms,
                    user: e.user.clone(),
                    data: e.encode_to_vec(),
                })
                .collect();
            let n = rows.len();
            let result = self
                .blocking(move |s| s.backend.append_stream_events(&rows))
                .await
                .and_then(|r| r.map_err(storage_status))
                .map(|stored| EmitStreamEventsResponse {
                    stored: stored as u32,
                });
            // One audit record per batch, not per event: the events are their own record.
            self.finish(
                &caller,
                "EmitStreamEvents",
                format!("event/stream x{n}"),
                result,
            )
            .await
        }

        pub(crate) async fn list_stream_events_rpc(
            &self,
            req: Request<ListStreamEventsRequest>,
        ) -> Result<Response<ListStreamEventsResponse>, Status> {
            let caller = self
                .authorize(&req, "ListStreamEvents", "event", "", &[Verb::List])
                .await?;
            let r = req.into_inner();
            let limit = match r.limit {
                0 => 100,
                n => n.min(10_000),
            };
            let result = async {
                let user = (!r.user.is_empty()).then_some(r.user);
                let rows = self
                    .blocking(move |s| s.backend.stream_events(user.as_deref(), r.since_ms, limit))
                    .await?
                    .map_err(storage_status)?;
                use prost::Message;
                let events = rows
                    .iter()
                    .map(|row| StreamEvent::decode(row.data.as_slice()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        Status::internal(format!("stored stream event is corrupt: {e}"))
                    })?;
                Ok(ListStreamEventsResponse { events })
            }
            .await;
            self.finish(&caller, "ListStreamEvents", "event/stream".into(), result)
                .await
        }
    }
}
