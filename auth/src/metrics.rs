//! Every metric the Auth server exports, named and described once. `GET /metrics` on
//! `metrics_listen` serves them (Prometheus text) when that address is set.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

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

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle. A process that
/// already has another recorder (a test harness, an embedding binary) gets a handle that renders
/// nothing; its counters go to that recorder.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_ok() {
                describe();
            }
            handle
        })
        .clone()
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
}

/// Serves `GET /metrics` on `listener` until `stop` (plain HTTP/1.0, one request per
/// connection, 5 s to send it).
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, stop: CancellationToken) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(?addr, "metrics listening");
    let mut backoff = Duration::from_millis(10);
    loop {
        let (mut s, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = async {
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => n += k,
                    }
                }
                true
            };
            if !matches!(
                tokio::time::timeout(Duration::from_secs(5), read).await,
                Ok(true)
            ) {
                return;
            }
            let (status, body) = if buf[..n].starts_with(b"GET /metrics ") {
                handle.run_upkeep();
                ("200 OK", handle.render())
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_string(),
                )
            };
            let head = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
