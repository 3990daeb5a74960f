//! The web listener: HTTPS discovery (`/webapi/ping`, `/webapi/find`), the login relay
//! (`POST /webapi/login`) and the agent join and renewal relays (`POST /webapi/join`,
//! `/webapi/renew`), JSON errors elsewhere.
//!
//! The accept loop, the PROXY header, TLS and the connection limits are ours; each connection's
//! requests go through one `axum` [`Router`] served by hyper.

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use axum::{Extension, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::counter;
use postern_dial::accept::{AcceptLimits, Acceptor, Refusal, Watched};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, info};
use tunnel_proto::discovery::{
    ErrorBody, FIND_PATH, FindResponse, PING_PATH, PingResponse, ProxySettings,
};

use tunnel_proto::login::{LOGIN_PATH, MAX_LOGIN_BYTES};

use crate::login::LoginRelay;
use crate::metrics as m;

/// What discovery answers, fixed at start.
pub struct Discovery {
    /// Clusters served.
    pub cluster_names: Vec<String>,
    /// This proxy's settings.
    pub settings: ProxySettings,
}

/// JSON response with a status.
pub fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes))
        .expect("static response parts")
}

fn error(status: StatusCode, msg: &str) -> Response {
    json(
        status,
        &ErrorBody {
            error: msg.to_owned(),
        },
    )
}

/// A path as echoed in an error: at most 64 characters, with the length of the rest noted.
fn short_path(path: &str) -> String {
    const KEEP: usize = 64;
    match path.char_indices().nth(KEEP) {
        Some((i, _)) => format!("{}… ({} bytes)", &path[..i], path.len()),
        None => path.to_owned(),
    }
}

/// The size of a request head as it came on the wire (request line, headers, blank line),
/// counted again after parsing: hyper's buffer limit can let a head up to twice its size
/// through.
fn head_size<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len() + 1 + req.uri().to_string().len() + 1 + 8 + 2;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + headers + 2
}

/// What the web routes share.
#[derive(Clone)]
struct Web {
    discovery: Arc<Discovery>,
    relay: Arc<LoginRelay>,
    /// Deadline for a login body, from the end of its headers.
    body_timeout: Duration,
}

/// The client's address (after any PROXY header), put on each request of its connection.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

/// Counts a discovery answer (`path` is `other` for unknown paths).
fn counted(path: &str, resp: Response) -> Response {
    counter!(m::DISCOVERY_REQUESTS, "path" => path.to_owned(), "status" => resp.status().as_u16().to_string()).increment(1);
    resp
}

/// `GET /webapi/ping`.
async fn ping(State(w): State<Web>) -> Response {
    counted(
        PING_PATH,
        json(
            StatusCode::OK,
            &PingResponse {
                cluster_names: w.discovery.cluster_names.clone(),
                server_version: env!("CARGO_PKG_VERSION").into(),
                min_client_version: env!("CARGO_PKG_VERSION").into(),
                protocol_version: tunnel_proto::PROTOCOL_VERSION,
                proxy: w.discovery.settings.clone(),
            },
        ),
    )
}

/// `GET /webapi/find`.
async fn find(State(w): State<Web>) -> Response {
    counted(
        FIND_PATH,
        json(
            StatusCode::OK,
            &FindResponse {
                server_version: env!("CARGO_PKG_VERSION").into(),
                proxy: w.discovery.settings.clone(),
            },
        ),
    )
}

/// Another method than GET or HEAD on a discovery path.
async fn get_only(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("{method} is not allowed on {path}: use GET"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    counted(path, r)
}

/// Another method than POST on a relay path.
async fn post_only(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("{method} is not allowed on {}: use POST", uri.path()),
    )
}

/// Any other path.
async fn not_found(uri: Uri) -> Response {
    counted(
        "other",
        error(
            StatusCode::NOT_FOUND,
            &format!("no such path: {}", short_path(uri.path())),
        ),
    )
}

/// Which request the relay passes on.
#[derive(Clone, Copy)]
enum Relayed {
    /// `POST /webapi/login`.
    Login,
    /// `POST /webapi/join`.
    Join,
    /// `POST /webapi/renew`.
    Renew,
}

/// Answers `POST /webapi/login`, `/webapi/join` or `/webapi/renew` (the body read up to 64 KiB)
/// through the relay.
async fn relayed(w: Web, Peer(peer): Peer, req: Request, kind: Relayed) -> Response {
    use http_body_util::BodyExt;
    let collect = http_body_util::Limited::new(req.into_body(), MAX_LOGIN_BYTES).collect();
    let body = match tokio::time::timeout(w.body_timeout, collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("login request unreadable or over {MAX_LOGIN_BYTES} bytes: {e}"),
            );
        }
        Err(_) => {
            counter!(m::CONNECTIONS_DROPPED, "reason" => "web_body_timeout").increment(1);
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the login request body did not arrive within {} s",
                    w.body_timeout.as_secs()
                ),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    let relay = &w.relay;
    let resp = match kind {
        Relayed::Login => relay.relay(&body, peer).await,
        Relayed::Join => {
            relay
                .relay_agent::<tunnel_proto::join::JoinRequest>(&body, peer)
                .await
        }
        Relayed::Renew => {
            relay
                .relay_agent::<tunnel_proto::join::RenewRequest>(&body, peer)
                .await
        }
    };
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut r = json(status, &resp);
    if resp.retry_after_secs > 0 {
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(resp.retry_after_secs),
        );
    }
    r
}

