//! Which CA keys each cluster trusts, indexed for the login path. Starts from the config; a
//! cluster whose policy comes from its Auth server has its lists replaced by what that server
//! exports ([`crate::policy::authorities`]), so a CA rotation reaches the proxy without a restart.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use postern_dial::ssh::parse_ca_lines;
use tunnel_proto::certs::Fingerprint;

use crate::config::ClusterConfig;

/// CA fingerprints of one cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterTrust {
    /// Host CA keys (sign agent certificates).
    pub host_cas: Vec<Fingerprint>,
    /// User CA keys (sign client certificates).
    pub user_cas: Vec<Fingerprint>,
}

/// Trust of every cluster. Clones share the lists: an update is seen by every holder.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    clusters: Arc<RwLock<HashMap<String, Arc<ClusterTrust>>>>,
}

impl Trust {
    /// Builds the trust from validated config.
    pub fn from_config(clusters: &[ClusterConfig]) -> Result<Trust, String> {
        let mut map = HashMap::new();
        for c in clusters {
            map.insert(
                c.name.clone(),
                Arc::new(ClusterTrust {
                    host_cas: parse_ca_lines(&c.host_ca)?,
                    user_cas: parse_ca_lines(&c.user_ca)?,
                }),
            );
        }
        Ok(Trust {
            clusters: Arc::new(RwLock::new(map)),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<ClusterTrust>>> {
        self.clusters.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A cluster's trust, if the proxy serves it.
    pub fn cluster(&self, name: &str) -> Option<Arc<ClusterTrust>> {
        self.read().get(name).cloned()
    }

    /// Replaces a served cluster's CA lists (a rotation moved); false if the proxy does not
    /// serve `name` or either list is empty (an empty list would refuse everyone: kept as is).
    pub fn replace(&self, name: &str, trust: ClusterTrust) -> bool {
        if trust.host_cas.is_empty() || trust.user_cas.is_empty() {
            return false;
        }
        let mut map = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(name) {
            Some(t) => {
                *t = Arc::new(trust);
                true
            }
            None => false,
        }
    }

    /// The cluster whose user CA has this fingerprint.
    pub fn cluster_of_user_ca(&self, fp: &Fingerprint) -> Option<(String, Arc<ClusterTrust>)> {
        self.read()
            .iter()
            .find(|(_, t)| t.user_cas.contains(fp))
            .map(|(n, t)| (n.clone(), t.clone()))
    }

    /// Whether some cluster's host CA has this fingerprint.
    pub fn is_host_ca(&self, fp: &Fingerprint) -> bool {
        self.read().values().any(|t| t.host_cas.contains(fp))
    }

    /// Names of the clusters served, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.read().keys().cloned().collect();
        v.sort();
        v
    }
}
