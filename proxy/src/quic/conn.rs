//! One QUIC connection: the login on its first stream (an agent's or a client's, checked as on
//! SSH); then for an agent the tunnel's registration and the `@control` messages, for a client
//! one QUIC stream per stream it opens (`Frame::Open`, decided as an SSH `direct-tcpip` is),
//! until the connection ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use russh::keys::{Certificate, PublicKey};
use tracing::{debug, info, warn};
use tunnel_proto::control::{HOST_CA_SIGNER_VERSION, Message};

use crate::tunnel::control::signer_for;
use postern_dial::quic::exporter;
use tunnel_proto::frame_stream::FrameStream;
use tunnel_proto::quic::{AGENT_CONTEXT, Frame, PROXY_CONTEXT, sign_binding, verify_binding};

use super::ProxyProof;
use crate::link::QUIC;
use crate::metrics as m;
use crate::policy::registry::Registration;
use crate::routing::Tunnel;
use crate::trust::Signs;
use crate::tunnel::TunnelShared;
use crate::tunnel::admission::Slot;
use crate::tunnel::checks::{Role, admit_login, check_login, record_refusal};

/// QUIC application error code of a refused login.
const REFUSED: u32 = 1;
/// QUIC application error code of a protocol violation.
const PROTOCOL: u32 = 2;

/// The control stream.
type Control = FrameStream<quinn::RecvStream, quinn::SendStream>;

/// How a login attempt failed.
enum Failed {
    /// Not a Postern agent speaking the protocol (or the connection broke).
    Protocol(String),
    /// A certificate or binding refused: `(metric reason, detail)`.
    Refused(&'static str, String, String),
}

/// An agent or client that logged in: its control stream, who it is, and its place in the policy
/// registry (kept for the connection's life: a lock cancels it).
struct LoggedIn {
    control: Control,
    role: Role,
    registration: Registration,
}

pub(super) async fn serve_conn(
    shared: Arc<TunnelShared>,
    proof: Arc<ProxyProof>,
    connecting: quinn::Connecting,
    peer: SocketAddr,
    slot: Slot,
) {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + shared.handshake_timeout;
    let evicted = || {
        info!(
            "closed: the pre-login pool was full and this was the oldest connection of the busiest source"
        );
        counter!(m::CONNECTIONS_DROPPED, "reason" => "prelogin_evicted").increment(1);
    };
    let conn = tokio::select! {
        r = tokio::time::timeout_at(deadline, connecting) => match r {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!(error = %e, "QUIC handshake failed");
                counter!(m::CONNECTIONS_DROPPED, "reason" => "protocol").increment(1);
                return;
            }
            Err(_) => {
                info!("closed: QUIC handshake not completed before the handshake timeout");
                counter!(m::CONNECTIONS_DROPPED, "reason" => "handshake_timeout").increment(1);
                return;
            }
        },
        _ = slot.evicted.cancelled() => return evicted(),
    };
    let login = tokio::select! {
        r = tokio::time::timeout_at(deadline, login(&shared, &proof, &conn)) => r,
        _ = slot.evicted.cancelled() => {
            evicted();
            conn.close(PROTOCOL.into(), b"too many connections logging in: retry");
            return;
        }
    };
    let logged_in = match login {
        Ok(Ok(x)) => x,
        Ok(Err(Failed::Protocol(e))) => {
            debug!(error = %e, "not a Postern agent");
            counter!(m::CONNECTIONS_DROPPED, "reason" => "protocol").increment(1);
            conn.close(PROTOCOL.into(), b"protocol error");
            return;
        }
        Ok(Err(Failed::Refused(reason, login, detail))) => {
            record_refusal(&shared, peer, &login, reason, &detail, QUIC);
            let why: String = format!("login refused: {detail}")
                .chars()
                .take(200)
                .collect();
            conn.close(REFUSED.into(), why.as_bytes());
            return;
        }
        Err(_) => {
            info!("closed: login not completed before the handshake timeout");
            counter!(m::CONNECTIONS_DROPPED, "reason" => "handshake_timeout").increment(1);
            conn.close(PROTOCOL.into(), b"handshake timeout");
            return;
        }
    };
    drop(slot);
    let LoggedIn {
        mut control,
        role,
        registration,
    } = logged_in;
    let (host_id, cluster, role) = match role {
        Role::Agent {
            host_id,
            cluster,
            role,
        } => (host_id, cluster, role),
        client @ Role::Client { .. } => {
            histogram!(m::HANDSHAKE_SECONDS, "role" => "client", "transport" => QUIC)
                .record(started.elapsed().as_secs_f64());
            let result =
                super::client::serve_client(&shared, &conn, peer, client, registration).await;
            debug!(?result, "client connection ended");
            drop(control);
            return;
        }
    };
    histogram!(m::HANDSHAKE_SECONDS, "role" => "agent", "transport" => QUIC)
        .record(started.elapsed().as_secs_f64());
    let tunnel = Arc::new(Tunnel::new(
        shared.next_id.fetch_add(1, Ordering::Relaxed),
        host_id,
        cluster,
        peer.to_string(),
        conn.clone(),
    ));
    let result = serve_control(&shared, &tunnel, &role, &registration, &conn, &mut control).await;
    if shared.routing.remove(&tunnel.cluster, tunnel.id) {
        crate::tunnel::register::set_tunnel_gauge(&shared, &tunnel.cluster, QUIC);
        let reason = match &result {
            Ok(()) => "closed",
            Err(e) if e == "shutdown" => "shutdown",
            Err(_) => "error",
        };
        counter!(m::TUNNEL_DISCONNECTS, "cluster" => tunnel.cluster.clone(), "reason" => reason, "transport" => QUIC)
            .increment(1);
        info!(cluster = %tunnel.cluster, host_id = %tunnel.host_id, reason, transport = QUIC, uptime_s = started.elapsed().as_secs(), "tunnel closed");
    } else if let Err(e) = result {
        debug!(error = %e, "connection ended");
    }
    conn.close(0u32.into(), b"bye");
}

