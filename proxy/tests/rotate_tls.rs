//! TLS CA rotation (`pctl auth rotate --type=tls --manual --phase=…`, driven as `pctl
//! --data-dir` does, with the admin identity read from the data dir at each step) while SDK
//! calls flow through the proxy with a dynamic identity file fed by a renewing bot: none fails.
//! Each phase shows its effect: `init` trusts both CAs (identity files carry both),
//! `update_clients` signs client certificates with the new CA, `update_servers` switches the
//! Auth server's serving certificate without a restart (an identity trusting only the old CA no
//! longer verifies the server), `standby` drops the old CA and refuses its client certificates
//! with a reason. The proxy's own Auth identity (valid 6 s) renews itself onto the new CA, and
//! after the rotation its policy watch still works: a lock closes a live stream. A rollback puts
//! the old CA back in every role, and the dropped CA's client certificates are refused with a
//! reason too.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_api::identity::IdentityFile;
use postern_api::proto::{
    CaRotation, CreateTokenRequest, CreateUserRequest, GenerateUserCertsRequest,
    ListCaRotationsRequest, RotateCertAuthorityRequest,
};
use postern_client::auth::AuthClient;
use postern_client::bot::BotConfig;
use postern_client::connect::Config;
use postern_client::credentials::Credentials;
use postern_dial::web::WebTrust;
use russh::keys::ssh_key::LineEnding;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

const READER: &str = "kind: role
metadata: {name: bot-reader}
spec:
  allow:
    rules:
      - resources: ['role']
        verbs: ['read']
version: v7
";

/// The admin identity of the data dir, as `pctl --data-dir` reads it.
async fn admin(c: &Cluster) -> AuthClient {
    let path = c.auth_cfg.data_dir.join("admin.identity");
    let id = IdentityFile::load(&path).unwrap();
    AuthClient::connect_direct(&c.auth_addr.to_string(), &id)
        .await
        .expect("the data dir's admin identity connects")
}

