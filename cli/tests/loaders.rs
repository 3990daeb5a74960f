//! The credential loaders and `Config` connection against the whole stack on loopback (the
//! demo's Auth server, reached through its proxy), and `psh` (the real binary).

mod support;

use support::{psh, text};

use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_api::identity::IdentityFile;
use postern_api::proto::{CreateUserRequest, GenerateUserCertsRequest};
use postern_client::auth::{AuthClient, ed25519_pkcs8};
use postern_client::connect::Config;
use postern_client::credentials::{Credentials, client_config};
use postern_demo::auth_flow::{AuthDemo, AuthReport};
use postern_dial::mint;
use postern_dial::web::WebTrust;
use russh::keys::ssh_key::LineEnding;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

async fn stack() -> (tempfile::TempDir, AuthDemo, AuthReport) {
    let dir = tempfile::tempdir().unwrap();
    let (demo, report) = postern_demo::auth_flow::run(dir.path()).await.unwrap();
    (dir, demo, report)
}

async fn admin(r: &AuthReport) -> AuthClient {
    let id = IdentityFile::load(&r.auth_dir.join("admin.identity")).unwrap();
    AuthClient::connect_direct(&r.auth_addr.to_string(), &id)
        .await
        .unwrap()
}

async fn sign(admin: &AuthClient, user: &str, ttl_secs: u64) -> IdentityFile {
    let key = mint::generate_key();
    let c = admin
        .generate_user_certs(GenerateUserCertsRequest {
            user: user.into(),
            public_key: key.public_key().to_openssh().unwrap(),
            ttl_secs,
        })
        .await
        .unwrap();
    IdentityFile::from_certs(user, key.to_openssh(LineEnding::LF).unwrap().to_string(), c)
}

