//! The russh handler: logins, target registration, stream requests and their routing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::counter;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tracing::{Instrument, info, info_span, warn};
use tunnel_proto::certs::Certificate;
use tunnel_proto::names::{CONTROL_HOST, NameError, StreamTarget, validate_label};

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
            counter!(m::TUNNEL_CONNECTS, "cluster" => tunnel.cluster.clone(), "transport" => crate::link::SSH).increment(1);
            info!(cluster = %tunnel.cluster, host_id = %tunnel.host_id, peer = %self.peer, "tunnel up");
        }
        super::register::set_tunnel_gauge(&self.shared, &tunnel.cluster, crate::link::SSH);
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
        session: &mut Session,
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
                let tunnel = self.tunnel(session);
                self.shared
                    .streams
                    .spawn(control(channel, self.shared.clone(), tunnel).instrument(span));
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
    pub(super) user: String,
    pub(super) cluster: String,
    pub(super) host: String,
    pub(super) port: u32,
    pub(super) originator: (String, u32),
}

impl Conn {
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
