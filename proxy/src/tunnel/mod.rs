//! The tunnel listener: an SSH server for agents (host certificates, `tcpip-forward`) and clients
//! (user certificates, `direct-tcpip` to `<target>.<cluster>`), and the splice between them.
//!
//! ## Layout
//! - this file: [`TunnelShared`] (what every connection sees) and the accept loop [`serve`];
//! - `conn`: one connection's life, from the SSH handshake to the end of its tunnel;
//! - `checks`: the login checks (certificates, policy, locks), for both transports;
//! - `register`: target registration, for both transports;
//! - `handler`: the russh handler: logins, target registration, stream requests;
//! - `streams`: a client's stream request decided (limits, route, policy), for both transports;
//! - [`splice`]: opening the agent side of a stream and passing bytes both ways;
//! - `control`: the `@control` channel;
//! - [`ssh_config`]: the russh server settings.

pub mod admission;
pub(crate) mod checks;
mod conn;
pub(crate) mod control;
mod handler;
pub(crate) mod register;
pub mod splice;
pub(crate) mod streams;

pub use splice::{Credits, SPLICE_QUEUE_CAP, queue_cap, splice};

use postern_dial::accept::{AcceptLimits, Acceptor, Slot as AcceptSlot};

use checks::{Conn, Role, reject_reason};
use conn::{ConnState, serve_conn};
use control::control;
pub(crate) use handler::OpenRequest;
use splice::{ClientEnd, open_stream};
use streams::ClientView;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use metrics::counter;
use russh::{MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

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
    /// russh server settings (host key and certificate, algorithms, keepalives), read at each
    /// accept: a renewed host certificate ([`crate::renewal`]) is used by the next connection.
    ssh_config: std::sync::RwLock<Arc<russh::server::Config>>,
    /// Accept to login deadline.
    pub handshake_timeout: Duration,
    /// Streams per tunnel, at most.
    pub max_streams_per_tunnel: usize,
    /// The other connection limits (set after `new`; defaults are `LimitsConfig`'s).
    pub limits: crate::config::LimitsConfig,
    /// New connections per source address, this minute.
    pub connects_by_source: crate::rate::RateLimit,
    /// Identities (login names) that failed to log in from each source address, this minute:
    /// one identity counts once however often it retries, so one misconfigured agent cannot
    /// lock its neighbours out; many different identities failing from one address do.
    pub failures_by_source: crate::rate::FailureCount,
    /// Failed logins per (source address, login name), this minute: past the limit that
    /// identity's logins from that address are refused, and nobody else's.
    pub failures_by_identity: crate::rate::FailureCount,
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
    /// Pre-login slots, shared fairly across sources.
    pub pre_login: Arc<admission::PreLogin>,
    /// Streams per user and target.
    pub user_streams: Arc<admission::UserStreams>,
    /// Whose PROXY headers to believe (set after `new`; off by default).
    pub proxy_protocol: crate::proxy_protocol::Policy,
    /// Each cluster's policy and the live connections it governs (set after `new`).
    pub policies: Arc<crate::policy::Policies>,
    /// The stream access audit (set after `new`).
    pub audit: Arc<crate::audit::StreamAudit>,
    /// Each cluster's proxy set, sent to agents on `@control` (set after `new`).
    pub peers: Arc<crate::peers::Peers>,
    /// The next tunnel id (both transports draw from it).
    pub(crate) next_id: AtomicU64,
    /// Renewals of the proxy's Auth identities: Auth connections reconnect after one.
    pub identity_renewals: crate::policy::identity::Renewals,
}

impl TunnelShared {
    /// The SSH server settings new connections use.
    pub fn ssh_config(&self) -> Arc<russh::server::Config> {
        self.ssh_config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the SSH server settings for new connections (open ones keep theirs).
    pub fn set_ssh_config(&self, config: Arc<russh::server::Config>) {
        *self.ssh_config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

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
            ssh_config: std::sync::RwLock::new(ssh_config),
            handshake_timeout,
            max_streams_per_tunnel,
            limits: crate::config::LimitsConfig::default(),
            connects_by_source: crate::rate::RateLimit::per_minute(
                crate::config::LimitsConfig::default().max_connects_per_source_per_minute,
            ),
            failures_by_source: crate::rate::FailureCount::default(),
            failures_by_identity: crate::rate::FailureCount::default(),
            grace_secs,
            proxy_id,
            draining: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            streams: TaskTracker::new(),
            pre_login: Arc::default(),
            user_streams: Arc::default(),
            proxy_protocol: Default::default(),
            policies: Arc::default(),
            audit: Arc::default(),
            peers: Arc::default(),
            next_id: AtomicU64::new(1),
            identity_renewals: Default::default(),
        }
    }

    /// Sets the connection limits, rebuilding the per-source connection limiter at the new rate.
    pub fn set_limits(&mut self, limits: crate::config::LimitsConfig) {
        self.connects_by_source =
            crate::rate::RateLimit::per_minute(limits.max_connects_per_source_per_minute);
        self.limits = limits;
    }
}

