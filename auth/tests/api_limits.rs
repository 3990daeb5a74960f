//! The API listener's limits: a TLS connection that says nothing is cut, an idle one is cut,
//! and the connection caps (total, per source) refuse at accept, each counted by reason.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn client_tls(srv: &Running) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for pem in srv.admin_identity().tls_cas {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tls(srv: &Running) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let name = ServerName::try_from(postern_api::auth_server_name(&srv.cluster)).unwrap();
    client_tls(srv).connect(name, tcp).await.unwrap()
}

/// Seconds until the server closes `s` (reads until EOF or error), at most `limit`.
async fn closed_after<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    let r = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    r.ok().map(|()| t.elapsed())
}

fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_tls_connections_are_cut() {
    let prom = postern_auth::metrics::install();
    let dir = TempDir::new("idle");
    let mut cfg = config(&dir.0, "idle");
    cfg.limits.api_handshake_timeout_secs = 1;
    cfg.limits.api_idle_timeout_secs = 3;
    let srv = start_with(cfg).await;

    // TLS, then nothing at all: cut when the first bytes are 1 s late.
    let mut s = tls(&srv).await;
    let after = closed_after(&mut s, Duration::from_secs(10)).await;
    println!("a silent TLS connection was cut after {after:?}");
    assert!(
        after.is_some_and(|d| d < Duration::from_secs(3)),
        "{after:?}"
    );

    // TLS and an HTTP/2 preface, then silence (pings unanswered): cut after the 3 s idle timeout.
    let mut s = tls(&srv).await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let after = closed_after(&mut s, Duration::from_secs(15)).await;
    println!("an idle HTTP/2 connection was cut after {after:?}");
    assert!(
        after.is_some_and(|d| d >= Duration::from_secs(2) && d < Duration::from_secs(6)),
        "{after:?}"
    );

    // A live client is not idle: the server's pings (every second here) are answered.
    let admin = srv.admin().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    admin
        .get_role("editor")
        .await
        .expect("a quiet but live client keeps its connection");

    let m = prom.render();
    assert!(!m.is_empty(), "this test binary installs the recorder");
    {
        for reason in ["first_bytes_timeout", "idle_timeout"] {
            assert!(
                metric(&m, "postern_auth_api_connections_cut_total", reason) >= 1.0,
                "{reason}: {m}"
            );
        }
    }
    srv.stop().await;
}

async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_at_accept_with_a_reason() {
    let prom = postern_auth::metrics::install();
    let dir = TempDir::new("caps");
    let mut cfg = config(&dir.0, "caps");
    cfg.limits.api_max_connections = 3;
    cfg.limits.api_max_connections_per_source = 2;
    let srv = start_with(cfg).await;

    // 127.0.0.1 is exempt from the per-source cap by default (the embedded agent dials from
    // it); 127.0.0.2 is an ordinary source.
    let _a = connect_from("127.0.0.2", srv.addr).await;
    let _b = connect_from("127.0.0.2", srv.addr).await;
    // A third from the same address is closed at once.
    let mut c = connect_from("127.0.0.2", srv.addr).await;
    assert!(
        closed_after(&mut c, Duration::from_secs(2)).await.is_some(),
        "over the per-source cap, yet kept open"
    );
    // Another address still gets in, up to the total.
    let mut d = connect_from("127.0.0.1", srv.addr).await;
    assert!(
        closed_after(&mut d, Duration::from_millis(300))
            .await
            .is_none(),
        "another address was refused"
    );
    let mut e = connect_from("127.0.0.3", srv.addr).await;
    assert!(
        closed_after(&mut e, Duration::from_secs(2)).await.is_some(),
        "over the total cap, yet kept open"
    );
    let m = prom.render();
    assert!(!m.is_empty(), "this test binary installs the recorder");
    {
        assert!(
            metric(
                &m,
                "postern_auth_api_connections_refused_total",
                "\"max_connections_per_source\""
            ) >= 1.0,
            "{m}"
        );
        assert!(
            metric(
                &m,
                "postern_auth_api_connections_refused_total",
                "\"max_connections\""
            ) >= 1.0,
            "{m}"
        );
    }
    srv.stop().await;
}

/// A name over 256 bytes in a request is refused before anything else, and its audit record
/// keeps only an escaped prefix (a 200 KB name used to cost about 200 KB of audit disk per call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_in_requests_are_refused_and_audited_short() {
    let dir = TempDir::new("names");
    let srv = start(&dir.0, "names").await;
    let admin = srv.admin().await;
    let log = srv.data_dir.join("audit.log");
    let before = std::fs::metadata(&log).unwrap().len();
    let huge = format!("x\n{}", "n".repeat(200_000));
    match admin.get_role(&huge).await {
        Err(postern_client::auth::AuthClientError::Api { code, message }) => {
            assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
            assert!(
                message.contains("at most 256 bytes") && message.len() < 200,
                "{message}"
            );
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    let grew = std::fs::metadata(&log).unwrap().len() - before;
    assert!(
        grew < 1024,
        "the audit log grew by {grew} bytes for one call"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("role/x\\\\nnnn"),
        "the name is recorded escaped"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_on_the_ops_listener() {
    let _ = postern_auth::metrics::install();
    let dir = TempDir::new("metrics");
    let mut cfg = config(&dir.0, "metrics");
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    cfg.ops_listen = Some(addr);
    cfg.limits.api_max_connections_per_source = 1;
    let srv = start_with(cfg).await;
    // One refusal to count.
    let _held = connect_from("127.0.0.2", srv.addr).await;
    let mut refused = connect_from("127.0.0.2", srv.addr).await;
    closed_after(&mut refused, Duration::from_secs(2)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    assert!(
        metric(
            &out,
            "postern_auth_api_connections_refused_total",
            "max_connections_per_source"
        ) >= 1.0,
        "{out}"
    );
    srv.stop().await;
}