/// Moves the TLS CA rotation to `phase` (manual mode); returns once the admin identity in the
/// data dir follows the new trusted list (the Auth server re-issues it).
async fn rotate(c: &Cluster, phase: &str) -> CaRotation {
    let r = admin(c)
        .await
        .rotate_cert_authority(RotateCertAuthorityRequest {
            kind: "tls".into(),
            phase: phase.into(),
            manual: true,
            grace_period_secs: 0,
        })
        .await
        .unwrap();
    assert_eq!(r.phase, phase, "{r:?}");
    let path = c.auth_cfg.data_dir.join("admin.identity");
    let deadline = Instant::now() + Duration::from_secs(10);
    while IdentityFile::load(&path).map(|i| i.tls_cas).ok() != Some(r.trusted.clone()) {
        assert!(
            Instant::now() < deadline,
            "the admin identity did not follow {phase}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r
}

async fn tls_rotation(a: &AuthClient) -> CaRotation {
    let all = a
        .list_ca_rotations(ListCaRotationsRequest {})
        .await
        .unwrap();
    all.rotations.into_iter().find(|r| r.kind == "tls").unwrap()
}

/// Creates `user` with the reader role.
async fn reader(a: &AuthClient, user: &str) {
    a.create_user(CreateUserRequest {
        name: user.into(),
        roles: vec!["bot-reader".into()],
        secret_ttl_secs: 0,
    })
    .await
    .unwrap();
}

/// An identity for `user` issued now.
async fn identity(a: &AuthClient, user: &str) -> IdentityFile {
    let key = postern_dial::mint::generate_key();
    let certs = a
        .generate_user_certs(GenerateUserCertsRequest {
            user: user.into(),
            public_key: key.public_key().to_openssh().unwrap(),
            ttl_secs: 3600,
        })
        .await
        .unwrap();
    IdentityFile::from_certs(
        user,
        key.to_openssh(LineEnding::LF).unwrap().to_string(),
        certs,
    )
}

/// Connects straight to the Auth server with `id` and reads a role.
async fn direct_call(c: &Cluster, id: &IdentityFile) -> Result<(), String> {
    let a = AuthClient::connect_direct(&c.auth_addr.to_string(), id)
        .await
        .map_err(|e| e.to_string())?;
    a.get_role("bot-reader")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Starts a bot for `user` on proxy 0 renewing every 4 s (the proxy relays at most 6 renewals a
/// minute per certificate key); returns its identity file.
async fn bot(c: &Cluster, user: &str, stop: &CancellationToken) -> PathBuf {
    let token = c
        .admin
        .create_token(CreateTokenRequest {
            kind: "bot".into(),
            ttl_secs: 600,
            uses: 0,
            user: user.into(),
        })
        .await
        .unwrap()
        .token;
    let dir = c.dir.path().join(format!("bot-{user}"));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    postern_dial::mint::write_file(&token_file, token.as_bytes(), 0o600).unwrap();
    let cfg = BotConfig {
        proxy: c.proxies[0].web.to_string(),
        trust: c.proxies[0].web_trust(),
        cluster: c.name.clone(),
        name: user.into(),
        token_file,
        ca_pin: c.ca_pin(),
        out: dir.join("identity"),
        interval: Duration::from_secs(4),
        ttl: Duration::from_secs(10),
    };
    let out = cfg.out.clone();
    tokio::spawn(postern_client::bot::run(cfg, stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.exists() {
        assert!(Instant::now() < deadline, "the bot wrote no identity file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

/// One SDK call through proxy 0 on a fresh connection with the dynamic identity file `path`.
async fn sdk_call(c: &Cluster, path: &PathBuf) -> Result<(), String> {
    let cfg = Config {
        addrs: vec![c.proxies[0].web.to_string()],
        credentials: vec![Credentials::dynamic_identity_file(path)],
        web_trust: Some(WebTrust::Pin(c.proxies[0].web_fp.clone())),
        ..Default::default()
    };
    let client = AuthClient::connect(cfg).await.map_err(|e| e.to_string())?;
    client
        .get_role("bot-reader")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_ca_rotates_through_every_phase_while_api_calls_flow() {
    let c = Cluster::start_full("rottls", 1, 60, false, |_| {}, (86400, 6)).await;
    c.role(READER).await;
    c.role(cluster::ALL_TARGETS).await;
    let echo = support::echo_server().await;
    let agent = c.service_agent("web-1", 0, &[("web", echo, &[])]).await;
    let session = c.user_session("alice", &["all-targets"], 0).await;
    let mut held = support::wait_stream(&session, "web", "rottls", Duration::from_secs(20)).await;
    let proxy_id = c.dir.path().join("proxy-0.identity");
    reader(&c.admin, "robot").await;
    reader(&c.admin, "oldie").await;
    let old_id = identity(&c.admin, "oldie").await;
    let stop = CancellationToken::new();
    let bot_id = bot(&c, "robot", &stop).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = sdk_call(&c, &bot_id).await {
        assert!(
            Instant::now() < deadline,
            "the proxy never served the API: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old_ca = tls_rotation(&admin(&c).await).await.trusted[0].clone();

    // Calls on fresh connections (a new TLS handshake each) all through the rotation.
    let (ok, failed, done) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let caller = {
        let (ok, failed, done) = (ok.clone(), failed.clone(), done.clone());
        let (c_proxy, path) = (c.proxies[0].web, bot_id.clone());
        let fp = c.proxies[0].web_fp.clone();
        tokio::spawn(async move {
            let cfg = Config {
                addrs: vec![c_proxy.to_string()],
                credentials: vec![Credentials::dynamic_identity_file(&path)],
                web_trust: Some(WebTrust::Pin(fp)),
                ..Default::default()
            };
            while !done.load(Ordering::Relaxed) {
                let r = match AuthClient::connect(cfg.clone()).await {
                    Ok(a) => a.get_role("bot-reader").await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match r {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("call failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // init: the new CA is trusted beside the old one, which still signs.
    let r = rotate(&c, "init").await;
    assert_eq!(r.trusted.len(), 2, "{r:?}");
    assert_eq!(r.trusted[0], old_ca, "the old CA still signs in init");
    let new_ca = r.trusted[1].clone();
    // The bot's next identity carries both CAs (and a certificate of the old one).
    let both = vec![old_ca.clone(), new_ca.clone()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while IdentityFile::load(&bot_id).map(|i| i.tls_cas).ok() != Some(both.clone()) {
        assert!(
            Instant::now() < deadline,
            "identity files do not carry both CAs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // update_clients: client certificates come from the new CA; the proxy's Auth identity moves
    // to it at its next renewal.
    let r = rotate(&c, "update_clients").await;
    assert_eq!(r.trusted, vec![new_ca.clone(), old_ca.clone()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while IdentityFile::load(&proxy_id)
        .map(|i| i.tls_cas.first() == Some(&new_ca))
        .ok()
        != Some(true)
    {
        assert!(
            Instant::now() < deadline,
            "the proxy's Auth identity did not renew onto the new CA"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The bot's next identity is from the new CA.
    let deadline = Instant::now() + Duration::from_secs(10);
    while IdentityFile::load(&bot_id)
        .map(|i| i.tls_cas.first() == Some(&new_ca))
        .ok()
        != Some(true)
    {
        assert!(
            Instant::now() < deadline,
            "the bot's certificate is not from the new CA"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    direct_call(&c, &old_id)
        .await
        .expect("an old-CA identity still works in update_clients");

    // update_servers: the API's own certificate is from the new CA now, without a restart.
    rotate(&c, "update_servers").await;
    let e = direct_call(&c, &old_id)
        .await
        .expect_err("an identity trusting only the old CA cannot verify the server any more");
    eprintln!("old-CA-only identity after update_servers: {e}");
    assert!(e.contains("TLS CA was rotated"), "{e}");
    // Both CAs have one name: a client holding them in either order finds the right one.
    let mut reversed = IdentityFile::load(&bot_id).unwrap();
    reversed.tls_cas.reverse();
    assert_eq!(reversed.tls_cas[1], new_ca);
    direct_call(&c, &reversed)
        .await
        .expect("the new CA listed second verifies the server");
    tokio::time::sleep(Duration::from_secs(3)).await;

    // standby: only the new CA is left.
    let r = rotate(&c, "standby").await;
    assert_eq!(r.trusted, vec![new_ca.clone()]);
    assert!(r.last_rotated > 0);
    // The proxy renews again (its policy watch reconnects on the new CA only).
    let before = IdentityFile::load(&proxy_id).unwrap().expires;
    let deadline = Instant::now() + Duration::from_secs(10);
    while IdentityFile::load(&proxy_id)
        .map(|i| i.expires)
        .unwrap_or(before)
        == before
    {
        assert!(
            Instant::now() < deadline,
            "no proxy identity renewal after standby"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        IdentityFile::load(&proxy_id).unwrap().tls_cas,
        vec![new_ca.clone()]
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    done.store(true, Ordering::Relaxed);
    caller.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("TLS CA rotation: {ok} calls, {failed} failed");
    assert_eq!(failed, 0, "no call fails during the rotation");
    assert!(ok > 20, "{ok}");

    // A client certificate of the old CA is refused with a reason, even by a client that
    // trusts the new CA.
    let mut stale = old_id.clone();
    stale.tls_cas = vec![new_ca.clone()];
    let e = direct_call(&c, &stale)
        .await
        .expect_err("an old-CA client certificate after the rotation");
    assert!(e.contains("retired"), "{e}");
    // `pctl status` shows it.
    let r = tls_rotation(&admin(&c).await).await;
    assert_eq!((r.phase.as_str(), r.trusted.len()), ("standby", 1));
    let fresh = identity(&admin(&c).await, "oldie").await;
    assert_eq!(fresh.tls_cas, vec![new_ca]);
    direct_call(&c, &fresh).await.expect("a new-CA identity");

    // The proxy's policy watch works on its new-CA identity: a lock closes a live stream.
    admin(&c)
        .await
        .create_lock(postern_api::proto::Lock {
            user: "alice".into(),
            message: "locked after the TLS rotation".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), held.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the live stream was not closed by the lock: {r:?}"
    );
    stop.cancel();
    agent.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_tls_rotation_leaves_the_old_ca_working() {
    let c = Cluster::start("rbtls", 1, 60).await;
    c.role(READER).await;
    reader(&c.admin, "oldie").await;
    let old_id = identity(&c.admin, "oldie").await;
    let old_ca = old_id.tls_cas[0].clone();

    rotate(&c, "init").await;
    rotate(&c, "update_clients").await;
    let mid_id = identity(&admin(&c).await, "oldie").await;
    assert_ne!(mid_id.tls_cas[0], old_ca, "issued by the new CA");
    rotate(&c, "update_servers").await;
    direct_call(&c, &mid_id).await.expect("a new-CA identity");
    assert!(direct_call(&c, &old_id).await.is_err(), "the server moved");

    // Rolling back: the old CA serves and signs again, both stay trusted (an identity the new CA
    // issued still works while its holder gets a new one); standby then drops the new CA.
    let r = rotate(&c, "rollback").await;
    assert_eq!(r.trusted.len(), 2, "{r:?}");
    assert_eq!(r.trusted[0], old_ca, "the old CA signs again");
    direct_call(&c, &old_id)
        .await
        .expect("an old-CA identity while rolling back");
    direct_call(&c, &mid_id)
        .await
        .expect("a new-CA identity while rolling back");
    let r = rotate(&c, "standby").await;
    assert_eq!(r.trusted, vec![old_ca.clone()]);
    assert_eq!(r.last_rotated, 0, "a rollback completes nothing");
    // After it: an identity from before the rotation works, the one the rolled-back CA issued
    // does not.
    direct_call(&c, &old_id)
        .await
        .expect("an old-CA identity after the rollback");
    let e = direct_call(&c, &mid_id)
        .await
        .expect_err("a rolled-back-CA identity");
    eprintln!("rolled-back-CA identity: {e}");
    assert!(e.contains("retired or rolled back"), "{e}");
    let fresh = identity(&admin(&c).await, "oldie").await;
    assert_eq!(fresh.tls_cas, vec![old_ca]);
    direct_call(&c, &fresh).await.expect("a fresh identity");
    c.stop().await;
}
