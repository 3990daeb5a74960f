//! Ships a cluster's spooled stream events to its Auth server (`EmitStreamEvents`), through the
//! cluster's own tunnel like the policy watch, in batches of at most [`BATCH`]. A segment is
//! deleted only after every batch of it was stored; until then it stays on disk, across Auth
//! outages and proxy restarts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use postern_api::proto::EmitStreamEventsRequest;
use postern_client::auth::AuthClient;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Spool;
use crate::metrics as m;
use crate::tunnel::TunnelShared;

/// Events per `EmitStreamEvents` call, at most.
pub const BATCH: usize = 500;
/// The longest an event waits in the current segment before it is shipped.
const FLUSH: Duration = Duration::from_millis(500);

/// Ships one cluster's spool.
pub struct Shipper {
    /// The cluster.
    pub cluster: String,
    /// Its spool.
    pub spool: Arc<Spool>,
    /// The proxy's identity for the cluster.
    pub identity_file: PathBuf,
    /// The tunnels (the Auth server is reached through one serving `auth`).
    pub shared: Arc<TunnelShared>,
}

impl Shipper {
    /// Ships until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut client: Option<AuthClient> = None;
        let mut backoff = Duration::from_millis(200);
        let mut renewed = self.shared.identity_renewals.subscribe(&self.cluster);
        loop {
            tokio::select! {
                _ = self.spool.appended.notified() => {
                    // Let a burst gather into one batch.
                    tokio::time::sleep(FLUSH).await;
                }
                _ = tokio::time::sleep(FLUSH) => {}
                _ = stop.cancelled() => return,
            }
            // A renewed identity: the next batch connects with it.
            if renewed.has_changed().unwrap_or(false) {
                renewed.mark_unchanged();
                client = None;
            }
            self.spool.rotate();
            match self.ship_closed(&mut client).await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    client = None;
                    counter!(m::AUDIT_SHIP_ERRORS, "cluster" => self.cluster.clone()).increment(1);
                    debug!(cluster = %self.cluster, error = %e, "audit shipping deferred");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn ship_closed(&self, client: &mut Option<AuthClient>) -> Result<(), String> {
        let closed = self.spool.closed().map_err(|e| e.to_string())?;
        for path in closed {
            let events = super::spool::read(&path).map_err(|e| e.to_string())?;
            for chunk in events.chunks(BATCH) {
                if client.is_none() {
                    *client = Some(
                        crate::policy::watch::connect(
                            &self.cluster,
                            &self.identity_file,
                            &self.shared,
                        )
                        .await
                        .map_err(|e| e.to_string())?,
                    );
                }
                let c = client.as_ref().expect("connected above");
                c.emit_stream_events(EmitStreamEventsRequest {
                    events: chunk.to_vec(),
                })
                .await
                .map_err(|e| e.to_string())?;
                counter!(m::AUDIT_SHIPPED, "cluster" => self.cluster.clone())
                    .increment(chunk.len() as u64);
            }
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), error = %e, "shipped audit segment not removed: it will be resent (the Auth server skips duplicates)");
            }
        }
        Ok(())
    }
}
