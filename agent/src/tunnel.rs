//! One tunnel's life: discover, dial, log in, register targets, serve streams, follow the control
//! channel, until the connection ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use postern_dial::DialError;
use postern_dial::ssh::{Identity, ProxyVerifier, client_config, login, parse_ca_lines};
use postern_dial::web::{WebTrust, find, host_of};
use russh::client::{ChannelOpenHandle, Msg, Session};
use russh::keys::PublicKeyOrCertificate;
use russh::{Channel, ChannelMsg, ChannelOpenFailure, Disconnect};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use tunnel_proto::control::Message;
use tunnel_proto::credit::CREDIT_VERSION;
use tunnel_proto::names::{CONTROL_HOST, agent_login};

use crate::config::{AgentConfig, TargetAddr, TransportMode};
use crate::renew::{SignerHint, SignerHints};

/// Deadline to connect to a local target.
pub(crate) const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Splice buffer per direction between a channel and a target socket (64 KiB: the size that
/// matters for throughput; see the README's performance notes).
pub(crate) const SPLICE_BUF: usize = 64 * 1024;
/// Seconds between heartbeats on the control channel.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(30);
/// Queue bound per stream toward a proxy without credit (back-pressure blocks the connection).
pub(crate) const LEGACY_QUEUE: usize = 4 << 20;

/// How a tunnel ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The agent is shutting down.
    Shutdown,
    /// The proxy closed the connection (or it dropped).
    Closed,
    /// The proxy asked its agents to move (it is shutting down).
    Drained,
    /// The agent pool already held a tunnel to this proxy: closed before registering anything.
    Duplicate,
}

/// How long a pooled tunnel waits for its proxy's control hello (which names the proxy).
pub(crate) const HELLO_DEADLINE: Duration = Duration::from_secs(5);

/// The web trust the config asks for.
pub fn web_trust(config: &AgentConfig) -> Result<WebTrust, DialError> {
    if let Some(pin) = &config.web.cert_sha256 {
        Ok(WebTrust::Pin(pin.clone()))
    } else if let Some(ca) = &config.web.ca_file {
        WebTrust::roots_from_pem_file(ca)
    } else {
        Ok(WebTrust::Insecure)
    }
}

/// Dials the proxy and serves until the connection ends or `shutdown` is cancelled.
/// What proxies say about the host CA's signer goes to `hints`.
pub async fn connect_and_serve(
    quic: &crate::quic::QuicClient,
    hints: &SignerHints,
    config: &AgentConfig,
    identity: &Identity,
    shutdown: &CancellationToken,
) -> Result<Ended, DialError> {
    connect_and_serve_in(quic, hints, config, identity, shutdown, None).await
}

