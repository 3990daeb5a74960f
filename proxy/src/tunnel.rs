//! The tunnel listener: an SSH server for agents (host certificates, `tcpip-forward`) and clients
//! (user certificates, `direct-tcpip` to `<target>.<cluster>`), and the splice between them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use metrics::{counter, gauge, histogram};
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
use russh::{Channel, ChannelMsg, ChannelOpenFailure, Disconnect, MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};
use tunnel_proto::certs::{
    CertError, Certificate, check_agent_cert, check_user_cert, signer_fingerprint,
};
use tunnel_proto::control::Message;
use tunnel_proto::names::{
    AGENT_LOGIN_PREFIX, CONTROL_HOST, NameError, StreamTarget, validate_label,
};

use crate::metrics as m;
use crate::routing::{RoutingTable, Tunnel};
use crate::trust::Trust;
use postern_dial::write_behind::{WRITE_BEHIND_CAP, WriteBehind};

/// Deadline for an agent to answer a `forwarded-tcpip` open.
const AGENT_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

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
    next_id: AtomicU64,
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
fn over_source_limits(shared: &TunnelShared, peer: SocketAddr) -> Option<(&'static str, String)> {
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

/// What the connection task and the russh handler both see.
#[derive(Default)]
struct ConnState {
    /// Signalled once login succeeded.
    authed: Notify,
    /// Signalled when a certificate was refused: the task closes the connection.
    refused: Notify,
    /// The agent's tunnel, once it registered a target.
    tunnel: OnceLock<Arc<Tunnel>>,
    /// Whether a login attempt reached Postern's own checks.
    attempt_seen: AtomicBool,
    /// Whether the login was an agent's.
    is_agent: AtomicBool,
    /// Whether the client finished key exchange and asked for user authentication.
    auth_started: AtomicBool,
}

/// Cuts a connection under russh's feet: shutting the duplicate down ends the session's reads.
struct Killer(std::net::TcpStream);

impl Killer {
    fn cancel(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Splits an accepted socket into the one russh gets and a duplicate kept to cut it.
fn duplicate(socket: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std = socket.into_std()?;
    let dup = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, dup))
}

async fn serve_conn(
    shared: Arc<TunnelShared>,
    socket: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let _ = socket.set_nodelay(true);
    let state = Arc::new(ConnState::default());
    let handler = Conn {
        shared: shared.clone(),
        peer,
        state: state.clone(),
        role: None,
        client_streams: Arc::default(),
    };
    let deadline = tokio::time::Instant::now() + shared.handshake_timeout;
    // A duplicate of the socket lets this task cut the connection from outside russh: a session
    // stuck mid key exchange would not act on a disconnect message. (An earlier version wrapped
    // the socket in a cancellable reader instead; polling a cancellation future on every read
    // stalled busy sessions.)
    let (socket, killer) = match duplicate(socket) {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "cannot prepare accepted socket");
            return;
        }
    };
    let kill = Killer(killer);
    let session = match tokio::time::timeout_at(
        deadline,
        russh::server::run_stream(
            shared.ssh_config.clone(),
            WriteBehind::new(socket, WRITE_BEHIND_CAP),
            handler,
        ),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %e, "not an SSH client");
            counter!(m::CONNECTIONS_DROPPED, "reason" => "protocol").increment(1);
            return;
        }
        Err(_) => {
            info!("closed: no SSH identification before the handshake timeout");
            counter!(m::CONNECTIONS_DROPPED, "reason" => "handshake_timeout").increment(1);
            return;
        }
    };
    let handle = session.handle();
    tokio::pin!(session);
    // Say why (queued behind russh's auth-rejection delay), then give the session up to a
    // second to send it and end; the caller then cuts the socket in case it did not.
    let close = |why: &'static str| {
        let handle = handle.clone();
        async move {
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                handle.disconnect(Disconnect::ByApplication, why.into(), String::new()),
            )
            .await;
        }
    };
    let ssh_layer_refusal = || {
        let refused = state.auth_started.load(Ordering::Relaxed)
            && !state.attempt_seen.load(Ordering::Relaxed);
        if refused {
            // russh refuses expired, not-yet-valid and badly signed certificates before
            // calling Postern: all we learn is that a login started and never reached us.
            warn!(
                reason = "rejected_by_ssh_layer",
                "login refused: certificate expired, not yet valid or badly signed"
            );
            counter!(m::AUTH_FAILURES, "reason" => "rejected_by_ssh_layer").increment(1);
        }
        refused
    };
    tokio::select! {
        r = &mut session => {
            if let Err(e) = r {
                debug!(error = %e, "session ended before login");
            }
            if !ssh_layer_refusal() {
                counter!(m::CONNECTIONS_DROPPED, "reason" => "protocol").increment(1);
            }
            return;
        }
        _ = state.authed.notified() => {}
        _ = state.refused.notified() => {
            close("certificate refused").await;
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut session).await;
            kill.cancel();
            return;
        }
        _ = tokio::time::sleep_until(deadline) => {
            ssh_layer_refusal();
            info!("closed: login not completed before the handshake timeout");
            counter!(m::CONNECTIONS_DROPPED, "reason" => "handshake_timeout").increment(1);
            close("handshake timeout").await;
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut session).await;
            kill.cancel();
            return;
        }
    }
    drop(permit);
    let role = if state.tunnel.get().is_some() || state.is_agent.load(Ordering::Relaxed) {
        "agent"
    } else {
        "client"
    };
    histogram!(m::HANDSHAKE_SECONDS, "role" => role).record(started.elapsed().as_secs_f64());
    let result = tokio::select! {
        r = &mut session => r.map_err(|e| e.to_string()),
        _ = shared.hard_stop.cancelled() => {
            close("proxy shutting down").await;
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut session).await;
            kill.cancel();
            Err("shutdown".into())
        }
    };
    if let Some(t) = state.tunnel.get() {
        shared.routing.remove(&t.cluster, t.id);
        gauge!(m::TUNNELS_CONNECTED, "cluster" => t.cluster.clone())
            .set(shared.routing.count(&t.cluster) as f64);
        let reason = match &result {
            Ok(()) => "closed",
            Err(e) if e == "shutdown" => "shutdown",
            Err(_) => "error",
        };
        counter!(m::TUNNEL_DISCONNECTS, "cluster" => t.cluster.clone(), "reason" => reason)
            .increment(1);
        info!(cluster = %t.cluster, host_id = %t.host_id, reason, uptime_s = started.elapsed().as_secs(), "tunnel closed");
    } else if let Err(e) = result {
        debug!(error = %e, "session ended");
    }
}

