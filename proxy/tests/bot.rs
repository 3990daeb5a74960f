//! Machine ID: a bot (`postern_client::bot`, what `psh bot start` runs) joins through the proxy
//! with a bot token bound to a user, writes an identity file and renews it atomically; the SDK
//! with the dynamic identity file loader makes calls through three renewals with none failing;
//! once the user is locked the identity and the bot's renewal are refused. Bad inputs: a bot
//! token at an agent's join, an agent token at a bot's join, a token used twice, a user's own
//! certificate presented for a bot's renewal.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_api::identity::IdentityFile;
use postern_api::proto::{CreateTokenRequest, CreateUserRequest, Lock};
use postern_client::auth::AuthClient;
use postern_client::bot::{BotConfig, BotError};
use postern_client::connect::Config;
use postern_client::credentials::Credentials;
use postern_dial::web::WebTrust;
use support::*;
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

/// Creates `user` with the reader role and a single-use bot token bound to it.
async fn bot_token(c: &Cluster, user: &str) -> String {
    let _ = c
        .admin
        .create_user(CreateUserRequest {
            name: user.into(),
            roles: vec!["bot-reader".into()],
            secret_ttl_secs: 0,
        })
        .await;
    token(c, "bot", user).await
}

async fn token(c: &Cluster, kind: &str, user: &str) -> String {
    c.admin
        .create_token(CreateTokenRequest {
            kind: kind.into(),
            ttl_secs: 600,
            uses: 0,
            user: user.into(),
        })
        .await
        .unwrap()
        .token
}

