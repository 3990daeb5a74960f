//! Every metric the agent exports, named and described once; served on the ops listener
//! (`ops_listen` in agent.toml, `POSTERN_AGENT_OPS_LISTEN`, off by default) with `/healthz` and
//! `/readyz` (ready while at least one tunnel is up).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use metrics::{counter, describe_counter, describe_gauge, gauge};
use postern_dial::DialError;
use postern_ops::http::Ready;

/// 1 while the tunnel to a proxy is up, 0 when it is down, by `proxy` (the tunnel address).
pub const TUNNEL_UP: &str = "postern_agent_tunnel_up";
/// Tunnels dialled again, by `reason`: why the last one ended or failed (`closed`, `drained`,
/// `connect`, `tls`, `not_postern`, `config`, `host_verification`, `auth_refused`, `ssh`,
/// `timeout`).
pub const RECONNECTS: &str = "postern_agent_reconnects_total";
/// Streams the proxy opened and the agent connected to its target, by `target`.
pub const STREAMS: &str = "postern_agent_streams_total";
/// Streams open now, by `target`.
pub const STREAMS_OPEN: &str = "postern_agent_streams_open";
/// Streams whose target could not be dialled, by `target` and `reason` (`resolve`: the name did
/// not resolve; `refused`; `timeout`; `error`).
pub const DIAL_ERRORS: &str = "postern_agent_dial_errors_total";

/// Every reason [`RECONNECTS`] is counted by.
pub const RECONNECT_REASONS: &[&str] = &[
    "closed",
    "drained",
    "connect",
    "tls",
    "not_postern",
    "config",
    "host_verification",
    "auth_refused",
    "refused",
    "own_certificate",
    "ssh",
    "timeout",
    "quic",
];
/// Every reason [`DIAL_ERRORS`] is counted by.
pub const DIAL_ERROR_REASONS: &[&str] = &["resolve", "refused", "timeout", "error"];

/// Describes every metric and exports the per-target and per-reason series at zero, so that
/// dashboards and alerts see them from the start.
pub fn describe<'a>(targets: impl IntoIterator<Item = &'a String>) {
    describe_gauge!(TUNNEL_UP, "1 while the tunnel to a proxy is up, by proxy.");
    describe_counter!(
        RECONNECTS,
        "Tunnels dialled again, by why the last one ended."
    );
    describe_counter!(STREAMS, "Streams connected to their target, by target.");
    describe_gauge!(STREAMS_OPEN, "Streams open now, by target.");
    describe_counter!(
        DIAL_ERRORS,
        "Target dials that failed, by target and reason."
    );
    for reason in RECONNECT_REASONS {
        counter!(RECONNECTS, "reason" => *reason).increment(0);
    }
    for t in targets {
        counter!(STREAMS, "target" => t.clone()).increment(0);
        gauge!(STREAMS_OPEN, "target" => t.clone()).set(0.0);
        for reason in DIAL_ERROR_REASONS {
            counter!(DIAL_ERRORS, "target" => t.clone(), "reason" => *reason).increment(0);
        }
    }
}

/// The [`RECONNECTS`] reason for a failed tunnel attempt.
pub fn failure_reason(e: &DialError) -> &'static str {
    match e {
        DialError::Connect { .. } => "connect",
        DialError::Tls { .. } => "tls",
        DialError::NotAPostern { .. } => "not_postern",
        DialError::Config(_) => "config",
        DialError::HostVerification { .. } => "host_verification",
        DialError::AuthRefused { .. } => "auth_refused",
        DialError::Refused { .. } => "refused",
        DialError::Ssh { .. } => "ssh",
        DialError::Timeout { .. } => "timeout",
        DialError::Quic { .. } => "quic",
    }
}

/// Counts a failed target dial.
pub fn dial_error(target: &str, reason: &'static str) {
    counter!(DIAL_ERRORS, "target" => target.to_string(), "reason" => reason).increment(1);
}

/// The agent's readiness (`/readyz`): true while at least one tunnel is up.
pub fn ready() -> Arc<Ready> {
    READY.get_or_init(Default::default).clone()
}

static READY: OnceLock<Arc<Ready>> = OnceLock::new();
static TUNNELS_UP: AtomicUsize = AtomicUsize::new(0);

/// A tunnel that is up: sets its [`TUNNEL_UP`] to 1 and readiness while it lives.
pub struct TunnelUp(String);

impl TunnelUp {
    /// The tunnel to `proxy` came up.
    pub fn new(proxy: &str) -> TunnelUp {
        gauge!(TUNNEL_UP, "proxy" => proxy.to_string()).set(1.0);
        TUNNELS_UP.fetch_add(1, Ordering::SeqCst);
        ready().set(true);
        TunnelUp(proxy.to_string())
    }
}

impl Drop for TunnelUp {
    fn drop(&mut self) {
        gauge!(TUNNEL_UP, "proxy" => self.0.clone()).set(0.0);
        if TUNNELS_UP.fetch_sub(1, Ordering::SeqCst) == 1 {
            ready().set(false);
        }
    }
}

/// An open stream to a target: counted in [`STREAMS`] and [`STREAMS_OPEN`] while it lives.
pub struct StreamOpen(String);

impl StreamOpen {
    /// A stream to `target` connected.
    pub fn new(target: &str) -> StreamOpen {
        counter!(STREAMS, "target" => target.to_string()).increment(1);
        gauge!(STREAMS_OPEN, "target" => target.to_string()).increment(1.0);
        StreamOpen(target.to_string())
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        gauge!(STREAMS_OPEN, "target" => self.0.clone()).decrement(1.0);
    }
}
