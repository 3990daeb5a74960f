//! How long a fleet takes to pick up a rotated host CA: 999 agents and the Auth server's own (the
//! proxy's default `max_tunnels_per_cluster` is 1,000; `POSTERN_STORM_AGENTS` to change it) with
//! hour-long certificates on one proxy; at `update_clients` the proxy tells them
//! the new signer and each renews within the proxy's `renew_spread_secs` (1 s in the test
//! cluster: every agent at once, the worst case for the proxy's relay and the Auth server).
//! Prints when 50 %, 90 %, 99 % and all of them held a new-CA certificate, and how many renewals
//! were refused on the way.
//!
//! A measurement, not a gate: `cargo test -p postern-proxy --test rotate_storm -- --ignored
//! --nocapture`.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_api::proto::*;
use russh::keys::ssh_key::{Certificate, PublicKey};
use support::*;

fn signed_by(path: &std::path::Path, key: &PublicKey) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| Certificate::from_openssh(t.trim()).ok())
        .is_some_and(|c| c.signature_key() == key.key_data())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: 999 agents pick up a rotated host CA; run alone with --ignored --nocapture"]
async fn a_thousand_agents_pick_up_a_rotated_host_ca() {
    let n: usize = std::env::var("POSTERN_STORM_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(999);
    let c = Cluster::start_tweaked("rstorm", 1, 60, false, |a| a.agent_cert_ttl_secs = 3600).await;
    let echo = echo_server().await;
    let configs: Vec<_> = c
        .enroll_fleet("r", n)
        .await
        .into_iter()
        .map(|(host_id, path)| {
            cluster::agent_cfg(
                "rstorm",
                &host_id,
                &c.proxies[0],
                &c.host_ca,
                path,
                [("echo", echo, &[][..])],
            )
        })
        .collect();
    let paths: Vec<_> = configs.iter().map(|c| c.host_cert_path()).collect();
    let agents: Vec<Agent> = configs.into_iter().map(start_agent).collect();
    let ops = c.proxies[0].ops;
    let start = Instant::now();
    loop {
        let up = metric(
            &scrape(ops).await,
            "postern_tunnels_connected",
            &[("cluster", "rstorm"), ("transport", "quic")],
        ) + metric(
            &scrape(ops).await,
            "postern_tunnels_connected",
            &[("cluster", "rstorm"), ("transport", "ssh")],
        );
        if up as usize > n {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{up} tunnels of {n} + 1"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{n} agents connected in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let rotate = |phase: &'static str| {
        c.admin.rotate_cert_authority(RotateCertAuthorityRequest {
            kind: "host".into(),
            phase: phase.into(),
            manual: true,
            grace_period_secs: 0,
        })
    };
    rotate("init").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused_before = metric(
        &scrape(ops).await,
        "postern_login_relays_total",
        &[("result", "rate_limited")],
    );
    let new_key =
        PublicKey::from_openssh(&rotate("update_clients").await.unwrap().trusted[0]).unwrap();
    let start = Instant::now();
    let mut done = vec![false; n];
    let mut left = n;
    let mut marks = Vec::new();
    while left > 0 {
        for (i, p) in paths.iter().enumerate() {
            if !done[i] && signed_by(p, &new_key) {
                done[i] = true;
                left -= 1;
                let held = n - left;
                for (k, pct) in [50, 90, 99].into_iter().enumerate() {
                    if marks.len() == k && held * 100 >= n * pct {
                        marks.push(start.elapsed().as_secs_f64());
                    }
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(1800),
            "{left} of {n} agents still on the old CA after 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = start.elapsed().as_secs_f64();
    let refused = metric(
        &scrape(ops).await,
        "postern_login_relays_total",
        &[("result", "rate_limited")],
    ) - refused_before;
    println!(
        "{n} agents hold a new-CA certificate {all:.1} s after update_clients (50/90/99 % at {marks:.1?} s); {refused} relay requests rate-limited on the way"
    );
    for a in agents {
        a.shutdown.cancel();
    }
    c.stop().await;
}
