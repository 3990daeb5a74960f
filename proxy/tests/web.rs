//! The web listener: discovery JSON, JSON 404/405, and the ops endpoints.

mod support;

use std::sync::Arc;

use postern_dial::DialError;
use postern_dial::web::{WebTrust, find, ping, tls_config};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends a raw HTTP/1.1 request over TLS (pinned) and returns status and body.
async fn https(proxy: &Proxy, request: &str) -> (u16, String, String) {
    let tcp = tokio::net::TcpStream::connect(proxy.web).await.unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(tls_config(&proxy.web_trust()).unwrap()));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_answers_json() {
    init_tracing();
    let pki = Pki::new("web1");
    let other = Pki::new("web0");
    let proxy = start_proxy(&[&pki, &other], |c| {
        c.proxy_id = Some("edge-7".into());
        c.public.web_addr = Some("proxy.example.com:443".into());
    })
    .await;
    let p = ping(&proxy.web.to_string(), &proxy.web_trust())
        .await
        .unwrap();
    assert_eq!(p.cluster_names, vec!["web0", "web1"]);
    assert_eq!(p.server_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(p.protocol_version, tunnel_proto::PROTOCOL_VERSION);
    assert_eq!(p.proxy.proxy_id, "edge-7");
    assert_eq!(p.proxy.proxy_ids, vec!["edge-7"]);
    // QUIC is on by default, on the tunnel port's UDP twin.
    assert_eq!(p.proxy.transports, vec!["quic", "ssh"]);
    assert_eq!(p.proxy.quic_port, Some(proxy.tunnel.port()));
    assert!(!p.proxy.tls_routing_enabled);
    assert_eq!(
        p.proxy.web_public_addr.as_deref(),
        Some("proxy.example.com:443")
    );
    assert_eq!(p.proxy.tunnel_listen_addr, proxy.tunnel.to_string());
    let f = find(&proxy.web.to_string(), &proxy.web_trust())
        .await
        .unwrap();
    assert_eq!(f.proxy, p.proxy);
    assert_eq!(
        f.proxy.tunnel_addr(None, "127.0.0.1"),
        proxy.tunnel.to_string(),
        "resolution falls back to the listen address"
    );
    let m = scrape(proxy.ops).await;
    assert!(
        metric(
            &m,
            "postern_discovery_requests_total",
            &[("path", "/webapi/ping"), ("status", "200")]
        ) >= 1.0,
        "{m}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_wrong_methods_get_json_errors() {
    init_tracing();
    let pki = Pki::new("web2");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let (status, _, body) = https(
        &proxy,
        "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 404);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("/nope"));
    let (status, head, body) = https(
        &proxy,
        "POST /webapi/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("POST"));
    // A malformed request line gets a 400 and a closed connection, not a hang.
    let (status, _, _) = https(&proxy, "BLAH\r\n\r\n").await;
    assert_eq!(status, 400);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_and_non_postern_servers_are_clear_errors() {
    init_tracing();
    let pki = Pki::new("web3");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let wrong = WebTrust::Pin("00".repeat(32));
    match ping(&proxy.web.to_string(), &wrong).await {
        Err(DialError::Tls { detail, .. }) => {
            assert!(detail.contains("does not match the pinned"), "{detail}")
        }
        other => panic!("expected a TLS pin error, got {other:?}"),
    }
    // The ops port speaks plain HTTP, not Postern discovery over TLS.
    match ping(&proxy.ops.to_string(), &WebTrust::Insecure).await {
        Err(DialError::Tls { .. }) => {}
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // An HTTPS server that is not Postern: the proxy's own web port asked for a wrong path.
    match postern_dial::web::get_json::<tunnel_proto::discovery::PingResponse>(
        &proxy.web.to_string(),
        "/other",
        &proxy.web_trust(),
    )
    .await
    {
        Err(DialError::NotAPostern { detail, .. }) => assert!(detail.contains("404"), "{detail}"),
        other => panic!("expected NotAPostern, got {other:?}"),
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_health_and_readiness() {
    init_tracing();
    let pki = Pki::new("web4");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    assert_eq!(http_get(proxy.ops, "/healthz").await.0, 200);
    assert_eq!(http_get(proxy.ops, "/readyz").await.0, 200);
    assert_eq!(http_get(proxy.ops, "/nope").await.0, 404);
    proxy.stop().await;
}
