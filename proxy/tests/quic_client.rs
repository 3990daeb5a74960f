//! Clients over QUIC, end to end on real sockets: a user logs in to the proxy's QUIC listener
//! with the same certificate as on SSH and reaches targets behind agents of either transport with
//! every byte intact; refusals say why (unknown cluster or target, the reserved login target, the
//! connection's stream limit, an untrusted CA); a stream the application stops reading holds back
//! none of the session's others; and a lock on the user closes the QUIC session with its message.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_client::{ProxyAddr, ProxySession, Transport};
use postern_proxy::mint::{self, CertSpec};
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes `data` through `stream`, writing and reading at once; returns what came back.
async fn echo_all(stream: postern_client::TunnelStream, data: &[u8]) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let owned = data.to_vec();
    let writer = tokio::spawn(async move {
        wr.write_all(&owned).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut back = Vec::with_capacity(data.len());
    rd.read_to_end(&mut back).await.unwrap();
    let _ = writer.await.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_client_reaches_targets_behind_both_agent_transports() {
    init_tracing();
    let pki = Pki::new("qcli");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let data = test_bytes(7, 6 << 20);
    let blob = blob_server(data.clone()).await;
    let ssh_agent = start_agent(agent_config(
        &pki,
        "over-ssh",
        &proxy,
        &[("echo-s", echo), ("blob-s", blob)],
    ));
    let quic_agent = start_agent(quic_agent_config(
        &pki,
        "over-quic",
        &proxy,
        &[("echo-q", echo), ("blob-q", blob)],
    ));
    let s = ProxySession::connect_over(&client_opts(&pki, &proxy, "alice"), Transport::Quic)
        .await
        .unwrap();
    for (echo_target, blob_target) in [("echo-s", "blob-s"), ("echo-q", "blob-q")] {
        let st = wait_stream(&s, echo_target, "qcli", Duration::from_secs(20)).await;
        let up = test_bytes(1, 4 << 20);
        let back = echo_all(st, &up).await;
        assert_eq!(
            Sha256::digest(&back),
            Sha256::digest(&up),
            "{echo_target}: {} of {} bytes came back, or changed",
            back.len(),
            up.len()
        );
        let mut st = wait_stream(&s, blob_target, "qcli", Duration::from_secs(20)).await;
        let mut down = Vec::new();
        st.read_to_end(&mut down).await.unwrap();
        assert_eq!(
            Sha256::digest(&down),
            Sha256::digest(&data),
            "{blob_target}"
        );
    }
    let text = scrape(proxy.ops).await;
    let logins = metric(
        &text,
        "postern_handshake_duration_seconds_count",
        &[("role", "client"), ("transport", "quic")],
    );
    assert!(logins >= 1.0, "no QUIC client login counted:\n{text}");
    // Bytes are counted under the two directions the README lists, whatever the transports.
    for line in text
        .lines()
        .filter(|l| l.starts_with("postern_bytes_proxied_total{"))
    {
        assert!(
            line.contains("direction=\"client_to_agent\"")
                || line.contains("direction=\"agent_to_client\""),
            "unknown direction: {line}"
        );
    }
    let down = metric(
        &text,
        "postern_bytes_proxied_total",
        &[("direction", "agent_to_client")],
    );
    assert!(
        down >= (2 * (data.len() + (4 << 20))) as f64,
        "{down} bytes counted toward clients"
    );
    ssh_agent.stop().await;
    quic_agent.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_client_refusals_say_why() {
    init_tracing();
    let pki = Pki::new("qref");
    let proxy = start_proxy(&[&pki], |c| {
        c.limits.max_streams_per_client = 2;
        c.limits.max_auth_failures_per_source_per_minute = 1000;
    })
    .await;
    let echo = echo_server().await;
    let agent = start_agent(quic_agent_config(&pki, "h", &proxy, &[("echo", echo)]));
    let s = ProxySession::connect_over(&client_opts(&pki, &proxy, "bob"), Transport::Quic)
        .await
        .unwrap();
    let first = wait_stream(&s, "echo", "qref", Duration::from_secs(20)).await;
    let refused = |r: Result<postern_client::TunnelStream, postern_client::ClientError>| match r {
        Ok(_) => panic!("stream opened"),
        Err(e) => e.to_string(),
    };
    let why = refused(s.open("echo", "elsewhere", 0).await);
    assert!(why.contains("unknown cluster elsewhere"), "{why}");
    let why = refused(s.open("nothing", "qref", 0).await);
    assert!(why.contains("no target named 'nothing'"), "{why}");
    let why = refused(s.open("login", "qref", 0).await);
    assert!(why.contains("reserved"), "{why}");
    let why = refused(s.open_host("127.0.0.1", 22).await);
    assert!(why.contains("127.0.0.1"), "{why}");
    // Two streams open at once at most on this connection: the third is refused, saying so.
    let second = wait_stream(&s, "echo", "qref", Duration::from_secs(5)).await;
    let why = refused(s.open("echo", "qref", 0).await);
    assert!(why.contains("too many open streams"), "{why}");
    drop((first, second));
    // Freed: a stream opens again.
    let mut again = wait_stream(&s, "echo", "qref", Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut again, b"ping").await, b"ping");

    // A user certificate from a CA the cluster does not trust: the login is refused with the
    // reason, and counted.
    let rogue = mint::generate_key();
    let (key, cert) = pki.cert(&rogue, &CertSpec::User { user: "eve".into() });
    let mut opts = client_opts(&pki, &proxy, "eve");
    opts.identity = postern_dial::ssh::Identity::new(key, cert).unwrap();
    let err = match ProxySession::connect_over(&opts, Transport::Quic).await {
        Ok(_) => panic!("untrusted CA logged in"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("refused the login"), "{err}");
    assert!(err.contains("untrusted CA"), "{err}");
    // Counted once the proxy has closed the connection, which may be just after the client has
    // read the reason.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(proxy.ops).await;
        let counted = metric(
            &text,
            "postern_auth_failures_total",
            &[("reason", "untrusted_ca"), ("transport", "quic")],
        );
        if counted >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "untrusted CA not counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.stop().await;
    proxy.stop().await;
}

/// Stream A's application stops reading a download; stream B of the same QUIC session keeps
/// echoing; A then resumes and gets every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_quic_client_stream_holds_back_none_of_the_others() {
    init_tracing();
    let pki = Pki::new("qiso");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let data = test_bytes(3, 24 << 20);
    let blob = blob_server(data.clone()).await;
    let agent = start_agent(quic_agent_config(
        &pki,
        "h",
        &proxy,
        &[("echo", echo), ("blob", blob)],
    ));
    let s = ProxySession::connect_over(&client_opts(&pki, &proxy, "carol"), Transport::Quic)
        .await
        .unwrap();
    let mut a = wait_stream(&s, "blob", "qiso", Duration::from_secs(20)).await;
    let mut head = [0u8; 1];
    a.read_exact(&mut head).await.unwrap();
    let mut b = wait_stream(&s, "echo", "qiso", Duration::from_secs(5)).await;
    for i in 0..50u32 {
        let msg = format!("ping {i}");
        let back = tokio::time::timeout(Duration::from_secs(5), echo_once(&mut b, msg.as_bytes()))
            .await
            .unwrap_or_else(|_| panic!("echo {i} stalled behind the stopped stream"));
        assert_eq!(back, msg.as_bytes());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).await.unwrap();
    let mut all = head.to_vec();
    all.extend_from_slice(&rest);
    assert_eq!(Sha256::digest(&all), Sha256::digest(&data));
    agent.stop().await;
    proxy.stop().await;
}

const ECHO_ROLE: &str = "kind: role
metadata: {name: echo-user}
spec:
  allow:
    target_labels: {env: test}
version: v7
";

/// A lock on the user closes its QUIC session, saying why, and refuses its next QUIC login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_closes_a_quic_client_session_with_its_message() {
    init_tracing();
    let c = Cluster::start("qlock", 1, 60).await;
    c.role(ECHO_ROLE).await;
    let echo = echo_server().await;
    let agent = c
        .service_agent_on(
            "echo-h",
            0,
            &[("echo", echo, &[("env", "test")])],
            postern_agent::config::TransportMode::Quic,
        )
        .await;
    let _ = c
        .admin
        .create_user(postern_api::proto::CreateUserRequest {
            name: "dave".into(),
            roles: vec!["echo-user".into()],
            secret_ttl_secs: 0,
        })
        .await;
    let id = c.identity("dave").await;
    let p = &c.proxies[0];
    let opts = postern_client::auth::proxy_options(
        &id,
        ProxyAddr::Web {
            addr: p.web.to_string(),
            trust: p.web_trust(),
        },
    )
    .unwrap();
    let s = ProxySession::connect_over(&opts, Transport::Quic)
        .await
        .unwrap();
    let mut st = wait_stream(&s, "echo", "qlock", Duration::from_secs(20)).await;
    assert_eq!(echo_once(&mut st, b"before").await, b"before");
    c.admin
        .create_lock(postern_api::proto::Lock {
            user: "dave".into(),
            message: "dave is under review".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(10), st.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Err(_)) | Ok(Ok(0))),
        "the locked user's stream was not cut in 10 s: {r:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(why) = s.closed_reason() {
            assert!(why.contains("dave is under review"), "{why}");
            break;
        }
        assert!(Instant::now() < deadline, "no close reason");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = match ProxySession::connect_over(&opts, Transport::Quic).await {
        Ok(_) => panic!("a locked user logged in over QUIC"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("dave is under review"), "{err}");
    agent.stop().await;
    c.stop().await;
}

/// `Transport::Auto`: QUIC where the proxy offers it; SSH where it does not, or where nothing
/// answers over UDP (within the 1.5 s handshake bound); the session works either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_prefers_quic_and_falls_back_to_ssh() {
    init_tracing();
    let pki = Pki::new("qauto");
    let with_quic = start_proxy(&[&pki], |_| {}).await;
    let without = start_proxy(&[&pki], |c| c.quic.enabled = false).await;
    let echo = echo_server().await;
    let a1 = start_agent(agent_config(&pki, "h1", &with_quic, &[("echo", echo)]));
    let a2 = start_agent(agent_config(&pki, "h2", &without, &[("echo", echo)]));
    // Offered: QUIC.
    let s = ProxySession::connect_over(&client_opts(&pki, &with_quic, "ann"), Transport::Auto)
        .await
        .unwrap();
    let mut st = wait_stream(&s, "echo", "qauto", Duration::from_secs(20)).await;
    assert_eq!(echo_once(&mut st, b"quic").await, b"quic");
    assert_eq!(s.transport(), Transport::Quic);

    // Not offered (discovery lists only SSH): SSH at once.
    let started = Instant::now();
    let s = ProxySession::connect_over(&client_opts(&pki, &without, "ann"), Transport::Auto)
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let mut st = wait_stream(&s, "echo", "qauto", Duration::from_secs(20)).await;
    assert_eq!(echo_once(&mut st, b"ssh").await, b"ssh");
    assert_eq!(s.transport(), Transport::Ssh);

    // A tunnel address whose UDP twin never answers (a bound socket nobody reads, as behind a
    // firewall that drops): QUIC is tried for at most the bound, then SSH.
    // One port for both (the UDP socket's port from `bind(:0)` may be taken over TCP).
    let port = free_port();
    let black_hole = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let relay = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let tunnel = without.tunnel;
    tokio::spawn(async move {
        while let Ok((mut c, _)) = relay.accept().await {
            tokio::spawn(async move {
                let mut up = tokio::net::TcpStream::connect(tunnel).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            });
        }
    });
    let mut opts = client_opts(&pki, &without, "ann");
    opts.proxy = ProxyAddr::Tunnel(black_hole.local_addr().unwrap().to_string());
    let started = Instant::now();
    let s = ProxySession::connect_over(&opts, Transport::Auto)
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "fell back after {took:?}"
    );
    let mut st = wait_stream(&s, "echo", "qauto", Duration::from_secs(20)).await;
    assert_eq!(echo_once(&mut st, b"fallback").await, b"fallback");
    assert_eq!(s.transport(), Transport::Ssh);
    drop(black_hole);
    a1.stop().await;
    a2.stop().await;
    with_quic.stop().await;
    without.stop().await;
}