/// Who a logged-in connection is.
enum Role {
    /// An agent with an accepted host certificate.
    Agent { host_id: String, cluster: String },
    /// A client with an accepted user certificate of `cluster`.
    Client { user: String, cluster: String },
}

/// The russh handler of one tunnel-listener connection.
struct Conn {
    shared: Arc<TunnelShared>,
    peer: SocketAddr,
    state: Arc<ConnState>,
    role: Option<Role>,
    /// Streams this client connection holds open now.
    client_streams: Arc<AtomicUsize>,
}

fn reject_reason(code: ChannelOpenFailure, reason: impl Into<String>) -> ChannelOpenFailure {
    ChannelOpenFailure::Other {
        code: code.code(),
        reason: reason.into(),
    }
}

impl Conn {
    fn refuse(&self, login: &str, reason: &'static str, detail: &str) -> Auth {
        warn!(peer = %self.peer, login, reason, detail, "login refused");
        counter!(m::AUTH_FAILURES, "reason" => reason).increment(1);
        self.shared
            .failures_by_source
            .allow(&self.peer.ip().to_string(), u32::MAX);
        self.state.refused.notify_one();
        Auth::Reject {
            proceed_with_methods: Some(MethodSet::empty()),
            partial_success: false,
        }
    }

    fn check(&self, login: &str, cert: &Certificate) -> Result<Role, (&'static str, String)> {
        let now = crate::mint::now_unix();
        let cert_err = |e: CertError| (e.reason(), e.to_string());
        if let Some(principal) = login.strip_prefix(AGENT_LOGIN_PREFIX) {
            let (host_id, cluster) = principal.split_once('.').ok_or((
                "bad_login",
                format!("agent login '{login}' is not @agent/<host-id>.<cluster>"),
            ))?;
            validate_label("host id", host_id).map_err(|e| ("bad_login", e.to_string()))?;
            let trust = self.shared.trust.cluster(cluster).ok_or((
                "unknown_cluster",
                format!("this proxy does not serve cluster '{cluster}'"),
            ))?;
            check_agent_cert(cert, host_id, cluster, now, &trust.host_cas).map_err(cert_err)?;
            Ok(Role::Agent {
                host_id: host_id.to_owned(),
                cluster: cluster.to_owned(),
            })
        } else {
            let signer = signer_fingerprint(cert);
            let Some((cluster, trust)) = self.shared.trust.cluster_of_user_ca(&signer) else {
                // Maybe a host certificate of a known host CA: say so precisely.
                if self.shared.trust.is_host_ca(&signer) {
                    return Err(cert_err(CertError::WrongType {
                        expected: "user",
                        got: "host",
                    }));
                }
                return Err(cert_err(CertError::UntrustedCa(signer.to_string())));
            };
            check_user_cert(cert, login, now, &trust.user_cas).map_err(cert_err)?;
            Ok(Role::Client {
                user: login.to_owned(),
                cluster: cluster.to_owned(),
            })
        }
    }

