//! The agent's QUIC transport: dial, log in by signing the connection's TLS exporter value with
//! the host-certificate key, check the proxy's own signature the same way SSH checks its host
//! certificate, register targets, then serve one QUIC stream per client stream.
//!
//! The wire contract is [`tunnel_proto::quic`].

mod splice;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use postern_dial::DialError;
use postern_dial::ssh::{Identity, ProxyVerifier};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use tunnel_proto::control::Message;
use tunnel_proto::frame_stream::{FrameStream, FrameStreamError};
use tunnel_proto::quic::{AGENT_CONTEXT, ALPN, Frame};

use crate::config::{AgentConfig, TargetAddr};
use crate::tunnel::{Ended, HEARTBEAT, HELLO_DEADLINE, TARGET_CONNECT_TIMEOUT, web_trust};

/// Keepalive intervals without a single datagram from the proxy before the agent gives the
/// connection up and redials.
const LIVENESS_PROBES: u32 = 3;

/// The agent's QUIC client endpoints: one UDP socket per address family for all its dials,
/// created on first use, so that redialling does not churn sockets (a handshake that timed out
/// would otherwise hold its socket until its idle timeout).
#[derive(Default)]
pub struct QuicClient {
    endpoints: std::sync::Mutex<[Option<quinn::Endpoint>; 2]>,
}

impl QuicClient {
    /// The endpoint for one address family, accepting datagrams of up to `mtu_upper_bound` UDP
    /// payload bytes (at least quinn's default, 1472; fixed when the endpoint is first made).
    fn endpoint(&self, v6: bool, mtu_upper_bound: u16) -> std::io::Result<quinn::Endpoint> {
        let mut slots = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut slots[usize::from(v6)];
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        let endpoint = postern_dial::quic::client_endpoint(v6, mtu_upper_bound)?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }
}

/// A logged-in QUIC tunnel, targets registered.
pub struct QuicTunnel {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    control: Control,
    /// The proxy's id, from its hello (empty when it sent none).
    proxy_id: String,
    /// In an agent pool: the pool, and this tunnel's hold on its proxy.
    pool: Option<(Arc<crate::pool::Pool>, crate::pool::Claim)>,
}

/// The control stream.
type Control = FrameStream<quinn::RecvStream, quinn::SendStream>;

fn quic_err(addr: &str, what: impl std::fmt::Display) -> DialError {
    DialError::Quic {
        addr: addr.to_owned(),
        detail: what.to_string(),
    }
}

