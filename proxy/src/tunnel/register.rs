//! Target registration, as the QUIC transport does it (`Frame::Register`).
//!
//! The SSH transport's `tcpip_forward` handler applies the same rules inline; once the edge
//! policy work on `handler.rs` lands, both should call [`register_target`].

use std::sync::Arc;

use metrics::{counter, gauge};
use tracing::{info, warn};
use tunnel_proto::names::validate_label;

use crate::metrics as m;
use crate::routing::Tunnel;

use super::TunnelShared;

/// Registers `target` on `tunnel` and puts the tunnel in the routing table on its first target.
/// A refusal says why (a bad name, or the cluster at its tunnel limit).
pub(crate) fn register_target(
    shared: &TunnelShared,
    tunnel: &Arc<Tunnel>,
    target: &str,
) -> Result<(), String> {
    let transport = tunnel.link.transport();
    if let Err(e) = validate_label("target", target) {
        warn!(cluster = %tunnel.cluster, host_id = %tunnel.host_id, error = %e, "registration refused");
        return Err(e.to_string());
    }
    let registered = shared.routing.all().iter().any(|t| t.id == tunnel.id);
    if !registered && shared.routing.count(&tunnel.cluster) >= shared.limits.max_tunnels_per_cluster
    {
        warn!(
            cluster = %tunnel.cluster,
            host_id = %tunnel.host_id,
            limit = shared.limits.max_tunnels_per_cluster,
            "registration refused: the cluster is at its tunnel limit on this proxy"
        );
        counter!(m::LIMIT_REFUSALS, "limit" => "tunnels_per_cluster").increment(1);
        return Err(format!(
            "cluster {} is at its tunnel limit on this proxy ({})",
            tunnel.cluster, shared.limits.max_tunnels_per_cluster
        ));
    }
    tunnel.add_target(target);
    if shared.routing.insert(tunnel.clone()) {
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