/// As [`connect_and_serve`], as dial number `attempt` of an agent pool (see [`crate::pool`]):
/// the tunnel claims its proxy's id (from the control hello, on either transport) before
/// registering any target, and ends at once as [`Ended::Duplicate`] if the pool already holds
/// that proxy.
pub async fn connect_and_serve_in(
    quic: &crate::quic::QuicClient,
    hints: &SignerHints,
    config: &AgentConfig,
    identity: &Identity,
    shutdown: &CancellationToken,
    pool: Option<(&Arc<crate::pool::Pool>, u64)>,
) -> Result<Ended, DialError> {
    let (addr, offered_quic) = match &config.proxy {
        Some(web) => {
            let found = find(web, &web_trust(config)?).await?;
            let env = std::env::var(tunnel_proto::discovery::TUNNEL_ADDR_ENV).ok();
            let addr = found.proxy.tunnel_addr(env.as_deref(), host_of(web));
            let quic = found.proxy.quic_addr(&addr);
            (addr, quic)
        }
        None => (config.tunnel_addr.clone().unwrap_or_default(), None),
    };
    let verifier = ProxyVerifier::new(
        host_of(&addr),
        proxy_host_cas(config)?,
        parse_ca_lines(&config.proxy_host_keys).map_err(DialError::Config)?,
    );
    let quic_addr = match config.transport.mode {
        TransportMode::Ssh => None,
        TransportMode::Auto | TransportMode::Quic => {
            config.transport.quic_addr.clone().or(offered_quic)
        }
    };
    if let Some(quic_addr) = quic_addr {
        let span = info_span!("tunnel", cluster = %config.cluster, host_id = %config.host_id, proxy = %quic_addr, transport = "quic");
        let started = std::time::Instant::now();
        let dialled = tokio::select! {
            r = crate::quic::dial(quic, config, identity, &quic_addr, &verifier, pool, shutdown).instrument(span.clone()) => r,
            _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
        };
        match dialled {
            Ok(Some(tunnel)) => {
                return Ok(tunnel.serve(config, hints, shutdown).instrument(span).await);
            }
            Ok(None) => return Ok(Ended::Duplicate),
            Err(e) if config.transport.mode == TransportMode::Quic => return Err(e),
            Err(e) => warn!(
                error = %e,
                after_ms = started.elapsed().as_millis() as u64,
                "QUIC unavailable: falling back to SSH over TCP"
            ),
        }
    } else if config.transport.mode == TransportMode::Quic {
        return Err(DialError::Config(
            "transport.mode = \"quic\" but the proxy offers no QUIC and transport.quic_addr is unset".into(),
        ));
    }
    let active = Arc::new(AtomicUsize::new(0));
    // The proxy's protocol version, from its control hello (0 until then): streams use credit
    // when it has them.
    let (proxy_version_tx, proxy_version) = watch::channel(0u32);
    let refusal = Refusal::default();
    let handler = AgentHandler {
        refusal: refusal.clone(),
        proxy_version,
        verifier: verifier.clone(),
        targets: Arc::new(config.target_addrs()),
        cluster: config.cluster.clone(),
        active: active.clone(),
    };
    let login_name = agent_login(&config.host_id, &config.cluster);
    let span =
        info_span!("tunnel", cluster = %config.cluster, host_id = %config.host_id, proxy = %addr);
    let login = login(
        &addr,
        Arc::new(client_config(config.keepalive())),
        handler,
        &verifier,
        &login_name,
        identity,
    )
    .instrument(span.clone());
    let mut handle = tokio::select! {
        r = login => r?,
        _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
    };
    let _enter = span.enter();
    // The control channel comes first: each target's labels go to the proxy before the target
    // is registered, so no stream is ever decided on a target without its labels.
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel();
    let (hello_tx, hello_rx) = tokio::sync::oneshot::channel();
    let mut control_task = None;
    match handle
        .channel_open_direct_tcpip(CONTROL_HOST, 0, "127.0.0.1", 0)
        .await
    {
        Ok(ch) => {
            let labels = crate::labels::encode_target_labels(config);
            if let Err(e) = ch.data(&labels[..]).await {
                warn!(error = %e, "could not send target labels: streams to them will be refused");
            }
            let hello = Message::Hello {
                version: tunnel_proto::PROTOCOL_VERSION,
                id: config.host_id.clone(),
            };
            let link = ControlLink {
                hello: Some(hello_tx),
                pool: pool.map(|(p, _)| p.clone()),
                hints: hints.clone(),
            };
            control_task = Some(tokio::spawn(
                control(ch, hello, active, drain_tx, proxy_version_tx, link)
                    .instrument(span.clone()),
            ));
        }
        Err(e) => warn!(error = %e, "no control channel: drain orders will not arrive"),
    }
    // In a pool: which proxy is this? A second tunnel to a proxy already held is closed now.
    let claim = match pool {
        None => None,
        Some((pool, attempt)) => {
            // A proxy that does not say who it is (no control channel, no hello in time) is
            // held as the one proxy at this address.
            let id = match tokio::time::timeout(HELLO_DEADLINE, hello_rx).await {
                Ok(Ok(id)) => id,
                _ => {
                    warn!(after = ?HELLO_DEADLINE, "no control hello from the proxy: held as the only proxy at this address");
                    format!("@{addr}")
                }
            };
            match pool.claim(attempt, &id, shutdown) {
                Some(c) => Some(c),
                None => {
                    if let Some(t) = control_task {
                        t.abort();
                    }
                    let _ = handle
                        .disconnect(Disconnect::ByApplication, "already connected", "")
                        .await;
                    return Ok(Ended::Duplicate);
                }
            }
        }
    };
    let mut registered = 0;
    for name in config.targets.keys() {
        match handle.tcpip_forward(name.clone(), 0).await {
            Ok(_) => registered += 1,
            Err(e) => warn!(target = %name, error = %e, "proxy refused to register target"),
        }
    }
    if registered == 0 {
        // A proxy that accepted the certificate but refuses this agent (a lock) says why in its
        // disconnect message: wait briefly for it.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut handle).await;
        if let Some(reason) = refusal.take() {
            return Err(DialError::Refused { addr, reason });
        }
        let _ = handle
            .disconnect(Disconnect::ByApplication, "no target registered", "")
            .await;
        return Err(DialError::Config("the proxy refused every target".into()));
    }
    info!(targets = registered, "tunnel up");
    let _up = crate::metrics::TunnelUp::new(&addr);
    drop(_enter);
    let ended = tokio::select! {
        r = &mut handle => {
            if let Err(e) = r {
                debug!(error = %e, "session ended");
            }
            Ended::Closed
        }
        Ok(()) = drain_rx => Ended::Drained,
        _ = shutdown.cancelled() => Ended::Shutdown,
    };
    if let Some(t) = control_task {
        t.abort();
    }
    if ended == Ended::Drained {
        if let Some(c) = &claim {
            c.drained();
        }
        // Streams on this tunnel finish on their own; the draining proxy closes it at its
        // deadline. Meanwhile the caller dials a new tunnel.
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = &mut handle => {}
                _ = shutdown.cancelled() => {
                    let _ = handle.disconnect(Disconnect::ByApplication, "agent shutting down", "").await;
                }
            }
        });
        return Ok(ended);
    }
    if ended != Ended::Closed {
        let _ = handle
            .disconnect(Disconnect::ByApplication, "agent moving", "")
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut handle).await;
    }
    Ok(ended)
}

