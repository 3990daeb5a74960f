//! The seed's whole flow on one machine: an Auth server that dials out to a proxy, an admin who
//! creates `api-role` and `api-user` and signs its identity, and an API client that reaches the
//! Auth server only through the proxy: GetRole is allowed, UpsertRole is denied.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use postern_api::identity::IdentityFile;
use postern_api::proto::{CreateUserRequest, GenerateUserCertsRequest};
use postern_api::resource;
use postern_auth::AuthConfig;
use postern_auth::config::TunnelConfig;
use postern_client::auth::{AuthClient, AuthClientError, proxy_options};
use postern_client::{ProxyAddr, ProxySession};
use postern_dial::mint;
use postern_dial::web::WebTrust;
use postern_proxy::{Listeners, ProxyConfig};
use russh::keys::ssh_key::LineEnding;
use tokio_util::sync::CancellationToken;

use crate::{CLUSTER, step, wait_web_cert};

/// The seed's role, verbatim.
pub const API_ROLE_YAML: &str = r#"kind: role
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

/// What the client saw, and where everything is.
#[derive(Debug)]
pub struct AuthReport {
    /// `api-role` as GetRole returned it (YAML).
    pub role_yaml: String,
    /// The error UpsertRole returned.
    pub denied: String,
    /// The proxy's web address.
    pub web: std::net::SocketAddr,
    /// SHA-256 of the proxy's web certificate.
    pub web_pin: String,
    /// The proxy's tunnel address.
    pub tunnel: String,
    /// The Auth server's own address.
    pub auth_addr: std::net::SocketAddr,
    /// The Auth server's data dir (its admin identity is there).
    pub auth_dir: std::path::PathBuf,
    /// api-user's identity file.
    pub identity: std::path::PathBuf,
}

/// A running Auth demo.
pub struct AuthDemo {
    /// Stops the proxy and the Auth server.
    pub shutdown: CancellationToken,
    /// Stops only the Auth server (and its tunnel), leaving the proxy up.
    pub auth_shutdown: CancellationToken,
    /// The API client connected through the proxy.
    pub client: AuthClient,
    proxy: tokio::task::JoinHandle<Result<(), postern_proxy::ProxyError>>,
    auth: tokio::task::JoinHandle<Result<(), postern_auth::AuthError>>,
}

impl AuthDemo {
    /// Stops everything and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.auth.await??;
        self.proxy.await??;
        Ok(())
    }
}

