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
//! - [`pool`]: a tunnel to every proxy of the set, through one balanced address.
//! - [`run`]: the pool (or, with `pool.enabled = false`, one tunnel and its reconnect loop).

pub mod config;
pub mod labels;
pub mod pool;
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

/// Runs the agent until `shutdown` is cancelled: the agent pool (see [`pool`]), or with the pool
/// off, one tunnel: connect, serve, back off, reconnect.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    config.validate()?;
    let identity =
        postern_dial::ssh::Identity::load(&config.host_key_file, &config.host_cert_path())
            .map_err(AgentError::Identity)?;
    if config.pool.enabled {
        pool::run(config, identity, shutdown).await;
        return Ok(());
    }
    let base = Duration::from_millis(config.reconnect.base_ms);
    let cap = Duration::from_millis(config.reconnect.cap_ms);
    let mut attempt = 0u32;
    loop {
        let outcome = tunnel::connect_and_serve(&config, &identity, &shutdown).await;
        match outcome {
            Ok(tunnel::Ended::Shutdown) => return Ok(()),
            Ok(ended) => {
                info!(?ended, "tunnel ended: reconnecting");
                attempt = 0;
            }
            Err(e) => {
                warn!(error = %e, attempt, "tunnel attempt failed");
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
