//! The PROXY protocol behind a real load balancer: HAProxy from Debian in TCP mode sends
//! `send-proxy-v2` to the tunnel listener and `send-proxy` (v1) to the web listener. The client's
//! own address then drives the per-source limits; PROXY headers from anyone else, and connections
//! from the balancer without one, are refused.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use postern_client::{ProxyAddr, ProxySession};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};

const HAPROXY: &str = "/usr/sbin/haproxy";

/// HAProxy in front of the proxy's tunnel (PROXY v2) and web (PROXY v1) listeners. Returns the
/// balancer's tunnel and web addresses.
async fn haproxy(proxy: &Proxy, dir: &Path) -> (Child, SocketAddr, SocketAddr) {
    assert!(
        Path::new(HAPROXY).exists(),
        "{HAPROXY} is missing: this test drives a real HAProxy; run `apt-get install haproxy` (scripts/test does)"
    );
    let (t, w) = (free_port(), free_port());
    let cfg = format!(
        "global\n  maxconn 512\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend tunnel\n  bind 127.0.0.1:{t}\n  default_backend proxies\n\
         backend proxies\n  server p1 {} send-proxy-v2\n\
         frontend web\n  bind 127.0.0.1:{w}\n  default_backend webs\n\
         backend webs\n  server w1 {} send-proxy\n",
        proxy.tunnel, proxy.web
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new(HAPROXY)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let tunnel: SocketAddr = format!("127.0.0.1:{t}").parse().unwrap();
    let web: SocketAddr = format!("127.0.0.1:{w}").parse().unwrap();
    for addr in [tunnel, web] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "HAProxy did not listen on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    (child, tunnel, web)
}

/// Connects to `to` from source address `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(IpAddr::from(from), 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// The first line the proxy writes on a fresh connection (its SSH banner, or a refusal).
async fn first_line(s: TcpStream) -> String {
    read_line(s).await
}

/// Says what an SSH client says first (its identification), then reads the proxy's first line.
async fn ssh_first_line(mut s: TcpStream) -> String {
    s.write_all(b"SSH-2.0-test\r\n").await.unwrap();
    read_line(s).await
}

async fn read_line(mut s: TcpStream) -> String {
    let mut buf = vec![0u8; 256];
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !out.ends_with(b"\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn dropped(proxy: &Proxy, reason: &str) -> f64 {
    metric(
        &scrape(proxy.ops).await,
        "postern_connections_dropped_total",
        &[("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_the_clients_own_address_counts() {
    init_tracing();
    let pki = Pki::new("pp1");
    let proxy = start_proxy(&[&pki], |c| {
        c.proxy_protocol.trusted_networks = vec!["127.0.0.1/32".into()];
        c.limits.max_connects_per_source_per_minute = 3;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_lb, lb_tunnel, lb_web) = haproxy(&proxy, dir.path()).await;

    // Discovery through the balancer (PROXY v1, then TLS), and a client logged in through it
    // (PROXY v2, then SSH) with a stream to an agent's echo service.
    let found = postern_dial::web::discover_tunnel_addr(&lb_web.to_string(), &proxy.web_trust())
        .await
        .expect("discovery through HAProxy with send-proxy");
    assert!(!found.is_empty());
    let echo = echo_server().await;
    // The agent, too, reaches the proxy through the balancer (everything from 127.0.0.1 is the
    // balancer here).
    let mut cfg = agent_config(&pki, "h1", &proxy, &[("echo", echo)]);
    cfg.proxy = None;
    cfg.tunnel_addr = Some(lb_tunnel.to_string());
    let agent = start_agent(cfg);
    let mut opts = client_opts(&pki, &proxy, "alice");
    opts.proxy = ProxyAddr::Tunnel(lb_tunnel.to_string());
    let session = ProxySession::connect(&opts)
        .await
        .expect("login through HAProxy with send-proxy-v2");
    let mut s = wait_stream(&session, "echo", "pp1", Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut s, b"via lb").await, b"via lb");

    // The per-source limit sees each client's address, not the balancer's.
    for _ in 0..3 {
        let line = ssh_first_line(connect_from([127, 0, 0, 6], lb_tunnel).await).await;
        assert!(line.starts_with("SSH-2.0-"), "{line:?}");
    }
    let line = ssh_first_line(connect_from([127, 0, 0, 6], lb_tunnel).await).await;
    assert!(
        line.starts_with("Postern: too many connections from 127.0.0.6 "),
        "the limit names the client's own address: {line:?}"
    );
    let line = ssh_first_line(connect_from([127, 0, 0, 7], lb_tunnel).await).await;
    assert!(
        line.starts_with("SSH-2.0-"),
        "another client behind the same balancer is unaffected: {line:?}"
    );
    drop(s);
    drop(session);
    agent.stop().await;
    proxy.stop().await;
}

#[tokio::test]
async fn proxy_headers_from_strangers_and_bad_headers_are_refused() {
    init_tracing();
    let pki = Pki::new("pp2");
    let proxy = start_proxy(&[&pki], |c| {
        c.proxy_protocol.trusted_networks = vec!["127.0.0.1/32".into()];
        c.ssh.handshake_timeout_secs = 2;
    })
    .await;
    // A PROXY header from an address that is not a trusted balancer.
    let mut s = connect_from([127, 0, 0, 8], proxy.tunnel).await;
    s.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 3024\r\nSSH-2.0-x\r\n")
        .await
        .unwrap();
    let line = first_line(s).await;
    assert_eq!(line, "", "a stranger's PROXY header gets no SSH banner");
    assert_eq!(dropped(&proxy, "proxy_header_untrusted").await, 1.0);

    // The trusted balancer's address without a header (require is on).
    let mut s = TcpStream::connect(proxy.tunnel).await.unwrap();
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    let _ = first_line(s).await;
    assert_eq!(dropped(&proxy, "proxy_header_missing").await, 1.0);

    // Malformed v1 and v2 headers from the balancer's address.
    let mut s = TcpStream::connect(proxy.tunnel).await.unwrap();
    s.write_all(b"PROXY GARBAGE\r\n").await.unwrap();
    let _ = first_line(s).await;
    let mut s = TcpStream::connect(proxy.tunnel).await.unwrap();
    s.write_all(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04\xff\xff\xff\xff")
        .await
        .unwrap();
    let _ = first_line(s).await;
    assert_eq!(dropped(&proxy, "proxy_header_malformed").await, 2.0);

    // A truncated header: the connection ends (or the deadline passes) before it is complete.
    let mut s = TcpStream::connect(proxy.tunnel).await.unwrap();
    s.write_all(b"PROXY TCP4 203.0.").await.unwrap();
    s.shutdown().await.unwrap();
    let _ = first_line(s).await;
    // And one that never finishes: cut at the handshake deadline.
    let mut s = TcpStream::connect(proxy.tunnel).await.unwrap();
    s.write_all(b"\r\n\r\n\0").await.unwrap();
    let _ = first_line(s).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(dropped(&proxy, "proxy_header_incomplete").await, 2.0);

    // The web listener refuses a stranger's header too.
    let mut s = connect_from([127, 0, 0, 8], proxy.web).await;
    s.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 3080\r\n")
        .await
        .unwrap();
    let _ = first_line(s).await;
    assert_eq!(dropped(&proxy, "proxy_header_untrusted").await, 2.0);
    proxy.stop().await;
}
