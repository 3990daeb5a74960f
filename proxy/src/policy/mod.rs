//! The proxy's authorization: who may open streams to which target, decided at every stream open
//! and again whenever the cluster's policy changes.
//!
//! ## Layout
//! - this file: [`Policies`] (one [`ClusterPolicy`] per cluster) and the decision itself;
//! - [`cache`]: the roles, users and locks a cluster's Auth server last sent, and how fresh they are;
//! - [`registry`]: live client connections and agent tunnels, so a lock or a deleted user closes
//!   what is already open;
//! - [`watch`]: the `WatchPolicy` stream from the cluster's Auth server, reached through the
//!   cluster's own tunnel, that feeds the cache;
//! - [`authorities`]: the cluster's trusted CA keys, read from its Auth server;
//! - [`identity`]: the proxy's Auth identity, renewed at two-thirds of its life.
//!
//! A decision, in order: the policy must be fresh (source `auth`); no lock may name the user, one
//! of its roles, the access request its certificate's elevation comes from, or the agent; an
//! elevation must still be live (approved, unexpired); the user must still exist; the Auth target `auth` is then open to
//! any user of the cluster; any other target needs its labels and a role whose `node_labels`
//! allow them, with no role denying them (deny wins, default deny).

pub mod authorities;
pub mod cache;
pub mod identity;
pub mod registry;
pub mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tunnel_proto::names::ROLE_AUTH;

use crate::config::{ClusterConfig, PolicySource};
use crate::routing::Labels;

pub use cache::PolicyCache;
pub use registry::Registry;

/// Why a stream or login was refused: the metric label and the reason the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `postern_stream_opens_total{result}`: `forbidden`, `locked`, `policy_unavailable`.
    pub result: &'static str,
    /// What the client sees.
    pub reason: String,
}

impl Refusal {
    fn new(result: &'static str, reason: impl Into<String>) -> Refusal {
        Refusal {
            result,
            reason: reason.into(),
        }
    }
}

/// Who asks: a user of the cluster, and the roles its certificate carries (`None` for a
/// certificate without the `postern-roles@postern` extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    /// The login (the certificate's principal).
    pub user: String,
    /// Roles from the certificate, if it lists them.
    pub cert_roles: Option<Vec<String>>,
    /// The access request whose approved roles the certificate's include
    /// (`postern-request@postern`), if any: they count only while its elevation lasts.
    pub request: Option<String>,
}

/// A certificate with an access request's roles: a lock on the request refuses (and closes) it;
/// so does the elevation's end (denied, expired, deleted). A request this proxy has not heard of
/// yet refuses new streams (`policy_unavailable`, which closes nothing) when `streams`.
fn check_elevation(view: &cache::View<'_>, who: &Who, streams: bool) -> Result<(), Refusal> {
    let Some(id) = &who.request else {
        return Ok(());
    };
    if let Some(msg) = view.lock_on_request(id) {
        return Err(Refusal::new("locked", msg));
    }
    match view.elevation_ended(who) {
        None => Ok(()),
        Some(Ok(why)) => Err(Refusal::new("forbidden", why)),
        Some(Err(why)) if streams => Err(Refusal::new("policy_unavailable", why)),
        Some(Err(_)) => Ok(()),
    }
}

/// One cluster's policy: its source and, for `auth`, the watched cache.
pub struct ClusterPolicy {
    /// The cluster's name.
    pub cluster: String,
    /// Where its policy comes from.
    pub source: PolicySource,
    /// How long the cache may go without news from the Auth server.
    pub stale_after: Duration,
    /// What the Auth server last sent.
    pub cache: PolicyCache,
}

impl ClusterPolicy {
    /// The checks at login: no lock on the user or its roles, and the user was not deleted (a
    /// user the cache has not seen yet may be newer than it: streams decide that).
    pub fn check_login(&self, who: &Who) -> Result<(), Refusal> {
        if self.source != PolicySource::Auth {
            return Ok(());
        }
        let view = self.cache.view();
        if let Some(msg) = view.lock_on_user(&who.user) {
            return Err(Refusal::new("locked", msg));
        }
        if view.user_deleted(&who.user) {
            return Err(Refusal::new(
                "forbidden",
                format!(
                    "user '{}' has been deleted from cluster {}: its certificate no longer opens streams",
                    who.user, self.cluster
                ),
            ));
        }
        check_elevation(&view, who, false)?;
        let roles = view.effective_roles(who);
        match roles.iter().find_map(|r| view.lock_on_role(r)) {
            Some(msg) => Err(Refusal::new("locked", msg)),
            None => Ok(()),
        }
    }

