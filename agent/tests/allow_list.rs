//! The agent dials only its configured targets: a proxy (here a hostile one) asking for any other
//! target gets the channel refused with a reason, and nothing is dialled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use postern_agent::AgentConfig;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Algorithm, LineEnding, PrivateKey};
use russh::server::{Auth, Handler, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tunnel_proto::names::{EXT_CLUSTER, EXT_ROLE};

/// A proxy that, once the agent registers, asks it for a target it never offered.
struct Hostile {
    opened: mpsc::UnboundedSender<Result<(), String>>,
}

impl Handler for Hostile {
    type Error = russh::Error;

    async fn auth_openssh_certificate(
        &mut self,
        _user: &str,
        _cert: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let handle = session.handle();
        let tx = self.opened.clone();
        tokio::spawn(async move {
            for target in ["ssh", "127.0.0.1"] {
                let r = handle
                    .channel_open_forwarded_tcpip(target, 22, "203.0.113.9", 4000)
                    .await
                    .map(|_c: Channel<Msg>| ())
                    .map_err(|e| e.to_string());
                let _ = tx.send(r);
            }
        });
        Ok(true)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host: &str,
        _port: u32,
        _oa: &str,
        _op: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(&mut self, _c: ChannelId, _s: &mut Session) -> Result<(), Self::Error> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_targets_it_does_not_serve() {
    let dir = tempfile::tempdir().unwrap();
    let host_ca = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    let agent_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut b = Builder::new_with_random_nonce(
        &mut rand::rng(),
        agent_key.public_key().key_data().clone(),
        now - 60,
        now + 600,
    )
    .unwrap();
    b.cert_type(CertType::Host).unwrap();
    b.valid_principal("h1.c1").unwrap();
    b.extension(EXT_CLUSTER, "c1").unwrap();
    b.extension(EXT_ROLE, "auth").unwrap();
    let cert = b.sign(&host_ca).unwrap();
    let key_path = dir.path().join("agent");
    std::fs::write(
        &key_path,
        agent_key.to_openssh(LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
    // Private keys must be 0600: the agent refuses one others can read.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(
        dir.path().join("agent-cert.pub"),
        cert.to_openssh().unwrap(),
    )
    .unwrap();

    // The hostile proxy presents a plain host key the agent pins.
    let proxy_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    let config = Arc::new(russh::server::Config {
        keys: vec![proxy_key.clone()],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let session = russh::server::run_stream(config, socket, Hostile { opened: tx })
            .await
            .unwrap();
        let _ = session.await;
    });

    // The agent serves only "auth", on a port where a listener would see any dial attempt.
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut targets = BTreeMap::new();
    targets.insert("auth".to_string(), service.local_addr().unwrap().into());
    let agent = AgentConfig {
        host_id: "h1".into(),
        cluster: "c1".into(),
        proxy: None,
        tunnel_addr: Some(addr.to_string()),
        web: Default::default(),
        host_key_file: key_path,
        host_cert_file: None,
        join_token_file: None,
        ca_pin: None,
        proxy_host_ca: vec![],
        proxy_host_keys: vec![proxy_key.public_key().to_openssh().unwrap()],
        targets,
        keepalive_interval_secs: 5,
        reconnect: Default::default(),
        ops_listen: None,
        transport: Default::default(),
        pool: Default::default(),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(postern_agent::run(agent, shutdown.clone()));

    for target in ["ssh", "127.0.0.1"] {
        let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the hostile proxy got an answer")
            .unwrap();
        assert!(r.is_err(), "the agent must refuse target {target}");
    }
    // Nothing was dialled on the agent's side.
    let dialled = tokio::time::timeout(Duration::from_millis(300), service.accept()).await;
    assert!(
        dialled.is_err(),
        "the agent dialled something it was not asked for by a registered target"
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}