/// The proxy's disconnect message, when it sent one.
#[derive(Clone, Default)]
struct Refusal(Arc<std::sync::Mutex<Option<String>>>);

impl Refusal {
    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The russh client handler of an agent connection.
struct AgentHandler {
    /// Where the proxy's disconnect message is kept for the caller.
    refusal: Refusal,
    verifier: ProxyVerifier,
    targets: Arc<BTreeMap<String, TargetAddr>>,
    cluster: String,
    active: Arc<AtomicUsize>,
    /// The proxy's protocol version (0 until its control hello arrives).
    proxy_version: watch::Receiver<u32>,
}

impl russh::client::Handler for AgentHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(self.verifier.verify(key))
    }

    async fn disconnected(
        &mut self,
        reason: russh::client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        match reason {
            russh::client::DisconnectReason::ReceivedDisconnect(info) => {
                if !info.message.is_empty() {
                    *self.refusal.0.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(info.message.chars().take(512).collect());
                }
                Ok(())
            }
            russh::client::DisconnectReason::Error(e) => Err(e),
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        _connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(addr) = self.targets.get(connected_address).cloned() else {
            warn!(
                target = connected_address,
                "refused a stream for a target this agent does not serve"
            );
            reply
                .reject(ChannelOpenFailure::Other {
                    code: ChannelOpenFailure::AdministrativelyProhibited.code(),
                    reason: format!(
                        "this agent does not serve target '{}'",
                        connected_address.chars().take(64).collect::<String>()
                    ),
                })
                .await;
            return Ok(());
        };
        let span = info_span!("stream", cluster = %self.cluster, target = connected_address, client = %format!("{originator_address}:{originator_port}"));
        tokio::spawn(
            serve_stream(
                channel,
                reply,
                connected_address.to_string(),
                addr,
                self.active.clone(),
                self.proxy_version.clone(),
            )
            .instrument(span),
        );
        Ok(())
    }
}

