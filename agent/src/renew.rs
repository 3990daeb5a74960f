//! Renewal: the agent asks for a new certificate for the same key at about two-thirds of the
//! lifetime the current one had left when it was first seen, through the proxy's web listener
//! (`POST /webapi/renew`, relayed to the Auth server like a join), presenting the certificate in
//! use. The new one replaces the file atomically (temporary file, then rename: a full disk
//! leaves the old one in place); the reconnect loop picks it up for the next connection, and
//! open tunnels and streams carry on.
//!
//! A proxy also says which key signs the cluster's host certificates now (`@control`
//! `HostCaSigner`). When that is not the key that signed this agent's certificate (a host CA
//! rotation reached `update_clients`, or rolled back), the agent renews at a random moment within
//! the spread the proxy gives, instead of waiting for the two-thirds mark: a fleet picks up a
//! rotated CA in that time, without every agent asking at once.

use std::sync::Arc;
use std::time::Duration;

use postern_dial::mint;
pub use postern_dial::renew_due::SignerHint;
use postern_dial::renew_due::wait_due;
use russh::keys::ssh_key::Certificate;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tunnel_proto::join::RenewRequest;

use crate::config::AgentConfig;
use crate::failure::utc;

/// Shortest wait between renewal attempts (also after a failure).
const MIN_WAIT: Duration = Duration::from_secs(1);

/// When to renew a certificate valid until `valid_before`, first seen at `now`: two-thirds of
/// the way from `now` to its expiry.
pub fn renew_at(now: u64, valid_before: u64) -> u64 {
    now + valid_before.saturating_sub(now) * 2 / 3
}

/// Where the agent's tunnels (either transport, alone or in a pool) post what proxies say about
/// the host CA's signer; the renewal loop follows it.
pub type SignerHints = Arc<watch::Sender<Option<SignerHint>>>;

/// Keeps the agent's certificate renewed until `shutdown`. Needs `proxy` (the web address).
/// `hints` (see [`SignerHints`]) brings a renewal forward when the host CA's signer changed.
pub async fn keep_renewed(
    config: AgentConfig,
    shutdown: CancellationToken,
    mut hints: watch::Receiver<Option<SignerHint>>,
) {
    let Some(web) = config.proxy.clone() else {
        info!("no web address (`proxy`): the certificate is not renewed automatically");
        return;
    };
    let Ok(trust) = crate::tunnel::web_trust(&config) else {
        return;
    };
    let path = config.host_cert_path();
    let mut failures = 0u32;
    loop {
        let Some(cert) = read_cert(&path) else {
            warn!(cert = %path.display(), "cannot read the certificate to renew: retrying");
            if sleep_or_stop(&shutdown, Duration::from_secs(5)).await {
                return;
            }
            continue;
        };
        let now = mint::now_unix();
        if failures == 0 {
            let at = renew_at(now, cert.valid_before());
            debug!(at = %utc(at), "next certificate renewal");
            let wait = Duration::from_secs(at.saturating_sub(now)).max(MIN_WAIT);
            let ours = tunnel_proto::certs::signer_fingerprint(&cert).to_string();
            if wait_due(&shutdown, wait, Some(&mut hints), &ours).await {
                return;
            }
        }
        let line = match cert.to_openssh() {
            Ok(l) => l,
            Err(_) => return,
        };
        let req = RenewRequest {
            cluster: config.cluster.clone(),
            renew_cert: line,
            source: None,
            ..Default::default()
        };
        let outcome = match postern_dial::web::renew(&web, &trust, &req).await {
            Ok(r) if r.error.is_empty() => save(&config, &cert, &r.ssh_cert, &r.ssh_host_cas),
            Ok(r) => Err(r.error),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(expires) => {
                failures = 0;
                info!(expires = %utc(expires), "certificate renewed: the next connection uses it");
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let left = cert.valid_before().saturating_sub(mint::now_unix());
                warn!(error = %e, expires_in_secs = left, "certificate renewal failed: retrying");
                // Retry well before expiry, but not in a tight loop; after a rotation (the
                // cluster signs with another key than this certificate's), within the spread
                // again rather than minutes later: a fleet renewing at once through one address
                // meets the proxy's per-source caps, and each retry finds room.
                let mut wait = Duration::from_secs((left / 10).clamp(1, 300));
                let ours = tunnel_proto::certs::signer_fingerprint(&cert).to_string();
                if let Some(spread) = hints
                    .borrow()
                    .as_ref()
                    .filter(|h| h.fingerprint != ours)
                    .map(|h| u64::from(h.spread_secs.max(1)) * 1000)
                {
                    wait = wait.min(Duration::from_millis(rand::random_range(
                        1000..=1000 + spread,
                    )));
                }
                if sleep_or_stop(&shutdown, wait).await {
                    return;
                }
            }
        }
    }
}