/// The relay route for `kind`: POST only.
fn relay_route(kind: Relayed) -> MethodRouter<Web> {
    post(
        move |State(w): State<Web>, Extension(peer): Extension<Peer>, req: Request| {
            relayed(w, peer, req, kind)
        },
    )
    .fallback(post_only)
}

/// The web listener's routes: discovery (GET or HEAD), the three relays (POST), JSON errors
/// elsewhere. Each request carries its connection's [`Peer`] as an extension.
fn router(discovery: Arc<Discovery>, relay: Arc<LoginRelay>, body_timeout: Duration) -> Router {
    Router::new()
        .route(PING_PATH, get(ping).fallback(get_only))
        .route(FIND_PATH, get(find).fallback(get_only))
        .route(LOGIN_PATH, relay_route(Relayed::Login))
        .route(tunnel_proto::join::JOIN_PATH, relay_route(Relayed::Join))
        .route(tunnel_proto::join::RENEW_PATH, relay_route(Relayed::Renew))
        .fallback(not_found)
        .with_state(Web {
            discovery,
            relay,
            body_timeout,
        })
}

/// Limits of the web listener.
#[derive(Debug, Clone, Copy)]
pub struct WebLimits {
    /// Deadline for the TLS handshake and then for each request's headers.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers), bytes.
    pub max_header_bytes: usize,
    /// Deadline for a login body, from the end of its headers.
    pub body_timeout: Duration,
    /// A connection whose client sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once, and from one source address.
    pub accept: AcceptLimits,
}

impl Default for WebLimits {
    fn default() -> Self {
        WebLimits::from_config(&crate::config::LimitsConfig::default())
    }
}

impl WebLimits {
    /// The web limits of `proxy.toml`'s `[limits]`.
    pub fn from_config(l: &crate::config::LimitsConfig) -> WebLimits {
        WebLimits {
            header_timeout: Duration::from_secs(l.web_header_timeout_secs),
            max_header_bytes: l.web_max_header_bytes,
            body_timeout: Duration::from_secs(l.web_body_timeout_secs),
            idle_timeout: Duration::from_secs(l.web_idle_timeout_secs),
            accept: AcceptLimits {
                max_connections: l.web_max_connections,
                max_per_source: l.web_max_connections_per_source,
            },
        }
    }
}

fn cut(reason: &'static str) {
    let label = match reason {
        "first_bytes_timeout" => "web_first_bytes_timeout",
        _ => "web_idle_timeout",
    };
    counter!(m::CONNECTIONS_DROPPED, "reason" => label).increment(1);
}

/// Serves HTTPS discovery and the login relay until `stop` is cancelled. Connections over
/// `limits.accept` are closed at accept (`postern_limit_refusals_total{limit="web_…"}`).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    discovery: Arc<Discovery>,
    relay: Arc<LoginRelay>,
    limits: WebLimits,
    stop: CancellationToken,
    conns: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(tls);
    let routes = router(discovery, relay.clone(), limits.body_timeout);
    let mut accept = Acceptor::new(listener, "web", limits.accept);
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            r = accept.accept() => match r {
                Ok(c) => c,
                Err(refused) => {
                    let limit = match refused.reason {
                        Refusal::MaxConnections(_) => "web_connections",
                        Refusal::MaxPerSource(_) => "web_connections_per_source",
                        Refusal::NoDescriptors => "web_no_descriptors",
                    };
                    counter!(m::LIMIT_REFUSALS, "limit" => limit).increment(1);
                    debug!(peer = %refused.peer, reason = %refused.reason, "web connection refused");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let routes = routes.clone();
        let stop = stop.clone();
        let proxy_protocol = relay.shared.proxy_protocol.clone();
        conns.spawn(async move {
            let (mut socket, peer, _slot) = (conn.stream, conn.peer, conn.slot);
            // Behind a trusted balancer, the client's address comes in a PROXY header.
            let peer = match proxy_protocol
                .source(&mut socket, peer, limits.header_timeout)
                .await
            {
                Ok(p) => p,
                Err(r) => {
                    info!(%peer, reason = r.reason(), "web connection refused: {r}");
                    counter!(m::CONNECTIONS_DROPPED, "reason" => r.reason()).increment(1);
                    return;
                }
            };
            let watched = Watched::new(socket, limits.header_timeout, limits.idle_timeout, cut);
            let mut tls =
                match tokio::time::timeout(limits.header_timeout, acceptor.accept(watched)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return debug!(%peer, error = %e, "web TLS handshake failed"),
                    Err(_) => return debug!(%peer, "web TLS handshake timed out"),
                };
            tls.get_mut().0.arm();
            // The connection is ours (PROXY header, TLS, limits); axum routes its requests.
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let mut routes = routes.clone();
                async move {
                    if head_size(&req) > limits.max_header_bytes {
                        counter!(m::CONNECTIONS_DROPPED, "reason" => "web_header_too_large")
                            .increment(1);
                        let mut r = error(
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            &format!("request head over {} bytes", limits.max_header_bytes),
                        );
                        r.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        return Ok(r);
                    }
                    req.extensions_mut().insert(Peer(peer));
                    routes.call(req).await
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    let reason = if e.is_timeout() {
                        Some("web_header_timeout")
                    } else if e.is_parse_too_large() {
                        Some("web_header_too_large")
                    } else {
                        None
                    };
                    if let Some(reason) = reason {
                        info!(%peer, reason, "web connection closed by a limit");
                        counter!(m::CONNECTIONS_DROPPED, "reason" => reason).increment(1);
                    }
                    debug!(%peer, error = %e, "web connection ended");
                },
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}
