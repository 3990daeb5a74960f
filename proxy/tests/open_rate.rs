//! Stream opens per second with authorization and auditing on (policy source `auth`: decision,
//! registry, spooled and shipped events) against the same proxy code with them off (source
//! `open`, no spool). A figure, not a check: run it in release,
//! `cargo test --release -p postern-proxy --test open_rate -- --ignored --nocapture`.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_client::ProxySession;
use support::*;

const STREAMS: usize = 4000;
const CONCURRENCY: usize = 16;

/// Opens and closes `STREAMS` streams to `target`, `CONCURRENCY` at a time; returns opens/s.
async fn rate(session: Arc<ProxySession>, target: &str, cluster: &str) -> f64 {
    wait_stream(&session, target, cluster, Duration::from_secs(20)).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (s, t, c) = (session.clone(), target.to_owned(), cluster.to_owned());
        tasks.push(tokio::spawn(async move {
            for _ in 0..STREAMS / CONCURRENCY {
                let st = s.open(&t, &c, 0).await.expect("stream opens");
                drop(st);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    STREAMS as f64 / start.elapsed().as_secs_f64()
}

async fn off_once(echo: std::net::SocketAddr) -> f64 {
    // A tunnel-only proxy (policy source `open`): no decision work, no spool.
    let pki = Pki::new("rateoff");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let agent = start_agent(agent_config(&pki, "h1", &proxy, &[("web", echo)]));
    let s = Arc::new(
        ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
            .await
            .unwrap(),
    );
    let r = rate(s, "web", "rateoff").await;
    agent.stop().await;
    proxy.stop().await;
    r
}

async fn on_once(echo: std::net::SocketAddr) -> f64 {
    // Roles decided from the watched policy, every open and close spooled and shipped.
    let c = Cluster::start("rateon", 1, 600).await;
    c.role("kind: role\nmetadata: {name: web-prod}\nspec:\n  allow:\n    target_labels: {env: prod}\nversion: v7\n")
        .await;
    let agent = c
        .service_agent("web-1", 0, &[("web", echo, &[("env", "prod")])])
        .await;
    let s = Arc::new(c.user_session("wendy", &["web-prod"], 0).await);
    let r = rate(s, "web", "rateon").await;
    agent.stop().await;
    c.stop().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
async fn stream_opens_per_second_with_authorization_and_audit_on_and_off() {
    let echo = echo_server().await;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    // Interleaved, so that load from elsewhere on the machine hits both alike.
    for _ in 0..3 {
        off.push(off_once(echo).await);
        on.push(on_once(echo).await);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m_off, m_on) = (median(&mut off), median(&mut on));
    println!(
        "stream opens/s ({STREAMS} opens, {CONCURRENCY} at a time, one client connection, median of 3 interleaved runs): authorization + audit off {m_off:.0} {off:.0?}, on {m_on:.0} {on:.0?} ({:+.1} %)",
        (m_on / m_off - 1.0) * 100.0
    );
}
