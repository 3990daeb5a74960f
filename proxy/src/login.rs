//! The login relay: `POST /webapi/login` on the web listener, passed as one JSON line down a
//! stream to target `login` of the cluster (the Auth server's agent serves it), rate-limited per
//! user and per source address before anything is relayed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::counter;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tunnel_proto::login::{LOGIN_TARGET, LoginRequest, LoginResponse, MAX_LOGIN_BYTES};

use crate::metrics as m;
use crate::tunnel::TunnelShared;

/// Logins relayed per source address per minute, at most.
pub const PER_SOURCE_PER_MINUTE: u32 = 30;
/// Logins relayed per user per minute, at most.
pub const PER_USER_PER_MINUTE: u32 = 10;
/// How long the Auth server has to answer.
const RELAY_TIMEOUT: Duration = Duration::from_secs(15);

/// Fixed one-minute windows of attempts per key.
#[derive(Default)]
pub struct Limiter(Mutex<HashMap<String, (Instant, u32)>>);

impl Limiter {
    /// Counts an attempt for `key`; false once `limit` is reached within the minute.
    pub fn allow(&self, key: &str, limit: u32) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 100_000 {
            m.retain(|_, (since, _)| since.elapsed() < Duration::from_secs(60));
        }
        let e = m.entry(key.to_string()).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= Duration::from_secs(60) {
            *e = (Instant::now(), 0);
        }
        e.1 = e.1.saturating_add(1);
        e.1 <= limit
    }

    /// Attempts counted for `key` in the current minute.
    pub fn count(&self, key: &str) -> u32 {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key)
            .filter(|(since, _)| since.elapsed() < Duration::from_secs(60))
            .map_or(0, |(_, n)| *n)
    }
}

/// What the relay needs from the proxy.
pub struct LoginRelay {
    /// Live tunnels.
    pub shared: Arc<TunnelShared>,
    /// Per source address.
    pub by_source: Limiter,
    /// Per `cluster/user`.
    pub by_user: Limiter,
}

fn result(resp: LoginResponse, label: &'static str) -> LoginResponse {
    counter!(m::LOGIN_RELAYS, "result" => label).increment(1);
    resp
}

impl LoginRelay {
    /// A relay over the proxy's tunnels.
    pub fn new(shared: Arc<TunnelShared>) -> LoginRelay {
        LoginRelay {
            shared,
            by_source: Limiter::default(),
            by_user: Limiter::default(),
        }
    }

    /// Relays one login body from `peer`.
    pub async fn relay(&self, body: &[u8], peer: SocketAddr) -> LoginResponse {
        let source: IpAddr = peer.ip();
        if !self
            .by_source
            .allow(&source.to_string(), PER_SOURCE_PER_MINUTE)
        {
            return result(
                LoginResponse::failed(429, "too many logins from this address: wait a minute"),
                "rate_limited",
            );
        }
        let mut req: LoginRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                return result(
                    LoginResponse::failed(400, format!("bad login request: {e}")),
                    "bad_request",
                );
            }
        };
        if !self.by_user.allow(
            &format!("{}/{}", req.cluster, req.user),
            PER_USER_PER_MINUTE,
        ) {
            return result(
                LoginResponse::failed(429, "too many logins for this user: wait a minute"),
                "rate_limited",
            );
        }
        req.source = Some(peer.to_string());
        let tunnel = match self.shared.routing.pick(&req.cluster, LOGIN_TARGET) {
            Ok(t) => t,
            Err(e) => {
                return result(
                    LoginResponse::failed(
                        502,
                        format!("auth server unreachable through this proxy: {e}"),
                    ),
                    "no_tunnel",
                );
            }
        };
        let relayed = async {
            let mut stream = tunnel
                .link
                .open_io(
                    LOGIN_TARGET,
                    0,
                    &source.to_string(),
                    u32::from(peer.port()),
                    RELAY_TIMEOUT,
                )
                .await
                .map_err(|e| format!("opening the login stream: {e}"))?;
            let mut line = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
            line.push(b'\n');
            stream.write_all(&line).await.map_err(|e| e.to_string())?;
            stream.flush().await.map_err(|e| e.to_string())?;
            let mut reader = BufReader::new((&mut stream).take(MAX_LOGIN_BYTES as u64 * 4));
            let mut answer = String::new();
            reader
                .read_line(&mut answer)
                .await
                .map_err(|e| e.to_string())?;
            serde_json::from_str::<LoginResponse>(&answer)
                .map_err(|e| format!("the Auth server's answer is not a login response: {e}"))
        };
        match tokio::time::timeout(RELAY_TIMEOUT, relayed).await {
            Ok(Ok(resp)) if resp.error.is_empty() => result(resp, "ok"),
            Ok(Ok(resp)) => result(resp, "refused"),
            Ok(Err(e)) => result(
                LoginResponse::failed(
                    502,
                    format!("auth server unreachable through this proxy: {e}"),
                ),
                "error",
            ),
            Err(_) => result(
                LoginResponse::failed(504, "the Auth server did not answer the login in 15 s"),
                "error",
            ),
        }
    }
}
