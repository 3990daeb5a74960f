//! Pre-login admission is fair across sources: idle connections from many addresses, each well
//! under the per-address limits, cannot keep real agents and clients out (the hardening issue
//! measured an agent's reconnect going from 0.21 s to 7.8 s under such a flood).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use postern_client::ProxySession;
use support::*;
use tokio::net::{TcpSocket, TcpStream};

/// Source addresses of the flood (127.0.0.2 ..= 127.0.0.46).
const SOURCES: u8 = 45;
/// The pre-login pool in this test.
const POOL: usize = 128;

/// Opens idle connections (that never say anything) from `SOURCES` addresses, about 110 a second
/// in all, until the returned task is aborted. Connections stay open until the proxy drops them.
fn flood(tunnel: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut held: Vec<TcpStream> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(9));
        let mut n = 0u32;
        loop {
            tick.tick().await;
            let ip = IpAddr::from([127, 0, 0, 2 + (n % SOURCES as u32) as u8]);
            n += 1;
            let Ok(sock) = TcpSocket::new_v4() else {
                continue;
            };
            if sock.bind(SocketAddr::new(ip, 0)).is_err() {
                continue;
            }
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(500), sock.connect(tunnel)).await
            {
                held.push(s);
            }
            // Forget connections the proxy has closed, so the flood's own descriptors stay bounded.
            if held.len() > 4 * POOL {
                held.drain(..POOL);
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_from_many_sources_does_not_keep_agents_out() {
    init_tracing();
    let pki = Pki::new("pre1");
    let proxy = start_proxy(&[&pki], |c| {
        c.limits.max_unauthenticated = POOL;
        c.limits.max_unauthenticated_per_source = 16;
    })
    .await;
    let echo = echo_server().await;
    let flooding = flood(proxy.tunnel);
    // Let the flood fill the pool.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A fresh agent gets its tunnel up, and a client logs in, within a second each.
    let started = Instant::now();
    let agent = start_agent(agent_config(&pki, "fresh", &proxy, &[("echo", echo)]));
    let client = tokio::time::timeout(
        Duration::from_secs(1),
        ProxySession::connect(&client_opts(&pki, &proxy, "alice")),
    )
    .await
    .expect("a client logs in within 1 s during the flood")
    .unwrap();
    let mut s = wait_stream(&client, "echo", "pre1", Duration::from_secs(10)).await;
    let up = started.elapsed();
    assert_eq!(echo_once(&mut s, b"hi").await, b"hi");
    eprintln!(
        "agent tunnel up and a client stream through it {up:?} after the agent started, during the flood"
    );
    assert!(
        up < Duration::from_secs(1),
        "the agent's tunnel took {up:?} to come up during the flood"
    );
    let m = scrape(proxy.ops).await;
    assert!(
        metric(
            &m,
            "postern_connections_dropped_total",
            &[("reason", "prelogin_evicted")]
        ) > 0.0,
        "flood connections were evicted to make room"
    );
    flooding.abort();
    drop(s);
    drop(client);
    agent.stop().await;
    proxy.stop().await;
}

/// One source cannot take more than its share of the pre-login slots.
#[tokio::test]
async fn one_source_holds_at_most_its_share_of_prelogin_slots() {
    let pki = Pki::new("pre2");
    let proxy = start_proxy(&[&pki], |c| c.limits.max_unauthenticated_per_source = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(proxy.tunnel).await.unwrap());
    }
    // Give the proxy time to admit them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = TcpStream::connect(proxy.tunnel).await.unwrap();
    let mut line = String::new();
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut line)).await;
    assert!(
        line.starts_with("Postern: too many connections from 127.0.0.1 still logging in (limit 3)"),
        "{line:?}"
    );
    let m = scrape(proxy.ops).await;
    assert_eq!(
        metric(
            &m,
            "postern_limit_refusals_total",
            &[("limit", "unauthenticated_per_source")]
        ),
        1.0
    );
    // Another address is still served.
    let other = TcpSocket::new_v4().unwrap();
    other
        .bind(SocketAddr::new(IpAddr::from([127, 0, 0, 9]), 0))
        .unwrap();
    let mut o = other.connect(proxy.tunnel).await.unwrap();
    let mut banner = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), o.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    drop(held);
    proxy.stop().await;
}
