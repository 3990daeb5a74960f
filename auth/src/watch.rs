//! `WatchPolicy`: the policy change feed as a server-streaming RPC.
//!
//! A watcher gives the last revision it applied. If the server still keeps every change after it,
//! the stream carries them in order; otherwise (a new watcher, or one too far behind) it starts
//! with a snapshot of every role, user and lock, closed by a `snapshot_end` event at the
//! snapshot's revision. Then it polls the feed every [`POLL`] and sends a heartbeat (an event with
//! no kind, at the newest revision) every [`HEARTBEAT`] when nothing changed, so a watcher can
//! tell a quiet cluster from a dead stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use postern_api::proto::{PolicyEvent, PolicyUser};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::debug;

use crate::changes::Change;
use crate::locks::StoredLock;
use crate::service::{State, StoredUser};

/// How often the feed is polled.
pub const POLL: Duration = Duration::from_millis(100);
/// Heartbeat interval on a quiet stream.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Changes read per poll, at most.
const PAGE: u32 = 1000;

/// Ends every open watch stream at once (at shutdown: a graceful server stop waits for open
/// streams, and these never end on their own).
#[derive(Debug, Clone, Default)]
pub struct Watches(tokio_util::sync::CancellationToken);

impl Watches {
    /// Ends every open watch stream; later ones end at once.
    pub fn stop(&self) {
        self.0.cancel();
    }
}

/// The stream type of the RPC.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<PolicyEvent, Status>> + Send>>;

/// Converts a stored change into an event: roles as wire roles, users as name and roles only,
/// locks as wire locks.
pub fn event(c: &Change, snapshot: bool) -> Result<PolicyEvent, Status> {
    let mut e = PolicyEvent {
        revision: c.revision,
        kind: c.kind.clone(),
        name: c.name.clone(),
        deleted: c.deleted,
        snapshot,
        ..Default::default()
    };
    if c.deleted {
        return Ok(e);
    }
    let corrupt = |e: &dyn std::fmt::Display| {
        Status::internal(format!("stored {} '{}' is corrupt: {e}", c.kind, c.name))
    };
    match c.kind.as_str() {
        "role" => {
            let doc: postern_api::resource::RoleDoc =
                serde_json::from_str(&c.value).map_err(|x| corrupt(&x))?;
            e.role = Some(postern_api::resource::from_doc(doc, 0).map_err(|x| corrupt(&x))?);
        }
        "user" => {
            let u: StoredUser = serde_json::from_str(&c.value).map_err(|x| corrupt(&x))?;
            e.user = Some(PolicyUser {
                name: c.name.clone(),
                roles: u.roles,
            });
        }
        "lock" => {
            let l: StoredLock = serde_json::from_str(&c.value).map_err(|x| corrupt(&x))?;
            e.lock = Some(l.to_proto(&c.name));
        }
        "access_request" => {
            let r: crate::requests::StoredRequest =
                serde_json::from_str(&c.value).map_err(|x| corrupt(&x))?;
            e.access_request = Some(r.to_policy(&c.name));
        }
        _ => {}
    }
    Ok(e)
}

async fn blocking<T: Send + 'static>(
    state: &Arc<State>,
    f: impl FnOnce(&State) -> T + Send + 'static,
) -> Result<T, Status> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state))
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))
}

fn storage(e: crate::storage::StorageError) -> Status {
    Status::unavailable(format!("the Auth server's storage failed: {e}"))
}

/// Sends a snapshot; returns its revision.
async fn snapshot(
    state: &Arc<State>,
    tx: &mpsc::Sender<Result<PolicyEvent, Status>>,
) -> Result<u64, Status> {
    let (rev, items) = blocking(state, |s| s.backend.policy_snapshot())
        .await?
        .map_err(storage)?;
    for c in &items {
        if tx.send(event(c, true)).await.is_err() {
            return Err(Status::cancelled("watcher gone"));
        }
    }
    let end = PolicyEvent {
        revision: rev,
        snapshot: true,
        snapshot_end: true,
        ..Default::default()
    };
    tx.send(Ok(end))
        .await
        .map_err(|_| Status::cancelled("watcher gone"))?;
    Ok(rev)
}

async fn run(
    state: Arc<State>,
    from: u64,
    tx: mpsc::Sender<Result<PolicyEvent, Status>>,
) -> Result<(), Status> {
    let mut cursor = from;
    let mut need_snapshot = from == 0;
    let mut last_sent = Instant::now();
    loop {
        if need_snapshot {
            cursor = snapshot(&state, &tx).await?;
            need_snapshot = false;
            last_sent = Instant::now();
        }
        let after = cursor;
        let page = blocking(&state, move |s| s.backend.changes_since(after, PAGE))
            .await?
            .map_err(storage)?;
        // Behind what the feed still keeps, or ahead of it (a restored database): start over.
        if cursor > page.newest || (page.oldest > 0 && cursor + 1 < page.oldest) {
            debug!(
                cursor,
                oldest = page.oldest,
                newest = page.newest,
                "watcher out of range: snapshot"
            );
            need_snapshot = true;
            continue;
        }
        for c in &page.changes {
            if tx.send(event(c, false)).await.is_err() {
                return Ok(());
            }
            cursor = c.revision;
            last_sent = Instant::now();
        }
        if page.changes.is_empty() {
            if last_sent.elapsed() >= HEARTBEAT {
                let beat = PolicyEvent {
                    revision: cursor,
                    ..Default::default()
                };
                if tx.send(Ok(beat)).await.is_err() {
                    return Ok(());
                }
                last_sent = Instant::now();
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = tx.closed() => return Ok(()),
            }
        }
    }
}

/// The event stream of one watcher that applied everything up to `from` (0: nothing yet).
pub fn stream(state: Arc<State>, from: u64) -> EventStream {
    let (tx, rx) = mpsc::channel(256);
    let stop = state.watches.0.clone();
    tokio::spawn(async move {
        let err_tx = tx.clone();
        let r = tokio::select! {
            r = run(state, from, tx) => r,
            _ = stop.cancelled() => Err(Status::unavailable("the Auth server is shutting down")),
        };
        if let Err(status) = r {
            let _ = err_tx.send(Err(status)).await;
        }
    });
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

use postern_api::proto::WatchPolicyRequest;
use postern_api::rbac::Verb;
use tonic::{Request, Response};

use crate::service::Service;

impl Service {
    /// `WatchPolicy`: role list+read and lock list+read.
    pub(crate) async fn watch_policy_rpc(
        &self,
        req: Request<WatchPolicyRequest>,
    ) -> Result<Response<crate::watch::EventStream>, Status> {
        let list_read = [Verb::List, Verb::Read];
        self.authorize(&req, "WatchPolicy", "role", "", &list_read)
            .await?;
        let caller = self
            .authorize(&req, "WatchPolicy", "lock", "", &list_read)
            .await?;
        let from = req.get_ref().from_revision;
        let stream = crate::watch::stream(self.state.clone(), from);
        self.finish(&caller, "WatchPolicy", format!("policy@{from}"), Ok(stream))
            .await
    }
}
