//! Proxies that know each other: the proxy set of each cluster.
//!
//! For every cluster whose policy source is `auth` (so the proxy has an identity with the
//! cluster's Auth server), a [`Heartbeater`] calls `ProxyHeartbeat` on the cluster's Auth server
//! every `heartbeat_secs`, **through the cluster's own tunnel** (as the policy watch does), with
//! this proxy's id and public addresses; the record lives `heartbeat_secs × expire_after_beats`,
//! so a proxy that stops heartbeating (killed, cut off) leaves the set after that many missed
//! beats. The answer is the cluster's live proxy set, kept in [`Peers`]; each agent's `@control`
//! channel sends it as `ProxySet` when it is first known and again whenever it changes, so agents
//! can hold a tunnel to every proxy (see `postern_agent::pool`).
//!
//! Until the first answer the set of such a cluster is unknown and nothing is sent (an agent
//! told "only this proxy" would drop its tunnels to the others). A cluster without an Auth
//! identity has the fixed set `[this proxy]`. On drain the heartbeater sends `leaving` once, so
//! the other proxies drop this one at their next heartbeat instead of after the expiry.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use postern_api::proto::{ProxyHeartbeatRequest, ProxyRecord};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics as m;
use crate::tunnel::TunnelShared;

/// `[peers]` in `proxy.toml`: how often this proxy heartbeats into its clusters' proxy sets.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PeersConfig {
    /// Seconds between heartbeats (1..=60). Default 5.
    pub heartbeat_secs: u64,
    /// Missed heartbeats after which the Auth server drops this proxy from the set (2..=20).
    /// Default 3.
    pub expire_after_beats: u32,
}

impl Default for PeersConfig {
    fn default() -> Self {
        PeersConfig {
            heartbeat_secs: 5,
            expire_after_beats: 3,
        }
    }
}

impl PeersConfig {
    /// Checks the bounds; the error names the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(1..=60).contains(&self.heartbeat_secs) {
            return Err(("peers.heartbeat_secs".into(), "must be 1 to 60".into()));
        }
        if !(2..=20).contains(&self.expire_after_beats) {
            return Err(("peers.expire_after_beats".into(), "must be 2 to 20".into()));
        }
        Ok(())
    }

    /// The record lifetime asked for at each heartbeat.
    pub fn ttl_secs(&self) -> u32 {
        u32::try_from(self.heartbeat_secs * u64::from(self.expire_after_beats)).unwrap_or(600)
    }
}

/// The proxy set of each cluster: sorted proxy ids, empty while unknown.
#[derive(Default)]
pub struct Peers {
    sets: HashMap<String, watch::Sender<Vec<String>>>,
}

impl Peers {
    /// One set per cluster: `[self_id]` for clusters not in `heartbeating`, unknown (empty) for
    /// those that are.
    pub fn new<'a>(
        self_id: &str,
        clusters: impl IntoIterator<Item = &'a str>,
        heartbeating: &[String],
    ) -> Peers {
        let sets = clusters
            .into_iter()
            .map(|c| {
                let init = if heartbeating.iter().any(|h| h == c) {
                    Vec::new()
                } else {
                    vec![self_id.to_owned()]
                };
                (c.to_owned(), watch::channel(init).0)
            })
            .collect();
        Peers { sets }
    }

    /// Follows `cluster`'s set (None for an unknown cluster).
    pub fn subscribe(&self, cluster: &str) -> Option<watch::Receiver<Vec<String>>> {
        self.sets.get(cluster).map(|s| s.subscribe())
    }

    /// `cluster`'s set now (empty while unknown).
    pub fn get(&self, cluster: &str) -> Vec<String> {
        self.sets
            .get(cluster)
            .map(|s| s.borrow().clone())
            .unwrap_or_default()
    }

    /// Replaces `cluster`'s set; subscribers wake only if it changed.
    pub fn set(&self, cluster: &str, mut ids: Vec<String>) {
        ids.sort();
        ids.dedup();
        if let Some(s) = self.sets.get(cluster) {
            gauge!(m::PROXY_SET_SIZE, "cluster" => cluster.to_owned()).set(ids.len() as f64);
            s.send_if_modified(|cur| {
                if *cur == ids {
                    false
                } else {
                    info!(%cluster, proxies = ?ids, "proxy set changed");
                    *cur = ids;
                    true
                }
            });
        }
    }
}

