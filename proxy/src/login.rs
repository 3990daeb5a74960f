//! The login relay: `POST /webapi/login` on the web listener, passed as one JSON line down a
//! stream to target `login` of the cluster (the Auth server's agent serves it), rate-limited per
//! user and per source address before anything is relayed. Agent joins (`POST /webapi/join`)
//! take the same way. A renewal (`POST /webapi/renew`) that presents a certificate from one of
//! the cluster's trusted CAs, unexpired, counts against that certificate's key instead
//! ([`PER_CERT_PER_MINUTE`]): a fleet behind one NAT address renews at once after a CA rotation
//! without spending its users' login budget, and a certificate seen once cannot be used to
//! flood the Auth server.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tunnel_proto::login::{
    LOGIN_TARGET, LoginRequest, LoginResponse, MAX_LOGIN_BYTES, MAX_USER_LEN,
};

use crate::metrics as m;
use crate::rate::RateLimit;
use crate::tunnel::TunnelShared;

/// Logins relayed per source address per minute, at most.
pub const PER_SOURCE_PER_MINUTE: u32 = 30;
/// Logins relayed per user per minute from one source address, at most. Counted per address so
/// that a stranger using up the budget of a user does not lock its owner out from another
/// address (issue 11, item 6).
pub const PER_USER_PER_MINUTE: u32 = 10;
/// Renewals relayed per certificate key per minute, at most (an agent, a bot or a proxy renews
/// once in two-thirds of its certificate's life, or once when a rotation moves the CA).
pub const PER_CERT_PER_MINUTE: u32 = 6;
/// How long the Auth server has to answer.
const RELAY_TIMEOUT: Duration = Duration::from_secs(15);

/// An agent's request the relay passes on: it names its cluster, and carries the source address
/// the proxy saw.
pub trait AgentRequest: serde::Serialize + serde::de::DeserializeOwned {
    /// The cluster it is for.
    fn cluster(&self) -> &str;
    /// Records the source address (whatever the agent sent is replaced).
    fn set_source(&mut self, source: String);
    /// The key its rate limit counts against, when not the source address: see
    /// [`PER_CERT_PER_MINUTE`].
    fn certificate_key(&self, _trust: &crate::trust::Trust, _now: u64) -> Option<String> {
        None
    }
}

impl AgentRequest for tunnel_proto::join::JoinRequest {
    fn cluster(&self) -> &str {
        &self.cluster
    }
    fn set_source(&mut self, source: String) {
        self.source = Some(source);
    }
}

impl AgentRequest for tunnel_proto::join::RenewRequest {
    fn cluster(&self) -> &str {
        &self.cluster
    }
    fn set_source(&mut self, source: String) {
        self.source = Some(source);
    }
    /// The certificate's key, if the certificate is unexpired and signed by one of the cluster's
    /// trusted host or user CA keys (the Auth server checks the rest).
    fn certificate_key(&self, trust: &crate::trust::Trust, now: u64) -> Option<String> {
        let cert = russh::keys::ssh_key::Certificate::from_openssh(self.renew_cert.trim()).ok()?;
        let cas = trust.cluster(&self.cluster)?;
        let signer = tunnel_proto::certs::signer_fingerprint(&cert);
        let trusted = cas.host_cas.contains(&signer) || cas.user_cas.contains(&signer);
        (trusted && cert.valid_before() > now).then(|| {
            format!(
                "{}/{}",
                self.cluster,
                cert.public_key().fingerprint(russh::keys::HashAlg::Sha256)
            )
        })
    }
}

