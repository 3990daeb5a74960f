//! Renewal: the agent asks for a new certificate for the same key at about two-thirds of the
//! lifetime the current one had left when it was first seen, through the proxy's web listener
//! (`POST /webapi/renew`, relayed to the Auth server like a join), presenting the certificate in
//! use. The new one replaces the file atomically (temporary file, then rename: a full disk
//! leaves the old one in place); the reconnect loop picks it up for the next connection, and
//! open tunnels and streams carry on.

use std::time::Duration;

use postern_dial::mint;
use russh::keys::ssh_key::Certificate;
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

/// Keeps the agent's certificate renewed until `shutdown`. Needs `proxy` (the web address).
pub async fn keep_renewed(config: AgentConfig, shutdown: CancellationToken) {
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
            if sleep_or_stop(
                &shutdown,
                Duration::from_secs(at.saturating_sub(now)).max(MIN_WAIT),
            )
            .await
            {
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
            Ok(r) if r.error.is_empty() => save(&config, &cert, &r.ssh_cert),
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
                // Retry well before expiry, but not in a tight loop.
                let wait = Duration::from_secs((left / 10).clamp(1, 300));
                if sleep_or_stop(&shutdown, wait).await {
                    return;
                }
            }
        }
    }
}

/// Checks the renewed certificate (same key, same principals, same CA) and writes it over the
/// old one atomically; returns its expiry.
fn save(config: &AgentConfig, old: &Certificate, line: &str) -> Result<u64, String> {
    let new = Certificate::from_openssh(line.trim()).map_err(|e| e.to_string())?;
    if new.public_key() != old.public_key()
        || new.signature_key() != old.signature_key()
        || new.valid_principals() != old.valid_principals()
    {
        return Err(
            "the renewed certificate is not for this agent's key and name, or not from its CA"
                .into(),
        );
    }
    let text = format!("{}\n", new.to_openssh().map_err(|e| e.to_string())?);
    mint::write_file_atomic(&config.host_cert_path(), text.as_bytes(), 0o600)
        .map_err(|e| format!("{e} (the current certificate is kept)"))?;
    Ok(new.valid_before())
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
