//! Shared helpers: an Auth server on 127.0.0.1:0 in a temp data dir, and identities.
#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use postern_api::identity::IdentityFile;
use postern_api::proto::*;
use postern_auth::AuthConfig;
use postern_client::auth::{AuthClient, AuthClientError};
use postern_dial::mint;
use russh::keys::ssh_key::LineEnding;
use tokio_util::sync::CancellationToken;

pub mod logins;
pub mod postgres;

pub const SEED_ROLE: &str = r#"kind: role
metadata:
  name: api-role
spec:
  allow:
    rules:
      - resources: ['role']
        verbs: ['read']
  deny:
    node_labels:
      '*': '*'
version: v5
"#;

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "postern-auth-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Running {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub cluster: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), postern_auth::AuthError>>,
}

impl Running {
    pub fn admin_identity(&self) -> IdentityFile {
        IdentityFile::load(&self.data_dir.join("admin.identity")).unwrap()
    }

    pub async fn admin(&self) -> AuthClient {
        AuthClient::connect_direct(&self.addr.to_string(), &self.admin_identity())
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

pub fn config(dir: &Path, cluster: &str) -> AuthConfig {
    AuthConfig {
        cluster: Some(cluster.into()),
        data_dir: dir.join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        allow_root: true,
        ..AuthConfig::default()
    }
}

pub async fn start_with(config: AuthConfig) -> Running {
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let data_dir = config.data_dir.clone();
    let cluster = config.cluster.clone().unwrap_or_default();
    let prepared = postern_auth::server::prepare(&config).unwrap();
    let task =
        tokio::spawn(postern_auth::server::start(listener, prepared, shutdown.clone()).unwrap());
    Running {
        addr,
        data_dir,
        cluster,
        shutdown,
        task,
    }
}

pub async fn start(dir: &Path, cluster: &str) -> Running {
    start_with(config(dir, cluster)).await
}

/// Creates `user` with `roles` and signs an identity for it (TTL `ttl_secs`, 0 = the cap).
pub async fn identity_for(
    admin: &AuthClient,
    user: &str,
    roles: &[&str],
    ttl_secs: u64,
) -> IdentityFile {
    match admin
        .create_user(CreateUserRequest {
            name: user.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            secret_ttl_secs: 0,
        })
        .await
    {
        Ok(_)
        | Err(AuthClientError::Api {
            code: tonic::Code::AlreadyExists,
            ..
        }) => {}
        Err(e) => panic!("create user: {e}"),
    }
    sign(admin, user, ttl_secs).await
}

pub async fn sign(admin: &AuthClient, user: &str, ttl_secs: u64) -> IdentityFile {
    let key = mint::generate_key();
    let certs = admin
        .generate_user_certs(GenerateUserCertsRequest {
            user: user.into(),
            public_key: key.public_key().to_openssh().unwrap(),
            ttl_secs,
        })
        .await
        .unwrap();
    IdentityFile::from_certs(
        user,
        key.to_openssh(LineEnding::LF).unwrap().to_string(),
        certs,
    )
}

pub fn seed_role() -> Role {
    postern_api::resource::parse_roles(SEED_ROLE)
        .unwrap()
        .remove(0)
}

pub fn unique(tag: &str) -> String {
    format!("{tag}{}", rand::random::<u32>())
}
