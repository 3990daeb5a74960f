//! A client session is a multiplexer too: on both agent transports, several large echoes that
//! write and read at once through one client session all complete (before per-stream credit on
//! the client's leg, the proxy's session loop for that client blocked on a full stream queue,
//! stopped reading the client's window adjustments, and the echoes deadlocked for good), and a
//! stream whose reader stops holds back none of the session's other streams.

mod support;

use std::time::{Duration, Instant};

use postern_agent::config::TransportMode;
use postern_client::ProxySession;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Streams echoed at once through one session.
const STREAMS: usize = 4;
/// Bytes each stream sends and reads back: well past every window and queue on the way.
const ECHO_BYTES: usize = 48 << 20;

/// Deterministic bytes for stream `seed`.
fn payload(seed: u64) -> Vec<u8> {
    test_bytes(seed, ECHO_BYTES)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_echoes_through_one_session_complete_over_ssh() {
    large_echoes("bulk1", TransportMode::Ssh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_echoes_through_one_session_complete_over_quic() {
    large_echoes("bulkq", TransportMode::Quic).await;
}

/// [`STREAMS`] echoes of [`ECHO_BYTES`] each, writing and reading at once, through one session.
async fn large_echoes(cluster: &str, transport: TransportMode) {
    init_tracing();
    let pki = Pki::new(cluster);
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let mut config = agent_config(&pki, "h1", &proxy, &[("echo", echo)]);
    config.transport.mode = transport;
    let agent = start_agent(config);
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    wait_stream(&session, "echo", cluster, Duration::from_secs(10)).await;

    let started = Instant::now();
    let mut runs = Vec::new();
    for i in 0..STREAMS {
        let s = session.open("echo", cluster, 0).await.unwrap();
        runs.push(tokio::spawn(async move {
            let data = payload(i as u64);
            let want = Sha256::digest(&data);
            let (mut rd, mut wr) = tokio::io::split(s);
            let send = async move {
                wr.write_all(&data).await.unwrap();
                wr
            };
            let recv = async move {
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 64 << 10];
                let mut got = 0usize;
                while got < ECHO_BYTES {
                    let n = rd.read(&mut buf).await.expect("the echo was not cut");
                    assert!(n > 0, "stream {i}: the echo ended after {got} bytes");
                    hasher.update(&buf[..n]);
                    got += n;
                }
                hasher.finalize()
            };
            let (_wr, got) = tokio::join!(send, recv);
            assert_eq!(got[..], want[..], "stream {i}: the echoed bytes changed");
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(240), async {
        for r in runs {
            r.await.unwrap();
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "{STREAMS} echoes of {} MiB through one session did not finish in 240 s: deadlocked",
        ECHO_BYTES >> 20
    );
    eprintln!(
        "{STREAMS} x {} MiB echoed over {transport:?} in {:?}",
        ECHO_BYTES >> 20,
        started.elapsed()
    );
    agent.stop().await;
    proxy.stop().await;
}

/// A download whose reader stops, and an echo, on the same session: the echo keeps its pace
/// (the session's other streams are not held back by the stopped one), and the download then
/// completes intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_stream_holds_back_none_of_its_sessions_other_streams() {
    init_tracing();
    let pki = Pki::new("bulk2");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let hose = blob_server(payload(7)).await;
    let agent = start_agent(agent_config(
        &pki,
        "h1",
        &proxy,
        &[("echo", echo), ("hose", hose)],
    ));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let mut e = wait_stream(&session, "echo", "bulk2", Duration::from_secs(10)).await;
    let mut h = session.open("hose", "bulk2", 0).await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let first = h.read(&mut buf).await.unwrap();
    assert!(first > 0);
    let mut hasher = Sha256::new();
    hasher.update(&buf[..first]);
    // Let the download fill everything it can while its reader is stopped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..30 {
        let echoed = tokio::time::timeout(Duration::from_secs(2), echo_once(&mut e, b"ping"))
            .await
            .unwrap_or_else(|_| {
                panic!("echo {i} on the same session waited over 2 s behind the stopped stream")
            });
        assert_eq!(echoed, b"ping");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut got = first;
    let rest = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let n = h
                .read(&mut buf)
                .await
                .expect("the stopped stream was not cut");
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            got += n;
        }
    })
    .await;
    assert!(rest.is_ok(), "the stopped download did not finish");
    assert_eq!(got, ECHO_BYTES);
    assert_eq!(hasher.finalize()[..], Sha256::digest(payload(7))[..]);
    agent.stop().await;
    proxy.stop().await;
}
