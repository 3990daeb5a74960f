//! One slow client never stalls another, on both transports: on SSH, per-stream credit between
//! proxy and agent keeps a stream whose reader stops from holding back the rest of its tunnel; on
//! QUIC, QUIC's own per-stream flow control does, because the connection window covers every
//! stream's window (`quic.connection_window_bytes` ≥ streams × `quic.stream_window_bytes`). The
//! stopped stream resumes with every byte. Its own binary, so the 200-stream test does not run
//! beside it.

mod support;

use std::time::{Duration, Instant};

use postern_agent::config::TransportMode;
use postern_client::ProxySession;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longer than the old stall breaker's 10 s, which closed a stream whose reader paused.
const PAUSE: Duration = Duration::from_secs(12);
/// Bytes the firehose sends per connection.
const FIREHOSE_BYTES: usize = 32 << 20;
/// Bound on one echo round trip of the other client while the first one is stopped.
const ECHO_LIMIT: Duration = Duration::from_secs(2);

/// Deterministic bytes: what the firehose sends, and what the client hashes to compare.
fn firehose_bytes() -> Vec<u8> {
    test_bytes(0x2545_f491_4f6c_dd1d, FIREHOSE_BYTES)
}

/// A download whose reader stops completely for longer than the old breaker allowed: another
/// client's echoes through the same tunnel (SSH) keep their pace, and the download then completes
/// with its SHA-256 intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_reader_stalls_only_its_own_stream_and_resumes_intact() {
    stopped_reader_scenario("iso1", TransportMode::Ssh).await;
}

/// The same over a QUIC tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_a_stopped_reader_stalls_only_its_own_stream_and_resumes_intact() {
    stopped_reader_scenario("isoq", TransportMode::Quic).await;
}

/// A stops reading for [`PAUSE`] while B echoes through the same tunnel, which runs over
/// `transport`; then A resumes and must get every byte.
async fn stopped_reader_scenario(cluster: &str, transport: TransportMode) {
    init_tracing();
    let pki = Pki::new(cluster);
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let hose = blob_server(firehose_bytes()).await;
    let mut config = agent_config(&pki, "h1", &proxy, &[("echo", echo), ("hose", hose)]);
    config.transport.mode = transport;
    let agent = start_agent(config);
    let alice = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let bob = ProxySession::connect(&client_opts(&pki, &proxy, "bob"))
        .await
        .unwrap();
    let mut b = wait_stream(&bob, "echo", cluster, Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut b, b"warm").await, b"warm");

    // A reads the first MiB, then stops reading altogether.
    let mut a = alice.open("hose", cluster, 0).await.unwrap();
    let mut hasher = Sha256::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    while got < (1 << 20) {
        let n = a.read(&mut buf).await.unwrap();
        assert!(n > 0, "the download ended early");
        hasher.update(&buf[..n]);
        got += n;
    }
    let stopped = Instant::now();
    // B echoes through the same tunnel while A is stopped.
    let mut rounds = 0;
    let mut worst = Duration::ZERO;
    while stopped.elapsed() < PAUSE {
        let t = Instant::now();
        let echoed = tokio::time::timeout(ECHO_LIMIT, echo_once(&mut b, b"ping"))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "echo {rounds} took over {ECHO_LIMIT:?} while another client's reader was \
                     stopped for {:?}: the tunnel is stalled",
                    stopped.elapsed()
                )
            });
        assert_eq!(echoed, b"ping");
        worst = worst.max(t.elapsed());
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{rounds} echoes while A was stopped, slowest {worst:?}");
    assert!(rounds >= 50, "only {rounds} echoes in {PAUSE:?}");

    // A resumes after the pause and gets every byte.
    let rest = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let n = a
                .read(&mut buf)
                .await
                .expect("the paused stream was not cut");
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            got += n;
        }
    })
    .await;
    assert!(rest.is_ok(), "the paused download did not finish");
    assert_eq!(got, FIREHOSE_BYTES);
    assert_eq!(
        hasher.finalize()[..],
        Sha256::digest(firehose_bytes())[..],
        "the paused download's bytes changed"
    );
    let label = if transport == TransportMode::Quic {
        "quic"
    } else {
        "ssh"
    };
    let m = scrape(proxy.ops).await;
    assert_eq!(
        metric(
            &m,
            "postern_tunnels_connected",
            &[("cluster", cluster), ("transport", label)]
        ),
        1.0,
        "the scenario ran over {label}: {m}"
    );
    drop(a);
    drop(b);
    agent.stop().await;
    proxy.stop().await;
}

/// A client that writes without reading to a service that echoes fills every queue on its own
/// stream's path (with credit on the client's leg, only that stream stops; an OpenSSH client's
/// whole connection would: see the README). Other clients' streams through the same tunnel keep
/// working all along, and once the hog gives up, its tunnel serves new streams as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_stops_reading_does_not_wedge_its_tunnel() {
    init_tracing();
    let pki = Pki::new("stall1");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let agent = start_agent(agent_config(&pki, "h1", &proxy, &[("auth", echo)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    wait_stream(&session, "auth", "stall1", Duration::from_secs(5)).await;

    let hog = session.open("auth", "stall1", 0).await.unwrap();
    let (hog_r, mut hog_w) = tokio::io::split(hog);
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..64 {
            if hog_w.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    // Let the hog fill the queues before anyone else asks for anything.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let other = ProxySession::connect(&client_opts(&pki, &proxy, "bob"))
        .await
        .unwrap();
    let started = Instant::now();
    let mut s = tokio::time::timeout(Duration::from_secs(5), other.open("auth", "stall1", 0))
        .await
        .expect("a new stream opens while the hog is stalled")
        .unwrap();
    for _ in 0..20 {
        let echoed = tokio::time::timeout(ECHO_LIMIT, echo_once(&mut s, b"not wedged"))
            .await
            .expect("the tunnel keeps serving other streams");
        assert_eq!(echoed, b"not wedged");
    }
    eprintln!(
        "other stream served 20 echoes {:?} after the hog started",
        started.elapsed()
    );

    // The hog gives up (its connection closes); the tunnel serves new streams as before.
    writer.abort();
    drop(hog_r);
    drop(session);
    let fresh = ProxySession::connect(&client_opts(&pki, &proxy, "carol"))
        .await
        .unwrap();
    let mut f = tokio::time::timeout(Duration::from_secs(10), fresh.open("auth", "stall1", 0))
        .await
        .expect("the tunnel opens streams after the hog left")
        .unwrap();
    assert_eq!(echo_once(&mut f, b"after").await, b"after");
    let echoed = tokio::time::timeout(ECHO_LIMIT, echo_once(&mut s, b"still here"))
        .await
        .expect("the other client's stream is still served");
    assert_eq!(echoed, b"still here");
    agent.stop().await;
    proxy.stop().await;
}
