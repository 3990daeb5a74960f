//! The edge policy governs agents on the QUIC transport exactly as on SSH (one login module, one
//! registration rule set): target labels sent over QUIC select roles, streams through a QUIC
//! tunnel are audited with `transport = "quic"`, and a lock on the agent closes its QUIC tunnel and
//! refuses its next QUIC logins with the lock's message.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_agent::config::TransportMode;
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

/// Polls proxy `i`'s metrics until `name{labels}` is `want`; panics after 20 s.
async fn until_metric(c: &Cluster, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(c.proxies[0].ops).await;
        let got = metric(&text, name, labels);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {got} after 20 s, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_quic_agent_is_cut_and_refused_and_its_streams_are_audited() {
    let c = Cluster::start("qpol1", 1, 60).await;
    c.role(WEB_PROD).await;
    let echo = echo_server().await;
    let agent = c
        .service_agent_on(
            "web-q",
            0,
            &[("web", echo, &[("env", "prod")])],
            TransportMode::Quic,
        )
        .await;
    let s = c.user_session("quinn", &["web-prod"], 0).await;
    // The role selects the target by a label the agent sent over QUIC: without it, refused.
    let mut st = wait_stream(&s, "web", "qpol1", Duration::from_secs(20)).await;
    // web-q's tunnel, and the Auth server's own agent's (transport `auto`: QUIC when offered).
    let quic_tunnels = |text: &str| {
        metric(
            text,
            "postern_tunnels_connected",
            &[("cluster", "qpol1"), ("transport", "quic")],
        )
    };
    let before = quic_tunnels(&scrape(c.proxies[0].ops).await);
    assert!(before >= 1.0, "web-q is not on QUIC");
    st.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    st.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello");
    st.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = st.read_to_end(&mut rest).await;

    // The stream's open and close reach the Auth server, saying which transport carried it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let evs = c
            .admin
            .list_stream_events(ListStreamEventsRequest {
                user: "quinn".into(),
                since_ms: 0,
                limit: 1000,
            })
            .await
            .unwrap()
            .events;
        if evs.iter().any(|e| e.kind == "close") {
            break evs;
        }
        assert!(Instant::now() < deadline, "no close event in 30 s: {evs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let close = events.iter().find(|e| e.kind == "close").unwrap();
    assert_eq!(close.transport, "quic", "{close:?}");
    assert_eq!((close.bytes_in, close.bytes_out), (5, 5), "{close:?}");
    assert!(
        events
            .iter()
            .any(|e| e.kind == "open" && e.transport == "quic" && e.target == "web"),
        "{events:?}"
    );

    // A stream held open while the agent is locked: the lock closes the QUIC tunnel under it.
    let held = wait_stream(&s, "web", "qpol1", Duration::from_secs(5)).await;
    c.admin
        .create_lock(Lock {
            agent: "web-q".into(),
            message: "agent web-q quarantined".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut held = held;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), held.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the stream on the locked agent's QUIC tunnel was not closed in 10 s: {r:?}"
    );
    until_metric(
        &c,
        "postern_tunnels_connected",
        &[("cluster", "qpol1"), ("transport", "quic")],
        before - 1.0,
    )
    .await;
    match s.open("web", "qpol1", 0).await {
        Ok(_) => panic!("a locked agent's target was reached"),
        Err(e) => assert!(e.to_string().contains("no target named 'web'"), "{e}"),
    }
    // The agent redials over QUIC and is refused at login, counted by reason and transport.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(c.proxies[0].ops).await;
        let refused = metric(
            &text,
            "postern_auth_failures_total",
            &[("reason", "locked"), ("transport", "quic")],
        );
        if refused >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no QUIC login refused as locked in 20 s: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.stop().await;
    c.stop().await;
}
