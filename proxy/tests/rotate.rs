//! Host CA rotation while streams flow: the phases are moved by hand (`pctl auth rotate --manual
//! --phase=…`, here its RPC), the Auth server is restarted mid-rotation and resumes its phase,
//! the agent picks up a certificate from the new CA by renewing, no stream fails, and after the
//! rotation a certificate from the old CA is refused by the proxy (`untrusted_ca`) and by the
//! Auth server's renewal.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::{ALL_TARGETS, Cluster};
use postern_api::proto::{
    CaRotation, GenerateHostCertsRequest, ListCaRotationsRequest, RotateCertAuthorityRequest,
};
use russh::keys::ssh_key::{Certificate, PublicKey};
use support::*;
use tunnel_proto::join::RenewRequest;

/// Lifetime of the agents' certificates in this test, seconds (renewal every ~4 s).
const TTL: u64 = 6;

fn cert_of(path: &std::path::Path) -> Certificate {
    Certificate::from_openssh(std::fs::read_to_string(path).unwrap().trim()).unwrap()
}

async fn rotate(c: &Cluster, phase: &str) -> CaRotation {
    c.admin
        .rotate_cert_authority(RotateCertAuthorityRequest {
            kind: "host".into(),
            phase: phase.into(),
            manual: true,
            grace_period_secs: 0,
        })
        .await
        .unwrap()
}

async fn host_rotation(c: &Cluster) -> CaRotation {
    let all = c
        .admin
        .list_ca_rotations(ListCaRotationsRequest {})
        .await
        .unwrap();
    all.rotations
        .into_iter()
        .find(|r| r.kind == "host")
        .unwrap()
}

/// Streams opened and echoed one after another, counted.
#[derive(Default, Debug)]
struct Tally {
    ok: u32,
    failed: u32,
}

