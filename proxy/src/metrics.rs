//! Every metric the proxy exports, named and described once.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Agent tunnels connected now, by `cluster` and `transport` (`ssh`, `quic`).
pub const TUNNELS_CONNECTED: &str = "postern_tunnels_connected";
/// Agent tunnels established, by `cluster` and `transport`.
pub const TUNNEL_CONNECTS: &str = "postern_tunnel_connects_total";
/// Agent tunnels ended, by `cluster`, `reason` (`closed`, `error`, `shutdown`, `replaced`) and
/// `transport`.
pub const TUNNEL_DISCONNECTS: &str = "postern_tunnel_disconnects_total";
/// Refused logins, by `reason` (see `CertError::reason`, plus `no_certificate`, `unknown_cluster`,
/// `rejected_by_ssh_layer`, and on QUIC `binding_mismatch`, `bad_binding`), and
/// `transport`.
pub const AUTH_FAILURES: &str = "postern_auth_failures_total";
/// Client streams open now.
pub const STREAMS_ACTIVE: &str = "postern_streams_active";
/// Client stream open attempts, by `result` (`ok`, `unknown_cluster`, `no_tunnel`,
/// `unknown_target`, `bad_target`, `forbidden`, `locked`, `policy_unavailable`, `reserved`,
/// `agent_refused`, `limit`).
pub const STREAM_OPENS: &str = "postern_stream_opens_total";
/// Payload bytes spliced, by `direction` (`client_to_agent`, `agent_to_client`).
pub const BYTES_PROXIED: &str = "postern_bytes_proxied_total";
/// Seconds from accept to successful login on the tunnel listener, by `role` and `transport`.
pub const HANDSHAKE_SECONDS: &str = "postern_handshake_duration_seconds";
/// Discovery requests, by `path` and `status`.
pub const DISCOVERY_REQUESTS: &str = "postern_discovery_requests_total";
/// Connections closed before login or by a web deadline, by `reason` (`handshake_timeout`,
/// `protocol`, `limit`, `prelogin_evicted`: dropped to make room for a newer connection when the
/// pre-login pool was full, `web_header_timeout`, `web_header_too_large`, `web_body_timeout`,
/// `web_first_bytes_timeout`, `web_idle_timeout`, `proxy_header_untrusted`, `proxy_header_missing`,
/// `proxy_header_malformed`, `proxy_header_incomplete`).
pub const CONNECTIONS_DROPPED: &str = "postern_connections_dropped_total";
/// Connections, tunnels and streams refused by a limit, by `limit` (`connects_per_source`,
/// `auth_failures_per_source`, `auth_failures_per_identity`, `unauthenticated_per_source`, `tunnels_per_cluster`,
/// `streams_per_client`, `streams_per_user_per_target`, `web_connections`,
/// `web_connections_per_source`, `web_no_descriptors`).
pub const LIMIT_REFUSALS: &str = "postern_limit_refusals_total";
/// Logins relayed to an Auth server, by `result` (`ok`, `refused`, `rate_limited`,
/// `bad_request`, `unknown_cluster`, `no_tunnel`, `error`).
pub const LOGIN_RELAYS: &str = "postern_login_relays_total";

/// Target registrations (`tcpip-forward`) refused, by `reason` (`reserved_target`: a `service`
/// agent asked for `auth` or `login`; `bad_name`; `tunnels_per_cluster`).
pub const TARGET_REFUSALS: &str = "postern_target_registrations_refused_total";

/// Policy watch attempts that failed or were cut, by `cluster`.
pub const POLICY_WATCH_ERRORS: &str = "postern_policy_watch_errors_total";

/// Full policy snapshots applied, by `cluster` (a watch that resumes from its revision adds none).
pub const POLICY_SNAPSHOTS: &str = "postern_policy_snapshots_total";
/// The policy revision each cluster's cache is at, by `cluster`.
pub const POLICY_REVISION: &str = "postern_policy_revision";

/// Proxies in each cluster's proxy set as this proxy last heard it from the Auth server, by
/// `cluster`.
pub const PROXY_SET_SIZE: &str = "postern_proxy_set_size";
/// Proxy-set heartbeats that failed, by `cluster`.
pub const PEER_HEARTBEAT_ERRORS: &str = "postern_proxy_heartbeat_errors_total";

