//! Shared helpers for the proxy's integration tests: a cluster PKI minted at runtime, a proxy and
//! agents on ephemeral loopback ports, an echo service, metric scraping.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_agent::AgentConfig;
use postern_client::{ConnectOptions, ProxyAddr, ProxySession};
use postern_dial::ssh::Identity;
use postern_dial::web::WebTrust;
use postern_proxy::config::{ClusterConfig, ProxyConfig};
use postern_proxy::mint::{self, CertSpec};
use postern_proxy::{Listeners, run};
use russh::keys::{Certificate, PrivateKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A cluster's CAs in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub cluster: String,
    pub host_ca: PrivateKey,
    pub user_ca: PrivateKey,
}

impl Pki {
    pub fn new(cluster: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let host_ca = mint::generate_key();
        let user_ca = mint::generate_key();
        mint::write_key_pair(&dir.path().join("host_ca"), &host_ca).unwrap();
        mint::write_key_pair(&dir.path().join("user_ca"), &user_ca).unwrap();
        Pki {
            dir,
            cluster: cluster.to_owned(),
            host_ca,
            user_ca,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cluster_config(&self) -> ClusterConfig {
        ClusterConfig {
            name: self.cluster.clone(),
            host_ca: vec![self.host_ca.public_key().to_openssh().unwrap()],
            user_ca: vec![self.user_ca.public_key().to_openssh().unwrap()],
            // A tunnel-only setup with hand-minted certificates: no Auth server to ask.
            policy: postern_proxy::config::PolicyConfig {
                source: postern_proxy::config::PolicySource::Open,
                ..Default::default()
            },
        }
    }

    /// Mints a cert for a fresh key valid now.
    pub fn cert(&self, ca: &PrivateKey, spec: &CertSpec) -> (PrivateKey, Certificate) {
        let now = mint::now_unix();
        self.cert_window(ca, spec, now - 60, now + 3600)
    }

    pub fn cert_window(
        &self,
        ca: &PrivateKey,
        spec: &CertSpec,
        after: u64,
        before: u64,
    ) -> (PrivateKey, Certificate) {
        let key = mint::generate_key();
        let cert = mint::issue(ca, key.public_key(), spec, after, before).unwrap();
        (key, cert)
    }

    pub fn user(&self, user: &str) -> Identity {
        let (k, c) = self.cert(&self.user_ca, &CertSpec::User { user: user.into() });
        Identity::new(k, c).unwrap()
    }

    /// Writes an agent's key and cert files (role `auth`); returns the key path.
    pub fn agent_files(&self, host_id: &str) -> PathBuf {
        self.agent_files_for(&CertSpec::Agent {
            host_id: host_id.into(),
            cluster: self.cluster.clone(),
        })
    }

    /// Writes a `service` agent's key and cert files; returns the key path.
    pub fn service_agent_files(&self, host_id: &str) -> PathBuf {
        self.agent_files_for(&CertSpec::ServiceAgent {
            host_id: host_id.into(),
            cluster: self.cluster.clone(),
        })
    }

    fn agent_files_for(&self, spec: &CertSpec) -> PathBuf {
        let (k, c) = self.cert(&self.host_ca, spec);
        let host_id = match spec {
            CertSpec::Agent { host_id, .. } | CertSpec::ServiceAgent { host_id, .. } => host_id,
            _ => unreachable!("an agent spec"),
        };
        let path = self.path(&format!("agent-{host_id}"));
        mint::write_key_pair(&path, &k).unwrap();
        mint::write_cert(&mint::cert_path(&path), &c).unwrap();
        path
    }
}

/// A running in-process proxy.
pub struct Proxy {
    pub web: SocketAddr,
    pub tunnel: SocketAddr,
    pub ops: SocketAddr,
    pub web_fp: String,
    pub data_dir: tempfile::TempDir,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), postern_proxy::ProxyError>>,
}

pub fn proxy_config(pkis: &[&Pki], data_dir: &Path) -> ProxyConfig {
    let mut c = ProxyConfig {
        data_dir: data_dir.to_owned(),
        clusters: pkis.iter().map(|p| p.cluster_config()).collect(),
        // Tests may run as root (CI containers); the refusal itself is tested in `web.rs`.
        allow_root: true,
        ..Default::default()
    };
    c.listen.web = "127.0.0.1:0".parse().unwrap();
    c.listen.tunnel = "127.0.0.1:0".parse().unwrap();
    c.listen.ops = "127.0.0.1:0".parse().unwrap();
    c.shutdown.grace_secs = 2;
    // Tests open hundreds of streams as one user; the per-user limit has tests of its own.
    c.limits.max_streams_per_user_per_target = 100_000;
    c
}

/// Writes a proxy host certificate (signed by the first PKI's host CA) into the data dir.
pub fn proxy_host_cert(pki: &Pki, config: &ProxyConfig) {
    let (k, c) = pki.cert(
        &pki.host_ca,
        &CertSpec::Proxy {
            principals: vec!["127.0.0.1".into(), "localhost".into()],
        },
    );
    mint::write_key_pair(&config.host_key_path(), &k).unwrap();
    mint::write_cert(&config.host_cert_path(), &c).unwrap();
}

pub async fn start_proxy(pkis: &[&Pki], tweak: impl FnOnce(&mut ProxyConfig)) -> Proxy {
    let data_dir = tempfile::tempdir().unwrap();
    let mut config = proxy_config(pkis, data_dir.path());
    tweak(&mut config);
    proxy_host_cert(pkis[0], &config);
    start_proxy_with(config, data_dir).await
}

pub async fn start_proxy_with(config: ProxyConfig, data_dir: tempfile::TempDir) -> Proxy {
    let listeners = Listeners::bind(&config).await.unwrap();
    let web = listeners.web.local_addr().unwrap();
    let tunnel = listeners.tunnel.local_addr().unwrap();
    let ops = listeners.ops.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(listeners, config, shutdown.clone()));
    // run() writes the web cert before it serves; wait for the file.
    let crt = data_dir.path().join("web.crt");
    let mut web_fp = String::new();
    for _ in 0..200 {
        if let Ok(pem) = std::fs::read(&crt) {
            use rustls_pki_types::pem::PemObject;
            if let Ok(der) = rustls_pki_types::CertificateDer::from_pem_slice(&pem) {
                web_fp = postern_dial::web::cert_fingerprint(&der);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !web_fp.is_empty(),
        "proxy did not write its web certificate"
    );
    // Then its ready signal: /readyz turns 200 once every listener is serving.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while http_get(ops, "/readyz").await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "proxy did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Proxy {
        web,
        tunnel,
        ops,
        web_fp,
        data_dir,
        shutdown,
        task,
    }
}

impl Proxy {
    pub fn web_trust(&self) -> WebTrust {
        WebTrust::Pin(self.web_fp.clone())
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("proxy stops within its grace period")
            .unwrap()
            .unwrap();
    }
}

pub fn agent_config(
    pki: &Pki,
    host_id: &str,
    proxy: &Proxy,
    targets: &[(&str, SocketAddr)],
) -> AgentConfig {
    AgentConfig {
        host_id: host_id.into(),
        cluster: pki.cluster.clone(),
        proxy: Some(proxy.web.to_string()),
        tunnel_addr: None,
        web: postern_agent::config::WebTrustConfig {
            cert_sha256: Some(proxy.web_fp.clone()),
            ca_file: None,
            insecure: false,
        },
        host_key_file: pki.agent_files(host_id),
        host_cert_file: None,
        join_token_file: None,
        ca_pin: None,
        proxy_host_ca: vec![pki.host_ca.public_key().to_openssh().unwrap()],
        proxy_host_keys: vec![],
        targets: targets
            .iter()
            .map(|(n, a)| (n.to_string(), (*a).into()))
            .collect::<BTreeMap<_, _>>(),
        keepalive_interval_secs: 5,
        reconnect: Default::default(),
        ops_listen: None,
        // These tests exercise the SSH transport; QUIC tests use `quic_agent_config`.
        transport: postern_agent::config::TransportConfig {
            mode: postern_agent::config::TransportMode::Ssh,
            ..Default::default()
        },
        pool: Default::default(),
    }
}

/// An agent that dials the proxy over QUIC only (discovered from the web address).
pub fn quic_agent_config(
    pki: &Pki,
    host_id: &str,
    proxy: &Proxy,
    targets: &[(&str, SocketAddr)],
) -> AgentConfig {
    let mut c = agent_config(pki, host_id, proxy, targets);
    c.transport.mode = postern_agent::config::TransportMode::Quic;
    c
}

pub struct Agent {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), postern_agent::AgentError>>,
}

