//! The API listener: TCP accept under connection caps (total and per source), the TLS
//! handshake under a deadline, then a deadline for the client's first bytes and an idle timeout
//! for the life of the connection (`postern_dial::accept`). Each cut and refusal is counted (`crate::metrics`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::{counter, gauge};
use postern_dial::accept::{AcceptLimits, Acceptor, Slot, Watched};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::authority;
use crate::config::LimitsConfig;
use crate::metrics as m;
use crate::service::ConnInfo;

/// TLS handshakes in progress, at most (slowloris guard).
const MAX_HANDSHAKES: usize = 256;

fn cut(reason: &'static str) {
    counter!(m::API_CONNECTIONS_CUT, "reason" => reason).increment(1);
    debug!(reason, "API connection cut");
}

/// An open connection's place under the caps, shown in `postern_auth_api_connections_open`.
struct Open(#[allow(dead_code)] Slot);

impl Open {
    fn new(slot: Slot) -> Open {
        gauge!(m::API_CONNECTIONS_OPEN).increment(1.0);
        Open(slot)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        gauge!(m::API_CONNECTIONS_OPEN).decrement(1.0);
    }
}

/// A TLS connection tonic serves, carrying who is on the other end.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<Watched<TcpStream>>,
    info: ConnInfo,
    _open: Open,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts on `listener` until `shutdown`, handing finished TLS connections to `tx`.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Arc<crate::server_tls::ServerTls>,
    limits: LimitsConfig,
    tx: mpsc::Sender<TlsConn>,
    shutdown: CancellationToken,
) {
    let handshake = Duration::from_secs(limits.api_handshake_timeout_secs);
    let idle = Duration::from_secs(limits.api_idle_timeout_secs);
    let mut accept = Acceptor::new(
        listener,
        "auth api",
        AcceptLimits {
            max_connections: limits.api_max_connections,
            max_per_source: limits.api_max_connections_per_source,
        },
    )
    .exempt_from_per_source(limits.api_per_source_exempt.clone());
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = handshakes.clone().acquire_owned() => p.expect("semaphore open"),
        };
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = accept.accept() => match r {
                Ok(c) => c,
                Err(refused) => {
                    counter!(m::API_CONNECTIONS_REFUSED, "reason" => refused.reason.label()).increment(1);
                    debug!(peer = %refused.peer, reason = %refused.reason, "API connection refused");
                    continue;
                }
            },
        };
        // The TLS config of now: a TLS CA rotation changes it between connections.
        let snapshot = tls.current();
        let acceptor = TlsAcceptor::from(snapshot.config.clone());
        let tx = tx.clone();
        tokio::spawn(async move {
            let peer = conn.peer;
            let open = Open::new(conn.slot);
            let watched = Watched::new(conn.stream, handshake, idle, cut);
            let tls = match tokio::time::timeout(handshake, acceptor.accept(watched)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake refused"),
                Err(_) => {
                    counter!(m::API_CONNECTIONS_CUT, "reason" => "handshake_timeout").increment(1);
                    return debug!(%peer, "TLS handshake timed out");
                }
            };
            drop(permit);
            let mut tls = tls;
            tls.get_mut().0.arm();
            let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
            let cert_fingerprint = chain.first().map(|c| authority::fingerprint(c));
            let retired_ca = snapshot.retired_only(chain);
            let info = ConnInfo {
                peer,
                cert_fingerprint,
                retired_ca,
            };
            let _ = tx
                .send(TlsConn {
                    inner: tls,
                    info,
                    _open: open,
                })
                .await;
        });
    }
}
