//! Login refusals on the tunnel listener: each bad certificate is refused with a reason that is
//! logged and counted, and the connection is closed.

mod support;

use std::sync::Arc;
use std::time::Duration;

use postern_proxy::mint::{self, CertSpec};
use russh::client::{self, AuthResult, Handle};
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::{Certificate, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use support::*;
use tunnel_proto::names::{EXT_CLUSTER, EXT_ROLE, agent_login};

/// Trusts any proxy: these tests are about the proxy's checks of us.
struct AnyHost;

impl client::Handler for AnyHost {
    type Error = russh::Error;
    async fn check_server_key(&mut self, _k: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

async fn connect(proxy: &Proxy) -> Handle<AnyHost> {
    let config = Arc::new(postern_dial::ssh::client_config(Duration::from_secs(30)));
    client::connect(config, proxy.tunnel, AnyHost)
        .await
        .unwrap()
}

async fn cert_login(
    proxy: &Proxy,
    login: &str,
    key: PrivateKey,
    cert: Certificate,
) -> (bool, Handle<AnyHost>) {
    let mut h = connect(proxy).await;
    let ok = match h
        .authenticate_openssh_cert(login, Arc::new(key), cert)
        .await
    {
        Ok(r) => r.success(),
        Err(_) => false,
    };
    (ok, h)
}

async fn assert_closed_within(h: &Handle<AnyHost>, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while !h.is_closed() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "proxy did not close the connection within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn failures(proxy: &Proxy, reason: &str) -> f64 {
    metric(
        &scrape(proxy.ops).await,
        "postern_auth_failures_total",
        &[("reason", reason)],
    )
}

/// Expects the login refused for `reason`, counted, and the connection closed.
async fn expect_refused(
    proxy: &Proxy,
    login: &str,
    key: PrivateKey,
    cert: Certificate,
    reason: &str,
) {
    let before = failures(proxy, reason).await;
    let (ok, h) = cert_login(proxy, login, key, cert).await;
    assert!(!ok, "{reason}: login must be refused");
    assert_closed_within(&h, Duration::from_secs(3)).await;
    assert!(
        failures(proxy, reason).await > before,
        "{reason} not counted"
    );
}

fn agent_spec(pki: &Pki, host_id: &str) -> CertSpec {
    CertSpec::Agent {
        host_id: host_id.into(),
        cluster: pki.cluster.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_agent_certificates_are_refused() {
    init_tracing();
    let pki = Pki::new("auth1");
    let rogue = Pki::new("auth1");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let login = agent_login("h1", "auth1");

    // Untrusted CA.
    let (k, c) = rogue.cert(&rogue.host_ca, &agent_spec(&pki, "h1"));
    expect_refused(&proxy, &login, k, c, "untrusted_ca").await;
    // A user certificate presented for an agent login.
    let (k, c) = pki.cert(
        &pki.user_ca,
        &CertSpec::User {
            user: login.clone(),
        },
    );
    expect_refused(&proxy, &login, k, c, "untrusted_ca").await;
    let (k, c) = pki.cert(
        &pki.host_ca,
        &CertSpec::User {
            user: "h1.auth1".into(),
        },
    );
    expect_refused(&proxy, &login, k, c, "wrong_cert_type").await;
    // Principal for another host.
    let (k, c) = pki.cert(&pki.host_ca, &agent_spec(&pki, "h2"));
    expect_refused(&proxy, &login, k, c, "principal_mismatch").await;
    // Unknown cluster in the login.
    let (k, c) = pki.cert(&pki.host_ca, &agent_spec(&pki, "h1"));
    expect_refused(
        &proxy,
        &agent_login("h1", "elsewhere"),
        k,
        c,
        "unknown_cluster",
    )
    .await;
    // Host certificate without the Postern extensions.
    for ext in [
        vec![],
        vec![(EXT_CLUSTER, "auth1")],
        vec![(EXT_ROLE, "auth")],
    ] {
        let key = mint::generate_key();
        let now = mint::now_unix();
        let mut b = Builder::new_with_random_nonce(
            &mut rand::rng(),
            key.public_key().key_data().clone(),
            now - 60,
            now + 600,
        )
        .unwrap();
        b.cert_type(CertType::Host)
            .unwrap()
            .valid_principal("h1.auth1")
            .unwrap();
        for (k, v) in ext {
            b.extension(k, v).unwrap();
        }
        let cert = b.sign(&pki.host_ca).unwrap();
        expect_refused(&proxy, &login, key, cert, "missing_extension").await;
    }
    // A good one is accepted.
    let (k, c) = pki.cert(&pki.host_ca, &agent_spec(&pki, "h1"));
    let (ok, h) = cert_login(&proxy, &login, k, c).await;
    assert!(ok);
    // It may register a target, but not a malformed or reserved one.
    assert!(h.tcpip_forward("auth", 0).await.is_ok());
    assert!(h.tcpip_forward("BAD!", 0).await.is_err());
    assert!(h.tcpip_forward("@control", 0).await.is_err());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_are_refused() {
    init_tracing();
    let pki = Pki::new("auth2");
    let rogue = Pki::new("auth2");
    let proxy = start_proxy(&[&pki], |c| c.ssh.handshake_timeout_secs = 2).await;

    let (k, c) = rogue.cert(
        &rogue.user_ca,
        &CertSpec::User {
            user: "alice".into(),
        },
    );
    expect_refused(&proxy, "alice", k, c, "untrusted_ca").await;
    let (k, c) = pki.cert(
        &pki.user_ca,
        &CertSpec::User {
            user: "alice".into(),
        },
    );
    expect_refused(&proxy, "bob", k, c, "principal_mismatch").await;
    // A host certificate presented by a client.
    let (k, c) = pki.cert(&pki.host_ca, &agent_spec(&pki, "h1"));
    expect_refused(&proxy, "h1.auth2", k, c, "wrong_cert_type").await;
    // A user certificate may not register targets.
    let (k, c) = pki.cert(
        &pki.user_ca,
        &CertSpec::User {
            user: "alice".into(),
        },
    );
    let (ok, h) = cert_login(&proxy, "alice", k, c).await;
    assert!(ok);
    assert!(
        h.tcpip_forward("auth", 0).await.is_err(),
        "clients may not register targets"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_future_certificates_are_refused() {
    init_tracing();
    let pki = Pki::new("auth3");
    let proxy = start_proxy(&[&pki], |c| c.ssh.handshake_timeout_secs = 2).await;
    let now = mint::now_unix();
    let user = CertSpec::User {
        user: "alice".into(),
    };
    for (after, before) in [(now - 7200, now - 3600), (now + 3600, now + 7200)] {
        let before_count = failures(&proxy, "rejected_by_ssh_layer").await;
        let (k, c) = pki.cert_window(&pki.user_ca, &user, after, before);
        let (ok, h) = cert_login(&proxy, "alice", k, c).await;
        assert!(!ok, "a certificate outside its window must be refused");
        // russh refuses these before Postern's checks; the proxy closes the connection at the
        // handshake deadline and counts the refusal.
        assert_closed_within(&h, Duration::from_secs(4)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while failures(&proxy, "rejected_by_ssh_layer").await <= before_count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "refusal not counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_public_key_is_refused() {
    init_tracing();
    let pki = Pki::new("auth4");
    let proxy = start_proxy(&[&pki], |c| c.ssh.handshake_timeout_secs = 2).await;
    let before = failures(&proxy, "no_certificate").await;
    let mut h = connect(&proxy).await;
    let key = PrivateKeyWithHashAlg::new(Arc::new(mint::generate_key()), None);
    let r = h.authenticate_publickey("alice", key).await.unwrap();
    assert!(matches!(r, AuthResult::Failure { .. }));
    assert!(failures(&proxy, "no_certificate").await > before);
    assert_closed_within(&h, Duration::from_secs(4)).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_garbage_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_tracing();
    let pki = Pki::new("auth5");
    let proxy = start_proxy(&[&pki], |c| c.ssh.handshake_timeout_secs = 1).await;
    let read_until_closed = |mut s: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(4), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("proxy closes the connection after the handshake timeout");
    };
    // Nothing sent at all.
    let s = tokio::net::TcpStream::connect(proxy.tunnel).await.unwrap();
    read_until_closed(s).await;
    // An SSH banner, then silence mid key exchange.
    let mut s = tokio::net::TcpStream::connect(proxy.tunnel).await.unwrap();
    s.write_all(b"SSH-2.0-stalled\r\n").await.unwrap();
    read_until_closed(s).await;
    // Garbage.
    let mut s = tokio::net::TcpStream::connect(proxy.tunnel).await.unwrap();
    s.write_all(&[0xffu8; 3000]).await.unwrap();
    read_until_closed(s).await;
    // Garbage on the web port.
    let mut s = tokio::net::TcpStream::connect(proxy.web).await.unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    read_until_closed(s).await;
    let m = scrape(proxy.ops).await;
    assert!(
        metric(
            &m,
            "postern_connections_dropped_total",
            &[("reason", "handshake_timeout")]
        ) >= 2.0,
        "{m}"
    );
    // The proxy still serves.
    let session = postern_client::ProxySession::connect(&client_opts(&pki, &proxy, "alice")).await;
    assert!(session.is_ok());
    proxy.stop().await;
}
