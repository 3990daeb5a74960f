//! The russh handler: logins, target registration, stream requests and their routing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::counter;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tracing::{Instrument, info, info_span, warn};
use tunnel_proto::certs::Certificate;
use tunnel_proto::login::LOGIN_TARGET;
use tunnel_proto::names::{CONTROL_HOST, NameError, StreamTarget};

use crate::metrics as m;
use crate::routing::Tunnel;

use super::*;

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
        counter!(m::AUTH_FAILURES, "reason" => "no_certificate", "transport" => crate::link::SSH)
            .increment(1);
        Ok(Auth::Reject {
            proceed_with_methods: None,
            partial_success: false,
        })
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if offer.algorithm.clone().is_rsa() || offer.public_key.algorithm().is_rsa() {
            // russh is built without RSA: it would fail the signature with a misleading
            // "invalid", so say what is true here (and in the Rust client, which refuses to load
            // an RSA identity with the same words).
            warn!(peer = %self.peer, login = user, reason = "rsa_not_supported", "login refused: {}", postern_dial::ssh::RSA_NOT_SUPPORTED);
            counter!(m::AUTH_FAILURES, "reason" => "rsa_not_supported", "transport" => crate::link::SSH)
                .increment(1);
            return Ok(Auth::Reject {
                proceed_with_methods: None,
                partial_success: false,
            });
        }
        Ok(Auth::Accept)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        self.state.attempt_seen.store(true, Ordering::Relaxed);
        if let Some(why) = self.over_identity_limit(user) {
            warn!(peer = %self.peer, login = user, reason = "auth_failures_per_identity", "login refused: {why}");
            counter!(m::LIMIT_REFUSALS, "limit" => "auth_failures_per_identity").increment(1);
            self.state.refused.notify_one();
            return Ok(Auth::Reject {
                proceed_with_methods: Some(russh::MethodSet::empty()),
                partial_success: false,
            });
        }
        let checked = self.check(user, certificate).and_then(|role| {
            self.admit(&role)
                .map(|()| role)
                .map_err(|why| ("locked", why))
        });
        match checked {
            Ok(role) => {
                let (kind, who) = match &role {
                    Role::Agent {
                        host_id,
                        cluster,
                        role,
                    } => ("agent", format!("{host_id}.{cluster} (role {role})")),
                    Role::Client { user, cluster, .. } => ("client", format!("{user}@{cluster}")),
                };
                info!(peer = %self.peer, role = kind, who, "login accepted");
                self.state
                    .is_agent
                    .store(matches!(role, Role::Agent { .. }), Ordering::Relaxed);
                self.role = Some(role);
                self.state.authed.notify_one();
                Ok(Auth::Accept)
            }
            Err((reason, detail)) if reason == "critical_option" || reason == "locked" => {
                // The certificate is the cluster's and its key proved itself; only a restriction
                // we cannot honour stands in the way. A USERAUTH_FAILURE carries no words, and
                // `ssh` exits on it before reading a later disconnect, so the login "succeeds"
                // with no role (every channel and forward is refused) and the connection is
                // closed at once with the reason as the disconnect description, which `ssh`
                // prints: "Received disconnect from ...: certificate has critical option ...".
                *self.state.refusal.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(detail.clone());
                let _ = self.refuse(user, reason, &detail);
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
        let role = match &self.role {
            Some(Role::Agent { role, .. }) => role.clone(),
            _ => String::new(),
        };
        Ok(
            super::register::register_target(&self.shared, &tunnel, &role, address)
                .await
                .is_ok(),
        )
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
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match &self.role {
            Some(Role::Agent {
                host_id, cluster, ..
            }) => {
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
                let tunnel = self.tunnel(session);
                self.shared.streams.spawn(
                    control(channel, self.shared.clone(), tunnel, cluster.clone()).instrument(span),
                );
            }
            Some(Role::Client {
                user,
                port_forwarding: false,
                ..
            }) => {
                let why = "your certificate does not permit port forwarding (it lacks the permit-port-forwarding extension, as after ssh-keygen -O no-port-forwarding or -O clear): ask for a certificate without that restriction";
                info!(user = %user, why, "stream refused");
                counter!(m::STREAM_OPENS, "result" => "forbidden").increment(1);
                self.shared
                    .audit
                    .refused(&self.stream_info(host_to_connect), "forbidden", why);
                reply
                    .reject(reject_reason(
                        ChannelOpenFailure::AdministrativelyProhibited,
                        why,
                    ))
                    .await;
            }
            Some(Role::Client { user, cluster, .. }) => {
                let max = self.shared.limits.max_streams_per_client;
                if self.client_streams.load(Ordering::Relaxed) >= max {
                    let why = format!("too many open streams on this connection (limit {max})");
                    info!(user = ?user, why, "stream refused");
                    counter!(m::STREAM_OPENS, "result" => "limit").increment(1);
                    counter!(m::LIMIT_REFUSALS, "limit" => "streams_per_client").increment(1);
                    self.shared
                        .audit
                        .refused(&self.stream_info(host_to_connect), "limit", &why);
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
                    client_credit: tunnel_proto::credit::id_speaks_credit(session.remote_sshid()),
                    info: self.stream_info(host_to_connect),
                };
                match self.route(&open).and_then(|(tunnel, target)| {
                    let guard = self.authorize(&tunnel, &target)?;
                    let user_slot = self.user_stream(&open, &target)?;
                    Ok((tunnel, target, guard, user_slot))
                }) {
                    Ok((tunnel, target, guard, user_slot)) => {
                        let span = info_span!("stream", user = ?open.user, cluster = %target.cluster, target = %target.target, host_id = %tunnel.host_id);
                        let shared = self.shared.clone();
                        let held = StreamSlot::take(self.client_streams.clone());
                        self.shared.streams.spawn(
                            async move {
                                let _held = (held, guard, user_slot);
                                open_stream(shared, tunnel, target, open, channel, reply).await
                            }
                            .instrument(span),
                        );
                    }
                    Err((result, why)) => {
                        info!(user = ?open.user, host = ?open.host, result, why, "stream refused");
                        counter!(m::STREAM_OPENS, "result" => result).increment(1);
                        self.shared.audit.refused(&open.info, result, &why);
                        reply
                            .reject(reject_reason(ChannelOpenFailure::ConnectFailed, why))
                            .await;
                    }
                }
            }
            None => match self.state.refusal() {
                Some(why) => {
                    reply
                        .reject(reject_reason(
                            ChannelOpenFailure::AdministrativelyProhibited,
                            why,
                        ))
                        .await
                }
                None => {
                    reply
                        .reject(ChannelOpenFailure::AdministrativelyProhibited)
                        .await
                }
            },
        }
        Ok(())
    }
}

