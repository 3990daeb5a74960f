//! The proxy as a process: killed and restarted (agents come back), and SIGTERM (drain, exit 0).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use postern_client::ProxySession;
use support::*;
use tokio::process::{Child, Command};

/// Makes an agent config (`agent_config` or `quic_agent_config`).
type MakeAgent =
    fn(&Pki, &str, &Proxy, &[(&str, std::net::SocketAddr)]) -> postern_agent::AgentConfig;

/// The agent config of one transport.
fn agent_for(quic: bool) -> MakeAgent {
    if quic {
        quic_agent_config
    } else {
        agent_config
    }
}

struct Ports {
    web: u16,
    tunnel: u16,
    ops: u16,
}

fn write_config(pki: &Pki, dir: &Path, ports: &Ports, grace: u64) -> std::path::PathBuf {
    let c = pki.cluster_config();
    let toml = format!(
        "data_dir = {dir:?}\n\
         [listen]\nweb = \"127.0.0.1:{}\"\ntunnel = \"127.0.0.1:{}\"\nops = \"127.0.0.1:{}\"\n\
         [shutdown]\ngrace_secs = {grace}\n\
         [[clusters]]\nname = \"{}\"\nhost_ca = [{:?}]\nuser_ca = [{:?}]\npolicy = {{ source = \"open\" }}\n",
        ports.web, ports.tunnel, ports.ops, c.name, c.host_ca[0], c.user_ca[0]
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn spawn_proxy(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_postern-proxy"))
        .arg("--config")
        .arg(config)
        .arg("--allow-root")
        .env(
            "RUST_LOG",
            std::env::var("PROXY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits until the ops listener answers /readyz.
async fn wait_ready(ops: u16) {
    let addr = format!("127.0.0.1:{ops}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        if matches!(up, Ok(Ok(_))) && http_get(addr, "/readyz").await.0 == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "proxy process did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `Proxy` value describing the process (for the support helpers).
fn describe(dir: &tempfile::TempDir, ports: &Ports) -> Proxy {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(dir.path().join("web.crt")).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    Proxy {
        web: format!("127.0.0.1:{}", ports.web).parse().unwrap(),
        tunnel: format!("127.0.0.1:{}", ports.tunnel).parse().unwrap(),
        ops: format!("127.0.0.1:{}", ports.ops).parse().unwrap(),
        web_fp: postern_dial::web::cert_fingerprint(&der),
        data_dir: tempfile::tempdir().unwrap(),
        shutdown: Default::default(),
        task: tokio::spawn(async { Ok(()) }),
    }
}

/// A proxy process on fixed loopback ports with an agent serving an echo service.
struct Running {
    _dir: tempfile::TempDir,
    ports: Ports,
    config: std::path::PathBuf,
    child: Child,
    proxy: Proxy,
    agent: Agent,
}

async fn start_process(pki: &Pki, grace: u64, quic: bool) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports {
        web: free_port(),
        tunnel: free_port(),
        ops: free_port(),
    };
    let config = write_config(pki, dir.path(), &ports, grace);
    proxy_host_cert(
        pki,
        &postern_proxy::ProxyConfig {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        },
    );
    let child = spawn_proxy(&config);
    wait_ready(ports.ops).await;
    let proxy = describe(&dir, &ports);
    let echo = echo_server().await;
    let agent = start_agent(agent_for(quic)(pki, "h1", &proxy, &[("auth", echo)]));
    Running {
        _dir: dir,
        ports,
        config,
        child,
        proxy,
        agent,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_is_back_within_two_seconds_of_a_killed_proxys_return() {
    killed_proxy_returns("life1", false).await;
}

/// Over QUIC: the restarted proxy answers the agent's next keepalive with a stateless reset
/// (its reset key is kept in the data dir), so the agent redials at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_agent_is_back_within_two_seconds_of_a_killed_proxys_return() {
    killed_proxy_returns("lifeq1", true).await;
}

async fn killed_proxy_returns(cluster: &'static str, quic: bool) {
    init_tracing();
    let pki = Pki::new(cluster);
    let Running {
        _dir: _keep,
        ports,
        config,
        mut child,
        proxy,
        agent,
    } = start_process(&pki, 5, quic).await;
    let opts = client_opts(&pki, &proxy, "alice");
    let session = ProxySession::connect(&opts).await.unwrap();
    let mut s = wait_stream(&session, "auth", cluster, Duration::from_secs(5)).await;
    assert_eq!(echo_once(&mut s, b"before").await, b"before");

    child.kill().await.unwrap();
    // The stream that was open gets a clean error, not a silent end.
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut s, &mut buf),
    )
    .await
    .expect("the stream ends when the proxy dies");
    let e = r.expect_err("a stream cut by a dead proxy must end with an error");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
    drop(s);
    drop(session);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut child = spawn_proxy(&config);
    let returned = Instant::now();
    wait_ready(ports.ops).await;
    let session = ProxySession::connect(&opts).await.unwrap();
    let mut s = wait_stream(&session, "auth", cluster, Duration::from_secs(5)).await;
    let back_after = returned.elapsed();
    assert_eq!(echo_once(&mut s, b"after").await, b"after");
    eprintln!("streams work again {back_after:?} after the proxy's return");
    assert!(
        back_after < Duration::from_secs(2),
        "agent took {back_after:?} to come back"
    );
    agent.stop().await;
    child.kill().await.unwrap();
}

fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    // The shell's builtin `kill`: no procps needed on a minimal machine.
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_then_exits_zero() {
    sigterm_drains("life2", false).await;
}

/// Over QUIC: the drain order goes down the QUIC control stream, streams finish within the grace
/// period, the rest are cut at its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_sigterm_drains_streams_then_exits_zero() {
    sigterm_drains("lifeq2", true).await;
}

async fn sigterm_drains(cluster: &'static str, quic: bool) {
    init_tracing();
    let pki = Pki::new(cluster);
    let Running {
        _dir: _keep,
        mut child,
        proxy,
        agent,
        ..
    } = start_process(&pki, 3, quic).await;
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let mut short = wait_stream(&session, "auth", cluster, Duration::from_secs(5)).await;
    let mut long = session.open("auth", cluster, 0).await.unwrap();

    let term_at = Instant::now();
    sigterm(&child);
    // New connections are refused once the listeners close.
    let deadline = Instant::now() + Duration::from_secs(2);
    while tokio::net::TcpStream::connect(proxy.tunnel).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "tunnel listener still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An open stream keeps working during the grace period, then finishes normally.
    assert_eq!(
        echo_once(&mut short, b"during drain").await,
        b"during drain"
    );
    drop(short);
    // A stream still open at the deadline is cut: the client sees an error, not a hang and not
    // a clean end.
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), long.read(&mut buf))
        .await
        .expect("cut at the deadline");
    let e = r.expect_err("a stream cut at the drain deadline must end with an error");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .unwrap();
    let took = term_at.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took >= Duration::from_secs(2),
        "waited for the open stream ({took:?})"
    );
    agent.stop().await;
}

fn fd_count(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// 500 agents, the proxy SIGKILLed and restarted: reconnects are spread by the back-off's
/// jitter, all agents come back, and neither side leaks descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_agents_come_back_after_a_restart_spread_by_jitter() {
    storm("storm", false).await;
}

/// The same 500 agents over QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_five_hundred_agents_come_back_after_a_restart_spread_by_jitter() {
    storm("stormq", true).await;
}