/// Runs the flow in `dir`; leaves proxy and Auth server running.
pub async fn run(dir: &Path) -> anyhow::Result<(AuthDemo, AuthReport)> {
    let auth_dir = dir.join("auth");
    step(
        1,
        &format!(
            "creating cluster '{CLUSTER}': SSH user and host CAs and a TLS CA in {}",
            auth_dir.join("auth.db").display()
        ),
    );
    let mut auth_cfg = AuthConfig {
        cluster: Some(CLUSTER.into()),
        data_dir: auth_dir.clone(),
        listen: "127.0.0.1:0".parse()?,
        // The demo runs as whoever starts it; a real deployment runs as its own user.
        allow_root: true,
        ..AuthConfig::default()
    };
    let (host_ca, user_ca, proxy_cert) = {
        let p = postern_auth::server::prepare(&auth_cfg)?;
        let a = &p.state.authorities;
        let key = mint::generate_key();
        let cert = a.issue_host(
            key.public_key(),
            "",
            &["127.0.0.1".into(), "localhost".into()],
            86400,
        )?;
        (a.host_ca_line(), a.user_ca_line(), (key, cert.ssh_cert))
    };

    step(
        2,
        "starting the proxy at the edge; it trusts the cluster's host CA (agents) and user CA (clients)",
    );
    let proxy_dir = dir.join("proxy");
    let proxy_toml = format!(
        "data_dir = {proxy_dir:?}\n# The demo may run as root (a fresh container); a real proxy should not.\nallow_root = true\n\n[listen]\nweb = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\nops = \"127.0.0.1:0\"\n\n\
         [[clusters]]\nname = \"{CLUSTER}\"\nhost_ca = [{host_ca:?}]\nuser_ca = [{user_ca:?}]\n"
    );
    std::fs::write(dir.join("proxy.toml"), &proxy_toml)?;
    let config = ProxyConfig::from_file(&dir.join("proxy.toml"))?;
    config.validate()?;
    mint::write_key_pair(&config.host_key_path(), &proxy_cert.0)?;
    mint::write_file(
        &config.host_cert_path(),
        format!("{}\n", proxy_cert.1).as_bytes(),
        0o644,
    )?;
    let listeners = Listeners::bind(&config).await?;
    let web = listeners.web.local_addr()?;
    let shutdown = CancellationToken::new();
    let proxy = tokio::spawn(postern_proxy::run(listeners, config, shutdown.clone()));
    let web_fp = wait_web_cert(&proxy_dir.join("web.crt")).await?;
    println!("    web https://{web}  (certificate SHA-256 {web_fp})");

    step(
        3,
        "starting the Auth server: API on loopback, and a reverse tunnel OUT to the proxy",
    );
    auth_cfg.tunnel = Some(TunnelConfig {
        proxy: web.to_string(),
        host_id: "auth".into(),
        web: postern_agent::config::WebTrustConfig {
            cert_sha256: Some(web_fp.clone()),
            ..Default::default()
        },
        proxy_host_ca: Vec::new(),
        keepalive_interval_secs: 15,
    });
    let prepared = postern_auth::server::prepare(&auth_cfg)?;
    let listener = tokio::net::TcpListener::bind(auth_cfg.listen).await?;
    let auth_addr = listener.local_addr()?;
    let auth_shutdown = shutdown.child_token();
    let auth = tokio::spawn(postern_auth::server::start(
        listener,
        prepared,
        auth_shutdown.clone(),
    )?);
    println!(
        "    Auth API on {auth_addr} (mTLS, TLS 1.3); no inbound port is needed for the proxy path"
    );

    step(
        4,
        "admin (pctl --data-dir on the Auth host): create api-role, add api-user, sign its identity",
    );
    let admin_id = IdentityFile::load(&auth_dir.join("admin.identity"))?;
    let admin = AuthClient::connect_direct(&auth_addr.to_string(), &admin_id).await?;
    std::fs::write(dir.join("api-role.yaml"), API_ROLE_YAML)?;
    for role in resource::parse_roles(API_ROLE_YAML)? {
        admin.upsert_role(role).await?;
    }
    println!("    $ pctl create -f api-role.yaml            -> role 'api-role' has been created");
    let created = admin
        .create_user(CreateUserRequest {
            name: "api-user".into(),
            roles: vec!["api-role".into()],
            secret_ttl_secs: 0,
        })
        .await;
    match created {
        Ok(r) => postern_api::identity::write_private_atomic(
            &dir.join("api-user.signup"),
            r.signup_secret.as_bytes(),
        )?,
        Err(AuthClientError::Api {
            code: tonic::Code::AlreadyExists,
            ..
        }) => {}
        Err(e) => return Err(e.into()),
    }
    println!("    $ pctl users add api-user --roles=api-role -> secret in api-user.signup (0600)");
    let key = mint::generate_key();
    let certs = admin
        .generate_user_certs(GenerateUserCertsRequest {
            user: "api-user".into(),
            public_key: key.public_key().to_openssh()?,
            ttl_secs: 8 * 3600,
        })
        .await?;
    let id = IdentityFile::from_certs(
        "api-user",
        key.to_openssh(LineEnding::LF)?.to_string(),
        certs,
    );
    let id_path = dir.join("api-user.identity");
    id.save(&id_path)?;
    println!("    $ pctl auth sign --user=api-user --ttl=8h --out=api-user.identity");

    step(
        5,
        "API client: discovers the tunnel from the proxy's web address and calls the Auth API through it",
    );
    let opts = proxy_options(
        &id,
        ProxyAddr::Web {
            addr: web.to_string(),
            trust: WebTrust::Pin(web_fp.clone()),
        },
    )?;
    let session = Arc::new(ProxySession::connect(&opts).await?);
    println!(
        "    logged in to the proxy's tunnel listener {} as api-user",
        session.tunnel_addr
    );
    let mut client = None;
    let mut last = String::new();
    for _ in 0..250 {
        match AuthClient::connect_via_proxy(session.clone(), &id).await {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let client = client
        .with_context(|| format!("the Auth server's tunnel did not come up within 5 s: {last}"))?;
    let role = client.get_role("api-role").await?;
    let role_yaml = resource::roles_to_yaml(std::slice::from_ref(&role));
    println!("    GetRole(\"api-role\") -> allowed:");
    for l in role_yaml.lines() {
        println!("        {l}");
    }
    let denied = match client.upsert_role(role).await {
        Ok(_) => bail!("UpsertRole was allowed: RBAC is broken"),
        Err(e) => e.to_string(),
    };
    println!("    UpsertRole(api-role) -> {denied}");
    println!(
        "\n    The same with pctl:\n    $ pctl --proxy {web} --web-pin {web_fp} -i {} get role/api-role",
        id_path.display()
    );
    let tunnel = session.tunnel_addr.clone();
    Ok((
        AuthDemo {
            shutdown,
            auth_shutdown,
            client,
            proxy,
            auth,
        },
        AuthReport {
            role_yaml,
            denied,
            web,
            web_pin: web_fp,
            tunnel,
            auth_addr,
            auth_dir,
            identity: id_path,
        },
    ))
}