/// Checks the renewed certificate (same key, same principals; same CA, or during a host CA
/// rotation a new CA the answer announces next to the current one) and writes it over the old
/// one atomically; records the announced host CAs ([`learned_cas_path`]); returns its expiry.
fn save(
    config: &AgentConfig,
    old: &Certificate,
    line: &str,
    announced: &[String],
) -> Result<u64, String> {
    let new = Certificate::from_openssh(line.trim()).map_err(|e| e.to_string())?;
    if new.public_key() != old.public_key() || new.valid_principals() != old.valid_principals() {
        return Err("the renewed certificate is not for this agent's key and name".into());
    }
    check_signer(old, &new, announced)?;
    let text = format!("{}\n", new.to_openssh().map_err(|e| e.to_string())?);
    mint::write_file_atomic(&config.host_cert_path(), text.as_bytes(), 0o600)
        .map_err(|e| format!("{e} (the current certificate is kept)"))?;
    if !announced.is_empty() {
        let cas = format!("{}\n", announced.join("\n"));
        if let Err(e) = mint::write_file_atomic(&learned_cas_path(config), cas.as_bytes(), 0o600) {
            warn!(error = %e, "cannot record the cluster's host CAs: the configured ones stay");
        }
    }
    Ok(new.valid_before())
}

/// The renewed certificate's signer must be the current one's, or (a host CA rotation) a key
/// the Auth server announces together with the current signer: the answer comes from a server
/// that still trusts the CA this agent was issued by, over the channel the agent already trusts.
fn check_signer(old: &Certificate, new: &Certificate, announced: &[String]) -> Result<(), String> {
    if new.signature_key() == old.signature_key() {
        return Ok(());
    }
    let keys: Vec<_> = announced
        .iter()
        .filter_map(|l| russh::keys::ssh_key::PublicKey::from_openssh(l.trim()).ok())
        .map(|k| k.key_data().clone())
        .collect();
    if keys.contains(old.signature_key()) && keys.contains(new.signature_key()) {
        info!("the renewed certificate is from the cluster's new host CA (a CA rotation)");
        return Ok(());
    }
    Err("the renewed certificate is not from this agent's CA, nor from a new CA announced with it (a CA rotation): kept the current one".into())
}

/// Where the host CA keys announced by the last renewal are kept (next to the certificate): the
/// agent trusts proxies signed by them as well as by `proxy_host_ca`, so that proxies renewed
/// from a rotated host CA are accepted.
pub fn learned_cas_path(config: &AgentConfig) -> std::path::PathBuf {
    learned_cas_file(&config.host_cert_path())
}

/// [`learned_cas_path`] for the certificate at `cert_path` (an agent embedded in the Auth
/// server writes it there itself).
pub fn learned_cas_file(cert_path: &std::path::Path) -> std::path::PathBuf {
    let mut p = cert_path.as_os_str().to_owned();
    p.push(".cas");
    p.into()
}

/// The host CA keys recorded by the last renewal (none if never renewed).
pub fn learned_cas(config: &AgentConfig) -> Vec<String> {
    std::fs::read_to_string(learned_cas_path(config))
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn read_cert(path: &std::path::Path) -> Option<Certificate> {
    let text = std::fs::read_to_string(path).ok()?;
    Certificate::from_openssh(text.trim()).ok()
}

/// Sleeps `d`; true when `shutdown` came first.
async fn sleep_or_stop(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_two_thirds_of_what_is_left() {
        assert_eq!(renew_at(1000, 1000 + 30 * 86_400), 1000 + 20 * 86_400);
        assert_eq!(renew_at(100, 106), 104);
        assert_eq!(renew_at(200, 100), 200, "an expired certificate: now");
    }
}
