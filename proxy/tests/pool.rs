//! A tunnel to every proxy: proxies heartbeat into the cluster's proxy set through their own
//! tunnels, send it to agents on `@control`, and agents configured with one (balanced) address
//! hold a tunnel to each. Behind Debian's HAProxy (TCP mode, three proxy processes, two service
//! agents and the Auth server's own agent): every stream lands, a SIGKILLed proxy is routed
//! around within a measured bound, a SIGTERMed one drains without a failure. And a proxy set
//! naming a proxy that never answers costs a bounded dial rate.

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
use postern_api::proto::*;
use postern_client::auth::AuthClient;
use support::*;

fn agent_dials(m: &str) -> f64 {
    metric(
        m,
        "postern_handshake_duration_seconds_count",
        &[("role", "agent")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_in_the_set_that_never_answers_costs_a_bounded_dial_rate() {
    let c = Cluster::start("ghost", 1, 60).await;
    let echo = echo_server().await;
    let svc = c.service_agent("svc", 0, &[("echo", echo, &[])]).await;
    let s = c.user_session("alice", &["access"], 0).await;
    let mut st = wait_stream(&s, "echo", "ghost", Duration::from_secs(20)).await;
    assert_eq!(echo_once(&mut st, b"hi").await, b"hi");
    // Only a proxy identity may write the set: alice (role `access`) is refused.
    let as_alice = AuthClient::connect_direct(&c.auth_addr.to_string(), &c.identity("alice").await)
        .await
        .unwrap();
    let refused = as_alice
        .proxy_heartbeat(ProxyHeartbeatRequest {
            proxy: Some(ProxyRecord {
                id: "alice-proxy".into(),
                ..Default::default()
            }),
            ttl_secs: 600,
            leaving: false,
        })
        .await
        .expect_err("a user without `proxy: create` must not join the proxy set");
    assert!(refused.to_string().contains("proxy"), "{refused}");
    // A proxy record nobody will ever reach: heartbeated once with the proxy identity.
    let id = c.identity("proxy-1").await;
    let as_proxy = AuthClient::connect_direct(&c.auth_addr.to_string(), &id)
        .await
        .unwrap();
    let set = as_proxy
        .proxy_heartbeat(ProxyHeartbeatRequest {
            proxy: Some(ProxyRecord {
                id: "ghost-proxy".into(),
                web_addr: "192.0.2.1:3080".into(),
                tunnel_addr: "192.0.2.1:3024".into(),
                expires_ms: 0,
            }),
            ttl_secs: 600,
            leaving: false,
        })
        .await
        .unwrap();
    assert!(set.proxies.iter().any(|p| p.id == "ghost-proxy"));
    let ops = c.proxies[0].ops;
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(
        &scrape(ops).await,
        "postern_proxy_set_size",
        &[("cluster", "ghost")],
    ) < 2.0
    {
        assert!(
            Instant::now() < deadline,
            "the proxy never learnt the ghost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both agents (the Auth server's and the service agent) now hunt for the ghost through the
    // only address they have: every dial lands on the proxy they hold. Over 15 s they must keep
    // their tunnels and dial at a bounded rate.
    let before = agent_dials(&scrape(ops).await);
    let window = Instant::now();
    let mut streams = 0;
    while window.elapsed() < Duration::from_secs(15) {
        let mut st = s
            .open("echo", "ghost", 0)
            .await
            .expect("the held tunnel keeps serving");
        assert_eq!(echo_once(&mut st, b"x").await, b"x");
        streams += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let m = scrape(ops).await;
    let dials = agent_dials(&m) - before;
    println!(
        "ghost in the set: {dials} agent dials in 15 s by 2 agents; {streams} streams, 0 failures"
    );
    assert!(
        dials >= 1.0,
        "the agents never hunted for the ghost: the set did not reach them"
    );
    assert!(dials <= 30.0, "{dials} dials in 15 s: the agents spin");
    assert_eq!(
        metric(&m, "postern_tunnels_connected", &[("cluster", "ghost")]),
        2.0
    );
    svc.stop().await;
    c.stop().await;
}

/// The cluster's newest policy revision, from a watch's snapshot.
async fn policy_revision(c: &Cluster) -> f64 {
    let mut s = c
        .admin
        .rpc()
        .watch_policy(WatchPolicyRequest { from_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    loop {
        let e = s.message().await.unwrap().expect("a snapshot");
        if e.snapshot_end || e.kind.is_empty() {
            return e.revision as f64;
        }
    }
}

/// Every proxy shows `want` tunnels of the cluster (the Auth agent's and the two service agents').
fn tunnels(want: f64) -> impl Fn(&str, &str) -> bool {
    move |m, cl| metric(m, "postern_tunnels_connected", &[("cluster", cl)]) == want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_every_stream_lands_a_killed_proxy_is_routed_around_a_drain_loses_nothing() {
    let (mut c, b) = start_balanced("lb", 3).await;
    let echo = echo_server().await;
    c.admin
        .create_user(CreateUserRequest {
            name: "alice".into(),
            roles: vec!["access".into()],
            secret_ttl_secs: 0,
        })
        .await
        .unwrap();
    let alice = c.identity("alice").await;
    let revision = policy_revision(&c).await;
    // Two service agents, each given only the balancer's address.
    let started = Instant::now();
    let a1 = balanced_agent(&c, &b, "svc-1", &[("echo", echo, &[])]).await;
    let a2 = balanced_agent(&c, &b, "svc-2", &[("echo", echo, &[])]).await;
    wait_for(
        &c,
        &[0, 1, 2],
        tunnels(3.0),
        Duration::from_secs(60),
        "both agents on every proxy",
    )
    .await;
    println!(
        "two agents reached all three proxies through HAProxy in {} ms (enrolment included)",
        started.elapsed().as_millis()
    );
    // Every proxy has the policy that knows alice.
    wait_for(
        &c,
        &[0, 1, 2],
        |m, cl| metric(m, "postern_policy_revision", &[("cluster", cl)]) >= revision,
        Duration::from_secs(20),
        "alice known to every proxy",
    )
    .await;

    // 1. 100 streams, each on a new connection through the balancer: 0 failures.
    let mut failures = Vec::new();
    for _ in 0..100 {
        if let Err(e) = balanced_echo(&alice, &b, "lb", "echo").await {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 100 failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    for p in &c.proxies {
        let m = scrape(p.ops).await;
        assert!(
            metric(&m, "postern_stream_opens_total", &[("result", "ok")]) >= 20.0,
            "the balancer spread the streams over every proxy"
        );
    }

    // 2. SIGKILL p0: new streams through the balancer succeed again within a measured bound.
    let mut child = c.children[0].take().unwrap();
    child.start_kill().unwrap();
    let killed = Instant::now();
    let _ = child.wait().await;
    let (mut fails, mut run, mut first_ok_of_run) = (0, 0, None);
    while run < 20 {
        match balanced_echo(&alice, &b, "lb", "echo").await {
            Ok(()) => {
                first_ok_of_run.get_or_insert(killed.elapsed());
                run += 1;
            }
            Err(_) => {
                fails += 1;
                run = 0;
                first_ok_of_run = None;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no recovery within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = first_ok_of_run.unwrap();
    println!(
        "SIGKILL p0: streams succeed again {} ms after the kill ({fails} failed before)",
        recovered.as_millis()
    );
    assert!(
        recovered < Duration::from_secs(5),
        "failover bound 5 s exceeded: {recovered:?}"
    );
    // p0 leaves the set when its record expires (3 missed heartbeats of 1 s).
    wait_for(
        &c,
        &[1, 2],
        |m, cl| metric(m, "postern_proxy_set_size", &[("cluster", cl)]) == 2.0,
        Duration::from_secs(20),
        "p0 expired from the set",
    )
    .await;
    println!(
        "p0 left every proxy's set {} ms after the kill",
        killed.elapsed().as_millis()
    );

    // 3. SIGTERM p1 while streams shorter than the grace period (2 s) run on every proxy.
    let mut long = Vec::new();
    for _ in 0..6 {
        let id = alice.clone();
        let s = balanced_session(&id, &b).await.unwrap();
        let mut st = s.open("echo", "lb", 0).await.unwrap();
        assert_eq!(echo_once(&mut st, b"start").await, b"start");
        long.push(tokio::spawn(async move {
            let _keep = s;
            for i in 0..6u8 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let msg = [i; 1024];
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                st.write_all(&msg).await.map_err(|e| e.to_string())?;
                let mut back = [0u8; 1024];
                st.read_exact(&mut back).await.map_err(|e| e.to_string())?;
                if back != msg {
                    return Err("mismatch".to_string());
                }
            }
            Ok::<(), String>(())
        }));
    }
    let pid = c.children[1].as_ref().unwrap().id().unwrap();
    let term = Instant::now();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let mut after = 0;
    let mut after_failures = Vec::new();
    while term.elapsed() < Duration::from_secs(4) {
        if let Err(e) = balanced_echo(&alice, &b, "lb", "echo").await {
            after_failures.push(e);
        }
        after += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, t) in long.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert!(
            r.is_ok(),
            "long stream {i} (1.2 s, grace 2 s) failed across the drain: {r:?}"
        );
    }
    assert!(
        after_failures.is_empty(),
        "{} of {after} streams opened after the drain began failed: {:?}",
        after_failures.len(),
        &after_failures[..after_failures.len().min(5)]
    );
    let mut child = c.children[1].take().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("p1 exits within its grace period")
        .unwrap();
    assert!(status.success(), "drain exits 0");
    println!(
        "SIGTERM p1: 6 long streams completed, {after} streams opened after the drain began, 0 failed; p1 exited after {} ms",
        term.elapsed().as_millis()
    );
    // The agents end up with tunnels to the remaining proxy (and p1 leaves the set at once).
    let settled = wait_for(
        &c,
        &[2],
        |m, cl| {
            tunnels(3.0)(m, cl) && metric(m, "postern_proxy_set_size", &[("cluster", cl)]) == 1.0
        },
        Duration::from_secs(15),
        "every agent on p2, p2 alone in the set",
    )
    .await;
    println!(
        "after the drain: p2 holds all 3 agents' tunnels and is alone in the set ({} ms after the wait began)",
        settled.as_millis()
    );
    a1.stop().await;
    a2.stop().await;
    c.stop().await;
    drop(b);
}
