//! The routing table: cluster → live agent tunnels, and which targets each serves.
//!
//! Lookups take no global lock: a `DashMap` shard per cluster, and each tunnel's target set is
//! written only by that tunnel's own connection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;

/// A target's labels: `key = value`.
pub type Labels = BTreeMap<String, String>;

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
    /// Each target's labels, as the agent sent them on `@control` (before registering it).
    labels: RwLock<HashMap<String, Labels>>,
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
            labels: RwLock::default(),
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

    /// Records a target's labels (from the agent's `@control` channel).
    pub fn set_labels(&self, target: &str, labels: Labels) {
        self.labels
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.to_owned(), labels);
    }

    /// A target's labels, if the agent sent them.
    pub fn labels(&self, target: &str) -> Option<Labels> {
        self.labels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(target)
            .cloned()
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

/// What [`RoutingTable::insert_claiming`] did.
#[derive(Default)]
pub struct Claim {
    /// Whether the tunnel was not in the table before.
    pub new: bool,
    /// Older tunnels of the same cluster and host id, now out of the table: close them.
    pub replaced: Vec<Arc<Tunnel>>,
}

/// Closes tunnels a newer tunnel replaced, telling each agent why, and counts them in
/// `postern_tunnel_disconnects_total{reason="replaced"}`. Their own connection tasks then end as
/// usual (removing an id that is already gone is harmless).
pub async fn close_replaced(replaced: Vec<Arc<Tunnel>>) {
    for old in replaced {
        tracing::warn!(
            cluster = %old.cluster,
            host_id = %old.host_id,
            peer = %old.peer,
            "tunnel replaced by a newer one for the same host id: closing the old one"
        );
        metrics::counter!(crate::metrics::TUNNEL_DISCONNECTS, "cluster" => old.cluster.clone(), "reason" => "replaced", "transport" => old.link.transport())
            .increment(1);
        old.link
            .close(&format!(
                "replaced by a newer tunnel for host id {}.{}",
                old.host_id, old.cluster
            ))
            .await;
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

    /// Adds a tunnel as [`RoutingTable::insert`] does, and gives it its host id alone: any other
    /// tunnel of the cluster with the same host id is taken out of the table and returned in
    /// [`Claim::replaced`], for the caller to close with [`close_replaced`]. The newest tunnel
    /// wins, so an agent that reconnects before its old connection is found dead is not locked
    /// out, and two agents can never serve one host id side by side.
    pub fn insert_claiming(&self, tunnel: Arc<Tunnel>) -> Claim {
        let mut list = self.clusters.entry(tunnel.cluster.clone()).or_default();
        if list.iter().any(|t| t.id == tunnel.id) {
            return Claim {
                new: false,
                replaced: Vec::new(),
            };
        }
        let (replaced, kept): (Vec<_>, Vec<_>) =
            list.drain(..).partition(|t| t.host_id == tunnel.host_id);
        *list = kept;
        list.push(tunnel);
        Claim {
            new: true,
            replaced,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;
    impl russh::server::Handler for Quiet {
        type Error = russh::Error;
    }

    /// A live session handle over an in-memory pipe (no client beyond its version line).
    async fn handle() -> russh::server::Handle {
        use tokio::io::AsyncWriteExt;
        let (server, mut client) = tokio::io::duplex(1 << 16);
        client.write_all(b"SSH-2.0-test\r\n").await.unwrap();
        let key = russh::keys::PrivateKey::random(
            &mut rand::rng(),
            russh::keys::ssh_key::Algorithm::Ed25519,
        )
        .unwrap();
        let config = Arc::new(russh::server::Config {
            keys: vec![key],
            ..Default::default()
        });
        let running = russh::server::run_stream(config, server, Quiet)
            .await
            .unwrap();
        std::mem::forget(client);
        running.handle()
    }

    #[tokio::test]
    async fn a_host_id_is_held_by_one_tunnel_the_newest() {
        let table = RoutingTable::default();
        let h = handle().await;
        let t = |id, host: &str| {
            let t = Arc::new(Tunnel::new(
                id,
                host.into(),
                "c".into(),
                "p".into(),
                h.clone(),
            ));
            t.add_target("auth");
            t
        };
        assert!(table.insert_claiming(t(1, "a")).new);
        assert!(table.insert_claiming(t(2, "b")).new);
        let claim = table.insert_claiming(t(3, "a"));
        assert!(claim.new);
        assert_eq!(
            claim.replaced.iter().map(|t| t.id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(table.count("c"), 2);
        let mut ids: Vec<u64> = table.all().iter().map(|t| t.id).collect();
        ids.sort();
        assert_eq!(ids, vec![2, 3]);
        assert!(
            !table.insert_claiming(t(3, "a")).new,
            "re-inserting is a no-op"
        );
        close_replaced(claim.replaced).await;
        // The plain insert still lets two tunnels hold one host id: the tunnel listener must
        // call insert_claiming.
        assert!(table.insert(t(4, "a")));
        assert_eq!(table.count("c"), 3);
    }
}
