//! Reserved targets: only the Auth server's own agent (role `auth`) registers `auth` and `login`;
//! users never open `login` directly; the login relay records the source the proxy saw.

mod support;

use std::time::Duration;

use postern_agent::config::TransportMode;
use postern_client::ProxySession;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tunnel_proto::login::{LoginRequest, LoginResponse};

/// On both transports (one registration code for both; one after the other, since the counter
/// is process-wide).
#[tokio::test]
async fn a_service_agent_is_refused_the_reserved_targets_with_a_log_line_and_a_metric() {
    service_agent_refused_reserved_targets(TransportMode::Ssh).await;
    service_agent_refused_reserved_targets(TransportMode::Quic).await;
}

async fn service_agent_refused_reserved_targets(transport: TransportMode) {
    init_tracing();
    let pki = Pki::new("example");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let refused_before = metric(
        &scrape(proxy.ops).await,
        "postern_target_registrations_refused_total",
        &[("reason", "reserved_target")],
    );
    let web = name_server("web").await;
    let fake_auth = name_server("fake auth").await;
    let fake_login = name_server("fake login").await;
    let mut config = agent_config(
        &pki,
        "svc-1",
        &proxy,
        &[("web", web), ("auth", fake_auth), ("login", fake_login)],
    );
    config.host_key_file = pki.service_agent_files("svc-1");
    config.transport.mode = transport;
    let agent = start_agent(config);

    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let web_stream = wait_stream(&session, "web", "example", Duration::from_secs(10)).await;
    assert_eq!(read_all(web_stream).await, "web");
    let e = session.open("auth", "example", 3025).await.err().unwrap();
    assert!(
        e.to_string().contains("no target named 'auth'"),
        "a service agent's 'auth' must not be routed: {e}"
    );
    let text = scrape(proxy.ops).await;
    assert_eq!(
        metric(
            &text,
            "postern_target_registrations_refused_total",
            &[("reason", "reserved_target")]
        ) - refused_before,
        2.0,
        "auth and login refused over {transport:?}"
    );
    let label = if transport == TransportMode::Quic {
        "quic"
    } else {
        "ssh"
    };
    assert_eq!(
        metric(
            &text,
            "postern_tunnels_connected",
            &[("cluster", "example"), ("transport", label)]
        ),
        1.0,
        "the agent's tunnel is up over {label}: {text}"
    );
    agent.stop().await;
    proxy.stop().await;
}

#[tokio::test]
async fn the_auth_servers_own_agent_still_registers_auth_and_login() {
    init_tracing();
    let pki = Pki::new("example");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let auth = name_server("auth api").await;
    let agent = start_agent(agent_config(&pki, "auth-1", &proxy, &[("auth", auth)]));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let s = wait_stream(&session, "auth", "example", Duration::from_secs(10)).await;
    assert_eq!(read_all(s).await, "auth api");
    agent.stop().await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_user_cannot_open_the_login_target() {
    init_tracing();
    let pki = Pki::new("example");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let login = name_server("login back end").await;
    let auth = name_server("auth api").await;
    let agent = start_agent(agent_config(
        &pki,
        "auth-1",
        &proxy,
        &[("auth", auth), ("login", login)],
    ));
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "mallory"))
        .await
        .unwrap();
    // Wait until the agent is up, so the refusal below is not a missing tunnel.
    let s = wait_stream(&session, "auth", "example", Duration::from_secs(10)).await;
    drop(s);
    let e = session.open("login", "example", 0).await.err().unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("reserved for the proxy's login relay") && msg.contains("psh login"),
        "{msg}"
    );
    let text = scrape(proxy.ops).await;
    assert_eq!(
        metric(
            &text,
            "postern_stream_opens_total",
            &[("result", "reserved")]
        ),
        1.0
    );
    agent.stop().await;
    proxy.stop().await;
}

/// A login back end that answers with the `source` it was given.
async fn source_echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                BufReader::new(r).read_line(&mut line).await.unwrap();
                let req: LoginRequest = serde_json::from_str(&line).unwrap();
                let resp = LoginResponse::failed(
                    401,
                    format!("source={}", req.source.unwrap_or_default()),
                );
                let mut out = serde_json::to_vec(&resp).unwrap();
                out.push(b'\n');
                w.write_all(&out).await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_forged_source_in_a_login_request_is_replaced_by_the_address_the_proxy_saw() {
    init_tracing();
    let pki = Pki::new("example");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let login = source_echo().await;
    let agent = start_agent(agent_config(&pki, "auth-1", &proxy, &[("login", login)]));
    let req = LoginRequest {
        cluster: "example".into(),
        user: "alice".into(),
        secret: None,
        new_password: None,
        password: Some("x".into()),
        public_key: "ssh-ed25519 AAAA".into(),
        ttl_secs: 0,
        source: Some("203.0.113.9:4444".into()),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let resp = loop {
        let r = postern_dial::web::login(&proxy.web.to_string(), &proxy.web_trust(), &req)
            .await
            .unwrap();
        if r.error.starts_with("source=") || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        resp.error.starts_with("source=127.0.0.1:"),
        "the back end saw {:?}",
        resp.error
    );
    assert!(!resp.error.contains("203.0.113.9"));
    agent.stop().await;
    proxy.stop().await;
}
