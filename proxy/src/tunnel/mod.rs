//! The tunnel listener: an SSH server for agents (host certificates, `tcpip-forward`) and clients
//! (user certificates, `direct-tcpip` to `<target>.<cluster>`), and the splice between them.
//!
//! ## Layout
//! - this file: [`TunnelShared`] (what every connection sees) and the accept loop [`serve`];
//! - `conn`: one connection's life, from the SSH handshake to the end of its tunnel;
//! - `checks`: the login checks on certificates (agents and clients);
//! - `handler`: the russh handler: logins, target registration, stream requests and routing;
//! - [`splice`]: opening the agent side of a stream and passing bytes both ways;
//! - `control`: the `@control` channel;
//! - `register`: target registration (QUIC; SSH's handler applies the same rules);
//! - [`ssh_config`]: the russh server settings.

pub(crate) mod checks;
mod conn;
mod control;
mod handler;
pub(crate) mod register;
pub mod splice;

pub use splice::{SPLICE_QUEUE_CAP, splice};

use checks::{Conn, Role, reject_reason};
use conn::{ConnState, serve_conn};
use control::control;
use handler::OpenRequest;
use splice::open_stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use metrics::counter;
use russh::{MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics as m;
use crate::routing::RoutingTable;
use crate::trust::Trust;

/// Deadline for an agent to answer a `forwarded-tcpip` open.
pub(crate) const AGENT_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by every tunnel-listener connection.
pub struct TunnelShared {
    /// Which CAs each cluster trusts.
    pub trust: Trust,
    /// Live agent tunnels.
    pub routing: RoutingTable,
    /// russh server settings (host key, algorithms, keepalives).
    pub ssh_config: Arc<russh::server::Config>,
    /// Accept to login deadline.
    pub handshake_timeout: Duration,
    /// Streams per tunnel, at most.
    pub max_streams_per_tunnel: usize,
    /// The other connection limits (set after `new`; defaults are `LimitsConfig`'s).
    pub limits: crate::config::LimitsConfig,
    /// New connections per source address, this minute.
    pub connects_by_source: crate::login::Limiter,
    /// Failed logins per source address, this minute.
    pub failures_by_source: crate::login::Limiter,
    /// Seconds agents are told they have to move, on drain.
    pub grace_secs: u32,
    /// This proxy's id (control hello).
    pub proxy_id: String,
    /// Cancelled when shutdown begins: stop accepting, tell agents to drain.
    pub draining: CancellationToken,
    /// Cancelled when the grace period is over: close everything.
    pub hard_stop: CancellationToken,
    /// Every client stream's splice task.
    pub streams: TaskTracker,
    pub(crate) next_id: AtomicU64,
}

impl TunnelShared {
    /// Shared state with an empty routing table.
    pub fn new(
        trust: Trust,
        ssh_config: Arc<russh::server::Config>,
        handshake_timeout: Duration,
        max_streams_per_tunnel: usize,
        grace_secs: u32,
        proxy_id: String,
    ) -> Self {
        TunnelShared {
            trust,
            routing: RoutingTable::default(),
            ssh_config,
            handshake_timeout,
            max_streams_per_tunnel,
            limits: crate::config::LimitsConfig::default(),
            connects_by_source: crate::login::Limiter::default(),
            failures_by_source: crate::login::Limiter::default(),
            grace_secs,
            proxy_id,
            draining: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            streams: TaskTracker::new(),
            next_id: AtomicU64::new(1),
        }
    }
}

/// Accepts tunnel connections until `draining` is cancelled. Each connection gets one task,
/// tracked by `conns`; a semaphore bounds connections that have not logged in yet.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<TunnelShared>,
    max_unauthenticated: usize,
    conns: TaskTracker,
) {
    let unauthenticated = Arc::new(Semaphore::new(max_unauthenticated));
    loop {
        let permit = tokio::select! {
            _ = shared.draining.cancelled() => break,
            p = unauthenticated.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (socket, peer) = tokio::select! {
            _ = shared.draining.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "tunnel accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if let Some((limit, why)) = over_source_limits(&shared, peer) {
            info!(%peer, limit, "connection refused: {why}");
            counter!(m::LIMIT_REFUSALS, "limit" => limit).increment(1);
            // Lines before the SSH identification are allowed (RFC 4253 4.2): say why, then close.
            tokio::spawn(async move {
                let mut socket = socket;
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    use tokio::io::AsyncWriteExt;
                    let _ = socket
                        .write_all(format!("Postern: {why}\r\n").as_bytes())
                        .await;
                    let _ = socket.shutdown().await;
                })
                .await;
            });
            continue;
        }
        let shared = shared.clone();
        let span = info_span!("conn", %peer);
        conns.spawn(serve_conn(shared, socket, peer, permit).instrument(span));
    }
    debug!("tunnel listener stopped accepting");
}

/// A refusal before the handshake: too many connections, or too many failed logins, from one
/// source address this minute.
pub(crate) fn over_source_limits(
    shared: &TunnelShared,
    peer: SocketAddr,
) -> Option<(&'static str, String)> {
    let ip = peer.ip().to_string();
    let l = &shared.limits;
    if shared.failures_by_source.count(&ip) >= l.max_auth_failures_per_source_per_minute {
        return Some((
            "auth_failures_per_source",
            format!(
                "too many failed logins from {ip} (limit {} per minute): retry in a minute",
                l.max_auth_failures_per_source_per_minute
            ),
        ));
    }
    if !shared
        .connects_by_source
        .allow(&ip, l.max_connects_per_source_per_minute)
    {
        return Some((
            "connects_per_source",
            format!(
                "too many connections from {ip} (limit {} per minute): retry in a minute",
                l.max_connects_per_source_per_minute
            ),
        ));
    }
    None
}

/// The russh server config: modern algorithms, public-key login only, keepalives on.
pub fn ssh_config(
    host_key: russh::keys::PrivateKey,
    host_cert: Option<russh::keys::Certificate>,
    keepalive: Duration,
    keepalive_max: usize,
) -> russh::server::Config {
    let preferred = russh::Preferred {
        cipher: postern_dial::ssh::ciphers(),
        ..Default::default()
    };
    russh::server::Config {
        preferred,
        server_id: russh::SshId::Standard(
            format!("SSH-2.0-Postern_{}", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(200),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        certificates: host_cert.into_iter().collect(),
        max_auth_attempts: 6,
        // Liveness is keepalives, not silence: a quiet tunnel is a healthy tunnel.
        inactivity_timeout: None,
        keepalive_interval: Some(keepalive),
        keepalive_max,
        nodelay: true,
        ..Default::default()
    }
}