/// Accepts tunnel connections until `draining` is cancelled. Each connection gets one task,
/// tracked by `conns`, and a pre-login slot until it logs in (see [`admission`]: at most
/// `max_unauthenticated`, shared fairly across source addresses).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<TunnelShared>,
    max_unauthenticated: usize,
    conns: TaskTracker,
) {
    // Back-off on accept errors and a descriptor reserve, so that running out of descriptors
    // sheds connections here instead of starving the other listeners; the caps are the
    // pre-login pool's (below), not the acceptor's.
    let mut acceptor = Acceptor::new(
        listener,
        "tunnel",
        AcceptLimits {
            max_connections: usize::MAX,
            max_per_source: usize::MAX,
        },
    );
    loop {
        let accepted = tokio::select! {
            _ = shared.draining.cancelled() => break,
            r = acceptor.accept() => match r {
                Ok(a) => a,
                Err(refused) => {
                    let limit = format!("tunnel_{}", refused.reason.label());
                    counter!(m::LIMIT_REFUSALS, "limit" => limit).increment(1);
                    continue;
                }
            },
        };
        let (socket, peer, held) = (accepted.stream, accepted.peer, accepted.slot);
        if shared.proxy_protocol.trusts(peer.ip()) {
            // A trusted balancer: the client's own address comes in the PROXY header, and the
            // limits apply to it.
            let (shared, tracker) = (shared.clone(), conns.clone());
            conns.spawn(async move {
                let mut socket = socket;
                let deadline = shared.handshake_timeout;
                match shared
                    .proxy_protocol
                    .source(&mut socket, peer, deadline)
                    .await
                {
                    Ok(client) => admit(
                        shared,
                        (socket, held),
                        client,
                        max_unauthenticated,
                        &tracker,
                        false,
                    ),
                    Err(r) => refuse_header(peer, &r),
                }
            });
        } else {
            admit(
                shared.clone(),
                (socket, held),
                peer,
                max_unauthenticated,
                &conns,
                true,
            );
        }
    }
    debug!("tunnel listener stopped accepting");
}

/// A PROXY header refused: logged and counted, the connection dropped.
fn refuse_header(peer: SocketAddr, r: &crate::proxy_protocol::Refusal) {
    info!(%peer, reason = r.reason(), "connection refused: {r}");
    counter!(m::CONNECTIONS_DROPPED, "reason" => r.reason()).increment(1);
}

/// Applies the per-source limits and pre-login admission to a connection from `peer`, then
/// serves it in a task of its own (or says why not and closes it). `direct` is a connection that
/// did not come through a trusted balancer: it may not start with a PROXY header.
fn admit(
    shared: Arc<TunnelShared>,
    (socket, held): (TcpStream, AcceptSlot),
    peer: SocketAddr,
    max_unauthenticated: usize,
    conns: &TaskTracker,
    direct: bool,
) {
    let slot = match admit_pre_login(&shared, peer, max_unauthenticated) {
        Ok(slot) => slot,
        Err((_, why)) => {
            // Lines before the SSH identification are allowed (RFC 4253 4.2): say why, then close.
            conns.spawn(async move {
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
            return;
        }
    };
    let span = info_span!("conn", %peer);
    conns.spawn(
        async move {
            let mut socket = socket;
            let _held = held;
            // Nobody but a trusted balancer may send a PROXY header (this connection is not
            // from one): refuse one rather than take it for SSH garbage.
            if direct && shared.proxy_protocol.enabled() {
                let deadline = shared.handshake_timeout;
                if let Err(r) = shared
                    .proxy_protocol
                    .source(&mut socket, peer, deadline)
                    .await
                {
                    return refuse_header(peer, &r);
                }
            }
            serve_conn(shared, socket, peer, slot).await
        }
        .instrument(span),
    );
}

/// The admission of a new connection from `peer`, either transport: the per-source limits, then a
/// pre-login slot (see [`admission`]). A refusal is `(limit label, reason)`, logged and counted
/// here.
pub(crate) fn admit_pre_login(
    shared: &TunnelShared,
    peer: SocketAddr,
    max_unauthenticated: usize,
) -> Result<admission::Slot, (&'static str, String)> {
    let admitted = over_source_limits(shared, peer).map_or_else(
        || {
            shared
                .pre_login
                .admit(
                    peer.ip(),
                    max_unauthenticated,
                    shared.limits.max_unauthenticated_per_source,
                )
                .map_err(|admission::Refusal::PerSource { limit }| {
                    (
                        "unauthenticated_per_source",
                        format!(
                            "too many connections from {} still logging in (limit {limit}): \
                             retry when they are done",
                            peer.ip()
                        ),
                    )
                })
        },
        Err,
    );
    match admitted {
        Ok((slot, evicted)) => {
            if evicted {
                debug!(%peer, "pre-login pool full: dropped the oldest connection of the busiest source");
            }
            Ok(slot)
        }
        Err((limit, why)) => {
            info!(%peer, limit, "connection refused: {why}");
            counter!(m::LIMIT_REFUSALS, "limit" => limit).increment(1);
            Err((limit, why))
        }
    }
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
                "too many identities failed to log in from {ip} (limit {} per minute): retry in a minute",
                l.max_auth_failures_per_source_per_minute
            ),
        ));
    }
    if !shared.connects_by_source.allow(&ip) {
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
            format!(
                "SSH-2.0-Postern_{} {}",
                env!("CARGO_PKG_VERSION"),
                tunnel_proto::credit::CREDIT_ID_TAG
            )
            .into(),
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
