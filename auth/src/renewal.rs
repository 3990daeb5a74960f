//! The embedded agent's certificate renews itself: the Auth server issues it in-process (it
//! holds the host CA) with lifetime `agent_cert_ttl_secs`, and re-issues it for the same key at
//! two-thirds of that lifetime, written atomically (temporary file, fsync, rename: a full disk
//! leaves the old one in place). The agent loop reloads a changed certificate file before its
//! next dial, so the open tunnel and its streams carry on and the next connection uses the new
//! certificate. When a host CA rotation moves the signing key (`update_clients`, or a rollback),
//! the certificate is re-issued within a second: the proxies stop trusting the old key at the
//! end of the rotation, and the Auth server's own tunnel must not depend on its renewal schedule.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postern_dial::mint;
use russh::keys::ssh_key::PublicKey;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::authority::{Authorities, AuthorityError};
use crate::rotation::CaKind;

/// How often the signing key is compared with the one that signed the current certificate.
const SIGNER_CHECK: Duration = Duration::from_secs(1);

/// What renewing the embedded agent's certificate needs.
pub struct AgentRenewal {
    /// Issues the certificate (the cluster's host CA).
    pub authorities: Arc<Authorities>,
    /// The agent's public key (the private half stays in its key file).
    pub key: PublicKey,
    /// The agent's host id.
    pub host_id: String,
    /// The certificate file the agent reads.
    pub cert_path: PathBuf,
    /// Lifetime of each certificate, seconds.
    pub ttl: u64,
}

impl AgentRenewal {
    /// Issues a certificate and writes it atomically, with the host CA keys trusted now next to
    /// it (as a service agent's renewal records them: the agent then trusts proxies renewed from
    /// a rotated host CA); returns its expiry (unix seconds).
    pub fn issue_and_write(&self) -> Result<u64, AuthorityError> {
        let issued = self
            .authorities
            .issue_host(&self.key, &self.host_id, &[], self.ttl)?;
        mint::write_file_atomic(
            &self.cert_path,
            format!("{}\n", issued.ssh_cert).as_bytes(),
            0o600,
        )
        .map_err(|e| AuthorityError::Issue(format!("{e} (the current certificate is kept)")))?;
        let cas = format!("{}\n", self.authorities.host_ca_lines().join("\n"));
        let cas_path = postern_agent::renew::learned_cas_file(&self.cert_path);
        if let Err(e) = mint::write_file_atomic(&cas_path, cas.as_bytes(), 0o600) {
            warn!(error = %e, "cannot record the cluster's host CAs next to the embedded agent's certificate");
        }
        Ok(issued.expires)
    }

    /// Renews at two-thirds of each certificate's life, and at once when the host CA's signing
    /// key is no longer the one that signed it, until `shutdown`; a failure is retried after 1 s.
    pub async fn run(self, expires: u64, shutdown: CancellationToken) {
        let mut due = tokio::time::Instant::now() + renew_wait(mint::now_unix(), expires);
        let mut signed_by = self.signer();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SIGNER_CHECK) => {}
            }
            let rotated = self.signer() != signed_by;
            if !rotated && tokio::time::Instant::now() < due {
                continue;
            }
            // One signature and one small file: cheap enough to do here.
            match self.issue_and_write() {
                Ok(e) => {
                    info!(
                        expires = e,
                        rotated, "embedded agent certificate renewed: the next connection uses it"
                    );
                    due = tokio::time::Instant::now() + renew_wait(mint::now_unix(), e);
                    signed_by = self.signer();
                }
                Err(e) => {
                    warn!(error = %e, "embedded agent certificate renewal failed: retrying");
                    due = tokio::time::Instant::now();
                }
            }
        }
    }

    /// The host CA key that signs now.
    fn signer(&self) -> PublicKey {
        self.authorities
            .ca_keys(CaKind::Host)
            .signer
            .public_key()
            .clone()
    }
}

/// How long to wait before renewing a certificate valid until `expires`, at `now`: two-thirds
/// of what is left, at least 1 s.
pub fn renew_wait(now: u64, expires: u64) -> Duration {
    Duration::from_secs(expires.saturating_sub(now) * 2 / 3).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_waits_two_thirds_of_what_is_left() {
        assert_eq!(renew_wait(100, 130), Duration::from_secs(20));
        assert_eq!(renew_wait(100, 101), Duration::from_secs(1), "at least 1 s");
        assert_eq!(
            renew_wait(200, 100),
            Duration::from_secs(1),
            "expired: soon"
        );
    }
}
