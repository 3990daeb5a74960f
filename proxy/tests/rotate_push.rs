//! A host CA rotation reaches every holder of a host certificate without waiting for its renewal
//! schedule: at `update_clients` the proxy tells its agents (`@control` `HostCaSigner`, on SSH
//! and on QUIC) which key signs now, and each agent whose certificate has another signer renews
//! within the proxy's `renew_spread_secs`, and the Auth server re-issues its embedded agent's;
//! at `update_servers`, once agents know the new key, the proxy renews its own host certificate
//! the same way. Everything here holds hour-long (or
//! day-long) certificates, so without this nothing would renew for 40 minutes.
//!
//! After the rotation, or after a rollback from `update_clients` (everyone renews back from the
//! old key while both are trusted), a restarted proxy gets every tunnel back, the Auth server's
//! own included.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cluster::{ALL_TARGETS, Cluster};
use postern_agent::config::TransportMode;
use postern_api::proto::RotateCertAuthorityRequest;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Certificate, PublicKey};
use support::*;

/// Who holds a host certificate, in the order of [`Fleet::paths`].
const NAMES: [&str; 4] = ["QUIC agent", "SSH agent", "embedded agent", "proxy"];
/// The agents among [`NAMES`]: they move at `update_clients`.
const AGENTS: [usize; 3] = [0, 1, 2];
/// The proxy among [`NAMES`]: it moves at `update_servers`.
const PROXY: usize = 3;

