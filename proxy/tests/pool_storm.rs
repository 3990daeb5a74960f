//! The reconnect storm of an agent pool: 1,000 agents (`POSTERN_STORM_AGENTS` to change it)
//! behind Debian's HAProxy in front of three proxy processes. Measures, per proxy, the peak
//! tunnel connects in any 1 s window and the time until every agent holds a tunnel to every
//! proxy, for the cold start (every agent at once) and after the balancer is SIGKILLed and
//! restarted (every tunnel of every agent drops at once).
//!
//! A measurement, not a gate: `cargo test -p postern-proxy --test pool_storm -- --ignored
//! --nocapture`.

#[path = "support/balanced.rs"]
#[allow(dead_code)]
mod balanced;
#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use balanced::*;
use cluster::Cluster;
use support::*;

/// Samples every proxy's connect counter every 100 ms until each holds `want` tunnels (after
/// having held fewer); returns the time since `start`, each proxy's peak connects in any 1 s
/// window, and when all proxies together first held 50 %, 90 % and 99 % of the tunnels.
async fn until_all_held(
    c: &Cluster,
    want: f64,
    start: Instant,
    limit: Duration,
) -> (Duration, Vec<f64>, Vec<f64>) {
    let mut samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); c.proxies.len()];
    let mut seen_below = false;
    let marks = [0.5, 0.9, 0.99];
    let mut reached = vec![f64::NAN; marks.len()];
    loop {
        let mut done = seen_below;
        let mut held = 0.0;
        for (i, p) in c.proxies.iter().enumerate() {
            let m = scrape_soft(p.ops).await;
            let t = start.elapsed().as_secs_f64();
            samples[i].push((
                t,
                metric(&m, "postern_tunnel_connects_total", &[("cluster", &c.name)]),
            ));
            let n = metric(&m, "postern_tunnels_connected", &[("cluster", &c.name)]);
            held += n;
            if n < want {
                done = false;
                seen_below = true;
            }
        }
        let total = want * c.proxies.len() as f64;
        for (k, f) in marks.iter().enumerate() {
            if seen_below && reached[k].is_nan() && held >= f * total {
                reached[k] = start.elapsed().as_secs_f64();
            }
        }
        if done {
            break;
        }
        assert!(
            start.elapsed() < limit,
            "not every agent on every proxy within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peaks = samples
        .iter()
        .map(|s| {
            let mut peak = 0.0f64;
            for (i, (t0, c0)) in s.iter().enumerate() {
                for (t1, c1) in &s[i..] {
                    if t1 - t0 <= 1.0 {
                        peak = peak.max(c1 - c0);
                    }
                }
            }
            peak
        })
        .collect();
    (start.elapsed(), peaks, reached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: 1,000 agents x 3 proxies behind HAProxy; run alone with --ignored --nocapture"]
async fn storm_of_a_thousand_agents_over_three_proxies() {
    let n: usize = std::env::var("POSTERN_STORM_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let (c, mut b) = start_balanced("storm3", 3).await;
    let echo = echo_server().await;
    let configs: Vec<_> = c
        .enroll_fleet("s", n)
        .await
        .into_iter()
        .map(|(host_id, path)| {
            balanced_agent_config(&c, &b, &host_id, path, &[("echo", echo, &[])])
        })
        .collect();
    let started = Instant::now();
    let agents: Vec<Agent> = configs.into_iter().map(start_agent).collect();
    let want = (n + 1) as f64; // the service agents and the Auth server's own
    let (cold, cold_peaks, marks) =
        until_all_held(&c, want, started, Duration::from_secs(300)).await;
    println!(
        "cold start: {n} agents hold all 3 tunnels after {:.2} s (50/90/99 % of the tunnels at {:.1?} s); peak connects in any 1 s window per proxy: {:?}",
        cold.as_secs_f64(),
        marks,
        cold_peaks
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Every tunnel drops at once: the balancer dies and comes back.
    let killed = Instant::now();
    b.kill_and_restart().await;
    let (back, peaks, marks) = until_all_held(&c, want, killed, Duration::from_secs(300)).await;
    println!(
        "balancer SIGKILL + restart: {n} agents hold all 3 tunnels again after {:.2} s (50/90/99 % at {:.1?} s); peak connects in any 1 s window per proxy: {:?}",
        back.as_secs_f64(),
        marks,
        peaks
    );
    for a in agents {
        a.shutdown.cancel();
    }
    c.stop().await;
}
