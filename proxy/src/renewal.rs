//! The proxy's own host certificate renews itself at two-thirds of the life it had left, through
//! its own web listener (`POST /webapi/renew`, relayed to the Auth server of the cluster whose
//! host CA signed it, like an agent's renewal), authenticated by the certificate in use. The new
//! certificate is checked (same key, same names, signed by a key that cluster trusts), written
//! atomically over the old one (a full disk keeps the old one), and the SSH settings are rebuilt
//! with it (and the QUIC proof): the next connection presents it, open tunnels and streams carry
//! on.
//!
//! When the key that signs that cluster's proxy certificates changes (a rotation's
//! `update_servers`, after agents learned the new key at `update_clients`; or a rollback), the
//! renewal comes sooner, within `policy.renew_spread_secs`, as for agents
//! ([`postern_dial::renew_due`]).
//!
//! Only a proxy that has a host certificate and serves a cluster with policy `auth` renews; the
//! proxy's Auth identity file is renewed by [`crate::policy::identity`].

use std::sync::Arc;
use std::time::Duration;

use postern_dial::renew_due::wait_due;
use postern_dial::web::WebTrust;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::Certificate;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tunnel_proto::certs::signer_fingerprint;
use tunnel_proto::join::RenewRequest;

use crate::mint;
use crate::trust::Signs;
use crate::tunnel::TunnelShared;

/// Shortest wait between attempts.
const MIN_WAIT: Duration = Duration::from_secs(1);

/// What the renewal needs.
pub struct HostCertRenewal {
    /// The host key (the renewed certificate must be for it).
    pub key: PrivateKey,
    /// Where the host certificate is kept.
    pub cert_path: std::path::PathBuf,
    /// This proxy's web listener, as it dials itself (loopback for a wildcard bind).
    pub web: String,
    /// Its own web certificate's SHA-256 (pinned: it dials itself).
    pub web_fp: String,
    /// SSH keepalive settings, to rebuild the SSH settings.
    pub keepalive: (Duration, usize),
    /// The shared state whose SSH settings are replaced.
    pub shared: Arc<TunnelShared>,
    /// What QUIC agents are shown (its certificate line is replaced too).
    pub quic_proof: Arc<crate::quic::ProxyProof>,
}

impl HostCertRenewal {
    /// Renews until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let cert = match read_cert(&self.cert_path) {
                Ok(c) => c,
                Err(e) => {
                    warn!(cert = %self.cert_path.display(), error = %e, "cannot read the proxy's host certificate to renew it: retrying");
                    if sleep_or_stop(&stop, Duration::from_secs(5)).await {
                        return;
                    }
                    continue;
                }
            };
            let now = mint::now_unix();
            if failures == 0 {
                let at = now + cert.valid_before().saturating_sub(now) * 2 / 3;
                debug!(in_secs = at - now, "next proxy host certificate renewal");
                let wait = Duration::from_secs(at.saturating_sub(now)).max(MIN_WAIT);
                // Sooner when the signing cluster's host CA moves to another key (a rotation).
                let ours = signer_fingerprint(&cert);
                let mut hints = self
                    .shared
                    .trust
                    .cluster_of_host_ca(&ours)
                    .and_then(|c| self.shared.trust.signer(&c, Signs::Proxies));
                // Looked at once even if it moved before this wait began (the proxy read the CAs
                // earlier); `wait_due` ignores a signer equal to this certificate's.
                if let Some(rx) = &mut hints {
                    rx.mark_changed();
                }
                if wait_due(&stop, wait, hints.as_mut(), &ours.to_string()).await {
                    return;
                }
            }
            match self.once(&cert).await {
                Ok(expires) => {
                    failures = 0;
                    info!(
                        expires,
                        "proxy host certificate renewed: new connections present it"
                    );
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let left = cert.valid_before().saturating_sub(mint::now_unix());
                    warn!(error = %e, expires_in_secs = left, "proxy host certificate renewal failed: retrying");
                    let wait = Duration::from_secs((left / 10).clamp(1, 300));
                    if sleep_or_stop(&stop, wait).await {
                        return;
                    }
                }
            }
        }
    }

    async fn once(&self, cert: &Certificate) -> Result<u64, String> {
        let signer = signer_fingerprint(cert);
        let cluster = self
            .shared
            .trust
            .names()
            .into_iter()
            .find(|n| {
                self.shared
                    .trust
                    .cluster(n)
                    .is_some_and(|t| t.host_cas.contains(&signer))
            })
            .ok_or("no cluster this proxy serves trusts the CA that signed its host certificate")?;
        let req = RenewRequest {
            cluster: cluster.clone(),
            renew_cert: cert.to_openssh().map_err(|e| e.to_string())?,
            source: None,
            ..Default::default()
        };
        let trust = WebTrust::Pin(self.web_fp.clone());
        let r = postern_dial::web::renew(&self.web, &trust, &req)
            .await
            .map_err(|e| e.to_string())?;
        if !r.error.is_empty() {
            return Err(r.error);
        }
        let new = Certificate::from_openssh(r.ssh_cert.trim()).map_err(|e| e.to_string())?;
        let trusted = self
            .shared
            .trust
            .cluster(&cluster)
            .map(|t| t.host_cas.clone());
        if new.public_key() != self.key.public_key().key_data()
            || new.valid_principals() != cert.valid_principals()
            || !trusted.is_some_and(|t| t.contains(&signer_fingerprint(&new)))
        {
            return Err("the renewed certificate is not for this proxy's key and names, or not from a CA its cluster trusts: kept the current one".into());
        }
        let text = format!("{}\n", new.to_openssh().map_err(|e| e.to_string())?);
        mint::write_file_atomic(&self.cert_path, text.as_bytes(), 0o600)
            .map_err(|e| format!("{e} (the current certificate is kept)"))?;
        let (keepalive, max) = self.keepalive;
        let config = crate::tunnel::ssh_config(self.key.clone(), Some(new.clone()), keepalive, max);
        self.shared.set_ssh_config(Arc::new(config));
        self.quic_proof.set_cert(&new);
        Ok(new.valid_before())
    }
}

fn read_cert(path: &std::path::Path) -> Result<Certificate, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    Certificate::from_openssh(text.trim()).map_err(|e| e.to_string())
}

/// Sleeps `d`; true when `stop` came first.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