/// What the relay needs from the proxy.
pub struct LoginRelay {
    /// Live tunnels.
    pub shared: Arc<TunnelShared>,
    /// Per source address: [`PER_SOURCE_PER_MINUTE`].
    pub by_source: RateLimit,
    /// Per `cluster/user/source address`: [`PER_USER_PER_MINUTE`].
    pub by_user: RateLimit,
    /// Renewals per `cluster/certificate key`: [`PER_CERT_PER_MINUTE`].
    pub by_cert: RateLimit,
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
            by_source: RateLimit::per_minute(PER_SOURCE_PER_MINUTE),
            by_user: RateLimit::per_minute(PER_USER_PER_MINUTE),
            by_cert: RateLimit::per_minute(PER_CERT_PER_MINUTE),
        }
    }

    /// Relays one login body from `peer`.
    pub async fn relay(&self, body: &[u8], peer: SocketAddr) -> LoginResponse {
        let source: IpAddr = peer.ip();
        if !self.by_source.allow(&source.to_string()) {
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
        // Names are capped before they become limiter keys or reach the Auth server.
        if req.user.is_empty() || req.user.len() > MAX_USER_LEN {
            return result(
                LoginResponse::failed(400, format!("user: 1 to {MAX_USER_LEN} bytes")),
                "bad_request",
            );
        }
        if let Err(e) = tunnel_proto::names::validate_cluster(&req.cluster) {
            let e = e.to_string();
            let e: String = e.chars().take(200).collect();
            return result(
                LoginResponse::failed(400, format!("cluster: {e}")),
                "bad_request",
            );
        }
        if self.shared.trust.cluster(&req.cluster).is_none() {
            return result(
                LoginResponse::failed(
                    404,
                    format!(
                        "unknown cluster {}: this proxy does not route to it",
                        req.cluster
                    ),
                ),
                "unknown_cluster",
            );
        }
        if !self
            .by_user
            .allow(&format!("{}/{}/{source}", req.cluster, req.user))
        {
            return result(
                LoginResponse::failed(
                    429,
                    "too many logins for this user from this address: wait a minute",
                ),
                "rate_limited",
            );
        }
        req.source = Some(peer.to_string());
        let line = serde_json::to_vec(&req).expect("a login request serializes");
        self.relay_line(&req.cluster, peer, line).await
    }

    /// Relays one agent join (`POST /webapi/join`) or renewal (`POST /webapi/renew`) body from
    /// `peer`: the same per-source limit as logins, then down a stream to target `login` (the
    /// Auth server tells them from logins by their fields).
    pub async fn relay_agent<T: AgentRequest>(
        &self,
        body: &[u8],
        peer: SocketAddr,
    ) -> LoginResponse {
        let parsed = serde_json::from_slice::<T>(body);
        let cert_key = parsed
            .as_ref()
            .ok()
            .and_then(|r| r.certificate_key(&self.shared.trust, postern_dial::mint::now_unix()));
        let (allowed, refusal) = match &cert_key {
            Some(k) => (
                self.by_cert.allow(k),
                "too many renewals for this certificate: wait a minute",
            ),
            None => (
                self.by_source.allow(&peer.ip().to_string()),
                "too many requests from this address: wait a minute",
            ),
        };
        if !allowed {
            return result(LoginResponse::failed(429, refusal), "rate_limited");
        }
        let mut req: T = match parsed {
            Ok(r) => r,
            Err(e) => {
                return result(
                    LoginResponse::failed(400, format!("bad request: {e}")),
                    "bad_request",
                );
            }
        };
        if self.shared.trust.cluster(req.cluster()).is_none() {
            let cluster: String = req.cluster().chars().take(64).collect();
            return result(
                LoginResponse::failed(
                    404,
                    format!("unknown cluster {cluster}: this proxy does not route to it"),
                ),
                "unknown_cluster",
            );
        }
        req.set_source(peer.to_string());
        let line = serde_json::to_vec(&req).expect("a request serializes");
        let cluster = req.cluster().to_owned();
        self.relay_line(&cluster, peer, line).await
    }

    /// Sends one JSON line down a new stream to target `login` of `cluster` and returns the
    /// one-line answer.
    async fn relay_line(
        &self,
        cluster: &str,
        peer: SocketAddr,
        mut line: Vec<u8>,
    ) -> LoginResponse {
        let source = peer.ip();
        let tunnel = match self.shared.routing.pick(cluster, LOGIN_TARGET) {
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
