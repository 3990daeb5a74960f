//! Roles govern targets: the proxy decides every stream by the roles, users and locks it watches
//! from the cluster's Auth server (through the cluster's own tunnel). Seed role, label matching,
//! deleted users, role removal, locks on two proxies (timed), staleness, and a watch cut mid-way.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_api::proto::*;
use postern_client::ProxySession;
use support::*;
use tokio::io::AsyncReadExt;

const WEB_PROD: &str = "kind: role
metadata: {name: web-prod}
spec:
  allow:
    target_labels: {env: prod}
version: v7
";

const DEV_ONLY: &str = "kind: role
metadata: {name: dev-only}
spec:
  allow:
    node_labels: {env: [dev, staging]}
version: v7
";

const SEED: &str = "kind: role
metadata:
  name: api-role
spec:
  allow:
    rules:
      - resources: ['role']
        verbs: ['read']
  deny:
    node_labels:
      '*': '*'
version: v5
";

/// Opens `target` until it works (the agent and the policy arrive asynchronously).
async fn reach(s: &ProxySession, target: &str, cluster: &str) -> postern_client::TunnelStream {
    wait_stream(s, target, cluster, Duration::from_secs(20)).await
}

/// The refusal of opening `target`.
async fn refused(s: &ProxySession, target: &str, cluster: &str) -> String {
    match s.open(target, cluster, 0).await {
        Ok(_) => panic!("{target}.{cluster} must be refused"),
        Err(e) => e.to_string(),
    }
}