/// Dials `addr` over QUIC. The QUIC/TLS handshake must complete within
/// `transport.quic_handshake_timeout_ms` (past that the caller falls back to SSH); the login and
/// registration then get [`postern_dial::ssh::HANDSHAKE_TIMEOUT`].
///
/// As dial number `attempt` of an agent pool, the tunnel claims its proxy's id (from the hello
/// on the control stream) before registering any target: `Ok(None)` when the pool already holds
/// that proxy (the connection is closed).
pub async fn dial(
    client: &QuicClient,
    config: &AgentConfig,
    identity: &Identity,
    addr: &str,
    verifier: &ProxyVerifier,
    pool: Option<(&Arc<crate::pool::Pool>, u64)>,
    shutdown: &CancellationToken,
) -> Result<Option<QuicTunnel>, DialError> {
    let t = &config.transport;
    let target: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| quic_err(addr, e))?
        .next()
        .ok_or_else(|| quic_err(addr, "no address"))?;
    let endpoint = client
        .endpoint(target.is_ipv6(), t.quic_mtu_upper_bound)
        .map_err(|e| quic_err(addr, e))?;
    // TLS: the proxy's web certificate, trusted as discovery trusts it (pin, CA, or anything);
    // the proxy is then authenticated by its SSH host certificate bound to this connection.
    let mut tls = postern_dial::web::tls_config(&web_trust(config)?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| quic_err(addr, e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut tc = quinn::TransportConfig::default();
    let varint = postern_dial::quic::varint;
    tc.max_concurrent_bidi_streams(t.quic_max_streams.into());
    tc.max_concurrent_uni_streams(0u32.into());
    tc.stream_receive_window(varint(t.quic_stream_window_bytes));
    tc.receive_window(varint(t.connection_window()));
    tc.keep_alive_interval(Some(Duration::from_millis(t.quic_keepalive_ms)));
    tc.max_idle_timeout(quinn::IdleTimeout::try_from(config.keepalive() * 4).ok());
    tc.mtu_discovery_config(Some(postern_dial::quic::mtu_discovery(
        t.quic_mtu_upper_bound,
    )));
    client.transport_config(Arc::new(tc));
    let host = postern_dial::web::host_of(addr);
    let connecting = endpoint
        .connect_with(client, target, host)
        .map_err(|e| quic_err(addr, e))?;
    let bound = Duration::from_millis(t.quic_handshake_timeout_ms);
    let conn = match tokio::time::timeout(bound, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(quic_err(addr, format!("handshake failed: {e}"))),
        Err(_) => {
            return Err(quic_err(
                addr,
                format!("no QUIC handshake within {bound:?} (is UDP blocked?)"),
            ));
        }
    };
    let login = login(config, identity, &conn, verifier, addr, pool, shutdown);
    match tokio::time::timeout(postern_dial::ssh::HANDSHAKE_TIMEOUT + HELLO_DEADLINE, login).await {
        Ok(Ok(LoggedIn {
            control,
            proxy_id,
            claim,
        })) => Ok(Some(QuicTunnel {
            endpoint,
            conn,
            control,
            proxy_id,
            pool: pool.map(|(p, _)| p.clone()).zip(claim),
        })),
        Ok(Err(LoginFailed::Duplicate)) => {
            conn.close(0u32.into(), b"already connected");
            Ok(None)
        }
        Ok(Err(e)) => {
            conn.close(0u32.into(), b"login failed");
            Err(match e {
                LoginFailed::Refused(reason) => DialError::Refused {
                    addr: addr.to_owned(),
                    reason,
                },
                LoginFailed::Untrusted(detail) => DialError::HostVerification {
                    addr: addr.to_owned(),
                    detail,
                },
                LoginFailed::Other(e) => quic_err(addr, e),
                LoginFailed::Duplicate => unreachable!("handled above"),
            })
        }
        Err(_) => {
            conn.close(0u32.into(), b"login timeout");
            Err(quic_err(addr, "login timed out"))
        }
    }
}

/// How a QUIC login failed: what the agent's reconnect loop must tell apart (a refusal in words
/// or an untrusted proxy is permanent; the rest is transient).
enum LoginFailed {
    /// The proxy refused this agent, saying why (a certificate, a lock).
    Refused(String),
    /// The proxy did not prove its host certificate.
    Untrusted(String),
    /// Anything else: the connection broke, or the proxy spoke out of turn.
    Other(String),
    /// In an agent pool: the pool already holds a tunnel to this proxy.
    Duplicate,
}

/// A login that went through, targets registered.
struct LoggedIn {
    control: Control,
    /// The proxy's id from its hello (empty when it sent none).
    proxy_id: String,
    /// In a pool: the hold on this proxy.
    claim: Option<crate::pool::Claim>,
}

impl From<String> for LoginFailed {
    fn from(e: String) -> Self {
        LoginFailed::Other(e)
    }
}

impl From<FrameStreamError> for LoginFailed {
    fn from(e: FrameStreamError) -> Self {
        LoginFailed::Other(e.to_string())
    }
}

/// The login and the target registration on the control stream.
async fn login(
    config: &AgentConfig,
    identity: &Identity,
    conn: &quinn::Connection,
    verifier: &ProxyVerifier,
    addr: &str,
    pool: Option<(&Arc<crate::pool::Pool>, u64)>,
    shutdown: &CancellationToken,
) -> Result<LoggedIn, LoginFailed> {
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut control = Control::new(send, recv);
    let auth = postern_dial::quic::auth_frame(
        conn,
        AGENT_CONTEXT,
        tunnel_proto::names::agent_login(&config.host_id, &config.cluster),
        &identity.key,
        &identity.cert,
    )?;
    control.write(&[auth]).await?;
    match control.read().await? {
        Frame::ProxyAuth { key, signature } => {
            postern_dial::quic::check_proxy_proof(conn, &key, &signature, verifier)
                .map_err(LoginFailed::Untrusted)?;
        }
        Frame::Refused { reason } => return Err(LoginFailed::Refused(reason)),
        other => return Err(format!("unexpected answer to the login: {other:?}").into()),
    }
    // In a pool: which proxy is this? Its hello follows the proof. A second tunnel to a proxy
    // already held is closed now, before any target is registered.
    let mut proxy_id = String::new();
    let mut claim = None;
    if let Some((pool, attempt)) = pool {
        let hello = async {
            loop {
                match control.read().await.map_err(|e| e.to_string())? {
                    Frame::Control(Message::Hello { version, id }) => {
                        debug!(version, proxy = %id, "control hello");
                        return Ok::<_, String>(id);
                    }
                    other => debug!(?other, "control frame before the hello"),
                }
            }
        };
        // A proxy that does not say who it is in time is held as the one proxy at this address.
        proxy_id = match tokio::time::timeout(HELLO_DEADLINE, hello).await {
            Ok(r) => r?,
            Err(_) => {
                warn!(after = ?HELLO_DEADLINE, "no control hello from the proxy: held as the only proxy at this address");
                format!("@{addr}")
            }
        };
        claim = Some(
            pool.claim(attempt, &proxy_id, shutdown)
                .ok_or(LoginFailed::Duplicate)?,
        );
    }
    // Each target's labels go first, as on SSH: no stream is decided on a target without them.
    let labels = crate::labels::encode_target_labels(config);
    control
        .send_half()
        .write_all(&labels)
        .await
        .map_err(|e| e.to_string())?;
    let registers: Vec<Frame> = config
        .targets
        .keys()
        .map(|t| Frame::Register { target: t.clone() })
        .collect();
    control.write(&registers).await?;
    let mut answered = 0;
    let mut registered = 0;
    while answered < registers.len() {
        match control.read().await? {
            Frame::Registered { target, ok, reason } => {
                answered += 1;
                if ok {
                    registered += 1;
                } else {
                    warn!(%target, %reason, "proxy refused to register target");
                }
            }
            Frame::Control(Message::ProxySet { ids }) => {
                debug!(?ids, "proxy set");
                if let Some((p, _)) = pool {
                    p.proxy_set(&proxy_id, ids);
                }
            }
            Frame::Control(m) => debug!(?m, "control message during registration"),
            other => {
                return Err(format!("unexpected frame during registration: {other:?}").into());
            }
        }
    }
    if registered == 0 {
        return Err(LoginFailed::Refused(
            "the proxy refused every target".into(),
        ));
    }
    Ok(LoggedIn {
        control,
        proxy_id,
        claim,
    })
}

impl QuicTunnel {
    /// Serves streams and the control stream until the connection ends, a drain order arrives,
    /// or `shutdown` is cancelled. What the proxy says about the host CA signer goes to `hints`.
    pub async fn serve(
        self,
        config: &AgentConfig,
        hints: &crate::renew::SignerHints,
        shutdown: &CancellationToken,
    ) -> Ended {
        let QuicTunnel {
            endpoint,
            conn,
            mut control,
            mut proxy_id,
            pool,
        } = self;
        info!(
            targets = config.targets.len(),
            transport = "quic",
            "tunnel up"
        );
        let _up = crate::metrics::TunnelUp::new(&conn.remote_address().to_string());
        let active = Arc::new(AtomicUsize::new(0));
        let targets: Arc<BTreeMap<String, TargetAddr>> = Arc::new(
            config
                .targets
                .iter()
                .map(|(name, t)| (name.clone(), t.addr.clone()))
                .collect(),
        );
        let mut accept = Box::pin(accept_streams(
            conn.clone(),
            targets,
            active.clone(),
            config.cluster.clone(),
        ));
        let hello = Frame::Control(Message::Hello {
            version: tunnel_proto::PROTOCOL_VERSION,
            id: config.host_id.clone(),
        });
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.tick().await;
        // Liveness: the proxy acknowledges every keepalive, so a connection that has received
        // nothing for LIVENESS_PROBES keepalive intervals is dead (a restarted or vanished proxy:
        // UDP brings no reset, and QUIC's own probes back off exponentially meanwhile).
        let probe = Duration::from_millis(config.transport.quic_keepalive_ms);
        let mut check = tokio::time::interval(probe);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_rx = conn.stats().udp_rx.datagrams;
        let mut silent = 0u32;
        let ended = if control.write(&[hello]).await.is_err() {
            Ended::Closed
        } else {
            loop {
                tokio::select! {
                    _ = &mut accept => break Ended::Closed,
                    f = control.read() => match f {
                        Ok(Frame::Control(Message::Drain { reason, grace_secs })) => {
                            info!(%reason, grace_secs, "proxy asked to drain: moving");
                            break Ended::Drained;
                        }
                        Ok(Frame::Control(Message::Hello { version, id })) => {
                            debug!(version, proxy = %id, "control hello");
                            if proxy_id.is_empty() {
                                proxy_id = id;
                            }
                        }
                        Ok(Frame::Control(Message::HostCaSigner { fingerprint, spread_secs })) => {
                            crate::tunnel::post_signer(hints, fingerprint, spread_secs);
                        }
                        Ok(Frame::Control(Message::ProxySet { ids })) => {
                            debug!(?ids, "proxy set");
                            if let Some((p, _)) = &pool {
                                p.proxy_set(&proxy_id, ids);
                            }
                        }
                        Ok(other) => debug!(?other, "control frame"),
                        Err(e) => {
                            debug!(error = %e, "control stream ended");
                            break Ended::Closed;
                        }
                    },
                    _ = beat.tick() => {
                        let hb = Frame::Control(Message::Heartbeat { active_streams: active.load(Ordering::Relaxed) as u32 });
                        if control.write(&[hb]).await.is_err() {
                            break Ended::Closed;
                        }
                    }
                    _ = check.tick() => {
                        let rx = conn.stats().udp_rx.datagrams;
                        silent = if rx == last_rx { silent + 1 } else { 0 };
                        last_rx = rx;
                        if silent > LIVENESS_PROBES {
                            info!(silent_ms = (probe * silent).as_millis() as u64, "no datagram from the proxy: redialling");
                            break Ended::Closed;
                        }
                    }
                    _ = shutdown.cancelled() => break Ended::Shutdown,
                }
            }
        };
        match ended {
            Ended::Drained => {
                if let Some((_, claim)) = &pool {
                    claim.drained();
                }
                // Streams on this tunnel finish on their own (and new ones are still served);
                // the draining proxy closes it at its deadline. Meanwhile the caller redials.
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = accept => {}
                        _ = shutdown.cancelled() => conn.close(0u32.into(), b"agent shutting down"),
                    }
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
                });
            }
            Ended::Shutdown => {
                conn.close(0u32.into(), b"agent shutting down");
                // Let the close reach the proxy before the endpoint may go away.
                let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            }
            Ended::Closed => conn.close(0u32.into(), b"closed"),
            Ended::Duplicate => {}
        }
        ended
    }
}

