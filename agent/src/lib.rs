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
//! - [`tunnel`]: one connection's life: login, registration, control channel, serving streams.
//! - [`dial`]: dialling a target, its name resolved at each dial.
//! - [`metrics`]: every `postern_agent_*` metric, and readiness for the ops listener.
//! - [`run`]: the reconnect loop.

pub mod config;
pub mod dial;
pub mod labels;
pub mod metrics;
pub mod tunnel;

use std::time::Duration;

use postern_dial::DialError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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

/// Runs the agent until `shutdown` is cancelled: connect, serve, back off, reconnect.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    config.validate()?;
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
    let base = Duration::from_millis(config.reconnect.base_ms);
    let cap = Duration::from_millis(config.reconnect.cap_ms);
    let mut attempt = 0u32;
    loop {
        let outcome = tunnel::connect_and_serve(&config, &identity, &shutdown).await;
        match outcome {
            Ok(tunnel::Ended::Shutdown) => return Ok(()),
            Ok(ended) => {
                info!(?ended, "tunnel ended: reconnecting");
                let reason = if ended == tunnel::Ended::Drained {
                    "drained"
                } else {
                    "closed"
                };
                ::metrics::counter!(crate::metrics::RECONNECTS, "reason" => reason).increment(1);
                attempt = 0;
            }
            Err(e) => {
                warn!(error = %e, attempt, "tunnel attempt failed");
                ::metrics::counter!(crate::metrics::RECONNECTS, "reason" => crate::metrics::failure_reason(&e))
                    .increment(1);
            }
        }
        let wait = full_jitter(backoff_ceiling(base, cap, attempt));
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
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