    /// Gets or creates this agent connection's tunnel.
    fn tunnel(&self, session: &Session) -> Option<Arc<Tunnel>> {
        let Some(Role::Agent { host_id, cluster }) = &self.role else {
            return None;
        };
        Some(
            self.state
                .tunnel
                .get_or_init(|| {
                    Arc::new(Tunnel::new(
                        self.shared.next_id.fetch_add(1, Ordering::Relaxed),
                        host_id.clone(),
                        cluster.clone(),
                        self.peer.to_string(),
                        session.handle(),
                    ))
                })
                .clone(),
        )
    }
}

impl Handler for Conn {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        self.state.auth_started.store(true, Ordering::Relaxed);
        Ok(None)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.state.attempt_seen.store(true, Ordering::Relaxed);
        // A plain key may be one of several a client tries before its certificate: refuse it
        // without closing; the handshake timeout and max_auth_attempts bound the retries.
        warn!(peer = %self.peer, login = user, reason = "no_certificate", "login refused: plain public key without a certificate");
        counter!(m::AUTH_FAILURES, "reason" => "no_certificate").increment(1);
        Ok(Auth::Reject {
            proceed_with_methods: None,
            partial_success: false,
        })
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        self.state.attempt_seen.store(true, Ordering::Relaxed);
        match self.check(user, certificate) {
            Ok(role) => {
                let (kind, who) = match &role {
                    Role::Agent { host_id, cluster } => ("agent", format!("{host_id}.{cluster}")),
                    Role::Client { user, cluster } => ("client", format!("{user}@{cluster}")),
                };
                info!(peer = %self.peer, role = kind, who, "login accepted");
                self.state
                    .is_agent
                    .store(matches!(role, Role::Agent { .. }), Ordering::Relaxed);
                self.role = Some(role);
                self.state.authed.notify_one();
                Ok(Auth::Accept)
            }
            Err((reason, detail)) => Ok(self.refuse(user, reason, &detail)),
        }
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        _port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(tunnel) = self.tunnel(session) else {
            warn!(peer = %self.peer, target = address, "tcpip-forward refused: only agents register targets");
            return Ok(false);
        };
        if let Err(e) = validate_label("target", address) {
            warn!(cluster = %tunnel.cluster, host_id = %tunnel.host_id, error = %e, "tcpip-forward refused");
            return Ok(false);
        }
        let registered = self.shared.routing.all().iter().any(|t| t.id == tunnel.id);
        if !registered
            && self.shared.routing.count(&tunnel.cluster)
                >= self.shared.limits.max_tunnels_per_cluster
        {
            warn!(
                cluster = %tunnel.cluster,
                host_id = %tunnel.host_id,
                limit = self.shared.limits.max_tunnels_per_cluster,
                "tcpip-forward refused: the cluster is at its tunnel limit on this proxy"
            );
            counter!(m::LIMIT_REFUSALS, "limit" => "tunnels_per_cluster").increment(1);
            return Ok(false);
        }
        tunnel.add_target(address);
        let first = self.shared.routing.insert(tunnel.clone());
        if first {
            counter!(m::TUNNEL_CONNECTS, "cluster" => tunnel.cluster.clone()).increment(1);
            info!(cluster = %tunnel.cluster, host_id = %tunnel.host_id, peer = %self.peer, "tunnel up");
        }
        gauge!(m::TUNNELS_CONNECTED, "cluster" => tunnel.cluster.clone())
            .set(self.shared.routing.count(&tunnel.cluster) as f64);
        info!(cluster = %tunnel.cluster, host_id = %tunnel.host_id, target = address, "target registered");
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        _port: u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self
            .tunnel(session)
            .is_some_and(|t| t.remove_target(address)))
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        match &self.role {
            Some(Role::Agent { host_id, cluster }) => {
                if host_to_connect != CONTROL_HOST {
                    reply
                        .reject(reject_reason(
                            ChannelOpenFailure::AdministrativelyProhibited,
                            "agents may only open @control",
                        ))
                        .await;
                    return Ok(());
                }
                reply.accept().await;
                let span = info_span!("control", %cluster, %host_id);
                self.shared
                    .streams
                    .spawn(control(channel, self.shared.clone()).instrument(span));
            }
            Some(Role::Client { user, cluster }) => {
                let max = self.shared.limits.max_streams_per_client;
                if self.client_streams.load(Ordering::Relaxed) >= max {
                    let why = format!("too many open streams on this connection (limit {max})");
                    info!(user = %user, why, "stream refused");
                    counter!(m::STREAM_OPENS, "result" => "limit").increment(1);
                    counter!(m::LIMIT_REFUSALS, "limit" => "streams_per_client").increment(1);
                    reply
                        .reject(reject_reason(ChannelOpenFailure::ConnectFailed, why))
                        .await;
                    return Ok(());
                }
                let open = OpenRequest {
                    user: user.clone(),
                    cluster: cluster.clone(),
                    host: host_to_connect.to_owned(),
                    port: port_to_connect,
                    originator: (originator_address.to_owned(), originator_port),
                };
                match self.route(&open) {
                    Ok((tunnel, target)) => {
                        let span = info_span!("stream", user = %open.user, cluster = %target.cluster, target = %target.target, host_id = %tunnel.host_id);
                        let shared = self.shared.clone();
                        let held = StreamSlot::take(self.client_streams.clone());
                        self.shared.streams.spawn(
                            async move {
                                let _held = held;
                                open_stream(shared, tunnel, target, open, channel, reply).await
                            }
                            .instrument(span),
                        );
                    }
                    Err((result, why)) => {
                        info!(user = %open.user, host = %open.host, result, why, "stream refused");
                        counter!(m::STREAM_OPENS, "result" => result).increment(1);
                        reply
                            .reject(reject_reason(ChannelOpenFailure::ConnectFailed, why))
                            .await;
                    }
                }
            }
            None => {
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await
            }
        }
        Ok(())
    }
}

