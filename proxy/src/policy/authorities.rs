//! The cluster's trusted CA keys, read from its Auth server (`ExportAuthorities`, host and user)
//! every `ca_refresh_secs`, replacing the lists the proxy checks certificates against. This is
//! how a CA rotation reaches the proxy: in `init` the new key appears (both trusted), after the
//! rotation the old one disappears (an old-CA certificate is refused at the next login).
//!
//! The config's `host_ca`/`user_ca`, with what the last answer was (kept in the data directory:
//! [`crate::trust::CaCache`]), are the lists until the first answer. An answer with an
//! empty list is ignored (it would refuse everyone), and while the Auth server is unreachable
//! the last lists stay.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postern_api::proto::ExportAuthoritiesRequest;
use postern_client::auth::AuthClient;
use postern_dial::ssh::parse_ca_lines;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::policy::watch::{WatchError, connect};
use crate::trust::{ClusterTrust, Signs};
use crate::tunnel::TunnelShared;
use postern_dial::renew_due::SignerHint;

/// Reads one cluster's CAs from its Auth server, periodically.
pub struct CaRefresher {
    /// The cluster.
    pub cluster: String,
    /// The proxy's identity file for this cluster (re-read at each connection).
    pub identity_file: PathBuf,
    /// Time between reads.
    pub every: Duration,
    /// Told to agents with the host signer (`policy.renew_spread_secs`).
    pub renew_spread_secs: u32,
    /// Where each change is kept for the next start.
    pub cache: crate::trust::CaCache,
    /// Live tunnels (the Auth server is reached through one) and the trust to update.
    pub shared: Arc<TunnelShared>,
}

impl CaRefresher {
    /// Refreshes until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut client: Option<AuthClient> = None;
        let mut last_error = String::new();
        let mut renewed = self.shared.identity_renewals.subscribe(&self.cluster);
        loop {
            // A renewed identity: the next read connects with it.
            if renewed.has_changed().unwrap_or(false) {
                renewed.mark_unchanged();
                client = None;
            }
            match self.once(&mut client).await {
                Ok(()) => last_error.clear(),
                Err(e) => {
                    client = None;
                    let e = e.to_string();
                    if e != last_error {
                        debug!(cluster = %self.cluster, error = %e, "reading the cluster's CAs failed: the last known ones stay trusted");
                        last_error = e;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn once(&self, client: &mut Option<AuthClient>) -> Result<(), WatchError> {
        if client.is_none() {
            *client = Some(connect(&self.cluster, &self.identity_file, &self.shared).await?);
        }
        let Some(c) = client.as_ref() else {
            return Ok(());
        };
        let mut lists = Vec::new();
        let mut lines = Vec::new();
        for kind in ["host", "user"] {
            let r = c
                .export_authorities(ExportAuthoritiesRequest { kind: kind.into() })
                .await
                .map_err(|e| WatchError::Stream(format!("ExportAuthorities {kind}: {e}")))?;
            // The host signer (an older Auth server names none: agents then renew on their own
            // schedule only).
            if kind == "host" {
                let hint = |line: &String| {
                    parse_ca_lines(std::slice::from_ref(line))
                        .ok()
                        .and_then(|fps| fps.first().copied())
                        .map(|fp| SignerHint {
                            fingerprint: fp.to_string(),
                            spread_secs: self.renew_spread_secs,
                        })
                };
                // An older Auth server names neither: agents and this proxy then renew on
                // their own schedule only.
                for (line, whose) in [
                    (&r.signing, Signs::Agents),
                    (&r.server_signing, Signs::Proxies),
                ] {
                    if let Some(h) = hint(line) {
                        self.shared.trust.set_signer(&self.cluster, whose, h);
                    }
                }
            }
            lines.push(r.entries.clone());
            lists.push(
                parse_ca_lines(&r.entries)
                    .map_err(|e| WatchError::Stream(format!("{kind} CA from Auth: {e}")))?,
            );
        }
        let user_cas = lists.pop().unwrap_or_default();
        let host_cas = lists.pop().unwrap_or_default();
        let trust = &self.shared.trust;
        let new = ClusterTrust { host_cas, user_cas };
        if trust.cluster(&self.cluster).as_deref() == Some(&new) {
            return Ok(());
        }
        let (h, u) = (new.host_cas.len(), new.user_cas.len());
        if trust.replace(&self.cluster, new) {
            info!(cluster = %self.cluster, host_cas = h, user_cas = u, "trusted CA keys updated from the Auth server");
            if let Err(e) = self.cache.store(&self.cluster, &lines[0], &lines[1]) {
                warn!(cluster = %self.cluster, error = %e, "cannot keep the CA keys for the next start: after a rotation, a restart trusts the config's keys until the Auth server answers");
            }
        } else {
            warn!(cluster = %self.cluster, "the Auth server exported an empty CA list: kept the last known lists");
        }
        Ok(())
    }
}
