//! The QUIC transport end to end, on real sockets: an agent over QUIC serving client streams
//! (over SSH here; clients on QUIC are in `quic_client.rs`), 200 × 4 MiB with SHA-256, the
//! fallback to SSH when UDP is blocked, refused logins (user certificate, untrusted CA, expired,
//! replayed exporter signature), and garbage datagrams and Initial floods on the UDP port.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postern_client::ProxySession;
use postern_proxy::mint::{self, CertSpec};
use russh::keys::{Certificate, PrivateKey};
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_proto::quic::{AGENT_CONTEXT, ALPN, EXPORTER_LABEL, Frame, sign_binding};

/// A QUIC client endpoint that trusts any certificate (the tests check Postern's own login, not
/// the TLS layer).
fn raw_client() -> (quinn::Endpoint, quinn::ClientConfig) {
    let mut tls = postern_dial::web::tls_config(&postern_dial::web::WebTrust::Insecure).unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, quinn::ClientConfig::new(Arc::new(crypto)))
}

fn quic_addr(proxy: &Proxy) -> SocketAddr {
    // The UDP twin of the tunnel port.
    proxy.tunnel
}

/// This connection's agent exporter value.
fn agent_value(conn: &quinn::Connection) -> [u8; 32] {
    let mut v = [0u8; 32];
    conn.export_keying_material(&mut v, EXPORTER_LABEL, AGENT_CONTEXT)
        .map_err(|_| "exporter")
        .unwrap();
    v
}

