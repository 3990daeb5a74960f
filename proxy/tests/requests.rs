//! Access requests at the proxy: an approved elevation reaches targets its roles allow, exactly
//! like a standing role, and the proxy closes what it opened when the elevation ends, or at once
//! when the request or the user is locked (timed: the figures in the report come from here).

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster::Cluster;
use postern_api::identity::IdentityFile;
use postern_api::proto::*;
use postern_client::auth::AuthClient;
use support::*;
use tokio::io::AsyncReadExt;

const WEB_PROD: &str = "kind: role
metadata: {name: web-prod}
spec:
  allow:
    target_labels: {env: prod}
version: v7
";

const REQUESTER: &str = "kind: role
metadata: {name: requester}
spec:
  allow:
    request: {roles: [web-prod], max_duration: 1h}
version: v7
";

const REVIEWER: &str = "kind: role
metadata: {name: reviewer}
spec:
  allow:
    review_requests: {roles: [web-prod]}
version: v7
";

/// Alice (requester) and Bob (reviewer) as Auth API clients; an echo target `web` (env=prod).
async fn setup(c: &Cluster) -> (AuthClient, AuthClient, Agent) {
    for r in [WEB_PROD, REQUESTER, REVIEWER] {
        c.role(r).await;
    }
    for (user, role) in [("alice", "requester"), ("bob", "reviewer")] {
        c.admin
            .create_user(CreateUserRequest {
                name: user.into(),
                roles: vec![role.into()],
                secret_ttl_secs: 0,
            })
            .await
            .unwrap();
    }
    let addr = c.auth_addr.to_string();
    let alice = AuthClient::connect_direct(&addr, &c.identity("alice").await)
        .await
        .unwrap();
    let bob = AuthClient::connect_direct(&addr, &c.identity("bob").await)
        .await
        .unwrap();
    let echo = echo_server().await;
    let agent = c
        .service_agent("web-1", 0, &[("web", echo, &[("env", "prod")])])
        .await;
    (alice, bob, agent)
}

/// Requests `web-prod` for `secs`, has Bob approve, and reissues: the elevated identity and the
/// approved request.
async fn elevate(alice: &AuthClient, bob: &AuthClient, secs: u64) -> (IdentityFile, AccessRequest) {
    let req = alice
        .create_access_request(&["web-prod".into()], "deploy", secs)
        .await
        .unwrap();
    let approved = bob
        .review_access_request(&req.id, true, "ok")
        .await
        .unwrap();
    (alice.reissue_with_request(&req.id).await.unwrap(), approved)
}

/// Waits until the proxy closes `s`; returns when.
async fn until_closed(mut s: postern_client::TunnelStream) -> Instant {
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "stream not closed in 10 s: {r:?}"
    );
    Instant::now()
}

/// The instant unix second `at` begins.
fn instant_of(at: u64) -> Instant {
    let now = SystemTime::now();
    let end = UNIX_EPOCH + Duration::from_secs(at);
    match end.duration_since(now) {
        Ok(d) => Instant::now() + d,
        Err(e) => Instant::now() - e.duration(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elevation_reaches_targets_and_its_stream_closes_when_it_ends() {
    let c = Cluster::start("req1", 1, 60).await;
    let (alice, bob, _agent) = setup(&c).await;
    // Standing roles: the target is refused.
    let plain = c.session(&c.identity("alice").await, 0).await;
    reach_auth(&plain, "req1").await;
    let e = match plain.open("web", "req1", 0).await {
        Ok(_) => panic!("web opened with standing roles"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("alice"), "{e}");

    let (id, approved) = elevate(&alice, &bob, 3).await;
    let s = c.session(&id, 0).await;
    let mut stream = wait_stream(&s, "web", "req1", Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut stream, b"elevated").await, b"elevated");
    let end = instant_of(approved.expires);
    let closed = until_closed(stream).await;
    let late = closed.saturating_duration_since(end);
    eprintln!("figure: elevation end to the closed stream at the proxy: {late:?}");
    assert!(closed >= end, "closed before the elevation's end");
    assert!(
        late < Duration::from_secs(2),
        "closed {late:?} after the end"
    );
    // And the expired elevation opens nothing new (the client itself refuses the identity).
    let opts = postern_client::auth::proxy_options(
        &id,
        postern_client::ProxyAddr::Web {
            addr: c.proxies[0].web.to_string(),
            trust: c.proxies[0].web_trust(),
        },
    );
    if let Ok(opts) = opts {
        assert!(postern_client::ProxySession::connect(&opts).await.is_err());
    }
    c.stop().await;
}

async fn reach_auth(s: &postern_client::ProxySession, cluster: &str) {
    wait_stream(s, "auth", cluster, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_on_the_request_or_the_user_closes_the_elevated_stream_at_once() {
    let c = Cluster::start("req2", 1, 60).await;
    let (alice, bob, _agent) = setup(&c).await;
    let (id1, r1) = elevate(&alice, &bob, 600).await;
    let (id2, _) = elevate(&alice, &bob, 600).await;
    let s1 = c.session(&id1, 0).await;
    let s2 = c.session(&id2, 0).await;
    let st1 = wait_stream(&s1, "web", "req2", Duration::from_secs(10)).await;
    let mut st2 = wait_stream(&s2, "web", "req2", Duration::from_secs(10)).await;

    // A lock on the first request: its stream closes, the second elevation carries on.
    let t = Instant::now();
    c.admin
        .create_lock(Lock {
            access_request: r1.id.clone(),
            message: "elevation revoked".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let closed = until_closed(st1).await;
    eprintln!(
        "figure: lock on the request to the closed stream at the proxy: {:?}",
        closed - t
    );
    assert_eq!(echo_once(&mut st2, b"still").await, b"still");
    let e = s1.open("web", "req2", 0).await.err().map(|e| e.to_string());
    assert!(e.is_some(), "the locked elevation opened a stream");
    // API calls with the locked elevation fail too.
    let api = AuthClient::connect_direct(&c.auth_addr.to_string(), &id1).await;
    let refused = match api {
        Err(e) => e.to_string(),
        Ok(a) => a
            .upsert_role(
                postern_api::resource::parse_roles(WEB_PROD)
                    .unwrap()
                    .remove(0),
            )
            .await
            .unwrap_err()
            .to_string(),
    };
    assert!(refused.contains("elevation revoked"), "{refused}");

    // A lock on the user: the other elevated stream closes too.
    let t = Instant::now();
    c.admin
        .create_lock(Lock {
            user: "alice".into(),
            message: "alice is locked".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let closed = until_closed(st2).await;
    eprintln!(
        "figure: lock on the user to the closed stream at the proxy: {:?}",
        closed - t
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elevation_ends_on_time_while_the_auth_server_is_out_of_reach() {
    // A short staleness bound: the policy is stale well before the elevation ends.
    let mut c = Cluster::start("req3", 1, 2).await;
    let (alice, bob, _agent) = setup(&c).await;
    let (id, approved) = elevate(&alice, &bob, 6).await;
    let s = c.session(&id, 0).await;
    let mut stream = wait_stream(&s, "web", "req3", Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut stream, b"before").await, b"before");
    drop((alice, bob));
    c.stop_auth().await;
    let end = instant_of(approved.expires);
    let closed = until_closed(stream).await;
    let late = closed.saturating_duration_since(end);
    eprintln!("figure: elevation end to the closed stream, Auth server down: {late:?}");
    assert!(closed >= end, "closed before the elevation's end");
    assert!(
        late < Duration::from_secs(2),
        "closed {late:?} after the end"
    );
}
