//! Which CA keys each cluster trusts, indexed for the login path.

use std::collections::HashMap;

use postern_dial::ssh::parse_ca_lines;
use tunnel_proto::certs::Fingerprint;

use crate::config::ClusterConfig;

/// CA fingerprints of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterTrust {
    /// Host CA keys (sign agent certificates).
    pub host_cas: Vec<Fingerprint>,
    /// User CA keys (sign client certificates).
    pub user_cas: Vec<Fingerprint>,
}

/// Trust of every cluster.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    clusters: HashMap<String, ClusterTrust>,
}

impl Trust {
    /// Builds the trust from validated config.
    pub fn from_config(clusters: &[ClusterConfig]) -> Result<Trust, String> {
        let mut map = HashMap::new();
        for c in clusters {
            map.insert(
                c.name.clone(),
                ClusterTrust {
                    host_cas: parse_ca_lines(&c.host_ca)?,
                    user_cas: parse_ca_lines(&c.user_ca)?,
                },
            );
        }
        Ok(Trust { clusters: map })
    }

    /// A cluster's trust, if the proxy serves it.
    pub fn cluster(&self, name: &str) -> Option<&ClusterTrust> {
        self.clusters.get(name)
    }

    /// The cluster whose user CA has this fingerprint.
    pub fn cluster_of_user_ca(&self, fp: &Fingerprint) -> Option<(&str, &ClusterTrust)> {
        self.clusters
            .iter()
            .find(|(_, t)| t.user_cas.contains(fp))
            .map(|(n, t)| (n.as_str(), t))
    }

    /// Whether some cluster's host CA has this fingerprint.
    pub fn is_host_ca(&self, fp: &Fingerprint) -> bool {
        self.clusters.values().any(|t| t.host_cas.contains(fp))
    }

    /// Names of the clusters served, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.clusters.keys().cloned().collect();
        v.sort();
        v
    }
}
