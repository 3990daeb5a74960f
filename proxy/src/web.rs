//! The web listener: HTTPS discovery (`/webapi/ping`, `/webapi/find`), the login relay
//! (`POST /webapi/login`), JSON errors elsewhere.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::counter;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use tunnel_proto::discovery::{
    ErrorBody, FIND_PATH, FindResponse, PING_PATH, PingResponse, ProxySettings,
};

use tunnel_proto::login::{LOGIN_PATH, MAX_LOGIN_BYTES};

use crate::login::LoginRelay;
use crate::metrics as m;

/// Deadline for the TLS handshake and for reading request headers.
const WEB_TIMEOUT: Duration = Duration::from_secs(10);

/// What discovery answers, fixed at start.
pub struct Discovery {
    /// Clusters served.
    pub cluster_names: Vec<String>,
    /// This proxy's settings.
    pub settings: ProxySettings,
}

/// JSON response with a status.
pub fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts")
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            error: msg.to_owned(),
        },
    )
}

/// Answers one discovery request.
pub fn route(discovery: &Discovery, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let resp = match path {
        PING_PATH | FIND_PATH if method != Method::GET && method != Method::HEAD => {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} is not allowed on {path}: use GET"),
            );
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD"),
            );
            r
        }
        PING_PATH => json(
            StatusCode::OK,
            &PingResponse {
                cluster_names: discovery.cluster_names.clone(),
                server_version: env!("CARGO_PKG_VERSION").into(),
                min_client_version: env!("CARGO_PKG_VERSION").into(),
                protocol_version: tunnel_proto::PROTOCOL_VERSION,
                proxy: discovery.settings.clone(),
            },
        ),
        FIND_PATH => json(
            StatusCode::OK,
            &FindResponse {
                server_version: env!("CARGO_PKG_VERSION").into(),
                proxy: discovery.settings.clone(),
            },
        ),
        _ => error(StatusCode::NOT_FOUND, &format!("no such path: {path}")),
    };
    let label = if path == PING_PATH || path == FIND_PATH {
        path.to_owned()
    } else {
        "other".to_owned()
    };
    counter!(m::DISCOVERY_REQUESTS, "path" => label, "status" => resp.status().as_u16().to_string()).increment(1);
    resp
}

/// Answers `POST /webapi/login` (the body read up to 64 KiB) through the relay.
async fn login(
    relay: &LoginRelay,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    if req.method() != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not allowed on {LOGIN_PATH}: use POST", req.method()),
        );
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_LOGIN_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("login request unreadable or over {MAX_LOGIN_BYTES} bytes: {e}"),
            );
        }
    };
    let resp = relay.relay(&body, peer).await;
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    json(status, &resp)
}

/// Limits of the web listener.
#[derive(Debug, Clone, Copy)]
pub struct WebLimits {
    /// Deadline for the TLS handshake and then for each request's headers.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers), bytes.
    pub max_header_bytes: usize,
}

impl Default for WebLimits {
    fn default() -> Self {
        WebLimits {
            header_timeout: WEB_TIMEOUT,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// Serves HTTPS discovery and the login relay until `stop` is cancelled.
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
    loop {
        let (socket, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "web accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let discovery = discovery.clone();
        let relay = relay.clone();
        let stop = stop.clone();
        let proxy_protocol = relay.shared.proxy_protocol.clone();
        conns.spawn(async move {
            let mut socket = socket;
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
            let tls =
                match tokio::time::timeout(limits.header_timeout, acceptor.accept(socket)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return debug!(%peer, error = %e, "web TLS handshake failed"),
                    Err(_) => return debug!(%peer, "web TLS handshake timed out"),
                };
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (discovery, relay) = (discovery.clone(), relay.clone());
                async move {
                    let resp = if req.uri().path() == LOGIN_PATH {
                        login(&relay, req, peer).await
                    } else {
                        route(&discovery, req.method(), req.uri().path())
                    };
                    Ok::<_, std::convert::Infallible>(resp)
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