/// 64 streams at once on one QUIC client session, each echoing 1 MiB through a QUIC agent (the
/// QUIC-to-QUIC relay) and through an SSH agent: every byte back, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_quic_client_streams_keep_every_byte() {
    init_tracing();
    let pki = Pki::new("qmany");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let qa = start_agent(quic_agent_config(&pki, "q", &proxy, &[("echo-q", echo)]));
    let sa = start_agent(agent_config(&pki, "s", &proxy, &[("echo-s", echo)]));
    let s = std::sync::Arc::new(
        ProxySession::connect_over(&client_opts(&pki, &proxy, "erin"), Transport::Quic)
            .await
            .unwrap(),
    );
    for target in ["echo-q", "echo-s"] {
        drop(wait_stream(&s, target, "qmany", Duration::from_secs(20)).await);
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let data = test_bytes(i, 1 << 20);
                    let st = s.open(target, "qmany", 0).await.unwrap();
                    let back = echo_all(st, &data).await;
                    assert!(
                        back == data,
                        "{target} stream {i}: {} bytes back",
                        back.len()
                    );
                })
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("64 streams in 120 s")
                .unwrap();
        }
    }
    qa.stop().await;
    sa.stop().await;
    proxy.stop().await;
}

/// Logs `user` in over a raw QUIC connection (the SDK's login, by hand); returns the connection.
async fn raw_client_login(pki: &Pki, proxy: &Proxy, user: &str) -> quinn::Connection {
    let mut tls = postern_dial::web::tls_config(&postern_dial::web::WebTrust::Insecure).unwrap();
    tls.alpn_protocols = vec![tunnel_proto::quic::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(
            quinn::ClientConfig::new(std::sync::Arc::new(crypto)),
            proxy.tunnel,
            "localhost",
        )
        .unwrap()
        .await
        .unwrap();
    let id = pki.user(user);
    let auth = postern_dial::quic::auth_frame(
        &conn,
        tunnel_proto::quic::AGENT_CONTEXT,
        user.into(),
        &id.key,
        &id.cert,
    )
    .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut control = tunnel_proto::frame_stream::FrameStream::new(send, recv);
    control.write(&[auth]).await.unwrap();
    let answer = control.read().await.unwrap();
    assert!(
        matches!(answer, tunnel_proto::quic::Frame::ProxyAuth { .. }),
        "{answer:?}"
    );
    // The login's stream stays open, as the SDK's does.
    std::mem::forget(control);
    conn
}

/// The proxy's answer on a client stream that started with `bytes` (then finished).
async fn answer_to(conn: &quinn::Connection, bytes: &[u8]) -> tunnel_proto::quic::Frame {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    let mut buf = bytes::BytesMut::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(f) = tunnel_proto::quic::Frame::decode_from(&mut buf) {
                return f;
            }
            match recv.read_chunk(65536, true).await.unwrap() {
                Some(c) => buf.extend_from_slice(&c.bytes),
                None => panic!("stream ended without an answer"),
            }
        }
    })
    .await
    .expect("an answer within 15 s")
}

