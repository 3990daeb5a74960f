//! Descriptor exhaustion: a proxy process limited to 256 descriptors, flooded with 400 web
//! connections that never send a byte. The web listener's cap keeps the flood to its share, so
//! the tunnel listener still accepts agents and `/healthz` still answers. (Before the cap, 1,010
//! such connections at 1,024 descriptors made the tunnel listener fail with `Too many open
//! files` and `/healthz` time out.)

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_flood_leaves_the_tunnel_listener_and_health_checks_working() {
    let pki = Pki::new("fds");
    let dir = tempfile::tempdir().unwrap();
    let (web, tunnel, ops) = (free_port(), free_port(), free_port());
    let c = pki.cluster_config();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nallow_root = true\n\
             [listen]\nweb = \"127.0.0.1:{web}\"\ntunnel = \"127.0.0.1:{tunnel}\"\nops = \"127.0.0.1:{ops}\"\n\
             [limits]\nweb_max_connections = 128\nweb_max_connections_per_source = 128\nweb_header_timeout_secs = 60\nmax_unauthenticated = 64\n\
             [[clusters]]\nname = \"{}\"\nhost_ca = [{:?}]\nuser_ca = [{:?}]\n",
            dir.path(),
            c.name,
            c.host_ca[0],
            c.user_ca[0]
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new("prlimit")
        .arg("--nofile=256:256")
        .arg(env!("CARGO_BIN_EXE_postern-proxy"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let ops_addr = format!("127.0.0.1:{ops}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if TcpStream::connect(ops_addr).await.is_ok()
            && http_get(ops_addr, "/readyz").await.0 == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "the proxy did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let baseline = open_fds(pid);

    // 400 web connections that say nothing (each would wait 60 s for its TLS handshake).
    let mut flood = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", web)).await {
            flood.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = open_fds(pid);
    println!(
        "proxy descriptors: {baseline} before, {during} with 400 silent web connections (limit 256, web cap 128)"
    );
    assert!(
        during <= baseline + 128 + 8,
        "the web listener held {during} descriptors"
    );

    // The tunnel listener still accepts: it greets with an SSH banner.
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect(("127.0.0.1", tunnel)),
    )
    .await
    .expect("tunnel connect timed out")
    .expect("tunnel connect");
    let mut banner = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
        .await
        .expect("no SSH banner: the tunnel listener is starved")
        .unwrap();
    assert_eq!(&banner, b"SSH-");
    // And health checks answer.
    let (status, _) = tokio::time::timeout(Duration::from_secs(5), http_get(ops_addr, "/healthz"))
        .await
        .expect("/healthz timed out");
    assert_eq!(status, 200);
    drop(flood);
    child.kill().await.unwrap();
}