/// Logs in over a raw QUIC connection with `cert`, signing with `sign(conn)`. Returns the proxy's
/// first answer frame, or the connection error.
async fn raw_login(
    proxy: &Proxy,
    login: &str,
    cert: &Certificate,
    sign: impl FnOnce(&quinn::Connection) -> String,
) -> Result<Frame, String> {
    let (endpoint, client) = raw_client();
    let conn = endpoint
        .connect_with(client, quic_addr(proxy), "localhost")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut out = BytesMut::new();
    Frame::AgentAuth {
        login: login.into(),
        cert: cert.to_openssh().unwrap(),
        signature: sign(&conn),
    }
    .encode(&mut out)
    .unwrap();
    send.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(f) = Frame::decode_from(&mut buf) {
                return Ok(f);
            }
            match recv.read_chunk(65536, true).await {
                Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                Ok(None) => return Err("stream closed".to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no answer".to_string())?;
    conn.close(0u32.into(), b"");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_over_quic_serves_client_streams() {
    init_tracing();
    let pki = Pki::new("q1");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let found = postern_dial::web::find(&proxy.web.to_string(), &proxy.web_trust())
        .await
        .unwrap();
    assert_eq!(found.proxy.transports, vec!["quic", "ssh"]);
    let echo = echo_server().await;
    let agent = start_agent(quic_agent_config(&pki, "h1", &proxy, &[("auth", echo)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let mut s = wait_stream(&session, "auth", "q1", Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut s, b"over quic").await, b"over quic");
    // Half-close: the client's EOF reaches the service, whose answer and EOF come back.
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"last words");
    let m = scrape(proxy.ops).await;
    assert_eq!(
        metric(
            &m,
            "postern_tunnels_connected",
            &[("cluster", "q1"), ("transport", "quic")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "postern_tunnels_connected",
            &[("cluster", "q1"), ("transport", "ssh")]
        ),
        0.0
    );
    agent.stop().await;
    // The tunnel's end is seen and counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(proxy.ops).await;
        if metric(
            &m,
            "postern_tunnel_disconnects_total",
            &[("cluster", "q1"), ("transport", "quic")],
        ) >= 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "QUIC tunnel end not counted: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop().await;
}

/// 200 concurrent streams through one QUIC tunnel, 4 MiB of pseudo-random bytes each, echoed and
/// SHA-256 checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_over_quic_keep_every_byte() {
    init_tracing();
    let streams = 200usize;
    let bytes = 4usize << 20;
    let started = Instant::now();
    let pki = Pki::new("qbulk");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let agent = start_agent(quic_agent_config(&pki, "h1", &proxy, &[("auth", echo)]));
    let session = Arc::new(
        ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
            .await
            .unwrap(),
    );
    wait_stream(&session, "auth", "qbulk", Duration::from_secs(10)).await;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let session = session.clone();
        tasks.push(tokio::spawn(async move {
            let stream = session.open("auth", "qbulk", 0).await.unwrap();
            let (mut r, mut w) = tokio::io::split(stream);
            let mut data = vec![0u8; bytes];
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
            for chunk in data.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            let sent = Sha256::digest(&data);
            let writer = tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Sha256::new();
            let mut n = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let k = r.read(&mut buf).await.unwrap();
                if k == 0 {
                    break;
                }
                got.update(&buf[..k]);
                n += k;
            }
            writer.await.unwrap();
            assert_eq!(n, bytes, "stream {i} length");
            assert_eq!(got.finalize(), sent, "stream {i} digest");
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(300), all)
        .await
        .expect("bounded run");
    eprintln!(
        "QUIC: {streams} streams x {bytes} bytes echoed in {:?}",
        started.elapsed()
    );
    let m = scrape(proxy.ops).await;
    assert_eq!(
        metric(
            &m,
            "postern_tunnels_connected",
            &[("cluster", "qbulk"), ("transport", "quic")]
        ),
        1.0
    );
    agent.stop().await;
    proxy.stop().await;
}

/// UDP blocked: the agent's QUIC handshake gets no answer, and it falls back to SSH over TCP
/// once `quic_handshake_timeout_ms` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_falls_back_to_ssh_when_udp_is_blocked() {
    init_tracing();
    let pki = Pki::new("qfb");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    // A UDP port where nothing answers: bound, never read (no ICMP either, as behind a
    // firewall that drops).
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo = echo_server().await;
    let mut config = agent_config(&pki, "h1", &proxy, &[("auth", echo)]);
    config.transport.mode = postern_agent::config::TransportMode::Auto;
    config.transport.quic_addr = Some(black_hole.local_addr().unwrap().to_string());
    let bound = Duration::from_millis(config.transport.quic_handshake_timeout_ms);
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let started = Instant::now();
    let agent = start_agent(config);
    let mut s = wait_stream(&session, "auth", "qfb", Duration::from_secs(15)).await;
    let took = started.elapsed();
    eprintln!(
        "fallback: first stream served over SSH {took:?} after the agent started (QUIC bound {bound:?})"
    );
    assert!(took >= bound, "the agent did not try QUIC first ({took:?})");
    assert!(
        took < bound + Duration::from_secs(3),
        "fallback took {took:?}"
    );
    assert_eq!(echo_once(&mut s, b"via ssh").await, b"via ssh");
    let m = scrape(proxy.ops).await;
    assert_eq!(
        metric(
            &m,
            "postern_tunnels_connected",
            &[("cluster", "qfb"), ("transport", "ssh")]
        ),
        1.0
    );
    agent.stop().await;
    proxy.stop().await;
}

/// Refused QUIC logins: a user certificate, an untrusted CA, an expired certificate, and a
/// signature replayed from another connection. Each is refused and counted by reason; a valid
/// login on the same proxy is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_quic_logins_are_refused_and_counted() {
    init_tracing();
    let pki = Pki::new("qauth");
    let proxy = start_proxy(&[&pki], |c| {
        // The refusals below come from one address.
        c.limits.max_auth_failures_per_source_per_minute = 1000;
    })
    .await;
    let login = tunnel_proto::names::agent_login("h1", "qauth");
    let agent_spec = CertSpec::Agent {
        host_id: "h1".into(),
        cluster: "qauth".into(),
    };
    let signed =
        |key: PrivateKey| move |c: &quinn::Connection| sign_binding(&key, &agent_value(c)).unwrap();

    // A valid login first: the proxy answers with its own proof.
    let (k, c) = pki.cert(&pki.host_ca, &agent_spec);
    let ok = raw_login(&proxy, &login, &c, signed(k)).await.unwrap();
    assert!(matches!(ok, Frame::ProxyAuth { .. }), "{ok:?}");

    let refused = |r: &Result<Frame, String>| matches!(r, Ok(Frame::Refused { .. }));

    // A user certificate presented for an agent login: the cluster's user CA signs no agents
    // (untrusted_ca, as on SSH); a user-type certificate from the host CA is the wrong type.
    let (k, c) = pki.cert(&pki.user_ca, &CertSpec::User { user: "h1".into() });
    let r = raw_login(&proxy, &login, &c, signed(k)).await;
    assert!(refused(&r), "user certificate accepted: {r:?}");
    let (k, c) = pki.cert(&pki.host_ca, &CertSpec::User { user: "h1".into() });
    let r = raw_login(&proxy, &login, &c, signed(k)).await;
    assert!(refused(&r), "user-type certificate accepted: {r:?}");

    // An agent certificate from a CA the cluster does not trust.
    let rogue = mint::generate_key();
    let (k, c) = pki.cert(&rogue, &agent_spec);
    let r = raw_login(&proxy, &login, &c, signed(k)).await;
    assert!(refused(&r), "untrusted CA accepted: {r:?}");

    // An expired certificate.
    let now = mint::now_unix();
    let (k, c) = pki.cert_window(&pki.host_ca, &agent_spec, now - 7200, now - 3600);
    let r = raw_login(&proxy, &login, &c, signed(k)).await;
    assert!(refused(&r), "expired certificate accepted: {r:?}");

    // A valid certificate and key, but the signature made on another connection (a relay or a
    // replay): refused.
    let (k, c) = pki.cert(&pki.host_ca, &agent_spec);
    let (endpoint, client) = raw_client();
    let first = endpoint
        .connect_with(client, quic_addr(&proxy), "localhost")
        .unwrap()
        .await
        .unwrap();
    let replayed = sign_binding(&k, &agent_value(&first)).unwrap();
    let r = raw_login(&proxy, &login, &c, |_| replayed.clone()).await;
    assert!(
        matches!(&r, Ok(Frame::Refused { reason }) if reason.contains("replayed")),
        "replayed signature: {r:?}"
    );
    first.close(0u32.into(), b"");

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(proxy.ops).await;
        let counted = |reason: &str| {
            metric(
                &m,
                "postern_auth_failures_total",
                &[("reason", reason), ("transport", "quic")],
            )
        };
        let all = [
            "wrong_cert_type",
            "untrusted_ca",
            "expired",
            "binding_mismatch",
        ];
        if all.iter().all(|r| counted(r) >= 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refusals not all counted: {:?}\n{m}",
            all.map(|r| (r, counted(r)))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop().await;
}

/// Garbage datagrams, forged Initials and a burst of real handshakes that never log in: the
/// proxy stays up, and an agent then connects over QUIC and serves a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_initial_floods_do_not_take_the_proxy_down() {
    init_tracing();
    let pki = Pki::new("qflood");
    let proxy = start_proxy(&[&pki], |c| {
        c.ssh.handshake_timeout_secs = 2;
        c.limits.max_unauthenticated = 64;
        c.limits.max_connects_per_source_per_minute = 100_000;
    })
    .await;
    let target = quic_addr(&proxy);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // 20,000 datagrams of random bytes, 1..1500 long.
    for _ in 0..20_000 {
        let len = (next() % 1500) as usize + 1;
        let d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = udp.send_to(&d, target).await;
    }
    // 20,000 forged Initials: a valid long header (version 1, random connection ids, no token),
    // padded to 1200 bytes, with a payload that does not decrypt.
    for _ in 0..20_000 {
        let mut d = vec![0xc3, 0, 0, 0, 1, 8];
        d.extend((0..8).map(|_| next() as u8));
        d.push(8);
        d.extend((0..8).map(|_| next() as u8));
        d.push(0); // token length
        d.extend([0x44, 0x9e]); // length 1182 (2-byte varint)
        while d.len() < 1200 {
            d.push(next() as u8);
        }
        let _ = udp.send_to(&d, target).await;
    }
    // 200 real handshakes (each passes the Retry) that never log in.
    let (endpoint, client) = raw_client();
    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Ok(c) = endpoint.connect_with(client.clone(), target, "localhost") {
            idle.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), c).await;
            }));
        }
    }
    for t in idle {
        let _ = t.await;
    }
    let (status, _) = http_get(proxy.ops, "/healthz").await;
    assert_eq!(status, 200);
    let echo = echo_server().await;
    let agent = start_agent(quic_agent_config(&pki, "h1", &proxy, &[("auth", echo)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let mut s = wait_stream(&session, "auth", "qflood", Duration::from_secs(15)).await;
    assert_eq!(echo_once(&mut s, b"still serving").await, b"still serving");
    let m = scrape(proxy.ops).await;
    assert_eq!(
        metric(
            &m,
            "postern_tunnels_connected",
            &[("cluster", "qflood"), ("transport", "quic")]
        ),
        1.0
    );
    agent.stop().await;
    proxy.stop().await;
}

/// A UDP relay between one agent and the proxy that can be frozen (a half-open network: every
/// datagram dropped, both ways, with no error to either side).
struct UdpRelay {
    addr: SocketAddr,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl UdpRelay {
    async fn start(upstream: SocketAddr) -> UdpRelay {
        use std::sync::atomic::{AtomicBool, Ordering};
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            let mut backs: std::collections::HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> =
                Default::default();
            let mut buf = vec![0u8; 65536];
            while let Ok((len, from)) = front.recv_from(&mut buf).await {
                if f.load(Ordering::SeqCst) {
                    continue;
                }
                let back = match backs.get(&from) {
                    Some(b) => b.clone(),
                    None => {
                        let b = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        b.connect(upstream).await.unwrap();
                        let (b2, front2, f2) = (b.clone(), front.clone(), f.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(len) = b2.recv(&mut buf).await {
                                if !f2.load(Ordering::SeqCst) {
                                    let _ = front2.send_to(&buf[..len], from).await;
                                }
                            }
                        });
                        backs.insert(from, b.clone());
                        b
                    }
                };
                let _ = back.send(&buf[..len]).await;
            }
        });
        UdpRelay { addr, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A half-open network under a QUIC tunnel: both sides notice within their idle timeouts, the
/// stream on it ends with an error, and the agent redials and serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_quic_tunnel_is_detected_on_both_sides() {
    init_tracing();
    let pki = Pki::new("qhalf");
    let proxy = start_proxy(&[&pki], |c| {
        c.ssh.keepalive_interval_secs = 1;
        c.ssh.keepalive_max = 2;
    })
    .await;
    let relay = UdpRelay::start(quic_addr(&proxy)).await;
    let echo = echo_server().await;
    let mut cfg = quic_agent_config(&pki, "a1", &proxy, &[("auth", echo)]);
    cfg.proxy = None;
    cfg.tunnel_addr = Some(proxy.tunnel.to_string());
    cfg.transport.quic_addr = Some(relay.addr.to_string());
    cfg.keepalive_interval_secs = 1;
    let agent = start_agent(cfg);
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let mut s = wait_stream(&session, "auth", "qhalf", Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut s, b"before").await, b"before");

    relay.freeze();
    let frozen_at = Instant::now();
    loop {
        let m = scrape(proxy.ops).await;
        if metric(&m, "postern_tunnels_connected", &[("cluster", "qhalf")]) == 0.0 {
            break;
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(30),
            "the proxy kept the half-open tunnel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let proxy_side = frozen_at.elapsed();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("stream ends");
    assert!(
        r.is_err(),
        "a stream on a dead tunnel must end with an error, got {r:?}"
    );
    relay
        .frozen
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // The agent redials (from the same UDP socket: one per agent) and logs in again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = scrape(proxy.ops).await;
        let connects = metric(
            &m,
            "postern_tunnel_connects_total",
            &[("cluster", "qhalf"), ("transport", "quic")],
        );
        if connects >= 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not redial");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent_side = frozen_at.elapsed();
    let mut s2 = wait_stream(&session, "auth", "qhalf", Duration::from_secs(30)).await;
    assert_eq!(echo_once(&mut s2, b"after").await, b"after");
    eprintln!(
        "QUIC half-open (keepalive 1 s, idle 3-4 s): proxy dropped the tunnel after {:.1} s, agent redialled after {:.1} s, streams served again after {:.1} s",
        proxy_side.as_secs_f64(),
        agent_side.as_secs_f64(),
        frozen_at.elapsed().as_secs_f64()
    );
    agent.stop().await;
    proxy.stop().await;
}