/// Waits until opening `target` is refused with a reason containing `needle`; returns when.
async fn until_refused(s: &ProxySession, target: &str, cluster: &str, needle: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.open(target, cluster, 0).await {
            Err(e) if e.to_string().contains(needle) => return Instant::now(),
            other => {
                assert!(
                    Instant::now() < deadline,
                    "not refused with '{needle}' in 10 s: {:?}",
                    other.err().map(|e| e.to_string())
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Logs `id` in to proxy 0 and opens `target`; returns the error from either step.
async fn login_then_open(
    c: &Cluster,
    id: &postern_api::identity::IdentityFile,
    target: &str,
) -> String {
    let p = &c.proxies[0];
    let opts = postern_client::auth::proxy_options(
        id,
        postern_client::ProxyAddr::Web {
            addr: p.web.to_string(),
            trust: p.web_trust(),
        },
    )
    .unwrap();
    match ProxySession::connect(&opts).await {
        Err(e) => e.to_string(),
        Ok(s) => match s.open(target, &c.name, 0).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{target} opened"),
        },
    }
}

/// Waits until an open echo stream is closed by the proxy; returns when.
async fn until_closed(mut s: postern_client::TunnelStream) -> Instant {
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "stream not closed in 10 s: {r:?}"
    );
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_govern_targets_by_label_and_the_seed_role_reaches_only_auth() {
    let c = Cluster::start("pol1", 1, 60).await;
    c.role(SEED).await;
    c.role(WEB_PROD).await;
    c.role(DEV_ONLY).await;
    let echo = echo_server().await;
    let agent = c
        .service_agent("web-1", 0, &[("web", echo, &[("env", "prod")])])
        .await;

    let web = c.user_session("wendy", &["web-prod"], 0).await;
    let mut s = reach(&web, "web", "pol1").await;
    assert_eq!(
        echo_once(&mut s, b"allowed by env=prod").await,
        b"allowed by env=prod"
    );

    // The seed's api-role, unchanged: the Auth API yes, every other target no, naming the role.
    let api = c.user_session("api-user", &["api-role"], 0).await;
    reach(&api, "auth", "pol1").await;
    until_refused(&api, "web", "pol1", "api-role").await;
    let e = refused(&api, "web", "pol1").await;
    assert!(e.contains("role 'api-role'"), "{e}");

    // A user whose roles match no label of the target: refused, roles named.
    let dev = c.user_session("dave", &["dev-only"], 0).await;
    until_refused(&dev, "web", "pol1", "no role allows").await;
    let e = refused(&dev, "web", "pol1").await;
    assert!(
        e.contains("no role allows") && e.contains("dev-only"),
        "{e}"
    );
    // ... and a user with no role at all still reaches the Auth API.
    let none = c.user_session("nora", &[], 0).await;
    reach(&none, "auth", "pol1").await;
    until_refused(&none, "web", "pol1", "roles held: none").await;

    agent.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_user_and_a_removed_role_close_open_streams_and_refuse_new_ones() {
    let c = Cluster::start("pol2", 1, 60).await;
    c.role(WEB_PROD).await;
    let echo = echo_server().await;
    let agent = c
        .service_agent("web-1", 0, &[("web", echo, &[("env", "prod")])])
        .await;

    // Deleted user: its certificate is still valid for an hour.
    let carol = c.user_session("carol", &["web-prod"], 0).await;
    let carol_id = c.identity("carol").await;
    let open = reach(&carol, "web", "pol2").await;
    c.admin.delete_user("carol").await.unwrap();
    let t0 = Instant::now();
    let closed = until_closed(open).await;
    assert!(closed - t0 < Duration::from_secs(2), "{:?}", closed - t0);
    // A new login with the still-valid certificate gets nowhere, and is told why.
    let e = login_then_open(&c, &carol_id, "web").await;
    assert!(e.contains("has been deleted"), "{e}");

    // Removed role: the certificate still lists web-prod, the user no longer holds it.
    let wendy = c.user_session("wendy", &["web-prod"], 0).await;
    let open = reach(&wendy, "web", "pol2").await;
    c.admin
        .update_user(User {
            name: "wendy".into(),
            roles: vec![],
            ..Default::default()
        })
        .await
        .unwrap();
    let t0 = Instant::now();
    let closed = until_closed(open).await;
    assert!(closed - t0 < Duration::from_secs(2), "{:?}", closed - t0);
    let e = refused(&wendy, "web", "pol2").await;
    assert!(e.contains("roles held: none"), "{e}");

    agent.stop().await;
    c.stop().await;
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `pctl lock --user`: both proxies refuse the user's new streams and close its open ones with
/// the lock's message, within 2 s. Prints the figures (median of 10 rounds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_closes_and_refuses_on_two_proxies_within_two_seconds() {
    let c = Cluster::start("pol3", 2, 60).await;
    c.role(WEB_PROD).await;
    let echo = echo_server().await;
    let a0 = c
        .service_agent("web-a", 0, &[("web", echo, &[("env", "prod")])])
        .await;
    let a1 = c
        .service_agent("web-b", 1, &[("web", echo, &[("env", "prod")])])
        .await;
    let mut refuse = [Vec::new(), Vec::new()];
    let mut close = [Vec::new(), Vec::new()];
    for round in 0..10 {
        let user = format!("lee{round}");
        let msg = format!("incident {round}: access suspended");
        let mut held = Vec::new();
        let mut probes = Vec::new();
        for i in 0..2 {
            let s = c.user_session(&user, &["web-prod"], i).await;
            held.push(reach(&s, "web", "pol3").await);
            let probe = c.session(&c.identity(&user).await, i).await;
            reach(&probe, "web", "pol3").await;
            probes.push((s, probe));
        }
        let t0 = Instant::now();
        c.admin
            .create_lock(Lock {
                user: user.clone(),
                message: msg.clone(),
                ttl_secs: 3600,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut held = held.into_iter();
        let (h0, h1) = (held.next().unwrap(), held.next().unwrap());
        let (c0, c1, r0, r1) = tokio::join!(
            until_closed(h0),
            until_closed(h1),
            until_refused(&probes[0].1, "web", "pol3", &msg),
            until_refused(&probes[1].1, "web", "pol3", &msg),
        );
        close[0].push(c0 - t0);
        close[1].push(c1 - t0);
        refuse[0].push(r0 - t0);
        refuse[1].push(r1 - t0);
        // A new login of the locked user is refused too, with the message.
        let e = login_then_open(&c, &c.identity(&user).await, "web").await;
        assert!(e.contains(&msg), "{e}");
    }
    for i in 0..2 {
        let (r, cl) = (median(&mut refuse[i]), median(&mut close[i]));
        println!(
            "proxy {i}: lock -> new stream refused: median {} ms (max {} ms); lock -> open stream closed: median {} ms (max {} ms)",
            r.as_millis(),
            refuse[i].last().unwrap().as_millis(),
            cl.as_millis(),
            close[i].last().unwrap().as_millis()
        );
        assert!(*refuse[i].last().unwrap() < Duration::from_secs(2));
        assert!(*close[i].last().unwrap() < Duration::from_secs(2));
    }
    a0.stop().await;
    a1.stop().await;
    c.stop().await;
}

/// A lock on a role refuses its holders; removing the lock lets them in again. A lock on an
/// agent closes its tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_and_agent_locks_and_removing_a_lock() {
    let c = Cluster::start("pol6", 1, 60).await;
    c.role(WEB_PROD).await;
    let echo = echo_server().await;
    let agent = c
        .service_agent("web-a", 0, &[("web", echo, &[("env", "prod")])])
        .await;
    let s = c.user_session("rita", &["web-prod"], 0).await;
    reach(&s, "web", "pol6").await;
    let lock = c
        .admin
        .create_lock(Lock {
            role: "web-prod".into(),
            message: "web-prod frozen".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    until_refused(&s, "web", "pol6", "web-prod frozen").await;
    let listed = c.admin.list_locks(ListLocksRequest {}).await.unwrap().locks;
    assert_eq!(listed.len(), 1);
    c.admin
        .delete_lock(DeleteLockRequest { id: lock.id })
        .await
        .unwrap();
    // Logins are admitted again once the removal reaches the proxy (well within a second).
    let id = c.identity("rita").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = c.session(&id, 0).await;
        if s.open("web", "pol6", 0).await.is_ok() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still locked after the lock was removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    c.admin
        .create_lock(Lock {
            agent: "web-a".into(),
            message: "agent web-a quarantined".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    until_refused(&s, "web", "pol6", "no target named 'web'").await;
    agent.stop().await;
    c.stop().await;
}

/// The Auth server goes away: the last known policy holds for `stale_after_secs` (3 s here),
/// then new streams are refused with a reason that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_staleness_bound_new_streams_are_refused() {
    let mut c = Cluster::start("pol4", 1, 3).await;
    c.role(WEB_PROD).await;
    let echo = echo_server().await;
    let agent = c
        .service_agent("web-a", 0, &[("web", echo, &[("env", "prod")])])
        .await;
    let s = c.user_session("sam", &["web-prod"], 0).await;
    reach(&s, "web", "pol4").await;
    c.stop_auth().await;
    let t0 = Instant::now();
    let mut kept = s.open("web", "pol4", 0).await.expect("last known policy");
    assert_eq!(echo_once(&mut kept, b"still").await, b"still");
    let t = until_refused(&s, "web", "pol4", "has not heard from").await;
    let e = refused(&s, "web", "pol4").await;
    assert!(
        e.contains("bound 3s") && e.contains("refused until it reconnects"),
        "{e}"
    );
    println!(
        "stale bound 3 s: refused {} ms after the Auth server stopped",
        (t - t0).as_millis()
    );
    assert!(t - t0 >= Duration::from_millis(1500), "{:?}", t - t0);
    // An open stream is not cut by staleness.
    assert_eq!(echo_once(&mut kept, b"open").await, b"open");
    agent.stop().await;
    c.stop().await;
}

/// The watch is cut (the Auth server restarts); the proxy resumes from the revision it applied,
/// with no new snapshot, and a lock made right after the restart is enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cut_mid_way_resumes_without_missing_a_lock() {
    let mut c = Cluster::start("pol5", 1, 60).await;
    c.role(WEB_PROD).await;
    let echo = echo_server().await;
    let agent = c
        .service_agent("web-a", 0, &[("web", echo, &[("env", "prod")])])
        .await;
    let s = c.user_session("uma", &["web-prod"], 0).await;
    reach(&s, "web", "pol5").await;
    let before = scrape(c.proxies[0].ops).await;
    let snaps = |m: &str| metric(m, "postern_policy_snapshots_total", &[("cluster", "pol5")]);
    assert_eq!(snaps(&before), 1.0);
    c.stop_auth().await;
    c.restart_auth().await;
    c.admin
        .create_lock(Lock {
            user: "uma".into(),
            message: "locked during the reconnect".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    until_refused(&s, "web", "pol5", "locked during the reconnect").await;
    let after = scrape(c.proxies[0].ops).await;
    assert_eq!(
        snaps(&after),
        1.0,
        "the watch resumed, it did not start over"
    );
    assert!(
        metric(
            &after,
            "postern_policy_watch_errors_total",
            &[("cluster", "pol5")]
        ) >= 1.0,
        "the watch was cut"
    );
    agent.stop().await;
    c.stop().await;
}
