//! The agent's private key: one readable by others is refused (as the proxy and the Auth server
//! do, through the same check), and an unreadable one gets a message naming the file.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use postern_agent::AgentConfig;
use russh::keys::ssh_key::{Algorithm, LineEnding, PrivateKey};
use tokio_util::sync::CancellationToken;

fn config(key_path: std::path::PathBuf) -> AgentConfig {
    AgentConfig {
        host_id: "h1".into(),
        cluster: "c1".into(),
        proxy: None,
        tunnel_addr: Some("127.0.0.1:9".into()),
        web: Default::default(),
        host_key_file: key_path,
        host_cert_file: None,
        join_token_file: None,
        ca_pin: None,
        proxy_host_ca: vec![],
        proxy_host_keys: vec![
            PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
                .unwrap()
                .public_key()
                .to_openssh()
                .unwrap(),
        ],
        targets: BTreeMap::from([(
            "auth".to_string(),
            "127.0.0.1:9"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )]),
        keepalive_interval_secs: 5,
        reconnect: Default::default(),
        ops_listen: None,
        transport: Default::default(),
        pool: Default::default(),
    }
}

async fn run_err(cfg: AgentConfig) -> String {
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        postern_agent::run(cfg, CancellationToken::new()),
    )
    .await
    .expect("the agent gives up at once on a bad key");
    r.expect_err("the agent must refuse the key").to_string()
}

#[tokio::test]
async fn a_world_readable_key_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("agent");
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    std::fs::write(
        &key_path,
        key.to_openssh(LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = run_err(config(key_path.clone())).await;
    assert!(
        e.contains(&key_path.display().to_string())
            && e.contains("readable by other users")
            && e.contains("chmod 600"),
        "{e}"
    );
}

#[tokio::test]
async fn an_unreadable_or_garbage_key_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the key should be: unreadable as a file, even for root.
    let key_path = dir.path().join("agent");
    std::fs::create_dir(&key_path).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o700)).unwrap();
    let e = run_err(config(key_path.clone())).await;
    assert!(e.contains("cannot read private key"), "{e}");
    assert!(!e.contains("cannot mint certificate"), "{e}");

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "not a key\n").unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = run_err(config(garbage)).await;
    assert!(e.contains("is not an OpenSSH private key"), "{e}");
}