impl Conn {
    /// A place for one more stream of this user to `target`, under
    /// `limits.max_streams_per_user_per_target`; the refusal is counted here.
    fn user_stream(
        &self,
        open: &OpenRequest,
        target: &StreamTarget,
    ) -> Result<admission::UserStream, (&'static str, String)> {
        let max = self.shared.limits.max_streams_per_user_per_target;
        self.shared
            .user_streams
            .take(&target.cluster, &open.user, &target.target, max)
            .ok_or_else(|| {
                counter!(m::LIMIT_REFUSALS, "limit" => "streams_per_user_per_target").increment(1);
                (
                    "limit",
                    format!(
                        "user {} has {max} streams open to {} through this proxy (limit {max} per user and target): close some and retry",
                        open.user,
                        target.host()
                    ),
                )
            })
    }
}

/// One of a client connection's open streams; dropping it frees the slot.
pub(super) struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    pub(super) fn take(count: Arc<AtomicUsize>) -> StreamSlot {
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
pub(super) struct OpenRequest {
    /// Who asked for what, for the audit.
    pub(super) info: crate::audit::StreamInfo,
    pub(super) user: String,
    pub(super) cluster: String,
    pub(super) host: String,
    pub(super) port: u32,
    pub(super) originator: (String, u32),
    /// Whether the client speaks per-stream credit (its SSH identification string says so).
    pub(super) client_credit: bool,
}

impl Conn {
    /// The audit's view of a stream this client asks for (`host` as asked).
    pub(super) fn stream_info(&self, host: &str) -> crate::audit::StreamInfo {
        let (user, cluster, key_id) = match &self.role {
            Some(Role::Client {
                user,
                cluster,
                key_id,
                ..
            }) => (user.clone(), cluster.clone(), key_id.clone()),
            _ => Default::default(),
        };
        let target = StreamTarget::parse(host)
            .map(|t| t.target)
            .unwrap_or_else(|_| host.chars().take(80).collect());
        crate::audit::StreamInfo {
            user,
            key_id,
            source: self.peer.to_string(),
            cluster,
            target,
            transport: "",
        }
    }

    /// The policy's decision on a routed stream; on success the stream is recorded on the
    /// connection's registry entry (so a policy change re-decides it) until the guard drops.
    pub(super) fn authorize(
        &self,
        tunnel: &Tunnel,
        target: &StreamTarget,
    ) -> Result<Option<crate::policy::registry::StreamGuard>, (&'static str, String)> {
        let Some(Role::Client {
            user,
            cert_roles,
            request,
            ..
        }) = &self.role
        else {
            return Err(("forbidden", "only clients open streams".into()));
        };
        let who = crate::policy::Who {
            user: user.clone(),
            cert_roles: cert_roles.clone(),
            request: request.clone(),
        };
        let labels = tunnel.labels(&target.target);
        if let Some(policy) = self.shared.policies.cluster(&target.cluster) {
            policy
                .decide(&who, &target.target, labels.as_ref())
                .map_err(|r| (r.result, r.reason))?;
        }
        Ok(self
            .state
            .registration
            .get()
            .map(|r| r.entry.add_stream(&target.target, labels)))
    }

    /// Resolves a client's request to a tunnel, or a `(result label, reason)` refusal.
    pub(super) fn route(
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
        if target.target == LOGIN_TARGET {
            return Err((
                "reserved",
                format!(
                    "target '{LOGIN_TARGET}' is reserved for the proxy's login relay: log in with `psh login` (POST /webapi/login on the proxy's web address)"
                ),
            ));
        }
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
