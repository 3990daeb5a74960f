//! Every metric the proxy exports, named and described once.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Agent tunnels connected now, by `cluster` and `transport` (`ssh`, `quic`).
pub const TUNNELS_CONNECTED: &str = "postern_tunnels_connected";
/// Agent tunnels established, by `cluster` and `transport`.
pub const TUNNEL_CONNECTS: &str = "postern_tunnel_connects_total";
/// Agent tunnels ended, by `cluster`, `reason` (`closed`, `error`, `shutdown`) and `transport`.
pub const TUNNEL_DISCONNECTS: &str = "postern_tunnel_disconnects_total";
/// Refused logins, by `reason` (see `CertError::reason`, plus `no_certificate`, `unknown_cluster`,
/// `rejected_by_ssh_layer`, and on QUIC `binding_mismatch`, `bad_binding`, `not_an_agent`), and
/// `transport`.
pub const AUTH_FAILURES: &str = "postern_auth_failures_total";
/// Client streams open now.
pub const STREAMS_ACTIVE: &str = "postern_streams_active";
/// Client stream open attempts, by `result` (`ok`, `unknown_cluster`, `no_tunnel`,
/// `unknown_target`, `bad_target`, `forbidden`, `agent_refused`, `limit`).
pub const STREAM_OPENS: &str = "postern_stream_opens_total";
/// Payload bytes spliced, by `direction` (`client_to_agent`, `agent_to_client`).
pub const BYTES_PROXIED: &str = "postern_bytes_proxied_total";
/// Seconds from TCP accept to successful login on the tunnel listener, by `role`.
pub const HANDSHAKE_SECONDS: &str = "postern_handshake_duration_seconds";
/// Discovery requests, by `path` and `status`.
pub const DISCOVERY_REQUESTS: &str = "postern_discovery_requests_total";
/// Connections closed before login, by `reason` (`handshake_timeout`, `protocol`, `limit`).
pub const CONNECTIONS_DROPPED: &str = "postern_connections_dropped_total";
/// Connections, tunnels and streams refused by a limit, by `limit` (`connects_per_source`,
/// `auth_failures_per_source`, `tunnels_per_cluster`, `streams_per_client`).
pub const LIMIT_REFUSALS: &str = "postern_limit_refusals_total";
/// Logins relayed to an Auth server, by `result` (`ok`, `refused`, `rate_limited`,
/// `bad_request`, `no_tunnel`, `error`).
pub const LOGIN_RELAYS: &str = "postern_login_relays_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                    ],
                )
                .expect("static buckets")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_gauge!(
        TUNNELS_CONNECTED,
        "Agent tunnels connected now, by cluster."
    );
    describe_counter!(TUNNEL_CONNECTS, "Agent tunnels established, by cluster.");
    describe_counter!(
        LIMIT_REFUSALS,
        "Connections, tunnels and streams refused by a limit, by limit."
    );
    describe_counter!(LOGIN_RELAYS, "Logins relayed to an Auth server, by result.");
    describe_counter!(
        TUNNEL_DISCONNECTS,
        "Agent tunnels ended, by cluster and reason."
    );
    describe_counter!(
        AUTH_FAILURES,
        "Refused logins on the tunnel listener, by reason."
    );
    describe_gauge!(STREAMS_ACTIVE, "Client streams open now.");
    describe_counter!(STREAM_OPENS, "Client stream open attempts, by result.");
    describe_counter!(BYTES_PROXIED, "Payload bytes spliced, by direction.");
    describe_histogram!(
        HANDSHAKE_SECONDS,
        metrics::Unit::Seconds,
        "Seconds from TCP accept to successful login, by role."
    );
    describe_counter!(
        DISCOVERY_REQUESTS,
        "Discovery requests on the web listener, by path and status."
    );
    describe_counter!(
        CONNECTIONS_DROPPED,
        "Connections closed before login, by reason."
    );
}
