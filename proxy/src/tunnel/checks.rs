//! Login checks, one module for both transports: which certificate may log in as what
//! ([`check_login`]), the policy's word on it ([`admit_login`]: locks, deleted identities, and the
//! registration that lets a later lock close the connection), and how a refusal is recorded
//! ([`record_refusal`]). The SSH handler and the QUIC login both call these.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::counter;
use russh::server::{Auth, Session};
use russh::{ChannelOpenFailure, MethodSet};
use tracing::warn;
use tunnel_proto::certs::{
    CertError, Certificate, check_agent_cert, check_user_cert, signer_fingerprint,
};
use tunnel_proto::names::{AGENT_LOGIN_PREFIX, EXT_REQUEST, EXT_ROLES, validate_label};

/// The OpenSSH certificate extension that allows `direct-tcpip` (`ssh -W`, `-L`).
pub(super) const EXT_PERMIT_PORT_FORWARDING: &str = "permit-port-forwarding";

use crate::link::SSH;
use crate::metrics as m;
use crate::routing::Tunnel;
use crate::trust::Trust;

use super::*;

/// Who a logged-in connection is.
pub(crate) enum Role {
    /// An agent with an accepted host certificate; `role` is its certificate's role (`auth` or
    /// `service`).
    Agent {
        host_id: String,
        cluster: String,
        role: String,
    },
    /// A client with an accepted user certificate of `cluster`. `port_forwarding` is whether the
    /// certificate has `permit-port-forwarding` (OpenSSH refuses `-W` without it, and so do we).
    Client {
        user: String,
        cluster: String,
        port_forwarding: bool,
        cert_roles: Option<Vec<String>>,
        /// The access request the certificate's elevation comes from.
        request: Option<String>,
        key_id: String,
    },
}

/// The russh handler of one tunnel-listener connection.
pub(super) struct Conn {
    pub(super) shared: Arc<TunnelShared>,
    pub(super) peer: SocketAddr,
    pub(super) state: Arc<ConnState>,
    pub(super) role: Option<Role>,
    /// Streams this client connection holds open now.
    pub(super) client_streams: Arc<AtomicUsize>,
}

/// The key failed logins are counted under per identity: source address and login name (capped,
/// so a long name cannot grow the map's keys).
fn identity_key(ip: &str, login: &str) -> String {
    let login: String = login.chars().take(128).collect();
    format!("{ip} {login}")
}

pub(crate) fn reject_reason(
    code: ChannelOpenFailure,
    reason: impl Into<String>,
) -> ChannelOpenFailure {
    ChannelOpenFailure::Other {
        code: code.code(),
        reason: reason.into(),
    }
}

impl Conn {
    pub(super) fn refuse(&self, login: &str, reason: &'static str, detail: &str) -> Auth {
        record_refusal(&self.shared, self.peer, login, reason, detail, SSH);
        self.state.refused.notify_one();
        Auth::Reject {
            proceed_with_methods: Some(MethodSet::empty()),
            partial_success: false,
        }
    }

    /// Refuses a login name that failed too often from this source this minute (before any
    /// check, so its retries cost nothing), without touching other identities at that address.
    pub(super) fn over_identity_limit(&self, login: &str) -> Option<String> {
        let limit = self.shared.limits.max_auth_failures_per_source_per_minute;
        let ip = self.peer.ip().to_string();
        (self
            .shared
            .failures_by_identity
            .count(&identity_key(&ip, login))
            >= limit)
            .then(|| {
                format!(
                    "too many failed logins as '{login}' from {ip} (limit {limit} per minute): retry in a minute"
                )
            })
    }

    pub(super) fn check(
        &self,
        login: &str,
        cert: &Certificate,
    ) -> Result<Role, (&'static str, String)> {
        check_login(&self.shared.trust, login, cert)
    }

    /// The policy's word on a login that passed the certificate checks ([`admit_login`]); the
    /// registration is kept on the connection, so a later policy change can close it.
    pub(super) fn admit(&self, role: &Role) -> Result<(), String> {
        let registration = admit_login(&self.shared, role)?;
        let _ = self.state.registration.set(registration);
        Ok(())
    }

