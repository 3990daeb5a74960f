//! Certificates renew themselves: an agent that joined with a token renews its host certificate
//! at two-thirds of its life through the proxy (`POST /webapi/renew`), while streams flow, with
//! no stream failing; the renewed certificate is what the next connection uses; a locked agent's
//! renewal is refused.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_api::proto::Lock;
use russh::keys::ssh_key::Certificate;
use support::*;
use tunnel_proto::join::RenewRequest;

const ALL_TARGETS: &str = "kind: role
metadata: {name: all-targets}
spec:
  allow:
    node_labels: {'*': '*'}
version: v7
";

/// Lifetime of the agents' certificates in this test, seconds.
const TTL: u64 = 6;

fn valid_before(path: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    Certificate::from_openssh(text.trim())
        .unwrap()
        .valid_before()
}

#[tokio::test]
async fn an_agent_renews_three_times_while_streams_flow_and_none_fails() {
    let c = Cluster::start_tweaked("renew", 1, 60, false, |a| a.agent_cert_ttl_secs = TTL).await;
    c.role(ALL_TARGETS).await;
    let echo = echo_server().await;
    let session = c.user_session("alice", &["all-targets"], 0).await;
    let cfg = c.joining_agent("web-1", &c.agent_token(600).await, &c.ca_pin(), echo);
    let cert_path = cfg.host_cert_path();
    let agent = start_agent(cfg.clone());
    // One stream held open across every renewal.
    let mut held = wait_stream(&session, "web-1", "renew", Duration::from_secs(20)).await;
    let first = valid_before(&cert_path);
    let mut seen = vec![first];
    let (mut ok, mut failed) = (0u32, 0u32);
    let deadline = Instant::now() + Duration::from_secs(40);
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 renewals in 40 s (expiries seen: {seen:?})"
        );
        match session.open("web-1", "renew", 0).await {
            Ok(mut s) => {
                if echo_once(&mut s, b"renewing").await == b"renewing" {
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
        let now = valid_before(&cert_path);
        if now != *seen.last().unwrap() {
            assert!(
                now > *seen.last().unwrap(),
                "a renewal extends the certificate"
            );
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(echo_once(&mut held, b"still open").await, b"still open");
    eprintln!("3 renewals (expiries {seen:?}): {ok} streams, {failed} failed");
    assert_eq!(failed, 0, "no stream fails during renewals");
    assert!(ok > 10);
    // The first certificate has expired by now: a new connection works only with a renewed one.
    assert!(
        postern_dial::mint::now_unix() >= first,
        "the first certificate expired"
    );
    agent.stop().await;
    let again = start_agent(cfg);
    let mut s = wait_stream(&session, "web-1", "renew", Duration::from_secs(20)).await;
    assert_eq!(echo_once(&mut s, b"reconnected").await, b"reconnected");
    again.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn a_locked_agents_renewal_is_refused() {
    let c = Cluster::start_tweaked("renlock", 1, 60, false, |a| a.agent_cert_ttl_secs = 3600).await;
    let echo = echo_server().await;
    let cfg = c.joining_agent("web-2", &c.agent_token(600).await, &c.ca_pin(), echo);
    let cert_path = cfg.host_cert_path();
    let agent = start_agent(cfg);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cert_path.exists() {
        assert!(Instant::now() < deadline, "no join");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.stop().await;
    let cert = std::fs::read_to_string(&cert_path).unwrap();
    let proxy = &c.proxies[0];
    let req = RenewRequest {
        cluster: "renlock".into(),
        renew_cert: cert.trim().into(),
        source: None,
        ..Default::default()
    };
    let web = proxy.web.to_string();
    let ok = postern_dial::web::renew(&web, &proxy.web_trust(), &req)
        .await
        .unwrap();
    assert!(
        ok.error.is_empty(),
        "an unlocked agent renews: {}",
        ok.error
    );
    c.admin
        .create_lock(Lock {
            agent: "web-2".into(),
            message: "decommissioned".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let refused = postern_dial::web::renew(&web, &proxy.web_trust(), &req)
        .await
        .unwrap();
    assert_eq!(refused.status, 403);
    assert!(
        refused
            .error
            .contains("agent 'web-2' is locked: decommissioned"),
        "{}",
        refused.error
    );
    // A certificate from another CA is refused too.
    let other = Pki::new("renlock");
    let (_, foreign) = other.cert(
        &other.host_ca,
        &postern_dial::mint::CertSpec::ServiceAgent {
            host_id: "web-3".into(),
            cluster: "renlock".into(),
        },
    );
    let req = RenewRequest {
        renew_cert: foreign.to_openssh().unwrap(),
        ..req
    };
    let refused = postern_dial::web::renew(&web, &proxy.web_trust(), &req)
        .await
        .unwrap();
    assert!(
        refused.error.contains("renewal refused"),
        "{}",
        refused.error
    );
    c.stop().await;
}
