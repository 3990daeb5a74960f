//! The ops listener every daemon serves (plain HTTP, off or loopback by default): `/metrics`
//! (Prometheus text), `/healthz` (the process answers), `/readyz` (it serves its purpose now).
//! The accept loop and its limits are ours; an `axum` router answers the requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, Response, StatusCode, header};
use axum::routing::any;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use postern_dial::accept::{AcceptLimits, Acceptor};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::debug;

/// Readiness: true once every listener is serving, false again when draining starts.
#[derive(Debug, Default)]
pub struct Ready(AtomicBool);

impl Ready {
    /// Sets readiness.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    /// Reads readiness.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ctype)
        .body(Body::from(body))
        .expect("static response parts")
}

/// What the ops routes read.
#[derive(Clone)]
struct Ops {
    prom: PrometheusHandle,
    ready: Arc<Ready>,
}

/// `/metrics`: Prometheus text.
async fn metrics(State(ops): State<Ops>) -> Response<Body> {
    ops.prom.run_upkeep();
    text(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        ops.prom.render(),
    )
}

/// `/healthz`: the process answers.
async fn healthz() -> Response<Body> {
    text(StatusCode::OK, "text/plain", "ok\n".into())
}

/// `/readyz`: 200 while ready, 503 otherwise.
async fn readyz(State(ops): State<Ops>) -> Response<Body> {
    if ops.ready.get() {
        text(StatusCode::OK, "text/plain", "ready\n".into())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        )
    }
}

/// Any other path.
async fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
}

/// The ops routes, any method on each (as scrapers and probes use GET, a HEAD or POST is not
/// refused either).
fn router(prom: PrometheusHandle, ready: Arc<Ready>) -> Router {
    Router::new()
        .route("/metrics", any(metrics))
        .route("/healthz", any(healthz))
        .route("/readyz", any(readyz))
        .fallback(not_found)
        .with_state(Ops { prom, ready })
}

/// Ops connections open at once, at most (closed at accept beyond it).
const OPS_MAX_CONNECTIONS: usize = 64;

/// Serves the ops endpoints until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    prom: PrometheusHandle,
    ready: Arc<Ready>,
    stop: CancellationToken,
) {
    let routes = router(prom, ready);
    // Back-off on accept errors and a descriptor reserve, so that /healthz answers (or fails
    // fast) when the process is short of descriptors; a scraper needs few connections.
    let mut accept = Acceptor::new(
        listener,
        "ops",
        AcceptLimits {
            max_connections: OPS_MAX_CONNECTIONS,
            max_per_source: OPS_MAX_CONNECTIONS,
        },
    );
    loop {
        let (socket, slot) = tokio::select! {
            _ = stop.cancelled() => break,
            r = accept.accept() => match r {
                Ok(c) => (c.stream, c.slot),
                Err(refused) => {
                    debug!(peer = %refused.peer, reason = %refused.reason, "ops connection refused");
                    continue;
                }
            },
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                routes.clone().call(req)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(socket), svc)
                .await;
        });
    }
}

/// The process's Prometheus handle. The first call installs the recorder; a daemon that embeds
/// another (the Auth server runs the agent in-process) shares it, so one `/metrics` shows both.
/// If a different recorder is already installed (a test harness), the handle renders nothing.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Latencies as histograms (not summaries), so they aggregate across instances.
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .expect("static, non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Binds the ops listener at `addr` and serves it until `stop`, ready per `ready`. Returns the
/// bound address (port 0 picks one).
pub async fn bind_and_serve(
    addr: std::net::SocketAddr,
    ready: Arc<Ready>,
    stop: CancellationToken,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "ops listener: /metrics, /healthz, /readyz");
    tokio::spawn(serve(listener, prometheus(), ready, stop));
    Ok(bound)
}