/// The two storms run one at a time: each counts this process's descriptors before and after,
/// and the other's 500 agents would be counted with its own.
static STORMS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn storm(cluster: &'static str, quic: bool) {
    const AGENTS: usize = 500;
    let _one_at_a_time = STORMS.lock().await;
    let pki = Pki::new(cluster);
    let Running {
        _dir: _keep,
        ports,
        config,
        mut child,
        proxy,
        agent,
    } = start_process(&pki, 5, quic).await;
    let echo = echo_server().await;
    let mut agents = vec![agent];
    for i in 1..AGENTS {
        agents.push(start_agent(agent_for(quic)(
            &pki,
            &format!("s{i}"),
            &proxy,
            &[("auth", echo)],
        )));
    }
    let ops: std::net::SocketAddr = format!("127.0.0.1:{}", ports.ops).parse().unwrap();
    let connected = async || {
        metric(
            &scrape(ops).await,
            "postern_tunnels_connected",
            &[("cluster", cluster)],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected().await < AGENTS as f64 {
        assert!(
            Instant::now() < deadline,
            "{} of {AGENTS} agents connected",
            connected().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds_self, fds_proxy) = (fd_count("self"), fd_count(&child.id().unwrap().to_string()));

    child.kill().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut child = spawn_proxy(&config);
    let restarted = Instant::now();
    wait_ready(ports.ops).await;
    // Sample the connect counter every 50 ms until every agent is back.
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let all_back = loop {
        let m = scrape(ops).await;
        let t = restarted.elapsed().as_secs_f64();
        samples.push((
            t,
            metric(&m, "postern_tunnel_connects_total", &[("cluster", cluster)]),
        ));
        if metric(&m, "postern_tunnels_connected", &[("cluster", cluster)]) >= AGENTS as f64 {
            break t;
        }
        assert!(
            t < 60.0,
            "not every agent came back within 60 s: {:?}",
            samples.last()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Peak connects per second: the largest count within any 1 s window.
    let mut peak = 0.0f64;
    for (i, (t0, c0)) in samples.iter().enumerate() {
        for (t1, c1) in &samples[i..] {
            if t1 - t0 <= 1.0 {
                peak = peak.max(c1 - c0);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds_self_after, fds_proxy_after) =
        (fd_count("self"), fd_count(&child.id().unwrap().to_string()));
    eprintln!(
        "{AGENTS} agents: all back {all_back:.2} s after the proxy's restart; peak {peak:.0} connects in any 1 s window; \
         descriptors: test process (agents) {fds_self} -> {fds_self_after}, proxy {fds_proxy} -> {fds_proxy_after}"
    );
    assert!(
        fds_self_after <= fds_self + 10,
        "the agents leaked descriptors: {fds_self} -> {fds_self_after}"
    );
    assert!(
        fds_proxy_after <= fds_proxy + 10,
        "the proxy holds more descriptors: {fds_proxy} -> {fds_proxy_after}"
    );
    for a in agents {
        a.stop().await;
    }
    child.kill().await.unwrap();
}
