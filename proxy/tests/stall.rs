//! A stream whose reader stops does not wedge its tunnel. Its own binary, so the 200-stream test
//! does not run beside it and stretch its timings.

mod support;

use std::time::Duration;

use postern_client::ProxySession;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client that writes without reading to a service that echoes fills every queue on the path.
/// russh cannot hold back window per stream, so this would wedge the whole tunnel; the stall
/// breaker ends that one stream instead, and other streams through the same tunnel keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_reading_does_not_wedge_its_tunnel() {
    init_tracing();
    let pki = Pki::new("stall1");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let agent = start_agent(agent_config(&pki, "h1", &proxy, &[("auth", echo)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    wait_stream(&session, "auth", "stall1", Duration::from_secs(5)).await;

    let hog = session.open("auth", "stall1", 0).await.unwrap();
    let (mut hog_r, mut hog_w) = tokio::io::split(hog);
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..256 {
            if hog_w.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    // Let the hog fill the queues before anyone else asks for anything.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let other = ProxySession::connect(&client_opts(&pki, &proxy, "bob"))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut s = tokio::time::timeout(Duration::from_secs(30), other.open("auth", "stall1", 0))
        .await
        .expect("a new stream opens while the hog is stalled")
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(30), echo_once(&mut s, b"not wedged"))
        .await
        .expect("the tunnel keeps serving other streams");
    assert_eq!(echoed, b"not wedged");
    eprintln!(
        "other stream served {:?} after the hog started",
        started.elapsed()
    );

    // The hog's own stream ends (closed, not left hanging).
    let drained = tokio::time::timeout(Duration::from_secs(120), async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match hog_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the stalled stream is closed");
    writer.abort();
    agent.stop().await;
    proxy.stop().await;
}
