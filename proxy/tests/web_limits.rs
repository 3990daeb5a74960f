//! The web listener's limits: a slow login body and an idle connection are cut, connection
//! caps refuse at accept, a request head over the limit is refused exactly, a long path is not
//! echoed, and the login relay refuses unknown clusters and attacker-sized names clearly.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn web_tls_from(
    proxy: &Proxy,
    ip: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let cfg = postern_dial::web::tls_config(&proxy.web_trust()).unwrap();
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{ip}:0").parse().unwrap())?;
    let tcp = s.connect(proxy.web).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
}

async fn web_tls(proxy: &Proxy) -> tokio_rustls::client::TlsStream<TcpStream> {
    web_tls_from(proxy, "127.0.0.1").await.unwrap()
}

/// Everything the server sends until it closes, and how long that took (None: still open at
/// `limit`).
async fn until_closed<S: AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> (String, Option<Duration>) {
    let t = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let done = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        done.ok().map(|()| t.elapsed()),
    )
}

async fn counted(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&scrape(proxy.ops).await, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_login_body_and_an_idle_connection_are_cut() {
    init_tracing();
    let pki = Pki::new("wlslow");
    let proxy = start_proxy(&[&pki], |c| {
        c.limits.web_body_timeout_secs = 1;
        c.limits.web_idle_timeout_secs = 2;
    })
    .await;
    // Headers promise 100 bytes of body; 10 arrive, then nothing.
    let mut s = web_tls(&proxy).await;
    s.write_all(
        b"POST /webapi/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"user\":\"a",
    )
    .await
    .unwrap();
    let (answer, after) = until_closed(&mut s, Duration::from_secs(10)).await;
    println!("a stalled login body was answered and closed after {after:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        after.is_some_and(|d| d < Duration::from_secs(3)),
        "{after:?}"
    );

    // One request answered, then the connection sits idle: closed after 2 s.
    let mut s = web_tls(&proxy).await;
    s.write_all(b"GET /webapi/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let (_, after) = until_closed(&mut s, Duration::from_secs(9)).await;
    println!("an idle keep-alive connection was closed after {after:?}");
    assert!(
        after.is_some_and(|d| d < Duration::from_secs(5)),
        "{after:?}"
    );

    assert!(
        counted(
            &proxy,
            "postern_connections_dropped_total",
            &[("reason", "web_body_timeout")]
        )
        .await
            >= 1.0
    );
    assert!(
        counted(
            &proxy,
            "postern_connections_dropped_total",
            &[("reason", "web_idle_timeout")]
        )
        .await
            >= 1.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_at_accept_with_a_reason() {
    init_tracing();
    let pki = Pki::new("wlcaps");
    let proxy = start_proxy(&[&pki], |c| {
        c.limits.web_max_connections = 3;
        c.limits.web_max_connections_per_source = 2;
    })
    .await;
    let _a = web_tls(&proxy).await;
    let _b = web_tls(&proxy).await;
    assert!(
        web_tls_from(&proxy, "127.0.0.1").await.is_err(),
        "a third connection from one address was served"
    );
    let _c = web_tls_from(&proxy, "127.0.0.2")
        .await
        .expect("another address gets in");
    assert!(
        web_tls_from(&proxy, "127.0.0.3").await.is_err(),
        "a connection over the total was served"
    );
    assert!(
        counted(
            &proxy,
            "postern_limit_refusals_total",
            &[("limit", "web_connections_per_source")]
        )
        .await
            >= 1.0
    );
    assert!(
        counted(
            &proxy,
            "postern_limit_refusals_total",
            &[("limit", "web_connections")]
        )
        .await
            >= 1.0
    );
    // A freed slot is usable again.
    drop(_a);
    let deadline = Instant::now() + Duration::from_secs(5);
    while web_tls_from(&proxy, "127.0.0.1").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "a closed connection's slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop().await;
}

async fn exchange(proxy: &Proxy, request: &[u8]) -> String {
    let mut s = web_tls(proxy).await;
    s.write_all(request).await.unwrap();
    until_closed(&mut s, Duration::from_secs(10)).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_over_the_limit_are_refused_exactly_and_long_paths_are_not_echoed() {
    init_tracing();
    let pki = Pki::new("wlhead");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let head = |total: usize| {
        let fixed =
            "GET /webapi/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: \r\n\r\n".len();
        format!(
            "GET /webapi/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(total - fixed)
        )
    };
    // 70,000 bytes against the default 65,536: refused (it used to pass).
    let a = exchange(&proxy, head(70_000).as_bytes()).await;
    assert!(a.starts_with("HTTP/1.1 431"), "{}", &a[..a.len().min(300)]);
    assert!(!a.contains("cluster_names"));
    // Just under the limit: served.
    let a = exchange(&proxy, head(65_000).as_bytes()).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{}", &a[..a.len().min(300)]);

    // A 60,000-byte path: 404 without the path echoed back.
    let path = format!("/{}", "p".repeat(60_000));
    let a = exchange(
        &proxy,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 404"), "{}", &a[..a.len().min(300)]);
    assert!(a.len() < 1024, "the 404 is {} bytes", a.len());
    assert!(a.contains("(60001 bytes)"), "{a}");
    proxy.stop().await;
}

async fn login(proxy: &Proxy, body: &str) -> (u16, String) {
    let a = exchange(
        proxy,
        format!(
            "POST /webapi/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let status = a.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = a
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_relay_refuses_unknown_clusters_and_long_names_clearly() {
    init_tracing();
    let pki = Pki::new("wlrelay");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let req = |cluster: &str, user: &str| {
        serde_json::json!({"cluster": cluster, "user": user, "password": "pw", "public_key": "k"})
            .to_string()
    };
    // No such cluster: said so, not "no tunnel".
    let (status, body) = login(&proxy, &req("nosuch", "bob")).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown cluster nosuch"), "{body}");
    // A known cluster whose agent is not connected: "no tunnel".
    let (status, body) = login(&proxy, &req("wlrelay", "bob")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("no tunnel for cluster wlrelay"), "{body}");
    // A 59 KB user name: refused before it becomes a limiter key, and not echoed.
    let (status, body) = login(&proxy, &req("wlrelay", &"u".repeat(59_000))).await;
    assert_eq!(status, 400, "{}", &body[..body.len().min(300)]);
    assert!(
        body.contains("user: 1 to 64 bytes") && body.len() < 1024,
        "{}",
        &body[..body.len().min(300)]
    );
    assert!(
        counted(
            &proxy,
            "postern_login_relays_total",
            &[("result", "unknown_cluster")]
        )
        .await
            >= 1.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_refuses_root_and_keeps_its_data_dir_private() {
    init_tracing();
    let pki = Pki::new("wlroot");
    let dir = tempfile::tempdir().unwrap();
    let mut config = proxy_config(&[&pki], &dir.path().join("new").join("data"));
    config.allow_root = false;
    let listeners = postern_proxy::Listeners::bind(&config).await.unwrap();
    let r = postern_proxy::run(
        listeners,
        config.clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    if postern_proxy::mint::running_as_root() {
        let e = r.expect_err("root refused").to_string();
        assert!(
            e.contains("refusing to run as root") && e.contains("--allow-root"),
            "{e}"
        );
        // The binary says the same, before binding anything.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_postern-proxy"))
            .args([
                "--web-listen",
                "127.0.0.1:0",
                "--tunnel-listen",
                "127.0.0.1:0",
                "--ops-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.path().join("bin"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("--allow-root"),
            "{err}"
        );
    } else {
        println!("not root: the refusal is not exercised here");
    }
    // With the flag it starts, and the data dir it creates is 0700.
    config.allow_root = true;
    let data = config.data_dir.clone();
    let listeners = postern_proxy::Listeners::bind(&config).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(postern_proxy::run(listeners, config, stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !data.join("web.crt").exists() {
        assert!(Instant::now() < deadline, "the proxy did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data dir mode {mode:o}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_host_keys_get_clear_errors() {
    init_tracing();
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new("wlkey");
    let run = |config: postern_proxy::ProxyConfig| async move {
        let listeners = postern_proxy::Listeners::bind(&config).await.unwrap();
        postern_proxy::run(
            listeners,
            config,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect_err("refused")
        .to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = proxy_config(&[&pki], dir.path());
    let key = config.host_key_path();
    // A directory where the key should be: cannot be read (even by root).
    std::fs::create_dir_all(&key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o700)).unwrap();
    let e = run(config.clone()).await;
    assert!(
        e.contains("cannot read private key") && !e.contains("cannot mint"),
        "{e}"
    );
    std::fs::remove_dir(&key).unwrap();
    // Garbage.
    std::fs::write(&key, "garbage\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = run(config.clone()).await;
    assert!(e.contains("is not an OpenSSH private key"), "{e}");
    // Readable by others.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = run(config).await;
    assert!(
        e.contains("readable by other users") && e.contains("chmod 600"),
        "{e}"
    );
}

/// A TLS refusal still reaches the client through the listener's stream wrapper (it forwards
/// vectored writes: rustls sends its last alert that way). The client SDK tells a proxy's web
/// port from an Auth server by this alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_alert_reaches_the_client() {
    init_tracing();
    let pki = Pki::new("wlalpn");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let mut cfg = postern_dial::web::tls_config(&proxy.web_trust()).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(proxy.web).await.unwrap();
    let e = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .expect_err("no common ALPN protocol");
    assert!(e.to_string().contains("NoApplicationProtocol"), "{e}");
    proxy.stop().await;
}

/// The relay's per-user budget is per source address: a stranger who spends bob's budget does
/// not lock bob out from his own address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_spend_a_users_relay_budget() {
    init_tracing();
    let pki = Pki::new("wlbudget");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let body = serde_json::json!({"cluster": "wlbudget", "user": "bob", "password": "pw", "public_key": "k"})
        .to_string();
    let from = |ip: &'static str| {
        let body = body.clone();
        let proxy = &proxy;
        async move {
            let mut s = web_tls_from(proxy, ip).await.unwrap();
            s.write_all(
                format!(
                    "POST /webapi/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let a = until_closed(&mut s, Duration::from_secs(10)).await.0;
            a.get(9..12)
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(0)
        }
    };
    // The stranger: 10 logins for bob (relayed; no agent, so 502), then refused.
    for _ in 0..10 {
        assert_eq!(from("127.0.0.5").await, 502);
    }
    assert_eq!(from("127.0.0.5").await, 429);
    // Bob, from his own address, is still relayed.
    assert_eq!(
        from("127.0.0.6").await,
        502,
        "bob was rate-limited by a stranger"
    );
    proxy.stop().await;
}

/// One source address gets `PER_SOURCE_PER_MINUTE` relayed logins at once, whatever the users,
/// then `429` (a GCRA limit: one more every two seconds, so a slow machine may see a few more
/// pass before the refusal, never fewer); another address is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_its_per_source_budget_of_logins_then_429() {
    init_tracing();
    let pki = Pki::new("wlsource");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let login = |ip: &'static str, user: String| {
        let proxy = &proxy;
        async move {
            let body = serde_json::json!({"cluster": "wlsource", "user": user, "password": "pw", "public_key": "k"})
                .to_string();
            let mut s = web_tls_from(proxy, ip).await.unwrap();
            s.write_all(
                format!(
                    "POST /webapi/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let a = until_closed(&mut s, Duration::from_secs(10)).await.0;
            let status = a
                .get(9..12)
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(0);
            (status, a)
        }
    };
    let budget = postern_proxy::login::PER_SOURCE_PER_MINUTE as usize;
    for i in 0..budget {
        // Relayed (no agent serves `login`, so 502), each for another user.
        assert_eq!(
            login("127.0.0.7", format!("u{i}")).await.0,
            502,
            "login {i}"
        );
    }
    let mut refused = None;
    for i in budget..budget + 10 {
        let (status, answer) = login("127.0.0.7", format!("u{i}")).await;
        if status == 429 {
            refused = Some(answer);
            break;
        }
    }
    let answer = refused.expect("the address was never refused");
    assert!(
        answer.contains("too many logins from this address"),
        "{answer}"
    );
    assert_eq!(
        login("127.0.0.8", "u0".into()).await.0,
        502,
        "another address"
    );
    proxy.stop().await;
}

/// A busy Auth server's answer reaches the web client as `503` with `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_auth_server_is_passed_on_as_503_with_retry_after() {
    init_tracing();
    let pki = Pki::new("wlbusy");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    // A login service that is always busy.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let login_addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                let _ = tokio::io::BufReader::new(r).read_line(&mut line).await;
                let busy = tunnel_proto::login::LoginResponse::busy(
                    3,
                    "the Auth server is busy checking passwords: retry in 3 s",
                );
                let mut out = serde_json::to_vec(&busy).unwrap();
                out.push(b'\n');
                let _ = w.write_all(&out).await;
            });
        }
    });
    let agent = start_agent(agent_config(&pki, "a1", &proxy, &[("login", login_addr)]));
    let deadline = Instant::now() + Duration::from_secs(15);
    for i in 10u8.. {
        let body = serde_json::json!({"cluster": "wlbusy", "user": format!("u{i}"), "password": "pw", "public_key": "k"})
            .to_string();
        let mut s = web_tls_from(&proxy, &format!("127.0.0.{i}")).await.unwrap();
        s.write_all(
            format!(
                "POST /webapi/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let a = until_closed(&mut s, Duration::from_secs(10)).await.0;
        if a.starts_with("HTTP/1.1 502") {
            assert!(Instant::now() < deadline, "the agent never registered: {a}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert!(a.starts_with("HTTP/1.1 503"), "{a}");
        assert!(
            a.to_ascii_lowercase().contains("\r\nretry-after: 3\r\n"),
            "{a}"
        );
        assert!(a.contains("busy checking passwords"), "{a}");
        break;
    }
    agent.stop().await;
    proxy.stop().await;
}
