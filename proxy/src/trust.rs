//! Which CA keys each cluster trusts, indexed for the login path. Starts from the config; a
//! cluster whose policy comes from its Auth server has its lists replaced by what that server
//! exports ([`crate::policy::authorities`]), so a CA rotation reaches the proxy without a restart.
//! The key that signs the cluster's host certificates now is followed too ([`HostSigner`]): the
//! proxy tells its agents when it changes, so they renew from a rotated CA without waiting for
//! their certificate's two-thirds mark.
//!
//! What the Auth server exported last is also kept in the data directory ([`CaCache`]) and
//! trusted at the next start, next to the config's keys: after a rotation the config still
//! names the old key, and a restarted proxy that trusted only that would refuse the Auth
//! server's own agent, its one way to learn the new key.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use postern_dial::renew_due::SignerHint;
use postern_dial::ssh::parse_ca_lines;
use tokio::sync::watch;
use tunnel_proto::certs::Fingerprint;
use tunnel_proto::control::Message;

use crate::config::ClusterConfig;

/// CA fingerprints of one cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterTrust {
    /// Host CA keys (sign agent certificates).
    pub host_cas: Vec<Fingerprint>,
    /// User CA keys (sign client certificates).
    pub user_cas: Vec<Fingerprint>,
}

/// The `@control` message that tells an agent about its cluster's host signer.
pub fn signer_message(hint: &SignerHint) -> Message {
    Message::HostCaSigner {
        fingerprint: hint.fingerprint.clone(),
        spread_secs: hint.spread_secs,
    }
}

/// Trust of every cluster. Clones share the lists: an update is seen by every holder.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    clusters: Arc<RwLock<HashMap<String, Arc<ClusterTrust>>>>,
    /// Each served cluster's host CA signers, indexed by [`Signs`] (None until its Auth server
    /// names them).
    signers: Arc<HashMap<String, [watch::Sender<Option<SignerHint>>; 2]>>,
}

/// Whose certificates a host CA signer signs: during a rotation agents move to the new key at
/// `update_clients`, proxies at `update_servers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signs {
    /// Agents' certificates (what the proxy tells its agents on `@control`).
    Agents = 0,
    /// Proxies' host certificates (what this proxy's own renewal goes by).
    Proxies = 1,
}

impl Trust {
    /// Builds the trust from validated config, plus what `cache` kept of each cluster's last
    /// export (a cache that does not load is skipped with a warning).
    pub fn from_config(clusters: &[ClusterConfig], cache: &CaCache) -> Result<Trust, String> {
        let mut map = HashMap::new();
        let mut signers = HashMap::new();
        for c in clusters {
            signers.insert(
                c.name.clone(),
                [watch::Sender::new(None), watch::Sender::new(None)],
            );
            let mut host_cas = parse_ca_lines(&c.host_ca)?;
            let mut user_cas = parse_ca_lines(&c.user_ca)?;
            if let Some((host, user)) = cache.load(&c.name) {
                add_missing(&mut host_cas, host);
                add_missing(&mut user_cas, user);
            }
            map.insert(
                c.name.clone(),
                Arc::new(ClusterTrust { host_cas, user_cas }),
            );
        }
        Ok(Trust {
            clusters: Arc::new(RwLock::new(map)),
            signers: Arc::new(signers),
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

    /// Follows `cluster`'s signer of `whose` certificates (None for a cluster the proxy does not
    /// serve).
    pub fn signer(
        &self,
        cluster: &str,
        whose: Signs,
    ) -> Option<watch::Receiver<Option<SignerHint>>> {
        self.signers
            .get(cluster)
            .map(|s| s[whose as usize].subscribe())
    }

    /// Records `cluster`'s signer of `whose` certificates; followers wake only if it changed.
    pub fn set_signer(&self, cluster: &str, whose: Signs, signer: SignerHint) {
        if let Some(s) = self.signers.get(cluster) {
            postern_dial::renew_due::post(&s[whose as usize], signer);
        }
    }

    /// The cluster one of whose host CA keys has this fingerprint.
    pub fn cluster_of_host_ca(&self, fp: &Fingerprint) -> Option<String> {
        self.read()
            .iter()
            .find(|(_, t)| t.host_cas.contains(fp))
            .map(|(n, _)| n.clone())
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

/// Appends the keys of `more` that `list` lacks.
fn add_missing(list: &mut Vec<Fingerprint>, more: Vec<Fingerprint>) {
    for fp in more {
        if !list.contains(&fp) {
            list.push(fp);
        }
    }
}

/// The last CA keys each cluster's Auth server exported, one JSON file per cluster under the
/// proxy's data directory (`ca-cache/<cluster>.json`, written atomically, 0600).
#[derive(Debug, Clone)]
pub struct CaCache {
    dir: std::path::PathBuf,
}

/// One cluster's cached export: OpenSSH public key lines.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CachedCas {
    host: Vec<String>,
    user: Vec<String>,
}

impl CaCache {
    /// The cache under `data_dir`.
    pub fn new(data_dir: &std::path::Path) -> CaCache {
        CaCache {
            dir: data_dir.join("ca-cache"),
        }
    }

    fn path(&self, cluster: &str) -> std::path::PathBuf {
        self.dir.join(format!("{cluster}.json"))
    }

    /// Keeps `cluster`'s export (host and user key lines).
    pub fn store(&self, cluster: &str, host: &[String], user: &[String]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let body = serde_json::to_vec_pretty(&CachedCas {
            host: host.to_vec(),
            user: user.to_vec(),
        })
        .map_err(std::io::Error::other)?;
        postern_dial::mint::write_file_atomic(&self.path(cluster), &body, 0o600)
            .map_err(std::io::Error::other)
    }

    /// `cluster`'s cached keys, if a cache was kept and parses.
    fn load(&self, cluster: &str) -> Option<(Vec<Fingerprint>, Vec<Fingerprint>)> {
        let path = self.path(cluster);
        let text = std::fs::read(&path).ok()?;
        let parsed = serde_json::from_slice::<CachedCas>(&text)
            .map_err(|e| e.to_string())
            .and_then(|c| Ok((parse_ca_lines(&c.host)?, parse_ca_lines(&c.user)?)));
        match parsed {
            Ok(lists) => Some(lists),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "the cached CA keys do not load: using the config's only until the Auth server answers");
                None
            }
        }
    }
}