/// Bad first frames on a logged-in client's streams: garbage, a frame that is not `Open`, a
/// length past the frame limit, nothing at all. Each stream is refused saying what a stream
/// must start with; the connection and the proxy keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_first_frames_on_quic_client_streams_are_refused() {
    use tunnel_proto::quic::Frame;
    init_tracing();
    let pki = Pki::new("qbad");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let agent = start_agent(quic_agent_config(&pki, "h", &proxy, &[("echo", echo)]));
    let conn = raw_client_login(&pki, &proxy, "mallory").await;
    let mut register = bytes::BytesMut::new();
    Frame::Register {
        target: "echo".into(),
    }
    .encode(&mut register)
    .unwrap();
    let cases: [(&str, Vec<u8>); 4] = [
        ("garbage", b"\x00\x00\x00\x05\xffhello".to_vec()),
        ("not an Open frame", register.to_vec()),
        ("a length past the limit", b"\x7f\xff\xff\xff\x20".to_vec()),
        ("nothing", Vec::new()),
    ];
    for (what, bytes) in cases {
        match answer_to(&conn, &bytes).await {
            Frame::Refuse { reason } => assert!(
                reason.contains("must start with an Open frame"),
                "{what}: {reason}"
            ),
            other => panic!("{what}: answered {other:?}"),
        }
    }
    // The same connection still opens a good stream, and the SDK logs in as before.
    let mut open = bytes::BytesMut::new();
    Frame::Open {
        target: "echo.qbad".into(),
        port: 0,
        originator: "test".into(),
        originator_port: 0,
    }
    .encode(&mut open)
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match answer_to(&conn, &open).await {
            Frame::Accept => break,
            other => assert!(Instant::now() < deadline, "no Accept in 20 s: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = ProxySession::connect_over(&client_opts(&pki, &proxy, "bob"), Transport::Quic)
        .await
        .unwrap();
    let mut st = wait_stream(&s, "echo", "qbad", Duration::from_secs(5)).await;
    assert_eq!(echo_once(&mut st, b"still").await, b"still");
    agent.stop().await;
    proxy.stop().await;
}

/// `DialOptions::quic_mtu_upper_bound`: a session with the bound raised to 6500 carries bulk
/// intact (loopback lets discovery reach it); a bound outside 1200..=6500 is refused before
/// anything is dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quic_mtu_bound_is_the_clients_to_raise_within_limits() {
    init_tracing();
    let pki = Pki::new("qmtu");
    let proxy = start_proxy(&[&pki], |c| c.quic.mtu_upper_bound = 6500).await;
    let echo = echo_server().await;
    let agent = start_agent(quic_agent_config(&pki, "h", &proxy, &[("echo", echo)]));
    let opts = client_opts(&pki, &proxy, "fred");
    let dial = |m| postern_client::DialOptions {
        transport: Transport::Quic,
        quic_mtu_upper_bound: m,
    };
    let s = ProxySession::connect_with(&opts, dial(6500)).await.unwrap();
    let st = wait_stream(&s, "echo", "qmtu", Duration::from_secs(20)).await;
    let data = test_bytes(9, 4 << 20);
    assert!(echo_all(st, &data).await == data);
    for bad in [1199, 6501, 9000] {
        let err = match ProxySession::connect_with(&opts, dial(bad)).await {
            Ok(_) => panic!("MTU bound {bad} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("1200..=6500"), "{bad}: {err}");
    }
    agent.stop().await;
    proxy.stop().await;
}