/// The login: the agent's certificate and exporter signature, checked exactly as an SSH login
/// is ([`check_login`], then the policy's word and the registration with [`admit_login`]), then
/// the proxy's own proof.
async fn login(
    shared: &TunnelShared,
    proof: &ProxyProof,
    conn: &quinn::Connection,
) -> Result<LoggedIn, Failed> {
    let (send, recv) = conn
        .accept_bi()
        .await
        .map_err(|e| Failed::Protocol(e.to_string()))?;
    let mut control = Control::new(send, recv);
    let Frame::AgentAuth {
        login,
        cert,
        signature,
    } = control
        .read()
        .await
        .map_err(|e| Failed::Protocol(e.to_string()))?
    else {
        return Err(Failed::Protocol("first frame is not AgentAuth".into()));
    };
    let checked = check_dialler(shared, conn, &login, &cert, &signature).and_then(|role| {
        admit_login(shared, &role)
            .map(|registration| (role, registration))
            .map_err(|why| ("locked", why))
    });
    match checked {
        Ok((
            Role::Agent {
                host_id,
                cluster,
                role,
            },
            registration,
        )) => {
            let hello = Message::Hello {
                version: tunnel_proto::PROTOCOL_VERSION,
                id: shared.proxy_id.clone(),
            };
            // The proxy set as on SSH's `@control` (see `crate::peers`): this proxy alone
            // without a peers table for the cluster, nothing while the set is not known yet.
            let ids = match shared.peers.subscribe(&cluster) {
                Some(rx) => rx.borrow().clone(),
                None => vec![shared.proxy_id.clone()],
            };
            let mut frames = vec![proof_frame(conn, proof)?, Frame::Control(hello)];
            if !ids.is_empty() {
                frames.push(Frame::Control(Message::ProxySet { ids }));
            }
            control
                .write(&frames)
                .await
                .map_err(|e| Failed::Protocol(e.to_string()))?;
            info!(role = "agent", who = %format!("{host_id}.{cluster} (role {role})"), transport = QUIC, "login accepted");
            Ok(LoggedIn {
                control,
                role: Role::Agent {
                    host_id,
                    cluster,
                    role,
                },
                registration,
            })
        }
        Ok((client @ Role::Client { .. }, registration)) => {
            // A client hears the proxy's proof and nothing else on this stream: it opens a
            // stream per stream it wants.
            control
                .write(&[proof_frame(conn, proof)?])
                .await
                .map_err(|e| Failed::Protocol(e.to_string()))?;
            if let Role::Client { user, cluster, .. } = &client {
                info!(role = "client", who = %format!("{user} of {cluster}"), transport = QUIC, "login accepted");
            }
            Ok(LoggedIn {
                control,
                role: client,
                registration,
            })
        }
        Err((reason, detail)) => {
            // Say why, and give the frame a moment to be acknowledged before the close.
            let refused = Frame::Refused {
                reason: detail.clone(),
            };
            if control.write(&[refused]).await.is_ok() && control.send_half().finish().is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(1), control.send_half().stopped())
                    .await;
            }
            Err(Failed::Refused(reason, login, detail))
        }
    }
}

/// The proxy's proof for this connection: its host certificate and its signature over the proxy
/// exporter value.
fn proof_frame(conn: &quinn::Connection, proof: &ProxyProof) -> Result<Frame, Failed> {
    let proxy_value = exporter(conn, PROXY_CONTEXT).map_err(Failed::Protocol)?;
    let signature =
        sign_binding(&proof.key, &proxy_value).map_err(|e| Failed::Protocol(e.to_string()))?;
    Ok(Frame::ProxyAuth {
        key: proof.line(),
        signature,
    })
}