/// Dials the target, answers the proxy, splices until either side closes.
async fn serve_stream(
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    target: String,
    addr: TargetAddr,
    active: Arc<AtomicUsize>,
    proxy_version: watch::Receiver<u32>,
) {
    let tcp = match crate::dial::dial(&addr, TARGET_CONNECT_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%addr, error = %e, "target unreachable");
            crate::metrics::dial_error(&target, e.reason());
            reply
                .reject(ChannelOpenFailure::Other {
                    code: ChannelOpenFailure::ConnectFailed.code(),
                    reason: format!("target '{target}' ({addr}) unreachable: {e}"),
                })
                .await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    reply.accept().await;
    let credit = postern_dial::splice::peer_version(proxy_version).await >= CREDIT_VERSION;
    active.fetch_add(1, Ordering::Relaxed);
    let _open = crate::metrics::StreamOpen::new(&target);
    let (up, down) = crate::splice::splice_tcp(channel, tcp, credit).await;
    debug!(to_target = up, from_target = down, "stream closed");
    active.fetch_sub(1, Ordering::Relaxed);
}

/// What the control channel tells the rest of the agent besides the drain order: the proxy's id
/// (from its hello) and, in a pool, each proxy set.
struct ControlLink {
    /// Receives the proxy's id once.
    hello: Option<tokio::sync::oneshot::Sender<String>>,
    /// The pool that follows this proxy's sets.
    pool: Option<Arc<crate::pool::Pool>>,
    /// Where the host CA's signer goes (the renewal loop follows it).
    hints: SignerHints,
}

/// The agent side of `@control`: hello, heartbeats, and a drain order that ends the tunnel.
async fn control(
    channel: Channel<Msg>,
    hello: Message,
    active: Arc<AtomicUsize>,
    drain: tokio::sync::oneshot::Sender<()>,
    proxy_version: watch::Sender<u32>,
    mut link: ControlLink,
) {
    let mut proxy_id = String::new();
    let (mut rx, tx) = channel.split();
    let mut out = BytesMut::new();
    if hello.encode(&mut out).is_err() || tx.data_bytes(out.split().freeze()).await.is_err() {
        return;
    }
    let mut inbuf = BytesMut::new();
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.tick().await;
    loop {
        tokio::select! {
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    let msgs = match Message::feed(&mut inbuf, &data) {
                        Ok(m) => m,
                        Err(e) => {
                            warn!(error = %e, "bad control frame: closing control channel");
                            return;
                        }
                    };
                    for msg in msgs {
                        match msg {
                            Message::Hello { version, id } => {
                                debug!(version, proxy = %id, "control hello");
                                let _ = proxy_version.send(version.max(1));
                                if let Some(h) = link.hello.take() {
                                    let _ = h.send(id.clone());
                                }
                                proxy_id = id;
                            }
                            Message::ProxySet { ids } => {
                                debug!(?ids, "proxy set");
                                if let Some(p) = &link.pool {
                                    p.proxy_set(&proxy_id, ids);
                                }
                            }
                            Message::Drain { reason, grace_secs } => {
                                info!(%reason, grace_secs, "proxy asked to drain: moving");
                                let _ = drain.send(());
                                return;
                            }
                            Message::HostCaSigner { fingerprint, spread_secs } => {
                                post_signer(&link.hints, fingerprint, spread_secs);
                            }
                            other => debug!(?other, "unexpected control message"),
                        }
                    }
                }
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            },
            _ = beat.tick() => {
                let hb = Message::Heartbeat { active_streams: active.load(Ordering::Relaxed) as u32 };
                if hb.encode(&mut out).is_err() || tx.data_bytes(out.split().freeze()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Posts what a proxy said about the host CA's signer (either transport) for the renewal loop.
pub(crate) fn post_signer(hints: &SignerHints, fingerprint: String, spread_secs: u32) {
    debug!(%fingerprint, spread_secs, "host CA signer");
    postern_dial::renew_due::post(
        hints,
        SignerHint {
            fingerprint,
            spread_secs,
        },
    );
}

/// The host CA keys proxies may be signed by: `proxy_host_ca` and those the last certificate
/// renewal announced (a host CA rotation adds the new key there).
fn proxy_host_cas(
    config: &AgentConfig,
) -> Result<Vec<tunnel_proto::certs::Fingerprint>, DialError> {
    let mut cas = parse_ca_lines(&config.proxy_host_ca).map_err(DialError::Config)?;
    if let Ok(learned) = parse_ca_lines(&crate::renew::learned_cas(config)) {
        for fp in learned {
            if !cas.contains(&fp) {
                cas.push(fp);
            }
        }
    }
    Ok(cas)
}