/// Accepts the proxy's streams until the connection ends.
async fn accept_streams(
    conn: quinn::Connection,
    targets: Arc<BTreeMap<String, TargetAddr>>,
    active: Arc<AtomicUsize>,
    cluster: String,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let targets = targets.clone();
        let active = active.clone();
        let span = info_span!("stream", cluster = %cluster, transport = "quic");
        tokio::spawn(serve_stream(send, recv, targets, active).instrument(span));
    }
}

/// One stream: the proxy's [`Frame::Open`], the target dialled from the allow-list, then bytes.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    targets: Arc<BTreeMap<String, TargetAddr>>,
    active: Arc<AtomicUsize>,
) {
    let Some((postern_dial::quic::OpenAsk { target, .. }, buf)) =
        postern_dial::quic::read_open(&mut recv, TARGET_CONNECT_TIMEOUT).await
    else {
        let _ = send.reset(1u32.into());
        return;
    };
    let Some(addr) = targets.get(&target).cloned() else {
        warn!(target = %target.chars().take(64).collect::<String>(), "refused a stream for a target this agent does not serve");
        postern_dial::quic::refuse(
            &mut send,
            format!(
                "this agent does not serve target '{}'",
                target.chars().take(64).collect::<String>()
            ),
        )
        .await;
        return;
    };
    let tcp = match crate::dial::dial(&addr, TARGET_CONNECT_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%addr, error = %e, "target unreachable");
            crate::metrics::dial_error(&target, e.reason());
            postern_dial::quic::refuse(
                &mut send,
                format!("target '{target}' ({addr}) unreachable: {e}"),
            )
            .await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if postern_dial::quic::accept(&mut send).await.is_err() {
        return;
    }
    active.fetch_add(1, Ordering::Relaxed);
    let _open = crate::metrics::StreamOpen::new(&target);
    let (up, down) = splice::splice(send, recv, buf, tcp).await;
    active.fetch_sub(1, Ordering::Relaxed);
    debug!(to_target = up, from_target = down, "stream closed");
}
