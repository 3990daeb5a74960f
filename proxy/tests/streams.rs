//! End to end: discovery, an agent tunnel, client streams through the proxy, routing refusals,
//! load spreading and failover, metrics.

mod support;

use std::time::Duration;

use postern_client::{ClientError, ProxySession};
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reaches_echo_service_through_agent_tunnel() {
    init_tracing();
    let pki = Pki::new("echo1");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let agent = start_agent(agent_config(&pki, "h1", &proxy, &[("auth", echo)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    assert_eq!(
        session.tunnel_addr,
        proxy.tunnel.to_string(),
        "discovered tunnel address"
    );
    let mut s = wait_stream(&session, "auth", "echo1", Duration::from_secs(5)).await;
    assert_eq!(
        echo_once(&mut s, b"hello through the tunnel").await,
        b"hello through the tunnel"
    );
    drop(s);

    let m = scrape(proxy.ops).await;
    assert_eq!(
        metric(&m, "postern_tunnels_connected", &[("cluster", "echo1")]),
        1.0,
        "{m}"
    );
    assert!(metric(&m, "postern_tunnel_connects_total", &[("cluster", "echo1")]) >= 1.0);
    assert!(metric(&m, "postern_stream_opens_total", &[("result", "ok")]) >= 1.0);
    assert!(
        metric(
            &m,
            "postern_bytes_proxied_total",
            &[("direction", "client_to_agent")]
        ) >= 24.0
    );
    assert!(
        metric(
            &m,
            "postern_bytes_proxied_total",
            &[("direction", "agent_to_client")]
        ) >= 24.0
    );
    assert!(
        m.contains("postern_handshake_duration_seconds_bucket"),
        "{m}"
    );
    assert!(m.contains("postern_streams_active"), "{m}");
    agent.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_problem() {
    init_tracing();
    let pki = Pki::new("ref1");
    let other = Pki::new("ref2");
    let idle = Pki::new("ref3");
    let proxy = start_proxy(&[&pki, &other, &idle], |_| {}).await;
    let echo = echo_server().await;
    let agent = start_agent(agent_config(&pki, "h1", &proxy, &[("auth", echo)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    wait_stream(&session, "auth", "ref1", Duration::from_secs(5)).await;

    let refused = |r: Result<postern_client::TunnelStream, ClientError>| match r {
        Err(ClientError::Refused { reason, .. }) => reason,
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("stream should have been refused"),
    };
    let r = refused(session.open("auth", "nosuch", 0).await);
    assert!(r.contains("unknown cluster nosuch"), "{r}");
    let r = refused(session.open("db", "ref1", 0).await);
    assert!(r.contains("no target named 'db'"), "{r}");
    let r = refused(session.open_host("127.0.0.1", 22).await);
    assert!(r.contains("raw address"), "{r}");
    let r = refused(session.open_host("localhost:22", 22).await);
    assert!(r.contains("raw address"), "{r}");
    let r = refused(session.open_host("@control", 0).await);
    assert!(r.contains("<target>.<cluster>"), "{r}");
    // A user of ref1 may not reach ref2, even where ref2 is served.
    let r = refused(session.open("auth", "ref2", 0).await);
    assert!(r.contains("may not reach cluster ref2"), "{r}");
    // A user of ref3, whose agent is not connected.
    let mut opts = client_opts(&idle, &proxy, "bob");
    // The proxy's host certificate is signed by the first cluster's host CA.
    opts.proxy_host_cas = vec![tunnel_proto::certs::ca_fingerprint(
        pki.host_ca.public_key(),
    )];
    let s3 = ProxySession::connect(&opts).await.unwrap();
    let r = refused(s3.open("auth", "ref3", 0).await);
    assert_eq!(
        r,
        "no tunnel for cluster ref3: its agent is not connected to this proxy"
    );
    // The session survives refusals.
    let mut s = session.open("auth", "ref1", 0).await.unwrap();
    assert_eq!(echo_once(&mut s, b"still fine").await, b"still fine");
    let m = scrape(proxy.ops).await;
    for result in [
        "unknown_cluster",
        "unknown_target",
        "raw_address",
        "forbidden",
        "no_tunnel",
        "bad_target",
    ] {
        assert!(
            metric(&m, "postern_stream_opens_total", &[("result", result)]) >= 1.0,
            "{result}: {m}"
        );
    }
    agent.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_down_behind_agent_is_reported() {
    init_tracing();
    let pki = Pki::new("down1");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    // A port with nothing listening.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let echo = echo_server().await;
    let agent = start_agent(agent_config(
        &pki,
        "h1",
        &proxy,
        &[("auth", dead), ("echo", echo)],
    ));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    wait_stream(&session, "echo", "down1", Duration::from_secs(5)).await;
    match session.open("auth", "down1", 0).await {
        Err(ClientError::Refused { reason, .. }) => {
            assert!(reason.contains("could not open target auth"), "{reason}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("target is down"),
    }
    agent.stop().await;
    proxy.stop().await;
}

/// 200 concurrent streams through one tunnel, 4 MiB of random bytes each, SHA-256 checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_keep_every_byte() {
    init_tracing();
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let streams: usize = env("POSTERN_TEST_STREAMS", 200);
    let bytes: usize = env("POSTERN_TEST_STREAM_BYTES", 4 << 20);
    let started = std::time::Instant::now();
    let pki = Pki::new("bulk1");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let agent = start_agent(agent_config(&pki, "h1", &proxy, &[("auth", echo)]));
    let session = std::sync::Arc::new(
        ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
            .await
            .unwrap(),
    );
    wait_stream(&session, "auth", "bulk1", Duration::from_secs(5)).await;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let session = session.clone();
        tasks.push(tokio::spawn(async move {
            let stream = session.open("auth", "bulk1", 0).await.unwrap();
            let (mut r, mut w) = tokio::io::split(stream);
            let mut data = vec![0u8; bytes];
            // Cheap deterministic pseudo-random bytes, different per stream.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
            for chunk in data.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            let sent = Sha256::digest(&data);
            let writer = tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Sha256::new();
            let mut n = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let k = r.read(&mut buf).await.unwrap();
                if k == 0 {
                    break;
                }
                got.update(&buf[..k]);
                n += k;
            }
            writer.await.unwrap();
            assert_eq!(n, bytes, "stream {i} length");
            assert_eq!(got.finalize(), sent, "stream {i} digest");
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(240), all)
        .await
        .expect("bounded run");
    eprintln!(
        "{streams} streams x {bytes} bytes echoed in {:?}",
        started.elapsed()
    );
    agent.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_spread_over_agents_and_fail_over() {
    init_tracing();
    let pki = Pki::new("ha1");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let a = name_server("agent-a").await;
    let b = name_server("agent-b").await;
    let agent_a = start_agent(agent_config(&pki, "a", &proxy, &[("auth", a)]));
    let agent_b = start_agent(agent_config(&pki, "b", &proxy, &[("auth", b)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    // Wait until both tunnels are up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(proxy.ops).await;
        if metric(&m, "postern_tunnels_connected", &[("cluster", "ha1")]) == 2.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "both agents connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seen = std::collections::HashMap::new();
    for _ in 0..20 {
        let s = session.open("auth", "ha1", 0).await.unwrap();
        *seen.entry(read_all(s).await).or_insert(0) += 1;
    }
    assert_eq!(seen.get("agent-a"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("agent-b"), Some(&10), "{seen:?}");
    agent_a.stop().await;
    // Once a's tunnel is gone, every new stream goes to b.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(proxy.ops).await;
        if metric(&m, "postern_tunnels_connected", &[("cluster", "ha1")]) == 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent a's tunnel is dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        let s = session.open("auth", "ha1", 0).await.unwrap();
        assert_eq!(read_all(s).await, "agent-b");
    }
    let m = scrape(proxy.ops).await;
    assert!(
        metric(
            &m,
            "postern_tunnel_disconnects_total",
            &[("cluster", "ha1")]
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "postern_tunnel_connects_total", &[("cluster", "ha1")]),
        2.0,
        "{m}"
    );
    agent_b.stop().await;
    proxy.stop().await;
}