fn pinned(r: &AuthReport, addrs: Vec<String>, credentials: Vec<Credentials>) -> Config {
    Config {
        addrs,
        credentials,
        web_trust: Some(WebTrust::Pin(r.web_pin.clone())),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_file_works_by_web_tunnel_and_direct_address() {
    let (_d, demo, r) = stack().await;
    let id = Credentials::identity_file(&r.identity);
    for addr in [r.web.to_string(), r.tunnel.clone(), r.auth_addr.to_string()] {
        let c = AuthClient::connect(pinned(&r, vec![addr.clone()], vec![id.clone()]))
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert_eq!(
            c.get_role("api-role").await.unwrap().name,
            "api-role",
            "{addr}"
        );
    }
    // Addresses are tried in order, and every failure is reported.
    let c = AuthClient::connect(pinned(
        &r,
        vec!["127.0.0.1:1".into(), r.web.to_string()],
        vec![id.clone()],
    ))
    .await
    .unwrap();
    assert_eq!(c.user, "api-user");
    let e = AuthClient::connect(pinned(
        &r,
        vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        vec![id],
    ))
    .await
    .err()
    .unwrap();
    assert_eq!(e.attempts.len(), 2);
    let text = e.to_string();
    assert!(
        text.contains("127.0.0.1:1")
            && text.contains("127.0.0.1:2")
            && text.contains("Connection refused"),
        "{text}"
    );
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_pair_and_tls_credentials_go_direct_but_not_through_a_proxy() {
    let (d, demo, r) = stack().await;
    let admin = admin(&r).await;
    let id = sign(&admin, "api-user", 0).await;
    let key = russh::keys::PrivateKey::from_openssh(&id.private_key).unwrap();
    let pkcs8 = ed25519_pkcs8(&key).unwrap();
    let base = d.path().join("kp");
    let pem = |label: &str, der: &[u8]| {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    };
    std::fs::write(
        base.with_extension("key"),
        pem("PRIVATE KEY", pkcs8.secret_der()),
    )
    .unwrap();
    std::fs::write(base.with_extension("crt"), &id.tls_cert).unwrap();
    std::fs::write(base.with_extension("cas"), id.tls_cas.concat()).unwrap();
    let kp = Credentials::key_pair(
        base.with_extension("crt"),
        base.with_extension("key"),
        base.with_extension("cas"),
    );
    let c = AuthClient::connect(pinned(&r, vec![r.auth_addr.to_string()], vec![kp.clone()]))
        .await
        .unwrap();
    assert_eq!(c.get_role("api-role").await.unwrap().name, "api-role");
    for proxy_addr in [r.web.to_string(), r.tunnel.clone()] {
        let e = AuthClient::connect(pinned(&r, vec![proxy_addr.clone()], vec![kp.clone()]))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("cannot go through a proxy") || e.contains("cannot log in to a proxy"),
            "{proxy_addr}: {e}"
        );
    }
    let roots = vec![CertificateDer::from_pem_slice(id.tls_cas[0].as_bytes()).unwrap()];
    let chain = vec![CertificateDer::from_pem_slice(id.tls_cert.as_bytes()).unwrap()];
    let tls = client_config(roots, chain, pkcs8).unwrap();
    let c = AuthClient::connect(pinned(
        &r,
        vec![r.auth_addr.to_string()],
        vec![Credentials::tls(tls)],
    ))
    .await
    .unwrap();
    assert_eq!(c.user, "api-user");
    demo.stop().await.unwrap();
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_identity_file_is_reloaded_and_garbage_is_ignored() {
    let (d, demo, r) = stack().await;
    let admin = admin(&r).await;
    admin
        .create_user(CreateUserRequest {
            name: "rotated".into(),
            roles: vec!["api-role".into()],
            secret_ttl_secs: 0,
        })
        .await
        .unwrap();
    let path = d.path().join("dynamic.identity");
    std::fs::copy(&r.identity, &path).unwrap();
    let creds = Credentials::dynamic_identity_file(&path);
    let cfg = pinned(&r, vec![r.web.to_string()], vec![creds]);
    assert_eq!(
        AuthClient::connect(cfg.clone()).await.unwrap().user,
        "api-user"
    );

    // Another tool rotates the file (atomic rename): the next connection uses the new one.
    write_atomic(&path, &sign(&admin, "rotated", 0).await.to_toml());
    let c = AuthClient::connect(cfg.clone()).await.unwrap();
    assert_eq!(c.user, "rotated");

    // Garbage replaces it: the last good identity is kept.
    write_atomic(&path, "this is not an identity file");
    let c = AuthClient::connect(cfg.clone()).await.unwrap();
    assert_eq!(c.user, "rotated");
    assert_eq!(c.get_role("api-role").await.unwrap().name, "api-role");
    // A fresh loader has no good copy to fall back on, and says what is wrong with the file.
    let e = AuthClient::connect(pinned(
        &r,
        vec![r.web.to_string()],
        vec![Credentials::dynamic_identity_file(&path)],
    ))
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("dynamic.identity") && e.contains("corrupt or truncated"),
        "{e}"
    );
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_untrusted_proxies_get_clear_errors() {
    let (d, demo, r) = stack().await;
    let admin = admin(&r).await;
    let web = vec![r.web.to_string()];

    // Truncated identity file: the error names the file.
    let full = std::fs::read_to_string(&r.identity).unwrap();
    let cut = d.path().join("cut.identity");
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let e = AuthClient::connect(pinned(
        &r,
        web.clone(),
        vec![Credentials::identity_file(&cut)],
    ))
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("cut.identity") && e.contains("corrupt or truncated"),
        "{e}"
    );

    // Expired: a 1 s certificate, waited out.
    let brief = d.path().join("brief.identity");
    sign(&admin, "api-user", 1).await.save(&brief).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let e = AuthClient::connect(pinned(
        &r,
        web.clone(),
        vec![Credentials::identity_file(&brief)],
    ))
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("certificate expired"), "{e}");

    // A self-signed proxy without a pin (system roots only).
    let cfg = Config {
        addrs: web.clone(),
        credentials: vec![Credentials::identity_file(&r.identity)],
        ..Default::default()
    };
    let e = AuthClient::connect(cfg).await.err().unwrap().to_string();
    assert!(
        e.contains("TLS to web proxy") && e.contains("UnknownIssuer"),
        "{e}"
    );
    // A wrong pin.
    let mut cfg = pinned(
        &r,
        web.clone(),
        vec![Credentials::identity_file(&r.identity)],
    );
    cfg.web_trust = Some(WebTrust::Pin("00".repeat(32)));
    let e = AuthClient::connect(cfg).await.err().unwrap().to_string();
    assert!(e.contains("TLS to web proxy"), "{e}");

    // The proxy is up, the cluster's agent is not.
    demo.auth_shutdown.cancel();
    let mut last = String::new();
    for _ in 0..100 {
        match AuthClient::connect(pinned(
            &r,
            web.clone(),
            vec![Credentials::identity_file(&r.identity)],
        ))
        .await
        {
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                last = e.to_string();
                break;
            }
        }
    }
    assert!(
        last.contains("auth server unreachable through proxy")
            && last.contains("no tunnel for cluster demo"),
        "{last}"
    );
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psh_login_status_logout_and_the_profile_loader() {
    let (d, demo, r) = stack().await;
    let admin = admin(&r).await;
    let secret = admin
        .create_user(CreateUserRequest {
            name: "alice".into(),
            roles: vec!["api-role".into()],
            secret_ttl_secs: 0,
        })
        .await
        .unwrap()
        .signup_secret;
    let files = |name: &str, content: &str| -> PathBuf {
        let p = d.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    let secret_file = files("alice.signup", &secret);
    let pw_file = files("alice.pw", "correct horse battery staple\n");
    let bad_pw = files("bad.pw", "not the password at all");
    let short_pw = files("short.pw", "short");
    let home = d.path().join("home");
    let (web, pin) = (r.web.to_string(), r.web_pin.clone());
    let login = |extra: &[&str]| {
        let mut a = vec![
            "login",
            "--proxy",
            &web,
            "--user",
            "alice",
            "--web-pin",
            &pin,
        ];
        a.extend_from_slice(extra);
        let (home, a) = (
            home.clone(),
            a.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        tokio::task::spawn_blocking(move || {
            psh(&home, &a.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };

    // First login: the signup secret, and a password that is too short, then a good one.
    let o = login(&[
        "--secret-file",
        secret_file.to_str().unwrap(),
        "--password-file",
        short_pw.to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("at least 12 characters"),
        "{}",
        text(&o)
    );
    let o = login(&[
        "--secret-file",
        secret_file.to_str().unwrap(),
        "--password-file",
        pw_file.to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // The secret is single-use.
    let o = login(&[
        "--secret-file",
        secret_file.to_str().unwrap(),
        "--password-file",
        pw_file.to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("used or expired"),
        "{}",
        text(&o)
    );

    let o = psh(&home, &["status"]);
    let s = text(&o);
    assert!(o.status.success(), "{s}");
    for want in [
        "User:     alice",
        "Roles:    api-role",
        "Cluster:  demo",
        &format!("Proxy:    {web}"),
    ] {
        assert!(s.contains(want), "{s}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(home.join("identity"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // The profile loader finds the proxy by itself.
    let cfg = Config {
        credentials: vec![Credentials::profile(Some(home.clone()), None)],
        ..Default::default()
    };
    let c = AuthClient::connect(cfg).await.unwrap();
    assert_eq!(c.user, "alice");
    assert_eq!(c.get_role("api-role").await.unwrap().name, "api-role");

    // Later logins use the password; a wrong one is refused.
    let o = login(&["--password-file", pw_file.to_str().unwrap(), "--ttl", "1s"])
        .await
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let o = psh(&home, &["status"]);
    assert!(
        !o.status.success() && text(&o).contains("certificate expired: run psh login"),
        "{}",
        text(&o)
    );
    let e = AuthClient::connect(Config {
        credentials: vec![Credentials::profile(Some(home.clone()), None)],
        ..Default::default()
    })
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("certificate expired: run psh login"), "{e}");

    // Repeated wrong passwords lock the user out for a while (Auth server: 5 per 5 minutes;
    // the proxy also limits 10 per minute per user).
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let o = login(&["--password-file", bad_pw.to_str().unwrap()])
            .await
            .unwrap();
        assert!(!o.status.success());
        statuses.push(text(&o));
    }
    assert!(
        statuses[0].contains("login failed: wrong user, secret or password"),
        "{}",
        statuses[0]
    );
    assert!(
        statuses.last().unwrap().contains("too many"),
        "{statuses:?}"
    );
    let o = login(&["--password-file", pw_file.to_str().unwrap()])
        .await
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("too many"),
        "locked out even with the right password: {}",
        text(&o)
    );

    let o = psh(&home, &["logout"]);
    assert!(o.status.success() && text(&o).contains("logged out"));
    let o = psh(&home, &["status"]);
    assert!(
        !o.status.success() && text(&o).contains("run psh login"),
        "{}",
        text(&o)
    );
    demo.stop().await.unwrap();
}
