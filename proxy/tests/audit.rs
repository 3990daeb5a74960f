//! The stream access audit: every stream open, close and refusal reaches the Auth server with the
//! user, key id, the source the proxy saw, cluster, target, proxy id, transport, bytes each way,
//! duration and result; and none is lost across an Auth outage and a proxy SIGKILL.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_api::proto::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB_PROD: &str = "kind: role
metadata: {name: web-prod}
spec:
  allow:
    target_labels: {env: prod}
version: v7
";

/// Waits until `user` has at least `opens` open and `closes` close events; returns all of them.
async fn events_of(c: &Cluster, user: &str, opens: usize, closes: usize) -> Vec<StreamEvent> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let evs = c
            .admin
            .list_stream_events(ListStreamEventsRequest {
                user: user.into(),
                since_ms: 0,
                limit: 10_000,
            })
            .await
            .unwrap()
            .events;
        let n = |k: &str| evs.iter().filter(|e| e.kind == k).count();
        if n("open") >= opens && n("close") >= closes {
            return evs;
        }
        assert!(
            Instant::now() < deadline,
            "{user}: {} opens, {} closes after 30 s (wanted {opens}, {closes})",
            n("open"),
            n("close")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One echo stream of `n` bytes, closed by the client.
async fn echo_stream(s: &postern_client::ProxySession, cluster: &str, n: usize) {
    let mut st = wait_stream(s, "web", cluster, Duration::from_secs(20)).await;
    let data = vec![7u8; n];
    st.write_all(&data).await.unwrap();
    let mut back = vec![0u8; n];
    st.read_exact(&mut back).await.unwrap();
    st.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = st.read_to_end(&mut rest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_open_close_and_refusal_is_an_audit_event_with_bytes_and_source() {
    let c = Cluster::start("aud1", 1, 60).await;
    c.role(WEB_PROD).await;
    c.role(
        "kind: role\nmetadata:\n  name: api-role\nspec:\n  allow:\n    rules:\n      - resources: ['role']\n        verbs: ['read']\n  deny:\n    node_labels:\n      '*': '*'\nversion: v5\n",
    )
    .await;
    let echo = echo_server().await;
    let agent = c
        .service_agent("web-1", 0, &[("web", echo, &[("env", "prod")])])
        .await;
    let wendy = c.user_session("wendy", &["web-prod"], 0).await;
    echo_stream(&wendy, "aud1", 1000).await;
    let api = c.user_session("api-user", &["api-role"], 0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api
        .open("web", "aud1", 0)
        .await
        .err()
        .is_some_and(|e| e.to_string().contains("api-role"))
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let evs = events_of(&c, "wendy", 1, 1).await;
    let close = evs.iter().find(|e| e.kind == "close").unwrap();
    assert_eq!((close.bytes_in, close.bytes_out), (1000, 1000), "{close:?}");
    assert_eq!(close.target, "web");
    assert_eq!(close.cluster, "aud1");
    assert_eq!(close.transport, "ssh");
    assert_eq!(close.key_id, "user wendy");
    assert!(close.source.starts_with("127.0.0.1:"), "{close:?}");
    assert!(!close.proxy_id.is_empty());
    let open = evs.iter().find(|e| e.kind == "open").unwrap();
    assert_eq!(open.result, "ok");
    assert!(close.time_ms >= open.time_ms);

    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let evs = c
            .admin
            .list_stream_events(ListStreamEventsRequest {
                user: "api-user".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .events;
        if let Some(e) = evs
            .into_iter()
            .find(|e| e.kind == "refused" && e.reason.contains("api-role"))
        {
            break e;
        }
        assert!(Instant::now() < deadline, "no refusal audited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refused.result, "forbidden");
    assert_eq!(refused.target, "web");
    agent.stop().await;
    c.stop().await;
}

/// The Auth server is down while streams run, then the proxy is killed with SIGKILL and
/// restarted: every event of every answered stream still reaches the Auth server, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_lost_across_an_auth_outage_and_a_proxy_sigkill() {
    let mut c = Cluster::start_with("aud2", 1, 600, true).await;
    c.role(WEB_PROD).await;
    let echo = echo_server().await;
    let agent = c
        .service_agent("web-1", 0, &[("web", echo, &[("env", "prod")])])
        .await;
    let wendy = c.user_session("wendy", &["web-prod"], 0).await;
    echo_stream(&wendy, "aud2", 10).await;
    events_of(&c, "wendy", 1, 1).await;

    c.stop_auth().await;
    const N: usize = 20;
    for _ in 0..N {
        echo_stream(&wendy, "aud2", 100).await;
    }
    // Every stream's close has been recorded by the proxy before it dies.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &scrape(c.proxies[0].ops).await,
        "postern_streams_active",
        &[],
    ) > 0.0
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.kill_and_restart_proxy(0).await;
    c.restart_auth().await;

    let evs = events_of(&c, "wendy", N + 1, N + 1).await;
    let ids: HashSet<&str> = evs.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), evs.len(), "no event stored twice");
    let n = |k: &str| evs.iter().filter(|e| e.kind == k).count();
    assert_eq!((n("open"), n("close")), (N + 1, N + 1));
    assert_eq!(
        evs.iter()
            .filter(|e| e.kind == "close")
            .map(|e| e.bytes_in)
            .sum::<u64>(),
        10 + 100 * N as u64
    );
    println!(
        "audit events lost across an Auth outage and a proxy SIGKILL: 0 of {}",
        evs.len()
    );
    agent.stop().await;
    c.stop().await;
}
