//! The proxy renews its own host certificate: with 6-second certificates (agents' and the
//! proxy's), three proxy renewals pass while streams flow through a joined agent, none fails, a
//! stream held open survives, and once the first certificate has expired new connections (an
//! agent's over SSH and over QUIC, a user's) are accepted, so they are shown the renewed
//! certificate.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::{ALL_TARGETS, Cluster};
use russh::keys::ssh_key::Certificate;
use support::*;

/// Lifetime of every certificate in this test, seconds.
const TTL: u64 = 6;

fn cert_of(path: &std::path::Path) -> Certificate {
    Certificate::from_openssh(std::fs::read_to_string(path).unwrap().trim()).unwrap()
}

#[tokio::test]
async fn the_proxy_renews_its_host_certificate_three_times_while_streams_flow() {
    let c = Cluster::start_full(
        "prenew",
        1,
        60,
        false,
        |a| a.agent_cert_ttl_secs = TTL,
        (TTL, 3600),
    )
    .await;
    c.role(ALL_TARGETS).await;
    let echo = echo_server().await;
    let session = c.user_session("alice", &["all-targets"], 0).await;
    let cfg = c.joining_agent("web-1", &c.agent_token(600).await, &c.ca_pin(), echo);
    let agent = start_agent(cfg.clone());
    let mut held = wait_stream(&session, "web-1", "prenew", Duration::from_secs(20)).await;
    // The harness keeps the proxy's host key and certificate in its data dir (the defaults).
    let proxy_cert = c.proxies[0]
        .data_dir
        .path()
        .join("ssh_host_ed25519_key-cert.pub");
    let first = cert_of(&proxy_cert);
    let mut seen = vec![first.valid_before()];
    let (mut ok, mut failed) = (0u32, 0u32);
    let deadline = Instant::now() + Duration::from_secs(40);
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 proxy renewals in 40 s (expiries seen: {seen:?})"
        );
        match session.open("web-1", "prenew", 0).await {
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
        let now = cert_of(&proxy_cert);
        if now.valid_before() != *seen.last().unwrap() {
            assert_eq!(now.public_key(), first.public_key(), "same host key");
            assert_eq!(
                now.valid_principals(),
                first.valid_principals(),
                "same names"
            );
            seen.push(now.valid_before());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(echo_once(&mut held, b"still open").await, b"still open");
    eprintln!("3 proxy renewals (expiries {seen:?}): {ok} streams, {failed} failed");
    assert_eq!(failed, 0, "no stream fails during the proxy's renewals");
    assert!(ok > 10);
    // The first certificate has expired: a new agent connection and a new user session verify
    // the proxy, so they can only have been shown a renewed one.
    assert!(postern_dial::mint::now_unix() >= first.valid_before());
    agent.stop().await;
    let again = start_agent(cfg.clone());
    let fresh = c.user_session("bob", &["all-targets"], 0).await;
    let mut s = wait_stream(&fresh, "web-1", "prenew", Duration::from_secs(20)).await;
    assert_eq!(echo_once(&mut s, b"reconnected").await, b"reconnected");
    again.stop().await;
    // Over QUIC too: the proxy's proof shows the renewed certificate.
    let mut quic = cfg.clone();
    quic.transport.mode = postern_agent::config::TransportMode::Quic;
    let over_quic = start_agent(quic);
    let mut s = wait_stream(&fresh, "web-1", "prenew", Duration::from_secs(20)).await;
    assert_eq!(echo_once(&mut s, b"over quic").await, b"over quic");
    let m = scrape(c.proxies[0].ops).await;
    let quic_tunnels = metric(
        &m,
        "postern_tunnels_connected",
        &[("cluster", "prenew"), ("transport", "quic")],
    );
    assert!(
        quic_tunnels >= 1.0,
        "the agent is connected over QUIC: {quic_tunnels}"
    );
    over_quic.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn a_proxy_certificate_from_another_ca_is_not_renewed() {
    let c = Cluster::start("prforeign", 1, 60).await;
    let other = Pki::new("prforeign");
    let (_, foreign) = other.cert(
        &other.host_ca,
        &postern_dial::mint::CertSpec::Proxy {
            principals: vec!["127.0.0.1".into()],
        },
    );
    let proxy = &c.proxies[0];
    let req = tunnel_proto::join::RenewRequest {
        cluster: "prforeign".into(),
        renew_cert: foreign.to_openssh().unwrap(),
        source: None,
        ..Default::default()
    };
    let refused = postern_dial::web::renew(&proxy.web.to_string(), &proxy.web_trust(), &req)
        .await
        .unwrap();
    assert_eq!(refused.status, 403, "{}", refused.error);
    assert!(
        refused
            .error
            .contains("renewal refused: certificate signed by an untrusted CA")
            && refused.error.contains("pctl auth sign --proxy-names"),
        "{}",
        refused.error
    );
    c.stop().await;
}