/// One of a client connection's open streams; dropping it frees the slot.
struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn take(count: Arc<AtomicUsize>) -> StreamSlot {
        count.fetch_add(1, Ordering::Relaxed);
        StreamSlot(count)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's `direct-tcpip` request.
struct OpenRequest {
    user: String,
    cluster: String,
    host: String,
    port: u32,
    originator: (String, u32),
}

impl Conn {
    /// Resolves a client's request to a tunnel, or a `(result label, reason)` refusal.
    fn route(
        &self,
        open: &OpenRequest,
    ) -> Result<(Arc<Tunnel>, StreamTarget), (&'static str, String)> {
        let target = StreamTarget::parse(&open.host).map_err(|e| {
            let label = match e {
                NameError::RawAddress(_) => "raw_address",
                _ => "bad_target",
            };
            (label, e.to_string())
        })?;
        if self.shared.trust.cluster(&target.cluster).is_none() {
            return Err((
                "unknown_cluster",
                format!(
                    "unknown cluster {}: this proxy does not route to it",
                    target.cluster
                ),
            ));
        }
        if target.cluster != open.cluster {
            return Err((
                "forbidden",
                format!(
                    "user {} of cluster {} may not reach cluster {}",
                    open.user, open.cluster, target.cluster
                ),
            ));
        }
        let tunnel = self
            .shared
            .routing
            .pick(&target.cluster, &target.target)
            .map_err(|e| (e.result(), e.to_string()))?;
        if tunnel.active_streams.load(Ordering::Relaxed) >= self.shared.max_streams_per_tunnel {
            return Err((
                "limit",
                format!(
                    "tunnel of cluster {} is at its stream limit",
                    target.cluster
                ),
            ));
        }
        Ok((tunnel, target))
    }
}

/// Opens the agent side of a stream, answers the client, then splices.
async fn open_stream(
    shared: Arc<TunnelShared>,
    tunnel: Arc<Tunnel>,
    target: StreamTarget,
    open: OpenRequest,
    client: Channel<Msg>,
    reply: ChannelOpenHandle,
) {
    let agent = tokio::time::timeout(
        AGENT_OPEN_TIMEOUT,
        tunnel.handle.channel_open_forwarded_tcpip(
            target.target.clone(),
            open.port,
            open.originator.0.clone(),
            open.originator.1,
        ),
    )
    .await;
    let agent = match agent {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) => {
            let why = format!(
                "agent {} of cluster {} could not open target {}: {e}",
                tunnel.host_id, target.cluster, target.target
            );
            info!(%why, "stream refused");
            counter!(m::STREAM_OPENS, "result" => "agent_refused").increment(1);
            reply
                .reject(reject_reason(ChannelOpenFailure::ConnectFailed, why))
                .await;
            return;
        }
        Err(_) => {
            counter!(m::STREAM_OPENS, "result" => "agent_timeout").increment(1);
            reply
                .reject(reject_reason(
                    ChannelOpenFailure::ConnectFailed,
                    "agent did not answer in time",
                ))
                .await;
            return;
        }
    };
    reply.accept().await;
    counter!(m::STREAM_OPENS, "result" => "ok").increment(1);
    tunnel.active_streams.fetch_add(1, Ordering::Relaxed);
    gauge!(m::STREAMS_ACTIVE).increment(1.0);
    debug!("stream open");
    let (up, down) = splice(client, agent, &shared.hard_stop).await;
    tunnel.active_streams.fetch_sub(1, Ordering::Relaxed);
    gauge!(m::STREAMS_ACTIVE).decrement(1.0);
    debug!(
        client_to_agent = up,
        agent_to_client = down,
        "stream closed"
    );
}

