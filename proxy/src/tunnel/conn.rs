//! One tunnel-listener connection: handshake deadline, login outcome, and the tunnel's end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use russh::Disconnect;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::link::SSH;
use crate::metrics as m;
use crate::routing::Tunnel;
use postern_dial::write_behind::{WRITE_BEHIND_CAP, WriteBehind};

use super::*;

/// What the connection task and the russh handler both see.
#[derive(Default)]
pub(super) struct ConnState {
    /// Signalled once login succeeded.
    pub(super) authed: Notify,
    /// Signalled when a certificate was refused: the task closes the connection.
    pub(super) refused: Notify,
    /// The agent's tunnel, once it registered a target.
    pub(super) tunnel: OnceLock<Arc<Tunnel>>,
    /// Whether a login attempt reached Postern's own checks.
    pub(super) attempt_seen: AtomicBool,
    /// Whether the login was an agent's.
    pub(super) is_agent: AtomicBool,
    /// Whether the client finished key exchange and asked for user authentication.
    pub(super) auth_started: AtomicBool,
    /// Why the login was refused, when the client should be told in words (the disconnect
    /// description, which `ssh` prints).
    pub(super) refusal: std::sync::Mutex<Option<String>>,
    /// The connection in the policy registry, once logged in (unregistered when dropped).
    pub(super) registration: OnceLock<crate::policy::registry::Registration>,
}

impl ConnState {
    /// The refusal to tell the client, if one was recorded.
    pub(super) fn refusal(&self) -> Option<String> {
        self.refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Cuts a connection under russh's feet: shutting the duplicate down ends the session's reads.
pub(super) struct Killer(std::net::TcpStream);

impl Killer {
    fn cancel(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Splits an accepted socket into the one russh gets and a duplicate kept to cut it.
pub(super) fn duplicate(socket: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std = socket.into_std()?;
    let dup = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, dup))
}

pub(super) async fn serve_conn(
    shared: Arc<TunnelShared>,
    socket: TcpStream,
    peer: SocketAddr,
    slot: admission::Slot,
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
    let evicted = || {
        info!(
            "closed: the pre-login pool was full and this was the oldest connection of the busiest source"
        );
        counter!(m::CONNECTIONS_DROPPED, "reason" => "prelogin_evicted").increment(1);
    };
    let started_session = tokio::time::timeout_at(
        deadline,
        russh::server::run_stream(
            shared.ssh_config.clone(),
            WriteBehind::new(socket, WRITE_BEHIND_CAP),
            handler,
        ),
    );
    let started_session = tokio::select! {
        r = started_session => r,
        _ = slot.evicted.cancelled() => {
            evicted();
            kill.cancel();
            return;
        }
    };
    let session = match started_session {
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
    let close = |why: String| {
        let handle = handle.clone();
        async move {
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                handle.disconnect(Disconnect::ByApplication, why, String::new()),
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
            counter!(m::AUTH_FAILURES, "reason" => "rejected_by_ssh_layer", "transport" => SSH)
                .increment(1);
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
        _ = slot.evicted.cancelled() => {
            evicted();
            close("too many connections logging in: retry".into()).await;
            kill.cancel();
            return;
        }
        _ = state.refused.notified() => {
            let why = state.refusal().unwrap_or_else(|| "certificate refused".into());
            close(why).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut session).await;
            kill.cancel();
            return;
        }
        _ = tokio::time::sleep_until(deadline) => {
            ssh_layer_refusal();
            info!("closed: login not completed before the handshake timeout");
            counter!(m::CONNECTIONS_DROPPED, "reason" => "handshake_timeout").increment(1);
            close("handshake timeout".into()).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut session).await;
            kill.cancel();
            return;
        }
    }
    drop(slot);
    let role = if state.tunnel.get().is_some() || state.is_agent.load(Ordering::Relaxed) {
        "agent"
    } else {
        "client"
    };
    histogram!(m::HANDSHAKE_SECONDS, "role" => role, "transport" => SSH)
        .record(started.elapsed().as_secs_f64());
    let kicked = state
        .registration
        .get()
        .map(|r| r.entry.clone())
        .map(|e| async move {
            e.kicked.cancelled().await;
            e.reason().unwrap_or_default()
        });
    let kicked = async move {
        match kicked {
            Some(k) => k.await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = &mut session => r.map_err(|e| e.to_string()),
        why = kicked => {
            // A lock, a deleted user or a role taken away: the reason is the disconnect
            // message, which `ssh` prints.
            info!(reason = %why, "connection closed by policy");
            close(why).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut session).await;
            kill.cancel();
            Err("policy".into())
        }
        _ = shared.hard_stop.cancelled() => {
            close("proxy shutting down".into()).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut session).await;
            kill.cancel();
            Err("shutdown".into())
        }
    };
    if let Some(t) = state.tunnel.get() {
        shared.routing.remove(&t.cluster, t.id);
        super::register::set_tunnel_gauge(&shared, &t.cluster, SSH);
        let reason = match &result {
            Ok(()) => "closed",
            Err(e) if e == "shutdown" => "shutdown",
            Err(_) => "error",
        };
        counter!(m::TUNNEL_DISCONNECTS, "cluster" => t.cluster.clone(), "reason" => reason, "transport" => SSH)
            .increment(1);
        info!(cluster = %t.cluster, host_id = %t.host_id, reason, uptime_s = started.elapsed().as_secs(), "tunnel closed");
    } else if let Err(e) = result {
        debug!(error = %e, "session ended");
    }
}
