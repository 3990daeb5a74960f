//! A whole cluster for policy tests (included by those tests only: `#[path]`, since the agent's
//! tests include `support/mod.rs` too and do not link the Auth server): a real Auth server (its embedded agent dials out to the first
//! proxy; an `auth`-role agent serves the API to each further proxy), N proxies whose policy
//! source is `auth` with the preset `proxy` identity, and helpers for users and service agents.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use postern_agent::AgentConfig;
use postern_agent::config::{Target, TransportMode};
use postern_api::identity::IdentityFile;
use postern_api::proto::*;
use postern_auth::AuthConfig;
use postern_auth::config::TunnelConfig;
use postern_client::auth::{AuthClient, proxy_options};
use postern_client::{ProxyAddr, ProxySession};
use postern_proxy::config::{ClusterConfig, PolicyConfig, PolicySource};
use postern_proxy::mint;
use russh::keys::ssh_key::LineEnding;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// A target an agent serves: name, address, labels.
pub type TargetSpec<'a> = (&'a str, SocketAddr, &'a [(&'a str, &'a str)]);

/// A running cluster.
pub struct Cluster {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub auth_cfg: AuthConfig,
    pub auth_addr: SocketAddr,
    pub auth_stop: CancellationToken,
    pub auth_task: JoinHandle<Result<(), postern_auth::AuthError>>,
    pub admin: AuthClient,
    pub proxies: Vec<Proxy>,
    pub host_ca: String,
    /// Extra `auth`-role agents (one per proxy after the first).
    pub auth_agents: Vec<Agent>,
    /// For proxies run as `postern-proxy` processes: the child, killed with SIGKILL on demand.
    pub children: Vec<Option<tokio::process::Child>>,
    /// Each proxy's config file (process mode).
    pub config_files: Vec<PathBuf>,
}

/// A free loopback port (bound, then released).
/// A role that reaches every target of the cluster.
pub const ALL_TARGETS: &str = "kind: role
metadata: {name: all-targets}
spec:
  allow:
    node_labels: {'*': '*'}
version: v7
";

pub use crate::support::free_port;

/// Writes `config` as `proxy.toml` in its data dir and runs the real binary on it. `extra` is
/// appended (whole tables: `[public]`, `[peers]`, …); `proxy_id` is written when set.
pub async fn spawn_proxy_process(
    config: &postern_proxy::ProxyConfig,
    data_dir: tempfile::TempDir,
    extra: &str,
) -> (Proxy, tokio::process::Child, PathBuf) {
    let c = &config.clusters[0];
    let id = match &config.proxy_id {
        Some(id) => format!("proxy_id = {id:?}\n"),
        None => String::new(),
    };
    let toml = format!(
        "{id}data_dir = {:?}\nallow_root = true\n[listen]\nweb = \"{}\"\ntunnel = \"{}\"\nops = \"{}\"\n[shutdown]\ngrace_secs = 2\nunready_secs = {}\n\
         [[clusters]]\nname = \"{}\"\nhost_ca = [{:?}]\nuser_ca = [{:?}]\n[clusters.policy]\nsource = \"auth\"\n\
         identity_file = {:?}\nstale_after_secs = {}\nca_refresh_secs = {}\nrenew_spread_secs = {}\n",
        config.data_dir,
        config.listen.web,
        config.listen.tunnel,
        config.listen.ops,
        config.shutdown.unready_secs,
        c.name,
        c.host_ca[0],
        c.user_ca[0],
        c.policy.identity_file.as_ref().unwrap(),
        c.policy.stale_after_secs,
        c.policy.ca_refresh_secs,
        c.policy.renew_spread_secs,
    ) + extra;
    let path = config.data_dir.join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let child = run_proxy_process(&path);
    let proxy = wait_proxy_process(config, data_dir).await;
    (proxy, child, path)
}