/// Bytes a splice direction may hold while its writer waits for the peer's window.
pub const SPLICE_QUEUE_CAP: usize = 4 << 20;

/// Passes channel messages both ways until both sides close. Payload moves as the `Bytes` russh
/// decrypted into, straight to the other channel's encrypter: no copy buffer on the proxy. The
/// writer waits for the peer's SSH window, so a slow reader slows its writer; see
/// [`postern_dial::splice`] for why each direction is read eagerly into a bounded queue.
pub async fn splice(a: Channel<Msg>, b: Channel<Msg>, stop: &CancellationToken) -> (u64, u64) {
    let (a_rx, a_tx) = a.split();
    let (b_rx, b_tx) = b.split();
    let run = async {
        let up = pump(a_rx, &b_tx, "client_to_agent");
        let down = pump(b_rx, &a_tx, "agent_to_client");
        tokio::pin!(up);
        tokio::pin!(down);
        let (mut up_r, mut down_r) = (None, None);
        // Until both directions saw EOF, or either side closed its channel (a client that drops
        // its stream sends CLOSE without EOF): then the whole stream is over.
        loop {
            tokio::select! {
                r = &mut up, if up_r.is_none() => up_r = Some(r),
                r = &mut down, if down_r.is_none() => down_r = Some(r),
            }
            let closed =
                matches!(up_r, Some((_, End::Closed))) || matches!(down_r, Some((_, End::Closed)));
            if closed || (up_r.is_some() && down_r.is_some()) {
                break;
            }
        }
        // Close both channels, so that neither peer waits for the other's CLOSE, and free the
        // stream's task and slots now: a direction still running is dropped (its bytes were
        // counted in the metric as they moved).
        let _ = a_tx.close().await;
        let _ = b_tx.close().await;
        (up_r.map_or(0, |r| r.0), down_r.map_or(0, |r| r.0))
    };
    tokio::select! {
        r = run => r,
        _ = stop.cancelled() => (0, 0),
    }
}

