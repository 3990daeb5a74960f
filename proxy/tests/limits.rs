//! Limits: each has a config field, a metric and a clear refusal.

mod support;

use std::time::Duration;

use postern_client::ProxySession;
use support::*;
use tokio::io::AsyncReadExt;

async fn refused_line(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    out
}

#[tokio::test]
async fn connections_per_source_are_limited() {
    let pki = Pki::new("limsrc");
    let proxy = start_proxy(&[&pki], |c| c.limits.max_connects_per_source_per_minute = 3).await;
    for _ in 0..3 {
        let banner = refused_line(proxy.tunnel).await;
        // Accepted: the SSH identification (the handshake then times out or is closed by us).
        let _ = banner;
    }
    let line = refused_line(proxy.tunnel).await;
    assert!(
        line.starts_with("Postern: too many connections from 127.0.0.1 (limit 3 per minute)"),
        "{line:?}"
    );
    let m = scrape(proxy.ops).await;
    assert_eq!(
        metric(
            &m,
            "postern_limit_refusals_total",
            &[("limit", "connects_per_source")]
        ),
        1.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn failed_logins_per_source_lock_the_address_out() {
    let pki = Pki::new("limauth");
    let other = Pki::new("limauth-other");
    let proxy = start_proxy(&[&pki], |c| {
        c.limits.max_auth_failures_per_source_per_minute = 2
    })
    .await;
    // Two different logins with certificates from an untrusted CA: two identities failing.
    for user in ["mallory", "trudy"] {
        let mut opts = client_opts(&pki, &proxy, user);
        opts.identity = other.user(user);
        assert!(ProxySession::connect(&opts).await.is_err());
    }
    // Now even a good certificate from this address is refused before the handshake.
    let line = refused_line(proxy.tunnel).await;
    assert!(
        line.starts_with("Postern: too many identities failed to log in from 127.0.0.1"),
        "{line:?}"
    );
    let e = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .err()
        .expect("refused");
    let _ = e;
    let m = scrape(proxy.ops).await;
    assert!(
        metric(
            &m,
            "postern_limit_refusals_total",
            &[("limit", "auth_failures_per_source")]
        ) >= 2.0
    );
    proxy.stop().await;
}

/// One misconfigured agent retrying from an address (its certificate from a CA the proxy does
/// not trust) must not lock out a valid client and a valid agent on the same address: failures
/// count per (address, login), and the bad agent's own logins are refused past the limit.
#[tokio::test]
async fn a_bad_agent_retrying_does_not_lock_out_its_neighbours() {
    let pki = Pki::new("limnb");
    let rogue = Pki::new("limnb");
    let proxy = start_proxy(&[&pki], |c| {
        c.limits.max_auth_failures_per_source_per_minute = 3
    })
    .await;
    let echo = echo_server().await;
    // The bad agent: same cluster, host CA the proxy does not trust; fast retries.
    let mut bad = agent_config(&rogue, "bad", &proxy, &[("web", echo)]);
    bad.reconnect.base_ms = 10;
    bad.reconnect.cap_ms = 20;
    bad.reconnect.permanent_secs = 0;
    bad.proxy_host_ca = agent_config(&pki, "x", &proxy, &[("web", echo)]).proxy_host_ca;
    let bad = start_agent(bad);
    // Wait until its logins are refused by the per-identity limit, well past 3 failures.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(proxy.ops).await;
        if metric(
            &m,
            "postern_limit_refusals_total",
            &[("limit", "auth_failures_per_identity")],
        ) >= 3.0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bad agent's retries were not limited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A valid agent and a valid client from the same address are served meanwhile.
    let good = start_agent(agent_config(&pki, "good", &proxy, &[("web", echo)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .expect("a valid client is served while a bad agent retries from its address");
    let mut stream = wait_stream(&session, "web", "limnb", Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut stream, b"neighbour").await, b"neighbour");
    let m = scrape(proxy.ops).await;
    assert_eq!(
        metric(
            &m,
            "postern_limit_refusals_total",
            &[("limit", "auth_failures_per_source")]
        ),
        0.0,
        "the address itself was never refused"
    );
    bad.stop().await;
    good.stop().await;
    proxy.stop().await;
}

#[tokio::test]
async fn tunnels_per_cluster_are_limited() {
    let pki = Pki::new("limtun");
    let proxy = start_proxy(&[&pki], |c| c.limits.max_tunnels_per_cluster = 1).await;
    let one = name_server("one").await;
    let two = name_server("two").await;
    let a1 = start_agent(agent_config(&pki, "a1", &proxy, &[("auth", one)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    assert_eq!(
        read_all(wait_stream(&session, "auth", "limtun", Duration::from_secs(10)).await).await,
        "one"
    );
    let a2 = start_agent(agent_config(&pki, "a2", &proxy, &[("auth", two)]));
    // The second agent's registration is refused and counted; every stream still goes to a1.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(proxy.ops).await;
        if metric(
            &m,
            "postern_limit_refusals_total",
            &[("limit", "tunnels_per_cluster")],
        ) >= 1.0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second tunnel was not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..6 {
        assert_eq!(
            read_all(session.open("auth", "limtun", 0).await.unwrap()).await,
            "one"
        );
    }
    a2.stop().await;
    a1.stop().await;
    proxy.stop().await;
}

#[tokio::test]
async fn streams_per_client_are_limited() {
    let pki = Pki::new("limstr");
    let proxy = start_proxy(&[&pki], |c| c.limits.max_streams_per_client = 2).await;
    let echo = echo_server().await;
    let agent = start_agent(agent_config(&pki, "a1", &proxy, &[("auth", echo)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let mut s1 = wait_stream(&session, "auth", "limstr", Duration::from_secs(10)).await;
    let mut s2 = session.open("auth", "limstr", 0).await.unwrap();
    assert_eq!(echo_once(&mut s1, b"a").await, b"a");
    assert_eq!(echo_once(&mut s2, b"b").await, b"b");
    let e = session
        .open("auth", "limstr", 0)
        .await
        .err()
        .expect("third stream refused");
    assert!(
        e.to_string()
            .contains("too many open streams on this connection (limit 2)"),
        "{e}"
    );
    // Dropping one (CLOSE without EOF) frees its slot: the proxy ends the whole stream.
    drop(s1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut s3 = loop {
        match session.open("auth", "limstr", 0).await {
            Ok(s) => break s,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("slot not freed: {e}"),
        }
    };
    assert_eq!(echo_once(&mut s3, b"c").await, b"c");
    let m = scrape(proxy.ops).await;
    assert!(
        metric(
            &m,
            "postern_limit_refusals_total",
            &[("limit", "streams_per_client")]
        ) >= 1.0
    );
    agent.stop().await;
    proxy.stop().await;
}

async fn web_tls(proxy: &Proxy) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = postern_dial::web::tls_config(&proxy.web_trust()).unwrap();
    let tcp = tokio::net::TcpStream::connect(proxy.web).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

async fn web_dropped(proxy: &Proxy, reason: &str) -> f64 {
    metric(
        &scrape(proxy.ops).await,
        "postern_connections_dropped_total",
        &[("reason", reason)],
    )
}

#[tokio::test]
async fn slow_or_huge_web_requests_are_cut() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new("limweb");
    let proxy = start_proxy(&[&pki], |c| {
        c.limits.web_header_timeout_secs = 1;
        c.limits.web_max_header_bytes = 8192;
    })
    .await;
    // Headers that never finish: closed after the header timeout.
    let mut slow = web_tls(&proxy).await;
    slow.write_all(b"GET /webapi/ping HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "a slow request head was not cut");
    // A request head over the limit: answered with an error or closed, never served.
    let mut huge = web_tls(&proxy).await;
    let head = format!(
        "GET /webapi/ping HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let _ = huge.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), huge.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("cluster_names"),
        "an oversized request was served: {answer}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while web_dropped(&proxy, "web_header_timeout").await < 1.0
        || web_dropped(&proxy, "web_header_too_large").await < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "web limit refusals not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop().await;
}
