//! The routing table: cluster → live agent tunnels, and which targets each serves.
//!
//! Lookups take no global lock: a `DashMap` shard per cluster, and each tunnel's target set is
//! written only by that tunnel's own connection.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;

/// One agent's live tunnel.
pub struct Tunnel {
    /// Unique per connection (a reconnecting agent gets a new id).
    pub id: u64,
    /// The agent's host id.
    pub host_id: String,
    /// Its cluster.
    pub cluster: String,
    /// Peer address, for logs.
    pub peer: String,
    /// How streams are opened to the agent: SSH `forwarded-tcpip` channels or QUIC streams.
    pub link: crate::link::TunnelLink,
    /// Targets registered with `tcpip-forward`.
    targets: RwLock<HashSet<String>>,
    /// Streams open through this tunnel now.
    pub active_streams: AtomicUsize,
    /// The agent's protocol version from its control hello (0 until it arrives): streams use
    /// per-stream credit when it is at least [`tunnel_proto::credit::CREDIT_VERSION`].
    pub agent_version: tokio::sync::watch::Sender<u32>,
}

impl Tunnel {
    /// A tunnel with no targets yet.
    pub fn new(
        id: u64,
        host_id: String,
        cluster: String,
        peer: String,
        link: impl Into<crate::link::TunnelLink>,
    ) -> Tunnel {
        Tunnel {
            id,
            host_id,
            cluster,
            peer,
            link: link.into(),
            targets: RwLock::default(),
            active_streams: AtomicUsize::new(0),
            agent_version: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Records a target; returns false if it was already registered.
    pub fn add_target(&self, target: &str) -> bool {
        self.targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.to_owned())
    }

    /// Forgets a target; returns whether it was registered.
    pub fn remove_target(&self, target: &str) -> bool {
        self.targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(target)
    }

    /// Whether this tunnel serves `target`.
    pub fn serves(&self, target: &str) -> bool {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(target)
    }
}

/// Why no tunnel was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No agent of the cluster is connected.
    #[error("no tunnel for cluster {0}: its agent is not connected to this proxy")]
    NoTunnel(String),
    /// Agents are connected but none registered the target.
    #[error("cluster {cluster} has no target named '{target}'")]
    UnknownTarget {
        /// The cluster.
        cluster: String,
        /// The target asked for.
        target: String,
    },
}

impl RouteError {
    /// Label for `postern_stream_opens_total{result}`.
    pub fn result(&self) -> &'static str {
        match self {
            RouteError::NoTunnel(_) => "no_tunnel",
            RouteError::UnknownTarget { .. } => "unknown_target",
        }
    }
}

/// Cluster → tunnels.
#[derive(Default)]
pub struct RoutingTable {
    clusters: DashMap<String, Vec<Arc<Tunnel>>>,
    next: AtomicUsize,
}

impl RoutingTable {
    /// Adds a tunnel (once it has registered a target); returns whether it was new.
    pub fn insert(&self, tunnel: Arc<Tunnel>) -> bool {
        let mut list = self.clusters.entry(tunnel.cluster.clone()).or_default();
        if list.iter().any(|t| t.id == tunnel.id) {
            return false;
        }
        list.push(tunnel);
        true
    }

    /// Removes a tunnel; returns whether it was present. A cluster left with no tunnel is
    /// dropped from the table.
    pub fn remove(&self, cluster: &str, id: u64) -> bool {
        let removed = match self.clusters.get_mut(cluster) {
            Some(mut list) => {
                let before = list.len();
                list.retain(|t| t.id != id);
                list.len() != before
            }
            None => false,
        };
        self.clusters.remove_if(cluster, |_, list| list.is_empty());
        removed
    }

    /// Tunnels of a cluster connected now.
    pub fn count(&self, cluster: &str) -> usize {
        self.clusters.get(cluster).map(|l| l.len()).unwrap_or(0)
    }

    /// Tunnels of a cluster connected now over one transport (`ssh` or `quic`).
    pub fn count_transport(&self, cluster: &str, transport: &str) -> usize {
        self.clusters
            .get(cluster)
            .map(|l| l.iter().filter(|t| t.link.transport() == transport).count())
            .unwrap_or(0)
    }

    /// Every tunnel (for drain).
    pub fn all(&self) -> Vec<Arc<Tunnel>> {
        self.clusters
            .iter()
            .flat_map(|e| e.value().clone())
            .collect()
    }

    /// Picks a tunnel of `cluster` serving `target`, spreading streams round-robin.
    pub fn pick(&self, cluster: &str, target: &str) -> Result<Arc<Tunnel>, RouteError> {
        let list = self
            .clusters
            .get(cluster)
            .ok_or_else(|| RouteError::NoTunnel(cluster.to_owned()))?;
        let serving: Vec<&Arc<Tunnel>> = list.iter().filter(|t| t.serves(target)).collect();
        if serving.is_empty() {
            return Err(if list.is_empty() {
                RouteError::NoTunnel(cluster.to_owned())
            } else {
                RouteError::UnknownTarget {
                    cluster: cluster.to_owned(),
                    target: target.to_owned(),
                }
            });
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Ok(serving[n % serving.len()].clone())
    }
}
