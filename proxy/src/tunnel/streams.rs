//! A client's stream request, either transport (an SSH `direct-tcpip` channel or a QUIC stream
//! opened with `Frame::Open`): the certificate's restrictions, the connection's and the user's
//! stream limits, the route to a tunnel, and the policy's decision, then the refusal recorded in
//! one place (log, metric, audit). [`super::splice::open_stream`] takes it from there.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::counter;
use tracing::info;
use tunnel_proto::login::LOGIN_TARGET;
use tunnel_proto::names::{NameError, StreamTarget};

use super::admission::UserStream;
use super::checks::Role;
use super::{OpenRequest, TunnelShared};
use crate::metrics as m;
use crate::policy::registry::{Registration, StreamGuard};
use crate::routing::Tunnel;

/// Why a stream was refused: `(result label, reason)`, the reason for the client too.
pub(crate) type Refusal = (&'static str, String);

/// A logged-in client connection, either transport: what deciding its streams reads.
pub(crate) struct ClientView<'a> {
    pub(crate) shared: &'a Arc<TunnelShared>,
    pub(crate) peer: SocketAddr,
    pub(crate) role: Option<&'a Role>,
    /// The connection in the policy registry (a stream is recorded on it while open).
    pub(crate) registration: Option<&'a Registration>,
    /// Streams this connection holds open now.
    pub(crate) open_streams: &'a Arc<AtomicUsize>,
}

/// A stream the proxy decided to open, and the places it holds while it lives (freed when
/// dropped).
pub(crate) struct Decided {
    pub(crate) tunnel: Arc<Tunnel>,
    pub(crate) target: StreamTarget,
    /// The stream on the connection's registry entry (re-decided at a policy change), its place
    /// in the connection's and the user's stream counts.
    pub(crate) held: (Option<StreamGuard>, StreamSlot, UserStream),
}

impl ClientView<'_> {
    /// Decides a client's request: `Ok` to open it (routed to a tunnel, the places taken), or the
    /// refusal (not yet recorded: see [`ClientView::refused`]).
    pub(crate) fn decide(&self, open: &OpenRequest) -> Result<Decided, Refusal> {
        match self.role {
            Some(Role::Client {
                port_forwarding: false,
                ..
            }) => {
                return Err((
                    "forbidden",
                    "your certificate does not permit port forwarding (it lacks the permit-port-forwarding extension, as after ssh-keygen -O no-port-forwarding or -O clear): ask for a certificate without that restriction".into(),
                ));
            }
            Some(Role::Client { .. }) => {}
            _ => return Err(("forbidden", "only clients open streams".into())),
        }
        let max = self.shared.limits.max_streams_per_client;
        if self.open_streams.load(Ordering::Relaxed) >= max {
            counter!(m::LIMIT_REFUSALS, "limit" => "streams_per_client").increment(1);
            return Err((
                "limit",
                format!("too many open streams on this connection (limit {max})"),
            ));
        }
        let (tunnel, target) = self.route(open)?;
        let guard = self.authorize(&tunnel, &target)?;
        let user_slot = self.user_stream(open, &target)?;
        Ok(Decided {
            tunnel,
            target,
            held: (
                guard,
                StreamSlot::take(self.open_streams.clone()),
                user_slot,
            ),
        })
    }

    /// Records a refusal ([`record_refused`]). The caller tells the client.
    pub(crate) fn refused(&self, open: &OpenRequest, (result, why): &Refusal) {
        record_refused(self.shared, open, result, why);
    }

    /// The request for `host` (as asked) from this client: who asks, for the decision and the
    /// audit. `client_credit`: whether the client's end speaks per-stream credit (SSH).
    pub(crate) fn request(
        &self,
        host: &str,
        port: u32,
        originator: (String, u32),
        client_credit: bool,
    ) -> OpenRequest {
        let info = self.stream_info(host);
        OpenRequest {
            user: info.user.clone(),
            cluster: info.cluster.clone(),
            host: host.to_owned(),
            port,
            originator,
            client_credit,
            info,
        }
    }

    /// The audit's view of a stream this client asks for (`host` as asked; the agent's
    /// transport is filled in once the stream is routed).
    fn stream_info(&self, host: &str) -> crate::audit::StreamInfo {
        let (user, cluster, key_id) = match self.role {
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

    /// A place for one more stream of this user to `target`, under
    /// `limits.max_streams_per_user_per_target`; the refusal is counted here.
    fn user_stream(
        &self,
        open: &OpenRequest,
        target: &StreamTarget,
    ) -> Result<UserStream, Refusal> {
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

    /// The policy's decision on a routed stream; on success the stream is recorded on the
    /// connection's registry entry (so a policy change re-decides it) until the guard drops.
    fn authorize(
        &self,
        tunnel: &Tunnel,
        target: &StreamTarget,
    ) -> Result<Option<StreamGuard>, Refusal> {
        let Some(Role::Client {
            user,
            cert_roles,
            request,
            ..
        }) = self.role
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
            .registration
            .map(|r| r.entry.add_stream(&target.target, labels)))
    }

    /// Resolves a client's request to a tunnel.
    fn route(&self, open: &OpenRequest) -> Result<(Arc<Tunnel>, StreamTarget), Refusal> {
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

/// Records a refused stream, whatever refused it (the decision, or the agent once routed):
/// logged, counted by result and audited. The caller tells the client.
pub(crate) fn record_refused(
    shared: &TunnelShared,
    open: &OpenRequest,
    result: &'static str,
    why: &str,
) {
    info!(user = ?open.user, host = ?open.host, result, why, "stream refused");
    counter!(m::STREAM_OPENS, "result" => result).increment(1);
    shared.audit.refused(&open.info, result, why);
}

/// One of a client connection's open streams; dropping it frees the slot.
pub(crate) struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn take(count: Arc<AtomicUsize>) -> StreamSlot {
        count.fetch_add(1, Ordering::Relaxed);
        StreamSlot(count)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