/// A bot config for proxy 0 with `token` written 0600 to a file.
fn bot_config(
    c: &Cluster,
    name: &str,
    token: &str,
    interval: Duration,
    ttl: Duration,
) -> BotConfig {
    let dir = c.dir.path().join(format!("bot-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    postern_dial::mint::write_file(&token_file, token.as_bytes(), 0o600).unwrap();
    BotConfig {
        proxy: c.proxies[0].web.to_string(),
        trust: c.proxies[0].web_trust(),
        cluster: c.name.clone(),
        name: name.into(),
        token_file,
        ca_pin: c.ca_pin(),
        out: dir.join("identity"),
        interval,
        ttl,
    }
}

/// An SDK config through proxy 0's web address with the dynamic identity file `path`.
fn sdk(c: &Cluster, path: &PathBuf) -> Config {
    Config {
        addrs: vec![c.proxies[0].web.to_string()],
        credentials: vec![Credentials::dynamic_identity_file(path)],
        web_trust: Some(WebTrust::Pin(c.proxies[0].web_fp.clone())),
        ..Default::default()
    }
}

/// One SDK call on a fresh connection (the loader is asked at every connection).
async fn call(cfg: &Config) -> Result<String, String> {
    let client = AuthClient::connect(cfg.clone())
        .await
        .map_err(|e| e.to_string())?;
    client
        .get_role("bot-reader")
        .await
        .map(|r| r.name)
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_calls_survive_three_bot_renewals_and_a_locked_user_ends_the_bot() {
    let c = Cluster::start("botok", 1, 60).await;
    c.role(READER).await;
    let t = bot_token(&c, "robot").await;
    let cfg = bot_config(&c, "ci", &t, Duration::from_secs(2), Duration::from_secs(5));
    let out = cfg.out.clone();
    let stop = CancellationToken::new();
    let bot = tokio::spawn(postern_client::bot::run(cfg, stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.exists() {
        assert!(Instant::now() < deadline, "the bot wrote no identity file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&out).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "identity file mode");
    let first = IdentityFile::load(&out).unwrap();
    assert_eq!(first.user, "robot");
    assert!(
        first.expires <= postern_dial::mint::now_unix() + 5,
        "the lifetime asked for is used"
    );
    let api = sdk(&c, &out);
    // The proxy serves the API once it holds the cluster's policy (the join needed none).
    while let Err(e) = call(&api).await {
        assert!(
            Instant::now() < deadline,
            "the proxy never served the API: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut certs = vec![first.ssh_cert.clone()];
    let (mut ok, mut failed) = (0u32, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(40);
    while certs.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 renewals in 40 s ({} seen)",
            certs.len() - 1
        );
        match call(&api).await {
            Ok(name) if name == "bot-reader" => ok += 1,
            Ok(other) => failed.push(format!("wrong answer {other}")),
            Err(e) => failed.push(e),
        }
        let now = IdentityFile::load(&out).unwrap();
        if now.ssh_cert != *certs.last().unwrap() {
            assert_eq!(
                now.private_key, first.private_key,
                "same key across renewals"
            );
            certs.push(now.ssh_cert);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "bot renewals: {}, SDK calls ok: {ok}, failed: {}",
        certs.len() - 1,
        failed.len()
    );
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    // Past the first identity's expiry, only the renewals kept the calls working.
    assert!(
        postern_dial::mint::now_unix() > first.expires,
        "ran past the first expiry"
    );

    c.admin
        .create_lock(Lock {
            user: "robot".into(),
            message: "bot compromised".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Refused at once: by the Auth server's lock check, or by the proxy, which closes the
    // locked user's session as soon as the lock reaches its policy (the reason shown then
    // depends on when). Once the proxy holds the lock, its refusal carries the lock's message.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let e = call(&api)
            .await
            .expect_err("a locked user's identity is refused");
        if e.contains("bot compromised") {
            break;
        }
        assert!(Instant::now() < until, "no refusal naming the lock: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped = tokio::time::timeout(Duration::from_secs(20), bot)
        .await
        .expect("the bot stops by itself once refused")
        .unwrap();
    let e = stopped.expect_err("the renewal is refused");
    assert!(matches!(e, BotError::Refused(_)), "{e}");
    assert!(
        e.to_string()
            .contains("user 'robot' is locked: bot compromised"),
        "{e}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_another_kind_a_used_token_and_a_users_own_certificate_are_refused() {
    let c = Cluster::start("botbad", 1, 60).await;
    c.role(READER).await;
    let (second, hour) = (Duration::from_secs(60), Duration::from_secs(3600));

    // A bot token at an agent's join: refused as another kind, and not spent.
    let bot_t = bot_token(&c, "robot").await;
    let echo = echo_server().await;
    let agent = c.joining_agent("web-1", &bot_t, &c.ca_pin(), echo);
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        postern_agent::run(agent, CancellationToken::new()),
    )
    .await
    .expect("a refused join stops the agent");
    let e = r
        .expect_err("a bot token does not enroll an agent")
        .to_string();
    assert!(
        e.contains("'bot' token, not a token of type 'agent'"),
        "{e}"
    );

    // The same token still enrolls the bot (it was not spent), once.
    let cfg = bot_config(&c, "once", &bot_t, second, hour);
    let id = postern_client::bot::join(&cfg)
        .await
        .expect("the bot joins");
    assert_eq!(id.user, "robot");
    let again = bot_config(&c, "twice", &bot_t, second, hour);
    let e = postern_client::bot::join(&again).await.unwrap_err();
    assert!(matches!(e, BotError::Refused(_)), "{e}");
    assert!(e.to_string().contains("has already been used"), "{e}");

    // An agent token at a bot's join: refused as another kind.
    let agent_t = c.agent_token(600).await;
    let cfg = bot_config(&c, "agent-token", &agent_t, second, hour);
    let e = postern_client::bot::join(&cfg).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("'agent' token, not a token of type 'bot'"),
        "{e}"
    );

    // A user's own certificate (psh login, pctl auth sign) has no bot record: not renewed.
    let own = c.identity("robot").await;
    let r = postern_client::bot::renew(&cfg, &own).await;
    let Err(postern_client::bot::RenewError::Final(e)) = r else {
        panic!("a user's own certificate is not renewed as a bot's");
    };
    assert!(e.to_string().contains("not a bot's"), "{e}");

    // A bot token must name an existing user; an agent token names none.
    let no_user = c
        .admin
        .create_token(CreateTokenRequest {
            kind: "bot".into(),
            ttl_secs: 600,
            ..Default::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(no_user.contains("--user=NAME"), "{no_user}");
    let ghost = c
        .admin
        .create_token(CreateTokenRequest {
            kind: "bot".into(),
            user: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(ghost.contains("user 'ghost' not found"), "{ghost}");
    c.stop().await;
}
