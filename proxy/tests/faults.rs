//! Faults on the agent's leg, through a loopback relay the test controls: a half-open network
//! (the relay stops forwarding without closing) and a dead agent (the relay drops both sockets,
//! as the kernel does for a killed process). Figures are printed; the bounds are generous.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_client::ProxySession;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP relay to `upstream`. `freeze` black-holes the connections open at that moment (they
/// stay open: a half-open network); `kill` drops them. Later connections work normally.
struct Relay {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    generation: Arc<AtomicUsize>,
    frozen_below: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

async fn pass(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    generation: usize,
    frozen_below: Arc<AtomicUsize>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation < frozen_below.load(Ordering::SeqCst) {
            // Swallow everything, close nothing.
            std::future::pending::<()>().await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let generation = Arc::new(AtomicUsize::new(0));
        let frozen_below = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (a, g, f, c) = (
            accepted.clone(),
            generation.clone(),
            frozen_below.clone(),
            conns.clone(),
        );
        let acceptor = tokio::spawn(async move {
            while let Ok((down, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let my_gen = g.load(Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let mut v = c.lock().unwrap();
                v.push(tokio::spawn(pass(dr, uw, my_gen, f.clone())));
                v.push(tokio::spawn(pass(ur, dw, my_gen, f.clone())));
            }
        });
        Relay {
            addr,
            accepted,
            generation,
            frozen_below,
            conns,
            acceptor,
        }
    }

    /// Black-holes every connection open now.
    fn freeze(&self) {
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.frozen_below.store(g, Ordering::SeqCst);
    }

    /// Drops every connection open now (FIN to both ends, like a killed process's sockets).
    fn kill(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.kill();
    }
}

fn tunnels(m: &str, cluster: &str) -> f64 {
    metric(m, "postern_tunnels_connected", &[("cluster", cluster)])
}

async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn a_half_open_network_is_detected_on_both_sides() {
    let pki = Pki::new("halfopen");
    let proxy = start_proxy(&[&pki], |c| {
        c.ssh.keepalive_interval_secs = 1;
        c.ssh.keepalive_max = 2;
    })
    .await;
    let relay = Relay::start(proxy.tunnel).await;
    let echo = echo_server().await;
    let mut cfg = agent_config(&pki, "a1", &proxy, &[("auth", echo)]);
    cfg.proxy = None;
    cfg.tunnel_addr = Some(relay.addr.to_string());
    cfg.keepalive_interval_secs = 1;
    let agent = start_agent(cfg);
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let mut s = wait_stream(&session, "auth", "halfopen", Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut s, b"before").await, b"before");

    relay.freeze();
    let frozen_at = Instant::now();
    // The proxy's keepalives go unanswered: it drops the tunnel.
    let proxy_side = wait_for(
        "proxy drops the half-open tunnel",
        Duration::from_secs(30),
        async || tunnels(&scrape(proxy.ops).await, "halfopen") == 0.0,
    )
    .await;
    // The stream on it ends with an error, not silently.
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("stream ends");
    assert!(
        r.is_err(),
        "a stream on a dead tunnel must end with an error, got {r:?}"
    );
    // The agent's keepalives go unanswered too: it redials (a new relay connection) and serves again.
    wait_for("agent redials", Duration::from_secs(30), async || {
        relay.accepted.load(Ordering::SeqCst) >= 2
    })
    .await;
    let agent_side = frozen_at.elapsed();
    let mut s2 = wait_stream(&session, "auth", "halfopen", Duration::from_secs(30)).await;
    assert_eq!(echo_once(&mut s2, b"after").await, b"after");
    let back = frozen_at.elapsed();
    eprintln!(
        "half-open (keepalive 1 s x 2): proxy dropped the tunnel after {:.1} s, agent redialled after {:.1} s, streams served again after {:.1} s",
        proxy_side.as_secs_f64(),
        agent_side.as_secs_f64(),
        back.as_secs_f64()
    );
    agent.stop().await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_dead_agent_cuts_its_streams_with_an_error_and_its_tunnel_at_once() {
    let pki = Pki::new("deadagent");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let relay = Relay::start(proxy.tunnel).await;
    let echo = echo_server().await;
    let mut cfg = agent_config(&pki, "a1", &proxy, &[("auth", echo)]);
    cfg.proxy = None;
    cfg.tunnel_addr = Some(relay.addr.to_string());
    let agent = start_agent(cfg);
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let mut s = wait_stream(&session, "auth", "deadagent", Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut s, b"x").await, b"x");
    // Stop the agent from coming back through the relay, then cut its sockets.
    agent.shutdown.cancel();
    relay.kill();
    let killed = Instant::now();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("stream ends");
    let err = r.expect_err("a stream whose agent died must end with an error");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
    wait_for(
        "proxy drops the tunnel",
        Duration::from_secs(10),
        async || tunnels(&scrape(proxy.ops).await, "deadagent") == 0.0,
    )
    .await;
    let gone = killed.elapsed();
    let e = session
        .open("auth", "deadagent", 0)
        .await
        .err()
        .expect("no tunnel now");
    assert!(
        e.to_string().contains("no tunnel for cluster deadagent"),
        "{e}"
    );
    eprintln!(
        "dead agent: the client's stream ended with ConnectionAborted and the proxy dropped the tunnel within {:.0} ms",
        gone.as_millis()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), agent.task).await;
    proxy.stop().await;
}
