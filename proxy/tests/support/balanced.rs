//! A cluster behind a real load balancer: N `postern-proxy` processes on loopback behind Debian's
//! HAProxy in TCP mode (round robin, health checks, redispatch on a refused connect), the Auth
//! server whose embedded agent dials the balancer's web address, and helpers to enroll agents and
//! open client streams through the balancer. Included with `#[path]` after `support/cluster.rs`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use postern_api::identity::IdentityFile;
use postern_api::proto::*;
use postern_auth::config::TunnelConfig;
use postern_client::auth::{AuthClient, proxy_options};
use postern_client::{ProxyAddr, ProxySession};
use postern_dial::web::WebTrust;
use postern_proxy::config::{ClusterConfig, PolicyConfig, PolicySource};
use postern_proxy::mint;
use tokio::process::{Child, Command};

use crate::cluster::*;
use crate::support::*;

/// Debian's HAProxy.
pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// The balancer: its process (killed on drop) and its two frontends.
pub struct Balancer {
    /// The HAProxy process.
    pub child: Child,
    /// Frontend of the proxies' web listeners.
    pub web: SocketAddr,
    /// Frontend of the proxies' tunnel listeners.
    pub tunnel: SocketAddr,
    /// Its configuration file.
    pub cfg: std::path::PathBuf,
}