fn signer_of(path: &std::path::Path) -> KeyData {
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

/// A cluster (process proxy) with one agent on QUIC and one on SSH, all on hour-long
/// certificates.
struct Fleet {
    c: Cluster,
    agents: Vec<Agent>,
    /// The certificate files of [`NAMES`].
    paths: [PathBuf; 4],
}

impl Fleet {
    async fn start(name: &str) -> Fleet {
        let c = Cluster::start_tweaked(name, 1, 60, true, |a| a.agent_cert_ttl_secs = 3600).await;
        c.role(ALL_TARGETS).await;
        let echo = echo_server().await;
        let quic = c.joining_agent("web-q", &c.agent_token(600).await, &c.ca_pin(), echo);
        let mut ssh = c.joining_agent("web-s", &c.agent_token(600).await, &c.ca_pin(), echo);
        ssh.transport.mode = TransportMode::Ssh;
        let paths = [
            quic.host_cert_path(),
            ssh.host_cert_path(),
            postern_dial::mint::cert_path(&c.auth_cfg.data_dir.join("agent_key")),
            c.proxies[0]
                .data_dir
                .path()
                .join("ssh_host_ed25519_key-cert.pub"),
        ];
        let agents = vec![start_agent(quic), start_agent(ssh)];
        let f = Fleet { c, agents, paths };
        f.streams_flow(b"before").await;
        // The Auth server's own agent is on SSH too.
        let text = scrape(f.c.proxies[0].ops).await;
        assert_eq!(f.tunnels(&text), (2.0, 1.0), "tunnels on (ssh, quic)");
        f
    }

    fn tunnels(&self, text: &str) -> (f64, f64) {
        let n = |t| {
            metric(
                text,
                "postern_tunnels_connected",
                &[("cluster", self.c.name.as_str()), ("transport", t)],
            )
        };
        (n("ssh"), n("quic"))
    }

    async fn streams_flow(&self, payload: &[u8]) {
        let session = self.c.user_session("alice", &["all-targets"], 0).await;
        for name in ["web-q", "web-s"] {
            let mut s = wait_stream(&session, name, &self.c.name, Duration::from_secs(20)).await;
            assert_eq!(echo_once(&mut s, payload).await, payload);
        }
    }

    /// Waits until the certificates `which` (indices into [`NAMES`]) are signed by `key`;
    /// returns how long each took.
    async fn signed_by(&self, which: &[usize], key: &KeyData, what: &str) -> Vec<Duration> {
        let start = Instant::now();
        let mut picked = vec![None; which.len()];
        while picked.iter().any(Option::is_none) {
            for (slot, &i) in which.iter().enumerate() {
                if picked[slot].is_none() && &signer_of(&self.paths[i]) == key {
                    picked[slot] = Some(start.elapsed());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "not every host certificate renewed from the {what} within 20 s: {:?}",
                which
                    .iter()
                    .map(|&i| NAMES[i])
                    .zip(&picked)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        picked.into_iter().map(Option::unwrap).collect()
    }

    /// SIGKILLs the proxy and waits until all three tunnels are back on the restarted one.
    async fn restart_proxy_and_reconnect(&mut self) {
        self.c.kill_and_restart_proxy(0).await;
        let start = Instant::now();
        loop {
            let (ssh, quic) = self.tunnels(&scrape(self.c.proxies[0].ops).await);
            if ssh + quic == 3.0 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "after a proxy restart, {} of 3 tunnels came back",
                ssh + quic
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.streams_flow(b"after").await;
    }

    async fn stop(self) {
        for a in self.agents {
            a.stop().await;
        }
        self.c.stop().await;
    }
}

#[tokio::test]
async fn agents_with_long_certificates_renew_from_a_rotated_host_ca_within_the_spread() {
    let mut f = Fleet::start("rpush").await;
    let old: Vec<_> = f.paths.iter().map(|p| signer_of(p)).collect();

    rotate(&f.c, "init").await;
    // The proxy reads the CAs every second; in init the old key still signs: no renewal.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (p, o) in f.paths.iter().zip(&old) {
        assert_eq!(&signer_of(p), o, "no renewal while the old key signs");
    }

    let trusted = rotate(&f.c, "update_clients").await;
    let new_key = PublicKey::from_openssh(&trusted[0]).unwrap();
    let took = f
        .signed_by(&AGENTS, new_key.key_data(), "new host CA")
        .await;
    for (i, t) in AGENTS.iter().zip(took) {
        eprintln!(
            "{}: new-CA certificate {t:?} after update_clients (ca_refresh 1 s, spread 1 s)",
            NAMES[*i]
        );
    }
    // The proxy keeps its old-key certificate until update_servers: an agent that has not
    // renewed yet still trusts it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        signer_of(&f.paths[PROXY]),
        old[PROXY],
        "the proxy moves at update_servers"
    );
    rotate(&f.c, "update_servers").await;
    let took = f
        .signed_by(&[PROXY], new_key.key_data(), "new host CA")
        .await;
    eprintln!(
        "proxy: new-CA certificate {:?} after update_servers",
        took[0]
    );

    // Completing the rotation: the old key is trusted nowhere. A proxy restart drops every
    // tunnel; all three come back on their new-CA certificates, the Auth server's own included
    // (the restarted proxy trusts the CA it cached, though its config names the old one), and
    // the agents accept the proxy's renewed host certificate.
    rotate(&f.c, "standby").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    f.restart_proxy_and_reconnect().await;
    f.stop().await;
}

#[tokio::test]
async fn a_rollback_after_update_clients_brings_everyone_back_to_the_old_key() {
    let mut f = Fleet::start("rback").await;
    let old_key = signer_of(&f.paths[0]);
    rotate(&f.c, "init").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let trusted = rotate(&f.c, "update_clients").await;
    let new_key = PublicKey::from_openssh(&trusted[0]).unwrap();
    f.signed_by(&AGENTS, new_key.key_data(), "new host CA")
        .await;

    // Rolling back: both keys stay trusted, the old one signs again, and everyone renews back.
    let trusted = rotate(&f.c, "rollback").await;
    assert_eq!(trusted.len(), 2, "both keys trusted while rolling back");
    let took = f.signed_by(&AGENTS, &old_key, "old host CA").await;
    for (i, t) in AGENTS.iter().zip(took) {
        eprintln!("{}: back on the old CA {t:?} after rollback", NAMES[*i]);
    }
    assert_eq!(signer_of(&f.paths[PROXY]), old_key, "the proxy never moved");
    f.streams_flow(b"rolling back").await;
    // A second rollback is refused, saying how to finish.
    let e =
        f.c.admin
            .rotate_cert_authority(RotateCertAuthorityRequest {
                kind: "host".into(),
                phase: "rollback".into(),
                manual: true,
                grace_period_secs: 0,
            })
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("--phase standby"), "{e}");
    // Standby drops the new key; a restarted proxy gets every tunnel back on the old one.
    let trusted = rotate(&f.c, "standby").await;
    assert_eq!(trusted.len(), 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    f.restart_proxy_and_reconnect().await;
    f.stop().await;
}
