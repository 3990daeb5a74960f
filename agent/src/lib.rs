//! # postern-agent: the reverse-tunnel agent
//!
//! Runs beside a service in a network with no inbound ports. It dials **out** to a proxy,
//! logs in with its host certificate, registers each configured target with `tcpip-forward`, and
//! for every `forwarded-tcpip` channel the proxy opens, dials that target's local address (from
//! its allow-list, never from the wire) and splices. It reconnects with exponential back-off and
//! full jitter, re-registering each time.
//!
//! ## Layout
//! - [`config`]: `agent.toml`, validation.
//! - [`labels`]: target labels as `@control` frames.
//! - [`tunnel`]: one connection's life: login, registration, control channel, serving streams;
//!   QUIC first when the proxy offers it, SSH over TCP otherwise or when UDP is blocked.
//! - [`quic`]: the QUIC transport (login bound to the TLS exporter, one QUIC stream per stream).
//! - [`dial`]: dialling a target, its name resolved at each dial.
//! - [`failure`]: the own-certificate check before dialling; permanent vs transient failures.
//! - [`join`]: the first start with a join token: key, certificate through the proxy, CA pin.
//! - [`metrics`]: every `postern_agent_*` metric, and readiness for the ops listener.
//! - [`renew`]: renewing the certificate at two-thirds of its life, written atomically.
//! - [`pool`]: a tunnel to every proxy of the set, through one balanced address.
//! - [`run`]: the pool (or, with `pool.enabled = false`, one tunnel and its reconnect loop).

pub mod config;
pub mod dial;
pub mod failure;
pub mod join;
pub mod labels;
pub mod metrics;
pub mod pool;
pub mod quic;
pub mod renew;
mod splice;
pub mod tunnel;

use std::time::Duration;