    /// The user-level checks: fresh policy, no lock on the user or its roles, the user exists.
    pub fn check_user(&self, who: &Who) -> Result<(), Refusal> {
        match self.source {
            PolicySource::Open | PolicySource::Deny => return Ok(()),
            PolicySource::Auth => {}
        }
        let view = self.cache.view();
        // Before staleness: an elevation's end is known in advance and cannot move, so it ends
        // what it opened even while the Auth server is out of reach.
        check_elevation(&view, who, true)?;
        if let Some(age) = view.stale(self.stale_after) {
            return Err(Refusal::new(
                "policy_unavailable",
                match age {
                    None => format!(
                        "this proxy has not yet received cluster {}'s policy from its Auth server: retry shortly",
                        self.cluster
                    ),
                    Some(age) => format!(
                        "this proxy has not heard from cluster {}'s Auth server for {}s (bound {}s): new streams are refused until it reconnects",
                        self.cluster,
                        age.as_secs(),
                        self.stale_after.as_secs()
                    ),
                },
            ));
        }
        if let Some(msg) = view.lock_on_user(&who.user) {
            return Err(Refusal::new("locked", msg));
        }
        if who.user != "@admin" && !view.user_exists(&who.user) {
            return Err(Refusal::new(
                "forbidden",
                format!(
                    "user '{}' does not exist in cluster {} (deleted?): its certificate no longer opens streams",
                    who.user, self.cluster
                ),
            ));
        }
        let roles = view.effective_roles(who);
        if let Some(msg) = roles.iter().find_map(|r| view.lock_on_role(r)) {
            return Err(Refusal::new("locked", msg));
        }
        Ok(())
    }

    /// Decides one stream: [`ClusterPolicy::check_user`], then the target by its labels.
    pub fn decide(&self, who: &Who, target: &str, labels: Option<&Labels>) -> Result<(), Refusal> {
        self.check_user(who)?;
        if target == ROLE_AUTH {
            // The Auth API: any user of the cluster; the Auth server's RBAC decides each call.
            return Ok(());
        }
        match self.source {
            PolicySource::Open => return Ok(()),
            PolicySource::Deny => {
                return Err(Refusal::new(
                    "forbidden",
                    format!(
                        "cluster {} has no policy source on this proxy: only target 'auth' is reachable (set [clusters.policy] source = \"auth\")",
                        self.cluster
                    ),
                ));
            }
            PolicySource::Auth => {}
        }
        let Some(labels) = labels else {
            return Err(Refusal::new(
                "forbidden",
                format!("target '{target}' has not announced its labels yet: retry shortly"),
            ));
        };
        let view = self.cache.view();
        let roles = view.role_defs(&view.effective_roles(who));
        postern_api::targets::check_target(&roles, target, labels)
            .map_err(|e| Refusal::new("forbidden", format!("user '{}': {e}", who.user)))
    }

    /// Whether the agent `host_id` may keep its tunnel (no lock names it).
    pub fn check_agent(&self, host_id: &str) -> Result<(), Refusal> {
        if self.source != PolicySource::Auth {
            return Ok(());
        }
        match self.cache.view().lock_on_agent(host_id) {
            Some(msg) => Err(Refusal::new("locked", msg)),
            None => Ok(()),
        }
    }
}

/// Every cluster's policy, and the live connections it governs.
pub struct Policies {
    clusters: HashMap<String, Arc<ClusterPolicy>>,
    /// Live client connections and agent tunnels.
    pub registry: Arc<Registry>,
}

impl Policies {
    /// One empty policy per configured cluster.
    pub fn from_config(clusters: &[ClusterConfig]) -> Policies {
        Policies {
            clusters: clusters
                .iter()
                .map(|c| {
                    let p = ClusterPolicy {
                        cluster: c.name.clone(),
                        source: c.policy.source,
                        stale_after: Duration::from_secs(c.policy.stale_after_secs),
                        cache: PolicyCache::default(),
                    };
                    (c.name.clone(), Arc::new(p))
                })
                .collect(),
            registry: Arc::new(Registry::default()),
        }
    }

    /// A cluster's policy.
    pub fn cluster(&self, name: &str) -> Option<&Arc<ClusterPolicy>> {
        self.clusters.get(name)
    }

    /// Every cluster's policy.
    pub fn all(&self) -> impl Iterator<Item = &Arc<ClusterPolicy>> {
        self.clusters.values()
    }
}

impl Default for Policies {
    fn default() -> Self {
        Policies::from_config(&[])
    }
}
