//! User CA rotation in automatic mode (`pctl auth rotate --type=user --grace-period=9s`) while a
//! user's streams flow: none fails, a certificate from the new CA is accepted as soon as it is
//! issued, and after the rotation a new session with a certificate from the old CA is refused
//! by the proxy (`untrusted_ca`) while one from the new CA connects.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::{ALL_TARGETS, Cluster};
use postern_api::proto::{CaRotation, ListCaRotationsRequest, RotateCertAuthorityRequest};
use postern_client::auth::proxy_options;
use postern_client::{ProxyAddr, ProxySession};
use support::*;

async fn user_rotation(c: &Cluster) -> CaRotation {
    let all = c
        .admin
        .list_ca_rotations(ListCaRotationsRequest {})
        .await
        .unwrap();
    all.rotations
        .into_iter()
        .find(|r| r.kind == "user")
        .unwrap()
}

async fn connect(
    c: &Cluster,
    id: &postern_api::identity::IdentityFile,
) -> Result<ProxySession, String> {
    let p = &c.proxies[0];
    let opts = proxy_options(
        id,
        ProxyAddr::Web {
            addr: p.web.to_string(),
            trust: p.web_trust(),
        },
    )
    .map_err(|e| e.to_string())?;
    ProxySession::connect(&opts)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_user_ca_rotates_automatically_while_streams_flow() {
    let c = Cluster::start("rotuser", 1, 60).await;
    c.role(ALL_TARGETS).await;
    let echo = echo_server().await;
    let session = c.user_session("alice", &["all-targets"], 0).await;
    let old_id = c.identity("alice").await;
    let agent = c.joining_agent("web-1", &c.agent_token(600).await, &c.ca_pin(), echo);
    let agent = start_agent(agent);
    let mut held = wait_stream(&session, "web-1", "rotuser", Duration::from_secs(20)).await;

    let r = c
        .admin
        .rotate_cert_authority(RotateCertAuthorityRequest {
            kind: "user".into(),
            phase: String::new(),
            manual: false,
            grace_period_secs: 9,
        })
        .await
        .unwrap();
    assert_eq!((r.phase.as_str(), r.trusted.len()), ("init", 2), "{r:?}");
    assert!(r.next_phase_at > 0, "automatic mode has a deadline");
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut new_id_session = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = user_rotation(&c).await;
        if r.phase == "standby" {
            assert_eq!(r.trusted.len(), 1, "{r:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotation did not finish: {r:?}"
        );
        // In update_clients a certificate issued now comes from the new CA: the proxy has
        // trusted it since init.
        if r.phase == "update_clients" && new_id_session.is_none() {
            let id = c.identity("alice").await;
            let s = connect(&c, &id)
                .await
                .expect("a new-CA session during the rotation");
            new_id_session = Some(s);
        }
        match session.open("web-1", "rotuser", 0).await {
            Ok(mut s) => {
                if echo_once(&mut s, b"rotating").await == b"rotating" {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            Err(e) => {
                eprintln!("stream failed: {e}");
                failed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(new_id_session.is_some(), "update_clients was seen");
    assert_eq!(echo_once(&mut held, b"still open").await, b"still open");
    eprintln!("user CA rotation: {ok} streams, {failed} failed");
    assert_eq!(failed, 0, "no stream fails during the rotation");
    assert!(ok > 20, "{ok}");

    // Once the proxy has read the new lists (every second), the old CA's certificate is refused.
    let before = metric(
        &scrape(c.proxies[0].ops).await,
        "postern_auth_failures_total",
        &[("reason", "untrusted_ca")],
    );
    let start = Instant::now();
    let refusal = loop {
        match connect(&c, &old_id).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "old-CA session still accepted"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    eprintln!("old-CA user certificate refused: {refusal}");
    let after = metric(
        &scrape(c.proxies[0].ops).await,
        "postern_auth_failures_total",
        &[("reason", "untrusted_ca")],
    );
    assert!(
        after > before,
        "refused as untrusted_ca ({before} -> {after})"
    );
    let fresh = c.identity("alice").await;
    let s = connect(&c, &fresh)
        .await
        .expect("a new-CA session after the rotation");
    let mut st = s.open("web-1", "rotuser", 0).await.unwrap();
    assert_eq!(echo_once(&mut st, b"after").await, b"after");
    agent.stop().await;
    c.stop().await;
}