fn spawn_haproxy(cfg: &Path) -> Child {
    Command::new(HAPROXY)
        .arg("-db")
        .arg("-f")
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn wait_listening(addrs: [SocketAddr; 2]) {
    for addr in addrs {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "HAProxy did not listen on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Balancer {
    /// SIGKILLs HAProxy (every connection through it drops) and starts it again, same config.
    pub async fn kill_and_restart(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
        self.child = spawn_haproxy(&self.cfg);
        wait_listening([self.tunnel, self.web]).await;
    }
}

/// Starts HAProxy in front of `backends` (web, tunnel, ops) on the reserved ports `web`,
/// `tunnel`. Health checks ask each proxy's `/readyz` on its ops port.
async fn haproxy(
    dir: &Path,
    web: u16,
    tunnel: u16,
    backends: &[(SocketAddr, SocketAddr, SocketAddr)],
) -> Balancer {
    assert!(
        Path::new(HAPROXY).exists(),
        "{HAPROXY} is missing: this test drives a real HAProxy; run `apt-get install haproxy` (scripts/test does)"
    );
    let servers = |pick: fn(&(SocketAddr, SocketAddr, SocketAddr)) -> SocketAddr| {
        backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("  server p{i} {} check port {}\n", pick(b), b.2.port()))
            .collect::<String>()
    };
    let cfg = format!(
        "global\n  maxconn 8192\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 120s\n  timeout server 120s\n  \
         retries 3\n  option redispatch 1\n  balance roundrobin\n  \
         option httpchk GET /readyz\n  http-check expect status 200\n  \
         default-server inter 250ms fall 2 rise 2\n\
         frontend tunnel\n  bind 127.0.0.1:{tunnel}\n  default_backend tunnels\n\
         backend tunnels\n{}\
         frontend web\n  bind 127.0.0.1:{web}\n  default_backend webs\n\
         backend webs\n{}",
        servers(|b| b.1),
        servers(|b| b.0),
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = spawn_haproxy(&path);
    let (web, tunnel): (SocketAddr, SocketAddr) = (
        ([127, 0, 0, 1], web).into(),
        ([127, 0, 0, 1], tunnel).into(),
    );
    wait_listening([tunnel, web]).await;
    Balancer {
        child,
        web,
        tunnel,
        cfg: path,
    }
}

/// Starts the Auth server, `n` proxy processes (ids `p0`…, heartbeats every second; on SIGTERM
/// 1 s unready, then a 2 s grace) and HAProxy in front of them; the Auth server's agent dials the balancer. Returns once every
/// proxy is in every proxy's set and holds the Auth server's tunnel.
pub async fn start_balanced(name: &str, n: usize) -> (Cluster, Balancer) {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut auth_cfg = auth_config(dir.path(), name);
    let (host_ca, user_ca, issuer) = {
        let p = postern_auth::server::prepare(&auth_cfg).unwrap();
        let a = &p.state.authorities;
        (a.host_ca_line(), a.user_ca_line(), a.clone())
    };
    let (hp_web, hp_tunnel) = (free_port(), free_port());
    let extra = format!(
        "[public]\nweb_addr = \"127.0.0.1:{hp_web}\"\ntunnel_addr = \"127.0.0.1:{hp_tunnel}\"\n\
         [peers]\nheartbeat_secs = 1\nexpire_after_beats = 3\n\
         [limits]\nmax_connects_per_source_per_minute = 1000000\n\
         max_auth_failures_per_source_per_minute = 1000000\nmax_unauthenticated = 4096\n\
         max_unauthenticated_per_source = 4096\nweb_max_connections = 4096\n\
         web_max_connections_per_source = 4096\nmax_tunnels_per_cluster = 100000\n"
    );
    let (mut proxies, mut children, mut files) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = proxy_config(&[], data_dir.path());
        config.proxy_id = Some(format!("p{i}"));
        config.shutdown.unready_secs = 1;
        config.clusters = vec![ClusterConfig {
            name: name.into(),
            host_ca: vec![host_ca.clone()],
            user_ca: vec![user_ca.clone()],
            policy: PolicyConfig {
                source: PolicySource::Auth,
                identity_file: Some(dir.path().join(format!("proxy-{i}.identity"))),
                ..Default::default()
            },
        }];
        let key = mint::generate_key();
        let cert = issuer
            .issue_host(
                key.public_key(),
                "",
                &["127.0.0.1".into(), "localhost".into()],
                86400,
            )
            .unwrap();
        mint::write_key_pair(&config.host_key_path(), &key).unwrap();
        mint::write_file(
            &config.host_cert_path(),
            format!("{}\n", cert.ssh_cert).as_bytes(),
            0o644,
        )
        .unwrap();
        for (field, port) in [
            (&mut config.listen.web, free_port()),
            (&mut config.listen.tunnel, free_port()),
            (&mut config.listen.ops, free_port()),
        ] {
            *field = ([127, 0, 0, 1], port).into();
        }
        let (p, child, file) = spawn_proxy_process(&config, data_dir, &extra).await;
        proxies.push(p);
        children.push(Some(child));
        files.push(file);
    }
    let backends: Vec<_> = proxies.iter().map(|p| (p.web, p.tunnel, p.ops)).collect();
    let balancer = haproxy(dir.path(), hp_web, hp_tunnel, &backends).await;
    auth_cfg.tunnel = Some(TunnelConfig {
        proxy: balancer.web.to_string(),
        host_id: "auth".into(),
        web: postern_agent::config::WebTrustConfig {
            insecure: true,
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
    let c = Cluster {
        name: name.into(),
        dir,
        auth_cfg,
        auth_addr,
        auth_stop,
        auth_task,
        admin,
        proxies,
        host_ca,
        auth_agents: Vec::new(),
        children,
        config_files: files,
    };
    c.admin
        .create_user(CreateUserRequest {
            name: "proxy-1".into(),
            roles: vec!["proxy".into()],
            secret_ttl_secs: 0,
        })
        .await
        .unwrap();
    let id = c.identity("proxy-1").await;
    for i in 0..n {
        id.save(&c.dir.path().join(format!("proxy-{i}.identity")))
            .unwrap();
    }
    let all: Vec<usize> = (0..n).collect();
    wait_for(
        &c,
        &all,
        |m, cl| {
            metric(m, "postern_proxy_set_size", &[("cluster", cl)]) == n as f64
                && metric(m, "postern_tunnels_connected", &[("cluster", cl)]) >= 1.0
        },
        Duration::from_secs(60),
        "every proxy in every set, each with the Auth tunnel",
    )
    .await;
    (c, balancer)
}

/// Polls the metrics of proxies `which` until `ok(metrics, cluster)` holds on each; returns how
/// long it took. Panics with `what` after `limit`.
pub async fn wait_for(
    c: &Cluster,
    which: &[usize],
    ok: impl Fn(&str, &str) -> bool,
    limit: Duration,
    what: &str,
) -> Duration {
    let start = Instant::now();
    loop {
        let mut all = true;
        for &i in which {
            let m = scrape_soft(c.proxies[i].ops).await;
            if !ok(&m, &c.name) {
                all = false;
                break;
            }
        }
        if all {
            return start.elapsed();
        }
        if start.elapsed() >= limit {
            for &i in which {
                let m = scrape_soft(c.proxies[i].ops).await;
                let l = [("cluster", c.name.as_str())];
                eprintln!(
                    "proxy {i}: set {} tunnels {} connects {}",
                    metric(&m, "postern_proxy_set_size", &l),
                    metric(&m, "postern_tunnels_connected", &l),
                    metric(&m, "postern_tunnel_connects_total", &l)
                );
            }
            panic!("not within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `/metrics`, or empty if the proxy does not answer.
pub async fn scrape_soft(ops: SocketAddr) -> String {
    match tokio::time::timeout(Duration::from_secs(2), async {
        let mut s = tokio::net::TcpStream::connect(ops).await.ok()?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    })
    .await
    {
        Ok(Some(s)) => s,
        _ => String::new(),
    }
}

/// Enrolls service agent `host_id` serving `targets`, dialling the balancer.
pub async fn balanced_agent(
    c: &Cluster,
    b: &Balancer,
    host_id: &str,
    targets: &[TargetSpec<'_>],
) -> Agent {
    let path = c.enroll(host_id, 0).await;
    start_agent(balanced_agent_config(c, b, host_id, path, targets))
}

/// The config of an agent whose key (and certificate beside it) is at `path`, dialling the
/// balancer.
pub fn balanced_agent_config(
    c: &Cluster,
    b: &Balancer,
    host_id: &str,
    path: std::path::PathBuf,
    targets: &[TargetSpec<'_>],
) -> postern_agent::AgentConfig {
    let mut cfg = agent_cfg(
        &c.name,
        host_id,
        &c.proxies[0],
        &c.host_ca,
        path,
        targets.iter().copied(),
    );
    cfg.proxy = Some(b.web.to_string());
    cfg.web = postern_agent::config::WebTrustConfig {
        insecure: true,
        ..Default::default()
    };
    cfg
}

/// A client session through the balancer (a new connection: the balancer picks the proxy).
pub async fn balanced_session(id: &IdentityFile, b: &Balancer) -> Result<ProxySession, String> {
    let opts = proxy_options(
        id,
        ProxyAddr::Web {
            addr: b.web.to_string(),
            trust: WebTrust::Insecure,
        },
    )
    .map_err(|e| e.to_string())?;
    ProxySession::connect(&opts)
        .await
        .map_err(|e| e.to_string())
}

/// One echo stream through the balancer: a new session, `target`, 32 bytes there and back.
pub async fn balanced_echo(
    id: &IdentityFile,
    b: &Balancer,
    cluster: &str,
    target: &str,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let run = async {
        let s = balanced_session(id, b).await?;
        let mut st = s
            .open(target, cluster, 0)
            .await
            .map_err(|e| e.to_string())?;
        let msg = [7u8; 32];
        st.write_all(&msg).await.map_err(|e| e.to_string())?;
        let mut back = [0u8; 32];
        st.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        if back != msg {
            return Err("echo mismatch".into());
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .map_err(|_| "timed out after 10 s".to_string())?
}
