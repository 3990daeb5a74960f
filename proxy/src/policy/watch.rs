//! The proxy's watch of its cluster's policy: `WatchPolicy` on the cluster's Auth server, reached
//! **through the cluster's own tunnel** (a stream to target `auth` opened in-process on an agent
//! tunnel of role `auth`, with mTLS end to end from the proxy's own identity), so the proxy needs
//! no route to the isolated Auth server.
//!
//! The watch resumes from the last revision applied, so a cut stream misses nothing. A stream
//! silent for [`SILENCE`] (the server heartbeats every second) is treated as cut.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use postern_api::identity::IdentityFile;
use postern_api::proto::WatchPolicyRequest;
use postern_client::auth::{AuthClient, Dialer, Io, fixed};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tunnel_proto::names::{DEFAULT_AUTH_PORT, ROLE_AUTH};

use super::{ClusterPolicy, Registry};
use crate::metrics as m;
use crate::tunnel::TunnelShared;

/// A watch that says nothing (not even a heartbeat) for this long is reconnected.
pub const SILENCE: Duration = Duration::from_secs(5);
/// Longest wait between reconnects.
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Why one watch attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The identity file is missing or unusable.
    #[error("proxy identity {path}: {reason}")]
    Identity {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No connection to the Auth server through the tunnel.
    #[error("{0}")]
    Connect(String),
    /// The stream failed or went silent.
    #[error("watch stream: {0}")]
    Stream(String),
    /// The proxy's identity was renewed: reconnect with it (not a failure).
    #[error("the proxy's Auth identity was renewed")]
    Renewed,
}

/// What a watcher needs.
pub struct Watcher {
    /// The cluster's policy, fed by this watcher.
    pub policy: Arc<ClusterPolicy>,
    /// The proxy's identity file for this cluster (re-read at every attempt).
    pub identity_file: PathBuf,
    /// Live tunnels: the Auth server is reached through one that serves `auth`.
    pub shared: Arc<TunnelShared>,
    /// Closes what a policy change forbids.
    pub registry: Arc<Registry>,
}

impl Watcher {
    /// Watches until `stop`, reconnecting with a short back-off; meanwhile ends elevations on
    /// time (see [`Watcher::end_elevations`]).
    pub async fn run(self, stop: CancellationToken) {
        tokio::join!(self.watch(&stop), self.end_elevations(&stop));
    }

