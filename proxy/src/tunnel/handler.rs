//! The russh handler: logins, target registration, stream requests and their routing.

use std::sync::atomic::Ordering;

use metrics::counter;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tracing::{Instrument, info, info_span, warn};
use tunnel_proto::certs::Certificate;
use tunnel_proto::names::CONTROL_HOST;

use crate::metrics as m;

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
            Some(Role::Client { .. }) => {
                let view = self.view();
                let open = view.request(
                    host_to_connect,
                    port_to_connect,
                    (originator_address.to_owned(), originator_port),
                    tunnel_proto::credit::id_speaks_credit(session.remote_sshid()),
                );
                match view.decide(&open) {
                    Ok(decided) => {
                        let span = info_span!("stream", user = ?open.user, cluster = %decided.target.cluster, target = %decided.target.target, host_id = %decided.tunnel.host_id);
                        let shared = self.shared.clone();
                        self.shared.streams.spawn(
                            open_stream(shared, decided, open, ClientEnd::Ssh { channel, reply })
                                .instrument(span),
                        );
                    }
                    Err(refusal) => {
                        view.refused(&open, &refusal);
                        let (result, why) = refusal;
                        let code = if result == "forbidden" {
                            ChannelOpenFailure::AdministrativelyProhibited
                        } else {
                            ChannelOpenFailure::ConnectFailed
                        };
                        reply.reject(reject_reason(code, why)).await;
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
    /// This connection as a client whose streams are decided ([`ClientView`]).
    pub(super) fn view(&self) -> ClientView<'_> {
        ClientView {
            shared: &self.shared,
            peer: self.peer,
            role: self.role.as_ref(),
            registration: self.state.registration.get(),
            open_streams: &self.client_streams,
        }
    }
}

/// A client's stream request (an SSH `direct-tcpip` channel or a QUIC `Frame::Open`).
pub(crate) struct OpenRequest {
    /// Who asked for what, for the audit.
    pub(crate) info: crate::audit::StreamInfo,
    pub(crate) user: String,
    pub(crate) cluster: String,
    pub(crate) host: String,
    pub(crate) port: u32,
    pub(crate) originator: (String, u32),
    /// Whether the client speaks per-stream credit (its SSH identification string says so).
    pub(crate) client_credit: bool,
}
