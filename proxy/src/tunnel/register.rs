//! Target registration, one rule set for both transports: an SSH agent's `tcpip-forward` and a
//! QUIC agent's `Register` frame both call [`register_target`].

use std::sync::Arc;

use metrics::{counter, gauge};
use tracing::{info, warn};
use tunnel_proto::names::{ROLE_AUTH, is_reserved_target, validate_label};

use crate::metrics as m;
use crate::routing::Tunnel;

use super::TunnelShared;

/// Why a target was not registered: `(postern_target_refusals_total reason, what the agent is
/// told)`.
pub(crate) type Refused = (&'static str, String);

/// Registers `target` on `tunnel` of an agent whose certificate role is `role`, and puts the
/// tunnel in the routing table on its first target. The rules: a valid name; the reserved
/// targets (`auth`, `login`) only for role `auth`; the cluster's tunnel limit on this proxy; one
/// tunnel per host id (a newer tunnel replaces an older one, which is closed with a reason).
pub(crate) async fn register_target(
    shared: &TunnelShared,
    tunnel: &Arc<Tunnel>,
    role: &str,
    target: &str,
) -> Result<(), Refused> {
    let transport = tunnel.link.transport();
    if let Err(e) = validate_label("target", target) {
        warn!(cluster = %tunnel.cluster, host_id = %tunnel.host_id, transport, error = %e, "registration refused");
        counter!(m::TARGET_REFUSALS, "reason" => "bad_name").increment(1);
        return Err(("bad_name", e.to_string()));
    }
    if role != ROLE_AUTH && is_reserved_target(target) {
        let why = "only the Auth server's own agent (certificate role 'auth') may register the reserved targets auth and login";
        warn!(
            cluster = %tunnel.cluster,
            host_id = %tunnel.host_id,
            role,
            target,
            transport,
            "registration refused: {why}"
        );
        counter!(m::TARGET_REFUSALS, "reason" => "reserved_target").increment(1);
        return Err(("reserved_target", format!("target '{target}': {why}")));
    }
    let registered = shared.routing.all().iter().any(|t| t.id == tunnel.id);
    if !registered && shared.routing.count(&tunnel.cluster) >= shared.limits.max_tunnels_per_cluster
    {
        warn!(
            cluster = %tunnel.cluster,
            host_id = %tunnel.host_id,
            limit = shared.limits.max_tunnels_per_cluster,
            transport,
            "registration refused: the cluster is at its tunnel limit on this proxy"
        );
        counter!(m::LIMIT_REFUSALS, "limit" => "tunnels_per_cluster").increment(1);
        counter!(m::TARGET_REFUSALS, "reason" => "tunnels_per_cluster").increment(1);
        return Err((
            "tunnels_per_cluster",
            format!(
                "cluster {} is at its tunnel limit on this proxy ({})",
                tunnel.cluster, shared.limits.max_tunnels_per_cluster
            ),
        ));
    }
    tunnel.add_target(target);
    // A host id has one tunnel per proxy: a newer login of the same agent replaces the older
    // (a reconnect racing its half-open predecessor, or an agent that moved from SSH to QUIC),
    // which is closed with a reason.
    let claim = shared.routing.insert_claiming(tunnel.clone());
    let replaced: Vec<&'static str> = claim.replaced.iter().map(|t| t.link.transport()).collect();
    crate::routing::close_replaced(claim.replaced).await;
    for old in replaced {
        if old != transport {
            set_tunnel_gauge(shared, &tunnel.cluster, old);
        }
    }
    if claim.new {
        counter!(m::TUNNEL_CONNECTS, "cluster" => tunnel.cluster.clone(), "transport" => transport)
            .increment(1);
        info!(cluster = %tunnel.cluster, host_id = %tunnel.host_id, peer = %tunnel.peer, transport, "tunnel up");
    }
    set_tunnel_gauge(shared, &tunnel.cluster, transport);
    info!(cluster = %tunnel.cluster, host_id = %tunnel.host_id, target, transport, "target registered");
    Ok(())
}

/// Sets `postern_tunnels_connected{cluster, transport}` from the routing table.
pub(crate) fn set_tunnel_gauge(shared: &TunnelShared, cluster: &str, transport: &'static str) {
    gauge!(m::TUNNELS_CONNECTED, "cluster" => cluster.to_owned(), "transport" => transport)
        .set(shared.routing.count_transport(cluster, transport) as f64);
}