pub fn start_agent(config: AgentConfig) -> Agent {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(postern_agent::run(config, shutdown.clone()));
    Agent { shutdown, task }
}

impl Agent {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// A loopback port free for both TCP and UDP (a proxy's tunnel listener takes its UDP twin for
/// QUIC), chosen below the kernel's ephemeral range: a port from `bind(":0")` was free only
/// until another test's outgoing connection or `:0` bind took it, which made a restarted proxy's
/// listener fail with "Address already in use" under the parallel 500-agent tests.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low);
    if high < low + 1_000 {
        // No room below the ephemeral range on this machine: take what the kernel gives.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = high - low;
    // Test binaries run one after another; threads of one binary share the counter. The pid
    // spreads successive binaries over the range.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = (low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// `len` deterministic bytes (xorshift from `seed`): what a test service sends, and what the
/// client hashes to compare.
pub fn test_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A service on loopback that sends `data` to each connection and closes. Returns its address.
pub async fn blob_server(data: Vec<u8>) -> SocketAddr {
    let data = std::sync::Arc::new(data);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let data = data.clone();
            tokio::spawn(async move {
                let _ = s.write_all(&data).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// An echo service on loopback; each connection echoes until EOF. Returns its address.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A service that writes its name and closes: shows which agent served a stream.
pub async fn name_server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(name.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    addr
}

pub fn client_opts(pki: &Pki, proxy: &Proxy, user: &str) -> ConnectOptions {
    ConnectOptions {
        proxy: ProxyAddr::Web {
            addr: proxy.web.to_string(),
            trust: proxy.web_trust(),
        },
        user: user.into(),
        identity: pki.user(user),
        proxy_host_cas: vec![tunnel_proto::certs::ca_fingerprint(
            pki.host_ca.public_key(),
        )],
        proxy_host_keys: vec![],
    }
}

/// Opens streams until one succeeds (the agent registers asynchronously), within `limit`.
pub async fn wait_stream(
    session: &ProxySession,
    target: &str,
    cluster: &str,
    limit: Duration,
) -> postern_client::TunnelStream {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match session.open(target, cluster, 0).await {
            Ok(s) => return s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no stream to {target}.{cluster} within {limit:?}: {e}"),
        }
    }
}

/// Round-trips `msg` through an echo stream.
pub async fn echo_once(stream: &mut postern_client::TunnelStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    stream.read_exact(&mut buf).await.unwrap();
    buf
}

/// Reads a service that writes then closes.
pub async fn read_all(mut stream: postern_client::TunnelStream) -> String {
    let mut s = String::new();
    stream.read_to_string(&mut s).await.unwrap();
    s
}

/// Scrapes `/metrics` from the ops listener with a plain HTTP/1.0 request.
pub async fn scrape(ops: SocketAddr) -> String {
    http_get(ops, "/metrics").await.1
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sum of a metric's samples whose label set contains every `labels` pair.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