/// The checks of a QUIC login, an agent's or a client's: the certificate exactly as on SSH
/// ([`check_login`]: a host certificate for an `@agent/` login, a user certificate otherwise), and
/// the signature over this connection's exporter value with the certificate's key.
fn check_dialler(
    shared: &TunnelShared,
    conn: &quinn::Connection,
    login: &str,
    cert: &str,
    signature: &str,
) -> Result<Role, (&'static str, String)> {
    let cert = Certificate::from_openssh(cert.trim())
        .map_err(|e| ("no_certificate", format!("not an OpenSSH certificate: {e}")))?;
    let role = check_login(&shared.trust, login, &cert)?;
    let agent_value = exporter(conn, AGENT_CONTEXT).map_err(|e| ("bad_binding", e))?;
    let key = PublicKey::from(cert.public_key().clone());
    verify_binding(&key, &agent_value, signature).map_err(|e| (e.reason(), e.to_string()))?;
    Ok(role)
}

/// Registration and `@control` until the connection ends: `Err("shutdown")` at hard stop.
async fn serve_control(
    shared: &Arc<TunnelShared>,
    tunnel: &Arc<Tunnel>,
    role: &str,
    registration: &Registration,
    conn: &quinn::Connection,
    control: &mut Control,
) -> Result<(), String> {
    let mut drained = false;
    let entry = registration.entry.clone();
    // The tunnel lives as long as the connection, not its control stream: an agent that moves on
    // a drain order drops the control stream while its streams finish here.
    let mut control_open = true;
    // Each change of the proxy set goes to the agent, as on SSH's `@control`.
    let mut peers = shared.peers.subscribe(&tunnel.cluster);
    // Again now: a change since the login's set would otherwise be missed (a repeat is harmless).
    if let Some(rx) = &mut peers {
        let ids = rx.borrow_and_update().clone();
        if !ids.is_empty() {
            control
                .write(&[Frame::Control(Message::ProxySet { ids })])
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let mut signer = shared.trust.signer(&tunnel.cluster, Signs::Agents);
    let mut agent_version = 0u32;
    loop {
        tokio::select! {
            Ok(()) = async { signer.as_mut().expect("guarded").changed().await }, if signer.is_some() && agent_version >= HOST_CA_SIGNER_VERSION && control_open && !drained => {
                if let Some(m) = signer_for(&mut signer, agent_version) {
                    control.write(&[Frame::Control(m)]).await.map_err(|e| e.to_string())?;
                }
            }
            Ok(()) = async { peers.as_mut().expect("guarded").changed().await }, if peers.is_some() && control_open && !drained => {
                let ids = peers.as_mut().expect("guarded").borrow_and_update().clone();
                if !ids.is_empty() {
                    control.write(&[Frame::Control(Message::ProxySet { ids })]).await.map_err(|e| e.to_string())?;
                }
            }
            frame = control.read(), if control_open => match frame {
                Err(e) => {
                    debug!(error = %e, "control stream ended");
                    control_open = false;
                }
                Ok(frame) => match frame {
                Frame::Register { target } => {
                    let reply = match crate::tunnel::register::register_target(shared, tunnel, role, &target).await {
                        Ok(()) => Frame::Registered { target, ok: true, reason: String::new() },
                        Err((_, reason)) => Frame::Registered { target, ok: false, reason },
                    };
                    control.write(&[reply]).await.map_err(|e| e.to_string())?;
                }
                Frame::Control(Message::TargetLabels { target, labels }) => {
                    debug!(%target, ?labels, "target labels");
                    tunnel.set_labels(&target, labels.into_iter().collect());
                }
                Frame::Control(Message::Hello { version, id }) => {
                    debug!(version, agent = %id, "control hello");
                    tunnel.agent_version.send_replace(version.max(1));
                    agent_version = version;
                    if let Some(m) = signer_for(&mut signer, agent_version) {
                        control.write(&[Frame::Control(m)]).await.map_err(|e| e.to_string())?;
                    }
                }
                Frame::Control(Message::Heartbeat { active_streams }) => debug!(active_streams, "heartbeat"),
                other => {
                    warn!(?other, "unexpected frame on the control stream: closing");
                    return Err("protocol".into());
                }
            }},
            _ = shared.draining.cancelled(), if !drained => {
                drained = true;
                let drain = Message::Drain { reason: "proxy shutting down".into(), grace_secs: shared.grace_secs };
                let _ = control.write(&[Frame::Control(drain)]).await;
            }
            e = conn.closed() => return match e {
                quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed => Ok(()),
                e => Err(e.to_string()),
            },
            _ = entry.kicked.cancelled() => {
                // A lock or a role taken away: the reason goes in the close, which the agent logs.
                let why = entry.reason().unwrap_or_default();
                info!(reason = %why, transport = QUIC, "connection closed by policy");
                tunnel.link.close(&why).await;
                return Err("policy".into());
            }
            _ = shared.hard_stop.cancelled() => {
                conn.close(0u32.into(), b"proxy shutting down");
                return Err("shutdown".into());
            }
        }
    }
}