/// Opens streams to `web-1` for `d`, counting them.
async fn flow(session: &postern_client::ProxySession, d: Duration, t: &mut Tally) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        match session.open("web-1", "rotate", 0).await {
            Ok(mut s) => {
                if echo_once(&mut s, b"rotating").await == b"rotating" {
                    t.ok += 1;
                } else {
                    t.failed += 1;
                }
            }
            Err(e) => {
                eprintln!("stream failed: {e}");
                t.failed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Streams flow until the agent's certificate is signed by `key`; returns how long it took.
async fn flow_until_signed_by(
    session: &postern_client::ProxySession,
    path: &std::path::Path,
    key: &PublicKey,
    t: &mut Tally,
) -> Duration {
    let start = Instant::now();
    while cert_of(path).signature_key() != key.key_data() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent did not renew from the new CA within 30 s"
        );
        flow(session, Duration::from_millis(200), t).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn the_host_ca_rotates_while_streams_flow_and_old_certificates_are_refused_after() {
    let mut c =
        Cluster::start_tweaked("rotate", 1, 60, false, |a| a.agent_cert_ttl_secs = TTL).await;
    c.role(ALL_TARGETS).await;
    let echo = echo_server().await;
    let session = c.user_session("alice", &["all-targets"], 0).await;
    let cfg = c.joining_agent("web-1", &c.agent_token(600).await, &c.ca_pin(), echo);
    let cert_path = cfg.host_cert_path();
    let agent = start_agent(cfg.clone());
    let mut held = wait_stream(&session, "web-1", "rotate", Duration::from_secs(20)).await;
    let old_cert = std::fs::read_to_string(&cert_path).unwrap();
    let mut t = Tally::default();
    // An agent certificate from the old CA, valid for an hour: refused once the rotation is over.
    let stale_key = postern_dial::mint::generate_key();
    let stale_cert = c
        .admin
        .generate_host_certs(GenerateHostCertsRequest {
            host_id: "web-2".into(),
            public_key: stale_key.public_key().to_openssh().unwrap(),
            ttl_secs: 3600,
            proxy_principals: Vec::new(),
        })
        .await
        .unwrap()
        .ssh_cert;

    // Bad orders are refused, saying why.
    let e = c
        .admin
        .rotate_cert_authority(RotateCertAuthorityRequest {
            kind: "host".into(),
            phase: "update_servers".into(),
            manual: true,
            grace_period_secs: 0,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("the next phase is init"), "{e}");

    // init: the new key is trusted everywhere, the old one still signs.
    let r = rotate(&c, "init").await;
    assert_eq!((r.phase.as_str(), r.trusted.len()), ("init", 2), "{r:?}");
    assert_eq!(r.trusted[0].trim(), c.host_ca.trim(), "the old key signs");
    let new_key = PublicKey::from_openssh(&r.trusted[1]).unwrap();
    // The proxy reads the CAs every second (ca_refresh_secs = 1): give it three.
    flow(&session, Duration::from_secs(3), &mut t).await;

    // update_clients: renewals come from the new key.
    let r = rotate(&c, "update_clients").await;
    assert_eq!(r.trusted[0].trim(), new_key.to_openssh().unwrap().trim());
    let pickup = flow_until_signed_by(&session, &cert_path, &new_key, &mut t).await;
    eprintln!("the agent picked up a certificate from the new host CA in {pickup:?}");

    // An Auth restart mid-rotation resumes the phase, with the same new key.
    c.stop_auth().await;
    flow(&session, Duration::from_millis(500), &mut t).await;
    c.restart_auth().await;
    let r = host_rotation(&c).await;
    assert_eq!(
        r.phase, "update_clients",
        "resumed after the restart: {r:?}"
    );
    assert_eq!(r.trusted.len(), 2);
    assert_eq!(r.trusted[0].trim(), new_key.to_openssh().unwrap().trim());
    // The agent keeps renewing from the new key after the restart.
    let before = cert_of(&cert_path).valid_before();
    let start = Instant::now();
    while cert_of(&cert_path).valid_before() == before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no renewal after the Auth restart"
        );
        flow(&session, Duration::from_millis(200), &mut t).await;
    }
    assert_eq!(cert_of(&cert_path).signature_key(), new_key.key_data());

    // update_servers, then standby: the old key is dropped.
    rotate(&c, "update_servers").await;
    flow(&session, Duration::from_secs(1), &mut t).await;
    let r = rotate(&c, "standby").await;
    assert_eq!((r.phase.as_str(), r.trusted.len()), ("standby", 1), "{r:?}");
    assert_eq!(r.trusted[0].trim(), new_key.to_openssh().unwrap().trim());
    flow(&session, Duration::from_secs(3), &mut t).await;
    assert_eq!(echo_once(&mut held, b"still open").await, b"still open");
    eprintln!("streams during the rotation: {t:?}");
    assert_eq!(t.failed, 0, "no stream fails during the rotation");
    assert!(t.ok > 20, "{t:?}");

    // After the rotation an old-CA certificate is refused: by the Auth server's renewal...
    let proxy = &c.proxies[0];
    let req = RenewRequest {
        cluster: "rotate".into(),
        renew_cert: old_cert.trim().into(),
        source: None,
        ..Default::default()
    };
    let refused = postern_dial::web::renew(&proxy.web.to_string(), &proxy.web_trust(), &req)
        .await
        .unwrap();
    assert_eq!(refused.status, 403, "{}", refused.error);
    assert!(
        refused.error.contains("renewal refused") && refused.error.contains("untrusted CA"),
        "{}",
        refused.error
    );
    // ... and by the proxy at login (reason `untrusted_ca`): an agent with an old-CA
    // certificate that has not expired.
    let req = RenewRequest {
        renew_cert: stale_cert.trim().into(),
        ..req
    };
    let refused = postern_dial::web::renew(&proxy.web.to_string(), &proxy.web_trust(), &req)
        .await
        .unwrap();
    assert!(refused.error.contains("untrusted CA"), "{}", refused.error);
    let path = c.dir.path().join("agent-web-2");
    postern_dial::mint::write_key_pair(&path, &stale_key).unwrap();
    let cert_file = postern_dial::mint::cert_path(&path);
    postern_dial::mint::write_file(&cert_file, format!("{stale_cert}\n").as_bytes(), 0o600)
        .unwrap();
    let mut old_cfg = cluster::agent_cfg(
        "rotate",
        "web-2",
        proxy,
        &c.host_ca,
        path,
        [("web-2", echo, &[][..])],
    );
    // The proxy's own certificate is from the new key by now (it renewed at update_servers):
    // this agent trusts it as a renewed agent would, so that the refusal seen is the proxy's,
    // of the agent's old-CA certificate.
    old_cfg
        .proxy_host_ca
        .push(new_key.to_openssh().unwrap().trim().to_string());
    let untrusted = || async {
        metric(
            &scrape(proxy.ops).await,
            "postern_auth_failures_total",
            &[("reason", "untrusted_ca")],
        )
    };
    let before = untrusted().await;
    let stale = start_agent(old_cfg);
    let start = Instant::now();
    while untrusted().await <= before {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the proxy did not refuse the old-CA certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stale.stop().await;
    // A new connection with the renewed (new-CA) certificate is accepted.
    agent.stop().await;
    let again = start_agent(cfg);
    let mut s = wait_stream(&session, "web-1", "rotate", Duration::from_secs(20)).await;
    assert_eq!(echo_once(&mut s, b"reconnected").await, b"reconnected");
    again.stop().await;
    c.stop().await;
}