    /// Re-decides what is open at each elevation's end (the soonest approved access request's
    /// `expires`), whether or not the watch is connected: an end is known in advance.
    async fn end_elevations(&self, stop: &CancellationToken) {
        let mut changed = self.policy.cache.subscribe();
        loop {
            let wait = until_unix(self.policy.cache.next_elevation_end());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {
                    let closed = self.registry.enforce(&self.policy);
                    debug!(cluster = %self.policy.cluster, closed, "an elevation ended");
                }
                r = changed.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn watch(&self, stop: &CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut last_error = String::new();
        loop {
            let attempt = self.watch_once(stop);
            let r = tokio::select! {
                r = attempt => r,
                _ = stop.cancelled() => return,
            };
            match r {
                Ok(()) => return,
                Err(WatchError::Renewed) => {
                    debug!(cluster = %self.policy.cluster, "Auth identity renewed: the policy watch reconnects with it");
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Err(e) => {
                    let e = e.to_string();
                    counter!(m::POLICY_WATCH_ERRORS, "cluster" => self.policy.cluster.clone())
                        .increment(1);
                    if e != last_error {
                        warn!(cluster = %self.policy.cluster, error = %e, "policy watch interrupted: retrying (the last known policy stays in force for stale_after_secs)");
                        last_error = e;
                    } else {
                        debug!(cluster = %self.policy.cluster, error = %e, "policy watch retry");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }

    async fn watch_once(&self, stop: &CancellationToken) -> Result<(), WatchError> {
        let mut renewed = self
            .shared
            .identity_renewals
            .subscribe(&self.policy.cluster);
        let client = connect(&self.policy.cluster, &self.identity_file, &self.shared).await?;
        let from = self.policy.cache.revision();
        let mut stream = client
            .rpc()
            .watch_policy(WatchPolicyRequest {
                from_revision: from,
            })
            .await
            .map_err(|s| WatchError::Stream(s.message().to_string()))?
            .into_inner();
        info!(cluster = %self.policy.cluster, from_revision = from, user = %client.user, "watching the cluster's policy");
        loop {
            let next = tokio::select! {
                n = tokio::time::timeout(SILENCE, stream.message()) => n,
                _ = renewed.changed() => return Err(WatchError::Renewed),
                _ = stop.cancelled() => return Ok(()),
            };
            match next {
                Ok(Ok(Some(ev))) => {
                    let snapshots = self.policy.cache.snapshots();
                    if self.policy.cache.apply(ev) {
                        let cluster = self.policy.cluster.clone();
                        if self.policy.cache.snapshots() > snapshots {
                            counter!(m::POLICY_SNAPSHOTS, "cluster" => cluster.clone())
                                .increment(1);
                        }
                        gauge!(m::POLICY_REVISION, "cluster" => cluster)
                            .set(self.policy.cache.revision() as f64);
                        let closed = self.registry.enforce(&self.policy);
                        debug!(cluster = %self.policy.cluster, revision = self.policy.cache.revision(), closed, "policy updated");
                    }
                }
                Ok(Ok(None)) => return Err(WatchError::Stream("ended by the server".into())),
                Ok(Err(s)) => return Err(WatchError::Stream(s.message().to_string())),
                Err(_) => {
                    return Err(WatchError::Stream(format!(
                        "silent for {}s",
                        SILENCE.as_secs()
                    )));
                }
            }
        }
    }
}

/// How long until unix second `at` has begun (a year when `None`).
fn until_unix(at: Option<u64>) -> Duration {
    let Some(at) = at else {
        return Duration::from_secs(365 * 24 * 3600);
    };
    let end = std::time::UNIX_EPOCH + Duration::from_secs(at);
    end.duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// Opens streams to target `auth` of `cluster` on this proxy's own tunnels.
fn dialer(cluster: &str, shared: &Arc<TunnelShared>) -> Dialer {
    let shared = shared.clone();
    let cluster = cluster.to_owned();
    Arc::new(move || {
        let (shared, cluster) = (shared.clone(), cluster.clone());
        Box::pin(async move {
            let tunnel = shared
                .routing
                .pick(&cluster, ROLE_AUTH)
                .map_err(std::io::Error::other)?;
            let io = tunnel
                .link
                .open_io(
                    ROLE_AUTH,
                    u32::from(DEFAULT_AUTH_PORT),
                    "127.0.0.1",
                    0,
                    crate::tunnel::AGENT_OPEN_TIMEOUT,
                )
                .await
                .map_err(std::io::Error::other)?;
            Ok(Box::new(io) as Box<dyn Io>)
        })
    })
}

/// Connects to `cluster`'s Auth API through this proxy's own tunnel, with the proxy's identity
/// (re-read from `identity_file` at every call, so a renewed file is picked up).
pub async fn connect(
    cluster: &str,
    identity_file: &std::path::Path,
    shared: &Arc<TunnelShared>,
) -> Result<AuthClient, WatchError> {
    let path = identity_file.display().to_string();
    let id = IdentityFile::load(identity_file).map_err(|e| WatchError::Identity {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let loaded =
        postern_client::credentials::from_identity(&id, "proxy identity").map_err(|e| {
            WatchError::Identity {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
    let what = format!("auth.{cluster} through this proxy's own tunnel");
    AuthClient::over_dialer(fixed(loaded), &what, dialer(cluster, shared))
        .await
        .map_err(|e| WatchError::Connect(e.to_string()))
}