/// How one direction of a stream ended.
enum End {
    /// The sender half-closed (EOF, passed on); the other direction may go on.
    Eof,
    /// The channel closed or failed: the stream is over.
    Closed,
}

/// Moves one direction until its EOF or its channel's end; returns the bytes moved.
async fn pump(
    rx: russh::ChannelReadHalf,
    tx: &russh::ChannelWriteHalf<Msg>,
    direction: &'static str,
) -> (u64, End) {
    use postern_dial::splice::{Item, charge, eager_reader};
    let bytes = counter!(m::BYTES_PROXIED, "direction" => direction);
    let (reader, mut queue) = eager_reader(rx, SPLICE_QUEUE_CAP);
    let writer = async move {
        let mut total = 0u64;
        while let Some(item) = queue.next().await {
            match item {
                Item::Data(data) => {
                    let n = data.len();
                    if tx.data_bytes(data).await.is_err() {
                        return (total, End::Closed);
                    }
                    queue.release(charge(n, SPLICE_QUEUE_CAP));
                    total += n as u64;
                    bytes.increment(n as u64);
                }
                Item::Eof => {
                    let _ = tx.eof().await;
                    return (total, End::Eof);
                }
            }
        }
        (total, End::Closed)
    };
    tokio::pin!(reader);
    tokio::pin!(writer);
    let mut reader_done = false;
    loop {
        tokio::select! {
            done = &mut writer => break done,
            _ = &mut reader, if !reader_done => reader_done = true,
        }
    }
}

/// Serves an agent's `@control` channel: hello both ways, the proxy set, drain on shutdown.
async fn control(channel: Channel<Msg>, shared: Arc<TunnelShared>) {
    let (mut rx, tx) = channel.split();
    let mut out = BytesMut::new();
    let hello = Message::Hello {
        version: tunnel_proto::PROTOCOL_VERSION,
        id: shared.proxy_id.clone(),
    };
    let set = Message::ProxySet {
        ids: vec![shared.proxy_id.clone()],
    };
    if hello.encode(&mut out).is_err() || set.encode(&mut out).is_err() {
        return;
    }
    if tx.data_bytes(out.split().freeze()).await.is_err() {
        return;
    }
    let mut inbuf = BytesMut::new();
    let mut drained = false;
    loop {
        tokio::select! {
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) => match Message::feed(&mut inbuf, &data) {
                    Ok(msgs) => {
                        for msg in msgs {
                            match msg {
                                Message::Hello { version, id } => debug!(version, agent = %id, "control hello"),
                                Message::Heartbeat { active_streams } => debug!(active_streams, "heartbeat"),
                                other => debug!(?other, "unexpected control message from agent"),
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "closing control channel");
                        let _ = tx.close().await;
                        return;
                    }
                },
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            },
            _ = shared.draining.cancelled(), if !drained => {
                drained = true;
                let drain = Message::Drain { reason: "proxy shutting down".into(), grace_secs: shared.grace_secs };
                if drain.encode(&mut out).is_ok() {
                    let _ = tx.data_bytes(out.split().freeze()).await;
                }
            }
            _ = shared.hard_stop.cancelled() => return,
        }
    }
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
