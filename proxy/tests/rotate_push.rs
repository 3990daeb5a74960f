//! A host CA rotation reaches every holder of a host certificate without waiting for its renewal
//! schedule: at `update_clients` the proxy tells its agents (`@control` `HostCaSigner`, on SSH
//! and on QUIC) which key signs now, and each agent whose certificate has another signer renews
//! within the proxy's `renew_spread_secs`; the proxy renews its own host certificate the same
//! way, and the Auth server re-issues its embedded agent's. Everything here holds hour-long (or
//! day-long) certificates, so without this nothing would renew for 40 minutes. After the
//! rotation a restarted proxy gets every tunnel back, the Auth server's own included.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::{ALL_TARGETS, Cluster};
use postern_agent::config::TransportMode;
use postern_api::proto::RotateCertAuthorityRequest;
use russh::keys::ssh_key::{Certificate, PublicKey};
use support::*;

fn signer_of(path: &std::path::Path) -> russh::keys::ssh_key::public::KeyData {
    Certificate::from_openssh(std::fs::read_to_string(path).unwrap().trim())
        .unwrap()
        .signature_key()
        .clone()
}

async fn rotate(c: &Cluster, phase: &str) -> Vec<String> {
    c.admin
        .rotate_cert_authority(RotateCertAuthorityRequest {
            kind: "host".into(),
            phase: phase.into(),
            manual: true,
            grace_period_secs: 0,
        })
        .await
        .unwrap()
        .trusted
}

#[tokio::test]
async fn agents_with_long_certificates_renew_from_a_rotated_host_ca_within_the_spread() {
    let mut c =
        Cluster::start_tweaked("rpush", 1, 60, true, |a| a.agent_cert_ttl_secs = 3600).await;
    c.role(ALL_TARGETS).await;
    let echo = echo_server().await;
    let session = c.user_session("alice", &["all-targets"], 0).await;
    // One agent on QUIC (the default when the proxy offers it), one on SSH.
    let quic = c.joining_agent("web-q", &c.agent_token(600).await, &c.ca_pin(), echo);
    let mut ssh = c.joining_agent("web-s", &c.agent_token(600).await, &c.ca_pin(), echo);
    ssh.transport.mode = TransportMode::Ssh;
    let embedded = postern_dial::mint::cert_path(&c.auth_cfg.data_dir.join("agent_key"));
    let proxy_cert = c.proxies[0]
        .data_dir
        .path()
        .join("ssh_host_ed25519_key-cert.pub");
    let paths = [
        quic.host_cert_path(),
        ssh.host_cert_path(),
        embedded,
        proxy_cert,
    ];
    let names = ["QUIC agent", "SSH agent", "embedded agent", "proxy"];
    let agents = [start_agent(quic), start_agent(ssh)];
    for name in ["web-q", "web-s"] {
        let mut s = wait_stream(&session, name, "rpush", Duration::from_secs(20)).await;
        assert_eq!(echo_once(&mut s, b"before").await, b"before");
    }
    let ops = c.proxies[0].ops;
    let text = scrape(ops).await;
    // The Auth server's own agent is on SSH too.
    for (transport, n) in [("ssh", 2.0), ("quic", 1.0)] {
        assert_eq!(
            metric(
                &text,
                "postern_tunnels_connected",
                &[("cluster", "rpush"), ("transport", transport)]
            ),
            n,
            "tunnels on {transport}"
        );
    }
    let old: Vec<_> = paths.iter().map(|p| signer_of(p)).collect();

    rotate(&c, "init").await;
    // The proxy reads the CAs every second; in init the old key still signs: no renewal.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (p, o) in paths.iter().zip(&old) {
        assert_eq!(&signer_of(p), o, "no renewal while the old key signs");
    }

    let trusted = rotate(&c, "update_clients").await;
    let new_key = PublicKey::from_openssh(&trusted[0]).unwrap();
    let start = Instant::now();
    let mut picked = [None; 4];
    while picked.iter().any(Option::is_none) {
        for (i, p) in paths.iter().enumerate() {
            if picked[i].is_none() && &signer_of(p) == new_key.key_data() {
                picked[i] = Some(start.elapsed());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not every host certificate renewed from the new host CA within 20 s: {:?}",
            names.iter().zip(&picked).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (n, t) in names.iter().zip(&picked) {
        eprintln!(
            "{n}: new-CA certificate {:?} after update_clients (ca_refresh 1 s, spread 1 s)",
            t.unwrap()
        );
    }

    // Completing the rotation: the old key is trusted nowhere. A proxy restart drops every
    // tunnel; all three come back on their new-CA certificates, the Auth server's own included,
    // and the agents accept the proxy's renewed host certificate.
    rotate(&c, "update_servers").await;
    rotate(&c, "standby").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.kill_and_restart_proxy(0).await;
    let ops = c.proxies[0].ops;
    let start = Instant::now();
    loop {
        let text = scrape(ops).await;
        let n: f64 = ["ssh", "quic"]
            .iter()
            .map(|t| {
                metric(
                    &text,
                    "postern_tunnels_connected",
                    &[("cluster", "rpush"), ("transport", t)],
                )
            })
            .sum();
        if n == 3.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "after the rotation and a proxy restart, {n} of 3 tunnels came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let session = c.user_session("alice", &["all-targets"], 0).await;
    for name in ["web-q", "web-s"] {
        let mut s = wait_stream(&session, name, "rpush", Duration::from_secs(20)).await;
        assert_eq!(echo_once(&mut s, b"after").await, b"after");
    }
    for a in agents {
        a.stop().await;
    }
    c.stop().await;
}