    /// Gets or creates this agent connection's tunnel.
    pub(super) fn tunnel(&self, session: &Session) -> Option<Arc<Tunnel>> {
        let Some(Role::Agent {
            host_id, cluster, ..
        }) = &self.role
        else {
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

/// The certificate checks of both transports: whether `cert` may log in as `login` (an agent's
/// `@agent/<host-id>.<cluster>` or a user name), against the CAs each cluster trusts: CA, type,
/// validity window, principals, cluster and role extensions. A refusal is `(metric reason,
/// detail)`.
pub(crate) fn check_login(
    trust: &Trust,
    login: &str,
    cert: &Certificate,
) -> Result<Role, (&'static str, String)> {
    let now = crate::mint::now_unix();
    let cert_err = |e: CertError| (e.reason(), e.to_string());
    if let Some(principal) = login.strip_prefix(AGENT_LOGIN_PREFIX) {
        let (host_id, cluster) = principal.split_once('.').ok_or((
            "bad_login",
            format!("agent login '{login}' is not @agent/<host-id>.<cluster>"),
        ))?;
        validate_label("host id", host_id).map_err(|e| ("bad_login", e.to_string()))?;
        let trust = trust.cluster(cluster).ok_or((
            "unknown_cluster",
            format!("this proxy does not serve cluster '{cluster}'"),
        ))?;
        let id =
            check_agent_cert(cert, host_id, cluster, now, &trust.host_cas).map_err(cert_err)?;
        Ok(Role::Agent {
            host_id: id.host_id,
            cluster: id.cluster,
            role: id.role,
        })
    } else {
        let signer = signer_fingerprint(cert);
        let Some((cluster, trust)) = trust.cluster_of_user_ca(&signer) else {
            // Maybe a host certificate of a known host CA: say so precisely.
            if trust.is_host_ca(&signer) {
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
            port_forwarding: cert.extensions().contains_key(EXT_PERMIT_PORT_FORWARDING),
            key_id: cert.key_id().to_owned(),
            cert_roles: cert.extensions().get(EXT_ROLES).map(|r| {
                r.split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            request: cert.extensions().get(EXT_REQUEST).cloned(),
        })
    }
}

/// The policy's word on a login of either transport that passed [`check_login`]: a locked or
/// deleted identity is refused (a stale policy refuses streams, not logins). On success the
/// connection is registered in the policy registry, and the caller keeps the registration for
/// the connection's life: a lock or a policy change cancels its `kicked` token, and the
/// connection task closes the connection with the reason.
pub(crate) fn admit_login(
    shared: &TunnelShared,
    role: &Role,
) -> Result<crate::policy::registry::Registration, String> {
    use crate::policy::registry::Kind;
    let (cluster, kind) = match role {
        Role::Agent {
            host_id, cluster, ..
        } => (cluster, Kind::Agent(host_id.clone())),
        Role::Client {
            user,
            cluster,
            cert_roles,
            request,
            ..
        } => (
            cluster,
            Kind::Client(crate::policy::Who {
                user: user.clone(),
                cert_roles: cert_roles.clone(),
                request: request.clone(),
            }),
        ),
    };
    let policies = &shared.policies;
    if let Some(policy) = policies.cluster(cluster) {
        let verdict = match &kind {
            Kind::Agent(host_id) => policy.check_agent(host_id),
            Kind::Client(who) => policy.check_login(who),
        };
        if let Err(r) = verdict
            && r.result != "policy_unavailable"
        {
            return Err(r.reason);
        }
    }
    Ok(policies.registry.register(cluster, kind))
}

/// Logs and counts a refused login (either transport) and charges it to the source address.
pub(crate) fn record_refusal(
    shared: &TunnelShared,
    peer: SocketAddr,
    login: &str,
    reason: &'static str,
    detail: &str,
    transport: &'static str,
) {
    warn!(%peer, login, reason, detail, transport, "login refused");
    counter!(m::AUTH_FAILURES, "reason" => reason, "transport" => transport).increment(1);
    let ip = peer.ip().to_string();
    let key = identity_key(&ip, login);
    // The source's count grows by one per identity, not per attempt.
    if shared.failures_by_identity.count(&key) == 0 {
        shared.failures_by_source.record(&ip);
    }
    shared.failures_by_identity.record(&key);
}
