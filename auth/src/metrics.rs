//! Every metric the Auth server exports, named and described once, and the layer that counts
//! API calls. The ops listener (`ops_listen`) serves them on `/metrics`, with `/healthz` and
//! `/readyz` (ready while the API serves).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use postern_ops::http::Ready;
use tonic::codegen::http;

/// API connections closed at accept by a limit, by `reason` (`max_connections`,
/// `max_connections_per_source`).
pub const API_CONNECTIONS_REFUSED: &str = "postern_auth_api_connections_refused_total";
/// API connections closed by a deadline, by `reason` (`handshake_timeout`, `first_bytes_timeout`,
/// `idle_timeout`).
pub const API_CONNECTIONS_CUT: &str = "postern_auth_api_connections_cut_total";
/// API connections open now (handshakes included).
pub const API_CONNECTIONS_OPEN: &str = "postern_auth_api_connections_open";
/// Logins answered, by `result` (`ok`, `refused`, `throttled`, `busy`, `bad_request`, `error`).
pub const LOGINS: &str = "postern_auth_logins_total";
/// Logins waiting for a password-hashing slot now.
pub const LOGINS_QUEUED: &str = "postern_auth_logins_queued";
/// Audit records that reached no sink, by `sink` (`database`, `file`, `both`). `both` means the
/// record survives only in the process log (at `error`) and the call it records was failed.
pub const AUDIT_FAILURES: &str = "postern_auth_audit_failures_total";

/// API calls answered, by `method` (the RPC name; `reflection` for server reflection,
/// `unknown` for a path no service has) and `code` (the gRPC status code name, e.g. `Ok`,
/// `PermissionDenied`).
pub const API_CALLS: &str = "postern_auth_api_calls_total";
/// Seconds from a call's arrival to its response headers, by `method`.
pub const API_CALL_SECONDS: &str = "postern_auth_api_call_duration_seconds";
/// Seconds to write one audit record to its sinks (database and file).
pub const AUDIT_WRITE_SECONDS: &str = "postern_auth_audit_write_duration_seconds";

/// Installs the Prometheus recorder once per process (shared with an embedded agent) and
/// describes every metric; returns its handle.
pub fn install() -> PrometheusHandle {
    static DESCRIBED: OnceLock<()> = OnceLock::new();
    let handle = postern_ops::http::prometheus();
    DESCRIBED.get_or_init(describe);
    handle
}

/// The Auth server's readiness (`/readyz`): true while the API serves.
pub fn ready() -> Arc<Ready> {
    static READY: OnceLock<Arc<Ready>> = OnceLock::new();
    READY.get_or_init(Default::default).clone()
}

fn describe() {
    describe_counter!(
        API_CONNECTIONS_REFUSED,
        "API connections closed at accept by a limit, by reason."
    );
    describe_counter!(
        API_CONNECTIONS_CUT,
        "API connections closed by a deadline, by reason."
    );
    describe_gauge!(API_CONNECTIONS_OPEN, "API connections open now.");
    describe_counter!(LOGINS, "Logins answered, by result.");
    describe_gauge!(LOGINS_QUEUED, "Logins waiting for a password-hashing slot.");
    describe_counter!(
        AUDIT_FAILURES,
        "Audit records a sink could not take, by sink; `both` failed the call."
    );
    describe_counter!(API_CALLS, "API calls answered, by method and gRPC code.");
    describe_histogram!(
        API_CALL_SECONDS,
        "Seconds to answer an API call, by method."
    );
    describe_histogram!(AUDIT_WRITE_SECONDS, "Seconds to write one audit record.");
    for result in ["ok", "refused", "throttled", "busy", "bad_request", "error"] {
        counter!(LOGINS, "result" => result).increment(0);
    }
    for sink in ["database", "file", "both"] {
        counter!(AUDIT_FAILURES, "sink" => sink).increment(0);
    }
    counter!(API_CALLS, "method" => "Ping", "code" => "Ok").increment(0);
    for reason in ["max_connections", "max_connections_per_source"] {
        counter!(API_CONNECTIONS_REFUSED, "reason" => reason).increment(0);
    }
    for reason in ["handshake_timeout", "first_bytes_timeout", "idle_timeout"] {
        counter!(API_CONNECTIONS_CUT, "reason" => reason).increment(0);
    }
    gauge!(API_CONNECTIONS_OPEN).increment(0.0);
    gauge!(LOGINS_QUEUED).increment(0.0);
}

/// Counts every API call in [`API_CALLS`] and times it in [`API_CALL_SECONDS`] (a tower layer
/// on the gRPC server).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiCallsLayer;

impl<S> tower::Layer<S> for ApiCallsLayer {
    type Service = ApiCalls<S>;
    fn layer(&self, inner: S) -> ApiCalls<S> {
        ApiCalls { inner }
    }
}

/// The service [`ApiCallsLayer`] wraps.
#[derive(Debug, Clone)]
pub struct ApiCalls<S> {
    inner: S,
}

/// The `method` label of a request path: the RPC name of the Auth service, `reflection`, or
/// `unknown` (any other path: never a label taken from the wire).
fn method_label(path: &str) -> String {
    if path.starts_with("/grpc.reflection.") {
        return "reflection".into();
    }
    match path.strip_prefix("/postern.auth.v1.AuthService/") {
        Some(m)
            if !m.is_empty() && m.len() <= 64 && m.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            m.to_string()
        }
        _ => "unknown".into(),
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for ApiCalls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut method = method_label(req.uri().path());
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            // An error status comes in the headers (trailers-only); a success in the trailers.
            let code = match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse::<i32>().ok())
                    .map(tonic::Code::from)
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Internal,
            };
            if code == tonic::Code::Unimplemented {
                method = "unknown".into();
            }
            counter!(API_CALLS, "method" => method.clone(), "code" => format!("{code:?}"))
                .increment(1);
            histogram!(API_CALL_SECONDS, "method" => method).record(start.elapsed().as_secs_f64());
            r
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn method_labels_are_bounded() {
        use super::method_label;
        assert_eq!(
            method_label("/postern.auth.v1.AuthService/GetRole"),
            "GetRole"
        );
        assert_eq!(
            method_label("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "reflection"
        );
        assert_eq!(method_label("/evil/x"), "unknown");
        assert_eq!(method_label("/postern.auth.v1.AuthService/a{b}"), "unknown");
    }
}