/// Heartbeats one cluster's proxy set (see the module docs).
pub struct Heartbeater {
    /// The cluster.
    pub cluster: String,
    /// The proxy's identity for this cluster (re-read at every connection).
    pub identity_file: PathBuf,
    /// Tunnels (the Auth server is reached through one serving `auth`) and the sets.
    pub shared: Arc<TunnelShared>,
    /// This proxy's record: id and public addresses.
    pub record: ProxyRecord,
    /// Interval and expiry.
    pub config: PeersConfig,
}

impl Heartbeater {
    /// Heartbeats until `draining` (then sends `leaving` once, bounded) or `stop`.
    pub async fn run(self, draining: CancellationToken, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.config.heartbeat_secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut client = None;
        let mut last_error = String::new();
        let mut renewed = self.shared.identity_renewals.subscribe(&self.cluster);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = draining.cancelled() => break,
                _ = stop.cancelled() => return,
            }
            // A renewed identity: the next heartbeat connects with it.
            if renewed.has_changed().unwrap_or(false) {
                renewed.mark_unchanged();
                client = None;
            }
            match self.beat(&mut client, false).await {
                Ok(ids) => {
                    last_error.clear();
                    self.shared.peers.set(&self.cluster, ids);
                }
                Err(e) => {
                    client = None;
                    counter!(m::PEER_HEARTBEAT_ERRORS, "cluster" => self.cluster.clone())
                        .increment(1);
                    if e != last_error {
                        warn!(cluster = %self.cluster, error = %e, "proxy heartbeat failed: retrying (agents keep the last proxy set)");
                        last_error = e;
                    } else {
                        debug!(cluster = %self.cluster, error = %e, "proxy heartbeat retry");
                    }
                }
            }
        }
        let leave = self.beat(&mut client, true);
        match tokio::time::timeout(Duration::from_secs(2), leave).await {
            Ok(Ok(_)) => info!(cluster = %self.cluster, "left the proxy set"),
            Ok(Err(e)) => {
                debug!(cluster = %self.cluster, error = %e, "could not leave the proxy set: it expires")
            }
            Err(_) => {
                debug!(cluster = %self.cluster, "leaving the proxy set timed out: it expires")
            }
        }
    }

    /// One heartbeat; returns the live set's ids.
    async fn beat(
        &self,
        client: &mut Option<postern_client::auth::AuthClient>,
        leaving: bool,
    ) -> Result<Vec<String>, String> {
        if client.is_none() {
            let c = crate::policy::watch::connect(&self.cluster, &self.identity_file, &self.shared)
                .await
                .map_err(|e| e.to_string())?;
            *client = Some(c);
        }
        let c = client.as_ref().expect("connected above");
        let req = ProxyHeartbeatRequest {
            proxy: Some(self.record.clone()),
            ttl_secs: self.config.ttl_secs(),
            leaving,
        };
        let call = c.proxy_heartbeat(req);
        let resp = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .map_err(|_| "heartbeat timed out after 5s".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(resp.proxies.into_iter().map(|p| p.id).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_until_told_and_fixed_without_identity() {
        let p = Peers::new("p1", ["a", "b"], &["a".to_string()]);
        assert!(
            p.get("a").is_empty(),
            "heartbeating cluster: unknown at first"
        );
        assert_eq!(p.get("b"), ["p1"], "no identity: this proxy only");
        let mut rx = p.subscribe("a").unwrap();
        p.set("a", vec!["p2".into(), "p1".into(), "p2".into()]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), ["p1", "p2"]);
        p.set("a", vec!["p1".into(), "p2".into()]);
        assert!(!rx.has_changed().unwrap(), "same set: no wake-up");
        assert!(p.subscribe("zzz").is_none());
    }

    #[test]
    fn bounds_are_named() {
        assert!(PeersConfig::default().validate().is_ok());
        assert_eq!(PeersConfig::default().ttl_secs(), 15);
        let bad = PeersConfig {
            heartbeat_secs: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "peers.heartbeat_secs");
        let bad = PeersConfig {
            expire_after_beats: 1,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "peers.expire_after_beats");
    }
}