use postern_dial::DialError;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use config::AgentConfig;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Key or certificate unusable (not retried).
    #[error(transparent)]
    Identity(DialError),
    /// Joining with a token failed (a wrong, used or expired token, a CA pin that does not
    /// match): not retried.
    #[error(transparent)]
    Join(#[from] join::JoinError),
    /// The ops listener could not be bound.
    #[error("ops listener {addr}: {source}")]
    Ops {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The back-off ceiling before retry `attempt` (0-based): `min(cap, base * 2^attempt)`.
pub fn backoff_ceiling(base: Duration, cap: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(cap)
}

/// Full jitter: a uniform random wait in `[0, ceiling)`.
pub fn full_jitter(ceiling: Duration) -> Duration {
    let ms = ceiling.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::random_range(0..ms))
}

/// Runs the agent until `shutdown` is cancelled: join if it has no certificate yet, then the
/// agent pool (see [`pool`]), or with the pool off, one tunnel: connect, serve, back off,
/// reconnect.
///
/// Before each dial the agent checks its own certificate (reloaded when its file changes, so a
/// renewed one is used for the next connection). A permanent failure (see [`failure`]) is said
/// once and retried every `reconnect.permanent_secs`; a transient one keeps the fast schedule.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    config.validate()?;
    if config.join_token_file.is_some() && !config.host_cert_path().exists() {
        tokio::select! {
            r = join::join(&config) => r?,
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    let identity =
        postern_dial::ssh::Identity::load(&config.host_key_file, &config.host_cert_path())
            .map_err(AgentError::Identity)?;
    // The recorder is installed by the ops listener (first), so that the series exported at zero
    // land in it; an agent embedded without one records into its host's recorder, if any.
    if let Some(addr) = config.ops_listen {
        postern_ops::http::bind_and_serve(addr, crate::metrics::ready(), shutdown.child_token())
            .await
            .map_err(|e| AgentError::Ops { addr, source: e })?;
    }
    crate::metrics::describe(config.targets.keys());
    // A service agent renews its own certificate; the Auth server's own agent (role `auth`) is
    // issued in-process by its server.
    let service = identity
        .cert
        .extensions()
        .get(tunnel_proto::names::EXT_ROLE)
        .map(String::as_str)
        == Some(tunnel_proto::names::ROLE_SERVICE);
    let dialer = std::sync::Arc::new(Dialer::new(config, identity));
    let _renewing = service.then(|| {
        let stop = shutdown.child_token();
        let hints = dialer.hints.subscribe();
        tokio::spawn(renew::keep_renewed(
            dialer.config.clone(),
            stop.clone(),
            hints,
        ));
        stop.drop_guard()
    });
    if dialer.config.pool.enabled {
        pool::run(dialer, shutdown).await;
        return Ok(());
    }
    let config = &dialer.config;
    let base = Duration::from_millis(config.reconnect.base_ms);
    let cap = Duration::from_millis(config.reconnect.cap_ms);
    let permanent = Duration::from_secs(config.reconnect.permanent_secs);
    let mut attempt = 0u32;
    let mut last_permanent: Option<String> = None;
    loop {
        let wait = match dialer.dial(&shutdown, None).await {
            Ok(tunnel::Ended::Shutdown) => return Ok(()),
            Ok(ended) => {
                info!(?ended, "tunnel ended: reconnecting");
                attempt = 0;
                last_permanent = None;
                full_jitter(backoff_ceiling(base, cap, 0))
            }
            Err(failure::Failure::Transient(e)) => {
                warn!(error = %e, attempt, "tunnel attempt failed: retrying");
                last_permanent = None;
                let w = full_jitter(backoff_ceiling(base, cap, attempt));
                attempt = attempt.saturating_add(1);
                w
            }
            Err(failure::Failure::Permanent(e)) => {
                if last_permanent.as_deref() != Some(e.as_str()) {
                    error!(retry_in_secs = permanent.as_secs(), "{e}");
                } else {
                    debug!(error = %e, "still failing the same way");
                }
                last_permanent = Some(e);
                attempt = 0;
                permanent
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// A certificate file's stamp (see [`cert_stamp`]).
type Stamp = Option<(u64, std::time::SystemTime, u64)>;

/// What every dial of an agent shares, alone or in a pool: its config, the QUIC endpoints, and
/// its identity, reloaded when the certificate file changes.
pub struct Dialer {
    /// The agent's configuration.
    pub config: AgentConfig,
    /// What the proxies say about the host CA's signer, for the renewal loop.
    pub hints: renew::SignerHints,
    quic: quic::QuicClient,
    identity: std::sync::Mutex<(std::sync::Arc<postern_dial::ssh::Identity>, Stamp)>,
}

impl Dialer {
    /// A dialer for `config`, starting with `identity` (loaded from its files).
    pub fn new(config: AgentConfig, identity: postern_dial::ssh::Identity) -> Self {
        let stamp = cert_stamp(&config);
        Dialer {
            config,
            hints: std::sync::Arc::new(tokio::sync::watch::Sender::new(None)),
            quic: quic::QuicClient::default(),
            identity: std::sync::Mutex::new((std::sync::Arc::new(identity), stamp)),
        }
    }

    /// The identity to dial with: a certificate file that changed (renewed, or replaced by an
    /// operator) is used now.
    fn identity(&self) -> std::sync::Arc<postern_dial::ssh::Identity> {
        let config = &self.config;
        let mut slot = self.identity.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = cert_stamp(config);
        if stamp != slot.1 {
            match postern_dial::ssh::Identity::load(&config.host_key_file, &config.host_cert_path())
            {
                Ok(fresh) => {
                    info!(expires = %failure::utc(fresh.cert.valid_before()), "certificate reloaded");
                    *slot = (std::sync::Arc::new(fresh), stamp);
                }
                Err(e) => {
                    warn!(error = %e, "certificate file changed but does not load: keeping the one in use")
                }
            }
        }
        slot.0.clone()
    }

    /// One dial, alone or as dial `attempt` of a pool: the own-certificate check, the tunnel
    /// (QUIC first when offered, SSH otherwise) until it ends, the reconnect counted by reason,
    /// and a failure classified as permanent or transient.
    pub async fn dial(
        &self,
        shutdown: &CancellationToken,
        pool: Option<(&std::sync::Arc<pool::Pool>, u64)>,
    ) -> Result<tunnel::Ended, failure::Failure> {
        let config = &self.config;
        let identity = self.identity();
        let cert_path = config.host_cert_path().display().to_string();
        if let Err(f) =
            failure::check_own_cert(&identity.cert, &cert_path, postern_dial::mint::now_unix())
        {
            ::metrics::counter!(crate::metrics::RECONNECTS, "reason" => "own_certificate")
                .increment(1);
            return Err(refine_unknown_cluster(config, f).await);
        }
        match tunnel::connect_and_serve_in(
            &self.quic,
            &self.hints,
            config,
            &identity,
            shutdown,
            pool,
        )
        .await
        {
            Ok(ended) => {
                let reason = match ended {
                    tunnel::Ended::Drained => Some("drained"),
                    tunnel::Ended::Closed => Some("closed"),
                    tunnel::Ended::Shutdown | tunnel::Ended::Duplicate => None,
                };
                if let Some(reason) = reason {
                    ::metrics::counter!(crate::metrics::RECONNECTS, "reason" => reason)
                        .increment(1);
                }
                Ok(ended)
            }
            Err(e) => {
                ::metrics::counter!(
                    crate::metrics::RECONNECTS,
                    "reason" => crate::metrics::failure_reason(&e)
                )
                .increment(1);
                let f = failure::classify(&e, &config.cluster);
                Err(refine_unknown_cluster(config, f).await)
            }
        }
    }
}

/// Size, modification time and inode of the certificate file: a change means a new one.
fn cert_stamp(config: &AgentConfig) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(config.host_cert_path()).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

/// A refused certificate may be for a cluster the proxy does not serve: ask its discovery, and
/// say so in those words.
async fn refine_unknown_cluster(config: &AgentConfig, f: failure::Failure) -> failure::Failure {
    let (failure::Failure::Permanent(_), Some(web)) = (&f, &config.proxy) else {
        return f;
    };
    let Ok(trust) = tunnel::web_trust(config) else {
        return f;
    };
    match postern_dial::web::ping(web, &trust).await {
        Ok(ping) if !ping.cluster_names.contains(&config.cluster) => {
            failure::Failure::Permanent(format!(
                "proxy {web} does not serve cluster '{}' (it serves: {}): check `cluster` in \
                 agent.toml, or add the cluster to the proxy's [[clusters]]",
                config.cluster,
                ping.cluster_names.join(", ")
            ))
        }
        _ => f,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_cap_and_jitter_stays_below() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_millis(1500);
        let ceilings: Vec<u128> = (0..6)
            .map(|n| backoff_ceiling(base, cap, n).as_millis())
            .collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1500, 1500]);
        assert_eq!(backoff_ceiling(base, cap, 1000), cap);
        for _ in 0..1000 {
            assert!(full_jitter(cap) < cap);
        }
    }
}
