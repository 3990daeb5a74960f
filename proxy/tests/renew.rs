//! Certificates renew themselves: an agent that joined with a token renews its host certificate
//! at two-thirds of its life through the proxy (`POST /webapi/renew`), while streams flow, with
//! no stream failing; the renewed certificate is what the next connection uses; a locked agent's
//! renewal is refused.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::{ALL_TARGETS, Cluster};
use postern_api::proto::Lock;
use russh::keys::ssh_key::Certificate;
use support::*;
use tunnel_proto::join::RenewRequest;

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

/// A fleet behind one address (a NAT, a balancer without PROXY protocol) renews at once, as
/// after a CA rotation: renewals with a trusted, unexpired certificate count per certificate
/// key, not against the address's login budget; one certificate cannot flood the Auth server;
/// a renewal whose certificate the proxy cannot verify still counts against the address.
#[tokio::test]
async fn a_fleet_behind_one_address_renews_at_once_and_one_certificate_cannot_flood() {
    use postern_api::proto::GenerateHostCertsRequest;
    let c = Cluster::start("rlimit", 1, 60).await;
    let proxy = &c.proxies[0];
    let renew = |cert: String| {
        let req = RenewRequest {
            cluster: "rlimit".into(),
            renew_cert: cert,
            ..Default::default()
        };
        async move {
            postern_dial::web::renew(&proxy.web.to_string(), &proxy.web_trust(), &req)
                .await
                .unwrap()
        }
    };
    let fleet = postern_proxy::login::PER_SOURCE_PER_MINUTE as usize + 10;
    let mut certs = Vec::new();
    for i in 0..fleet {
        let key = postern_dial::mint::generate_key();
        let cert = c
            .admin
            .generate_host_certs(GenerateHostCertsRequest {
                host_id: format!("n{i}"),
                public_key: key.public_key().to_openssh().unwrap(),
                ttl_secs: 3600,
                proxy_principals: Vec::new(),
            })
            .await
            .unwrap()
            .ssh_cert;
        certs.push(cert);
    }
    for (i, cert) in certs.iter().enumerate() {
        let r = renew(cert.clone()).await;
        assert!(
            r.error.is_empty() && !r.ssh_cert.is_empty(),
            "renewal {i} of {fleet} from one address: {} {}",
            r.status,
            r.error
        );
    }
    // One certificate: its own budget, then 429 naming it.
    let mut refused = None;
    for i in 0..=postern_proxy::login::PER_CERT_PER_MINUTE {
        let r = renew(certs[0].clone()).await;
        if r.status == 429 {
            refused = Some((i, r.error));
            break;
        }
    }
    let (i, e) = refused.expect("one certificate renewing in a loop is refused");
    assert!(e.contains("for this certificate"), "{e}");
    assert!(i < postern_proxy::login::PER_CERT_PER_MINUTE, "after {i}");
    // A certificate the proxy cannot verify counts against the address: its budget is whole
    // (the fleet's renewals did not spend it), then 429.
    let mut refused = None;
    for i in 0..=postern_proxy::login::PER_SOURCE_PER_MINUTE {
        let r = renew("ssh-ed25519-cert-v01@openssh.com AAAA not a certificate".into()).await;
        if r.status == 429 {
            refused = Some((i, r.error));
            break;
        }
    }
    let (i, e) = refused.expect("unverifiable renewals are limited per address");
    assert!(e.contains("from this address"), "{e}");
    assert!(
        i + 2 >= postern_proxy::login::PER_SOURCE_PER_MINUTE,
        "the address's budget was spent by the fleet: refused after {i}"
    );
    c.stop().await;
}