pub fn run_proxy_process(config_file: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_postern-proxy"))
        .arg("--config")
        .arg(config_file)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

pub async fn wait_proxy_process(
    config: &postern_proxy::ProxyConfig,
    data_dir: tempfile::TempDir,
) -> Proxy {
    let crt = config.data_dir.join("web.crt");
    let mut web_fp = String::new();
    for _ in 0..1000 {
        if let Ok(pem) = std::fs::read(&crt) {
            use rustls_pki_types::pem::PemObject;
            if let Ok(der) = rustls_pki_types::CertificateDer::from_pem_slice(&pem)
                && tokio::net::TcpStream::connect(config.listen.ops)
                    .await
                    .is_ok()
            {
                web_fp = postern_dial::web::cert_fingerprint(&der);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!web_fp.is_empty(), "postern-proxy did not come up");
    Proxy {
        web: config.listen.web,
        tunnel: config.listen.tunnel,
        ops: config.listen.ops,
        web_fp,
        data_dir,
        shutdown: CancellationToken::new(),
        task: tokio::spawn(async { Ok(()) }),
    }
}

pub fn auth_config(dir: &std::path::Path, name: &str) -> AuthConfig {
    AuthConfig {
        cluster: Some(name.into()),
        data_dir: dir.join("auth"),
        listen: "127.0.0.1:0".parse().unwrap(),
        allow_root: true,
        ..AuthConfig::default()
    }
}

pub async fn serve_auth(
    cfg: &AuthConfig,
) -> (
    SocketAddr,
    CancellationToken,
    JoinHandle<Result<(), postern_auth::AuthError>>,
) {
    let prepared = postern_auth::server::prepare(cfg).unwrap();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    // `start` writes the admin identity before it returns (after the bind), then serves.
    let serving = postern_auth::server::start(listener, prepared, stop.clone()).unwrap();
    let task = tokio::spawn(serving);
    (addr, stop, task)
}

impl Cluster {
    /// Starts the Auth server, `proxies` proxies (policy `auth`, stale bound `stale_after_secs`)
    /// and the proxy identity; returns once every proxy has loaded the policy.
    pub async fn start(name: &str, proxies: usize, stale_after_secs: u64) -> Cluster {
        Cluster::start_with(name, proxies, stale_after_secs, false).await
    }

    /// As [`Cluster::start`]; with `process`, each proxy is a `postern-proxy` process.
    pub async fn start_with(
        name: &str,
        proxies: usize,
        stale_after_secs: u64,
        process: bool,
    ) -> Cluster {
        Cluster::start_tweaked(name, proxies, stale_after_secs, process, |_| {}).await
    }

    /// As [`Cluster::start_with`], with `tweak` applied to the Auth server's config first.
    pub async fn start_tweaked(
        name: &str,
        proxies: usize,
        stale_after_secs: u64,
        process: bool,
        tweak: impl FnOnce(&mut AuthConfig),
    ) -> Cluster {
        Self::start_full(
            name,
            proxies,
            stale_after_secs,
            process,
            tweak,
            (86400, 3600),
        )
        .await
    }

    /// As [`Cluster::start_tweaked`], with the proxies' host certificates valid
    /// `proxy_cert_ttl` seconds and their Auth identity `identity_ttl` seconds (they renew both
    /// at two-thirds of it).
    pub async fn start_full(
        name: &str,
        proxies: usize,
        stale_after_secs: u64,
        process: bool,
        tweak: impl FnOnce(&mut AuthConfig),
        (proxy_cert_ttl, identity_ttl): (u64, u64),
    ) -> Cluster {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let mut auth_cfg = auth_config(dir.path(), name);
        tweak(&mut auth_cfg);
        let (host_ca, user_ca, issuer) = {
            let p = postern_auth::server::prepare(&auth_cfg).unwrap();
            let a = &p.state.authorities;
            (
                a.host_ca_line(),
                a.user_ca_line(),
                p.state.authorities.clone(),
            )
        };
        let mut started = Vec::new();
        let mut children = Vec::new();
        let mut config_files = Vec::new();
        for i in 0..proxies {
            let data_dir = tempfile::tempdir().unwrap();
            let mut config = proxy_config(&[], data_dir.path());
            config.clusters = vec![ClusterConfig {
                name: name.into(),
                host_ca: vec![host_ca.clone()],
                user_ca: vec![user_ca.clone()],
                policy: PolicyConfig {
                    source: PolicySource::Auth,
                    identity_file: Some(dir.path().join(format!("proxy-{i}.identity"))),
                    stale_after_secs,
                    // CA rotations reach the proxies within a second, and their agents within
                    // another.
                    ca_refresh_secs: 1,
                    renew_spread_secs: 1,
                },
            }];
            let key = mint::generate_key();
            let cert = issuer
                .issue_host(
                    key.public_key(),
                    "",
                    &["127.0.0.1".into(), "localhost".into()],
                    proxy_cert_ttl,
                )
                .unwrap();
            mint::write_key_pair(&config.host_key_path(), &key).unwrap();
            mint::write_file(
                &config.host_cert_path(),
                format!("{}\n", cert.ssh_cert).as_bytes(),
                0o644,
            )
            .unwrap();
            if process {
                for (field, port) in [
                    (&mut config.listen.web, free_port()),
                    (&mut config.listen.tunnel, free_port()),
                    (&mut config.listen.ops, free_port()),
                ] {
                    *field = ([127, 0, 0, 1], port).into();
                }
                let (p, child, file) = spawn_proxy_process(&config, data_dir, "").await;
                started.push(p);
                children.push(Some(child));
                config_files.push(file);
            } else {
                started.push(start_proxy_with(config, data_dir).await);
                children.push(None);
            }
        }
        auth_cfg.tunnel = Some(TunnelConfig {
            proxy: started[0].web.to_string(),
            host_id: "auth".into(),
            web: postern_agent::config::WebTrustConfig {
                cert_sha256: Some(started[0].web_fp.clone()),
                ..Default::default()
            },
            proxy_host_ca: Vec::new(),
            keepalive_interval_secs: 15,
        });
        let (auth_addr, auth_stop, auth_task) = serve_auth(&auth_cfg).await;
        let admin_id = IdentityFile::load(&auth_cfg.data_dir.join("admin.identity")).unwrap();
        let admin = AuthClient::connect_direct(&auth_addr.to_string(), &admin_id)
            .await
            .unwrap();
        // Further proxies reach the Auth server through an `auth`-role agent of their own.
        let mut auth_agents = Vec::new();
        for (i, p) in started.iter().enumerate().skip(1) {
            let key = mint::generate_key();
            let host_id = format!("auth-{i}");
            let cert = issuer
                .issue_host(key.public_key(), &host_id, &[], 86400)
                .unwrap();
            let path = dir.path().join(format!("agent-{host_id}"));
            mint::write_key_pair(&path, &key).unwrap();
            mint::write_file(
                &mint::cert_path(&path),
                format!("{}\n", cert.ssh_cert).as_bytes(),
                0o644,
            )
            .unwrap();
            let cfg = agent_cfg(
                name,
                &host_id,
                p,
                &host_ca,
                path,
                [("auth", auth_addr, &[][..])],
            );
            auth_agents.push(start_agent(cfg));
        }
        let c = Cluster {
            name: name.into(),
            dir,
            auth_cfg,
            auth_addr,
            auth_stop,
            auth_task,
            admin,
            proxies: started,
            host_ca,
            auth_agents,
            children,
            config_files,
        };
        c.admin
            .create_user(CreateUserRequest {
                name: "proxy-1".into(),
                roles: vec!["proxy".into()],
                secret_ttl_secs: 0,
            })
            .await
            .unwrap();
        let id = c.identity_ttl("proxy-1", identity_ttl).await;
        for i in 0..c.proxies.len() {
            id.save(&c.dir.path().join(format!("proxy-{i}.identity")))
                .unwrap();
        }
        c
    }

    /// Signs an identity for an existing user.
    pub async fn identity(&self, user: &str) -> IdentityFile {
        self.identity_ttl(user, 3600).await
    }

    /// Signs an identity valid `ttl` seconds for an existing user.
    pub async fn identity_ttl(&self, user: &str, ttl: u64) -> IdentityFile {
        let key = mint::generate_key();
        let certs = self
            .admin
            .generate_user_certs(GenerateUserCertsRequest {
                user: user.into(),
                public_key: key.public_key().to_openssh().unwrap(),
                ttl_secs: ttl,
            })
            .await
            .unwrap();
        IdentityFile::from_certs(
            user,
            key.to_openssh(LineEnding::LF).unwrap().to_string(),
            certs,
        )
    }

    /// Creates `user` with `roles` and logs it in to proxy `i`.
    pub async fn user_session(&self, user: &str, roles: &[&str], i: usize) -> ProxySession {
        let _ = self
            .admin
            .create_user(CreateUserRequest {
                name: user.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                secret_ttl_secs: 0,
            })
            .await;
        self.session(&self.identity(user).await, i).await
    }

    /// Logs `id` in to proxy `i`.
    pub async fn session(&self, id: &IdentityFile, i: usize) -> ProxySession {
        let p = &self.proxies[i];
        let opts = proxy_options(
            id,
            ProxyAddr::Web {
                addr: p.web.to_string(),
                trust: p.web_trust(),
            },
        )
        .unwrap();
        ProxySession::connect(&opts).await.unwrap()
    }

    /// Enrolls a service agent with a join token and starts it on proxy `i`, serving `targets`.
    pub async fn service_agent(
        &self,
        host_id: &str,
        i: usize,
        targets: &[TargetSpec<'_>],
    ) -> Agent {
        self.service_agent_on(host_id, i, targets, TransportMode::Ssh)
            .await
    }

    /// As [`Cluster::service_agent`], dialling over `transport` only.
    pub async fn service_agent_on(
        &self,
        host_id: &str,
        i: usize,
        targets: &[TargetSpec<'_>],
        transport: TransportMode,
    ) -> Agent {
        let path = self.enroll(host_id, i).await;
        let mut cfg = agent_cfg(
            &self.name,
            host_id,
            &self.proxies[i],
            &self.host_ca,
            path,
            targets.iter().copied(),
        );
        cfg.transport.mode = transport;
        start_agent(cfg)
    }

    /// Enrolls a service agent with a join token; returns its key path (certificate beside it).
    pub async fn enroll(&self, host_id: &str, i: usize) -> PathBuf {
        let token = self
            .admin
            .create_token(CreateTokenRequest {
                kind: "agent".into(),
                ttl_secs: 600,
                uses: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .token;
        let key = mint::generate_key();
        let certs = self
            .admin
            .register_agent(RegisterAgentRequest {
                token,
                host_id: host_id.into(),
                public_key: key.public_key().to_openssh().unwrap(),
            })
            .await
            .unwrap();
        let path = self.dir.path().join(format!("agent-{host_id}-{i}"));
        mint::write_key_pair(&path, &key).unwrap();
        mint::write_file(
            &mint::cert_path(&path),
            format!("{}\n", certs.ssh_cert).as_bytes(),
            0o644,
        )
        .unwrap();
        path
    }

    /// Enrolls `n` service agents named `<prefix><i>` with multi-use join tokens (1,000 uses at
    /// most each); returns each host id and key path (certificate beside it).
    pub async fn enroll_fleet(&self, prefix: &str, n: usize) -> Vec<(String, PathBuf)> {
        let mut fleet = Vec::with_capacity(n);
        let mut token = String::new();
        for i in 0..n {
            if i % 1000 == 0 {
                token = self
                    .admin
                    .create_token(CreateTokenRequest {
                        kind: "agent".into(),
                        ttl_secs: 600,
                        uses: (n - i).min(1000) as u32,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .token;
            }
            let host_id = format!("{prefix}{i}");
            let key = mint::generate_key();
            let certs = self
                .admin
                .register_agent(RegisterAgentRequest {
                    token: token.clone(),
                    host_id: host_id.clone(),
                    public_key: key.public_key().to_openssh().unwrap(),
                })
                .await
                .unwrap();
            let path = self.dir.path().join(format!("agent-{host_id}"));
            mint::write_key_pair(&path, &key).unwrap();
            mint::write_file(
                &mint::cert_path(&path),
                format!("{}\n", certs.ssh_cert).as_bytes(),
                0o600,
            )
            .unwrap();
            fleet.push((host_id, path));
        }
        fleet
    }

    /// The cluster's CA pin, computed from its host CA line as `pctl status` does.
    pub fn ca_pin(&self) -> String {
        let key = russh::keys::ssh_key::PublicKey::from_openssh(&self.host_ca).unwrap();
        let fp = key.fingerprint(russh::keys::HashAlg::Sha256);
        tunnel_proto::join::ca_pin(fp.as_bytes())
    }

    /// A single-use agent join token valid for `ttl_secs`.
    pub async fn agent_token(&self, ttl_secs: u64) -> String {
        self.admin
            .create_token(CreateTokenRequest {
                kind: "agent".into(),
                ttl_secs,
                uses: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .token
    }

    /// An agent config on proxy 0 that joins with `token` (written 0600 to a file) and `pin`,
    /// and has no key yet; it serves a target named like itself (`host_id`) at `target`.
    pub fn joining_agent(
        &self,
        host_id: &str,
        token: &str,
        pin: &str,
        target: SocketAddr,
    ) -> AgentConfig {
        let dir = self.dir.path().join(format!("join-{host_id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("token");
        mint::write_file(&token_file, token.as_bytes(), 0o600).unwrap();
        let mut cfg = agent_cfg(
            &self.name,
            host_id,
            &self.proxies[0],
            &self.host_ca,
            dir.join("agent_key"),
            [(host_id, target, &[][..])],
        );
        cfg.join_token_file = Some(token_file);
        cfg.ca_pin = Some(pin.into());
        cfg
    }

    /// Creates a role from YAML.
    pub async fn role(&self, yaml: &str) {
        for r in postern_api::resource::parse_roles(yaml).unwrap() {
            self.admin.upsert_role(r).await.unwrap();
        }
    }

    /// Stops the Auth server (and its embedded agent's tunnel).
    pub async fn stop_auth(&mut self) {
        self.auth_stop.cancel();
        let task = std::mem::replace(&mut self.auth_task, tokio::spawn(async { Ok(()) }));
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }

    /// Starts the Auth server again on the same data dir and address.
    pub async fn restart_auth(&mut self) {
        let mut cfg = self.auth_cfg.clone();
        cfg.listen = self.auth_addr;
        let (addr, stop, task) = serve_auth(&cfg).await;
        self.auth_addr = addr;
        self.auth_stop = stop;
        self.auth_task = task;
        let admin_id = IdentityFile::load(&cfg.data_dir.join("admin.identity")).unwrap();
        self.admin = AuthClient::connect_direct(&addr.to_string(), &admin_id)
            .await
            .unwrap();
    }

    /// Kills process proxy `i` with SIGKILL (no drain, no flush) and starts it again on the same
    /// data dir, config and ports.
    pub async fn kill_and_restart_proxy(&mut self, i: usize) {
        let mut child = self.children[i].take().expect("a process proxy");
        child.start_kill().unwrap();
        let _ = child.wait().await;
        let file = self.config_files[i].clone();
        let config = postern_proxy::ProxyConfig::from_file(&file).unwrap();
        let old = self.proxies.remove(i);
        let child = run_proxy_process(&file);
        let p = wait_proxy_process(&config, old.data_dir).await;
        self.proxies.insert(i, p);
        self.children[i] = Some(child);
    }

    /// Stops everything.
    pub async fn stop(self) {
        for a in self.auth_agents {
            a.stop().await;
        }
        self.auth_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.auth_task).await;
        for p in self.proxies {
            p.stop().await;
        }
    }
}

/// An agent config on `proxy` for `cluster` with the key at `key`, serving `targets`.
pub fn agent_cfg<'a>(
    cluster: &str,
    host_id: &str,
    proxy: &Proxy,
    host_ca: &str,
    key: PathBuf,
    targets: impl IntoIterator<Item = TargetSpec<'a>>,
) -> AgentConfig {
    AgentConfig {
        host_id: host_id.into(),
        cluster: cluster.into(),
        proxy: Some(proxy.web.to_string()),
        tunnel_addr: None,
        web: postern_agent::config::WebTrustConfig {
            cert_sha256: Some(proxy.web_fp.clone()),
            ca_file: None,
            insecure: false,
        },
        host_key_file: key,
        host_cert_file: None,
        join_token_file: None,
        ca_pin: None,
        proxy_host_ca: vec![host_ca.into()],
        proxy_host_keys: vec![],
        targets: targets
            .into_iter()
            .map(|(n, addr, labels)| {
                let t = Target {
                    addr: addr.into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                };
                (n.to_string(), t)
            })
            .collect(),
        keepalive_interval_secs: 5,
        reconnect: Default::default(),
        ops_listen: None,
        // These clusters exercise the SSH transport unless a test asks for QUIC
        // (`Cluster::service_agent_on`).
        transport: postern_agent::config::TransportConfig {
            mode: postern_agent::config::TransportMode::Ssh,
            ..Default::default()
        },
        pool: Default::default(),
    }
}