/// Stream audit events recorded, by `kind` (`open`, `close`, `refused`).
pub const AUDIT_EVENTS: &str = "postern_audit_events_total";
/// Stream audit events lost, by `reason` (`spool_write`, `spool_full`).
pub const AUDIT_DROPPED: &str = "postern_audit_events_dropped_total";
/// Stream audit events the Auth server stored, by `cluster`.
pub const AUDIT_SHIPPED: &str = "postern_audit_events_shipped_total";
/// Failed attempts to ship audit events, by `cluster` (they stay spooled and are retried).
pub const AUDIT_SHIP_ERRORS: &str = "postern_audit_ship_errors_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle. If another
/// recorder is already installed (an embedding process), that one keeps the metrics and the
/// handle renders nothing.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                    ],
                )
                .expect("static buckets")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_ok() {
                describe();
            } else {
                tracing::warn!("another metrics recorder is installed: /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Exports the audit, policy and target-registration series of `clusters` at zero from the start, so that a
/// dashboard or an alert on them sees 0 rather than no series before the first event.
pub fn zero_cluster_counters<'a>(clusters: impl IntoIterator<Item = &'a str>) {
    use metrics::counter;
    for kind in ["open", "close", "refused"] {
        counter!(AUDIT_EVENTS, "kind" => kind).increment(0);
    }
    for reason in ["spool_write", "spool_full"] {
        counter!(AUDIT_DROPPED, "reason" => reason).increment(0);
    }
    for reason in ["reserved_target", "bad_name", "tunnels_per_cluster"] {
        counter!(TARGET_REFUSALS, "reason" => reason).increment(0);
    }
    for cluster in clusters {
        let c = cluster.to_owned();
        counter!(AUDIT_SHIPPED, "cluster" => c.clone()).increment(0);
        counter!(AUDIT_SHIP_ERRORS, "cluster" => c.clone()).increment(0);
        counter!(POLICY_WATCH_ERRORS, "cluster" => c.clone()).increment(0);
        counter!(POLICY_SNAPSHOTS, "cluster" => c.clone()).increment(0);
        counter!(PEER_HEARTBEAT_ERRORS, "cluster" => c.clone()).increment(0);
        metrics::gauge!(PROXY_SET_SIZE, "cluster" => c.clone()).increment(0.0);
        metrics::gauge!(POLICY_REVISION, "cluster" => c).increment(0.0);
    }
}

fn describe() {
    describe_gauge!(
        PROXY_SET_SIZE,
        "Proxies in each cluster's proxy set as last heard from its Auth server, by cluster."
    );
    describe_counter!(
        PEER_HEARTBEAT_ERRORS,
        "Proxy-set heartbeats to the Auth server that failed, by cluster."
    );
    describe_gauge!(
        TUNNELS_CONNECTED,
        "Agent tunnels connected now, by cluster and transport."
    );
    describe_counter!(
        TUNNEL_CONNECTS,
        "Agent tunnels established, by cluster and transport."
    );
    describe_counter!(
        LIMIT_REFUSALS,
        "Connections, tunnels and streams refused by a limit, by limit."
    );
    describe_counter!(LOGIN_RELAYS, "Logins relayed to an Auth server, by result.");
    describe_counter!(AUDIT_EVENTS, "Stream audit events recorded, by kind.");
    describe_counter!(AUDIT_DROPPED, "Stream audit events lost, by reason.");
    describe_counter!(
        AUDIT_SHIPPED,
        "Stream audit events stored by the Auth server, by cluster."
    );
    describe_counter!(
        AUDIT_SHIP_ERRORS,
        "Failed audit shipping attempts, by cluster."
    );
    describe_counter!(
        POLICY_SNAPSHOTS,
        "Full policy snapshots applied, by cluster."
    );
    describe_gauge!(POLICY_REVISION, "Policy revision of each cluster's cache.");
    describe_counter!(
        POLICY_WATCH_ERRORS,
        "Policy watch attempts that failed or were cut, by cluster."
    );
    describe_counter!(
        TARGET_REFUSALS,
        "Target registrations refused, by reason (reserved_target: a service agent asked for auth or login)."
    );
    describe_counter!(
        TUNNEL_DISCONNECTS,
        "Agent tunnels ended, by cluster, reason and transport."
    );
    describe_counter!(
        AUTH_FAILURES,
        "Refused logins on the tunnel listener, by reason and transport."
    );
    describe_gauge!(STREAMS_ACTIVE, "Client streams open now.");
    describe_counter!(STREAM_OPENS, "Client stream open attempts, by result.");
    describe_counter!(BYTES_PROXIED, "Payload bytes spliced, by direction.");
    describe_histogram!(
        HANDSHAKE_SECONDS,
        metrics::Unit::Seconds,
        "Seconds from accept to successful login, by role and transport."
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
