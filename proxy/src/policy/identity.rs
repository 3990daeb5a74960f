//! The proxy's Auth identity (`identity_file` of `clusters[].policy`: the mTLS identity its policy
//! watch, CA refresh and audit shipping use) renews itself at two-thirds of the life it had
//! left, as the host certificate does ([`crate::renewal`]): `GenerateUserCerts` for its own user
//! and key, over a connection to the Auth server authenticated by the identity in use (a caller
//! holding the preset role `proxy` may ask that for itself). The answer is checked (same
//! cluster, same key), written atomically over the old file (a full disk keeps the old one), and
//! every Auth connection of the cluster (policy watch, CA refresh, audit shipping, proxy
//! heartbeat) is told to reconnect with it ([`Renewals`]): the policy watch resumes from the
//! revision it had, so the policy cache is kept.
//!
//! It keeps its lifetime (the certificate's validity window less the minute certificates are
//! backdated), capped by the roles' `max_session_ttl`. During a TLS CA rotation the renewed
//! identity is how the proxy gets a certificate of the new CA and trusts the Auth server's new
//! serving certificate: the grace period must leave it time to renew before `update_servers`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postern_api::identity::IdentityFile;
use postern_api::proto::GenerateUserCertsRequest;
use postern_client::auth::AuthClient;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::Certificate;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::mint;
use crate::policy::watch::connect;
use crate::tunnel::TunnelShared;

/// Shortest wait between renewals.
const MIN_WAIT: Duration = Duration::from_secs(1);

/// Renewals of the proxy's Auth identity, per cluster: each Auth connection compares the count
/// it connected at with the current one and reconnects when it moved.
#[derive(Debug, Default)]
pub struct Renewals {
    by_cluster: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Renewals {
    /// Renewals of `cluster`'s identity from now on.
    pub fn subscribe(&self, cluster: &str) -> watch::Receiver<u64> {
        let mut map = self.by_cluster.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(cluster.to_owned())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    /// Records a renewal of `cluster`'s identity.
    pub fn renewed(&self, cluster: &str) {
        let mut map = self.by_cluster.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(cluster.to_owned())
            .or_insert_with(|| watch::Sender::new(0))
            .send_modify(|n| *n += 1);
    }
}

/// What one cluster's identity renewal needs.
pub struct IdentityRenewal {
    /// The cluster.
    pub cluster: String,
    /// The identity file, renewed in place.
    pub identity_file: PathBuf,
    /// Live tunnels (the Auth server is reached through one) and the renewal counters.
    pub shared: Arc<TunnelShared>,
}

impl IdentityRenewal {
    /// Renews until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut client: Option<AuthClient> = None;
        let mut failures = 0u32;
        loop {
            let id = match IdentityFile::load(&self.identity_file) {
                Ok(id) => id,
                Err(e) => {
                    debug!(cluster = %self.cluster, error = %e, "cannot read the proxy's Auth identity to renew it: retrying");
                    if sleep_or_stop(&stop, MIN_WAIT).await {
                        return;
                    }
                    continue;
                }
            };
            let now = mint::now_unix();
            if failures == 0 {
                let wait = Duration::from_secs(id.expires.saturating_sub(now) * 2 / 3);
                debug!(cluster = %self.cluster, in_secs = wait.as_secs(), "next Auth identity renewal");
                if sleep_or_stop(&stop, wait.max(MIN_WAIT)).await {
                    return;
                }
            }
            match self.once(&id, &mut client).await {
                Ok(expires) => {
                    failures = 0;
                    // The next renewal connects with the renewed identity.
                    client = None;
                    self.shared.identity_renewals.renewed(&self.cluster);
                    info!(cluster = %self.cluster, expires, "proxy Auth identity renewed: Auth connections reconnect with it");
                }
                Err(e) => {
                    client = None;
                    failures = failures.saturating_add(1);
                    let left = id.expires.saturating_sub(mint::now_unix());
                    warn!(cluster = %self.cluster, error = %e, expires_in_secs = left, "proxy Auth identity renewal failed: retrying");
                    let wait = Duration::from_secs((left / 10).clamp(1, 300));
                    if sleep_or_stop(&stop, wait).await {
                        return;
                    }
                }
            }
        }
    }

    /// One renewal of `id`; returns the new expiry.
    async fn once(
        &self,
        id: &IdentityFile,
        client: &mut Option<AuthClient>,
    ) -> Result<u64, String> {
        let key = PrivateKey::from_openssh(&id.private_key).map_err(|e| e.to_string())?;
        let cert = Certificate::from_openssh(id.ssh_cert.trim()).map_err(|e| e.to_string())?;
        let ttl = cert
            .valid_before()
            .saturating_sub(cert.valid_after())
            .saturating_sub(postern_client::doctor::MAX_CLOCK_SKEW_SECS)
            .max(2);
        if client.is_none() {
            let c = connect(&self.cluster, &self.identity_file, &self.shared)
                .await
                .map_err(|e| e.to_string())?;
            *client = Some(c);
        }
        let c = client.as_ref().ok_or("not connected")?;
        let certs = c
            .generate_user_certs(GenerateUserCertsRequest {
                user: id.user.clone(),
                public_key: key.public_key().to_openssh().map_err(|e| e.to_string())?,
                ttl_secs: ttl,
            })
            .await
            .map_err(|e| e.to_string())?;
        let new = Certificate::from_openssh(certs.ssh_cert.trim()).map_err(|e| e.to_string())?;
        if certs.cluster != id.cluster
            || new.public_key() != key.public_key().key_data()
            || certs.tls_cas.is_empty()
        {
            return Err("the renewed identity is not for this proxy's cluster and key: kept the current one".into());
        }
        let renewed = IdentityFile::from_certs(&id.user, id.private_key.clone(), certs);
        renewed
            .save(&self.identity_file)
            .map_err(|e| format!("{e} (the current identity is kept)"))?;
        Ok(renewed.expires)
    }
}

/// Sleeps `d`; true when `stop` came first.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
