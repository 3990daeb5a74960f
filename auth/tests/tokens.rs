//! Join tokens: single use unless created with `uses`, refused with a clear message once spent,
//! and the agents they enroll are `service` agents (never role `auth`).

mod support;

use postern_api::proto::*;
use postern_client::auth::AuthClient;
use support::*;
use tunnel_proto::names::EXT_ROLE;

async fn token(admin: &AuthClient, uses: u32) -> String {
    admin
        .create_token(CreateTokenRequest {
            kind: "agent".into(),
            ttl_secs: 600,
            uses,
            ..Default::default()
        })
        .await
        .unwrap()
        .token
}

fn register(token: &str, host_id: &str) -> RegisterAgentRequest {
    let key = postern_dial::mint::generate_key();
    RegisterAgentRequest {
        token: token.into(),
        host_id: host_id.into(),
        public_key: key.public_key().to_openssh().unwrap(),
    }
}

#[tokio::test]
async fn a_join_token_used_twice_is_refused_and_enrolls_a_service_agent() {
    let dir = TempDir::new("token-once");
    let srv = start(&dir.0, "once").await;
    let admin = srv.admin().await;
    let t = token(&admin, 0).await;
    let certs = admin.register_agent(register(&t, "web-1")).await.unwrap();
    let cert = russh::keys::ssh_key::Certificate::from_openssh(&certs.ssh_cert).unwrap();
    assert_eq!(
        cert.extensions().get(EXT_ROLE).map(String::as_str),
        Some("service"),
        "a join token enrolls a service agent, never role auth"
    );
    let e = admin
        .register_agent(register(&t, "web-2"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied));
    let msg = e.to_string();
    assert!(
        msg.contains("already been used") && msg.contains("--uses N"),
        "{msg}"
    );
    let listed = admin
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .tokens;
    assert_eq!(listed[0].uses_left, 0);
    srv.stop().await;
}

#[tokio::test]
async fn a_token_created_with_uses_n_enrolls_n_agents_then_no_more() {
    let dir = TempDir::new("token-n");
    let srv = start(&dir.0, "many").await;
    let admin = srv.admin().await;
    let t = token(&admin, 3).await;
    for i in 0..3 {
        admin
            .register_agent(register(&t, &format!("web-{i}")))
            .await
            .unwrap();
    }
    let e = admin
        .register_agent(register(&t, "web-3"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("3 of 3 uses"), "{e}");
    let e = admin
        .create_token(CreateTokenRequest {
            kind: "agent".into(),
            ttl_secs: 0,
            uses: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    srv.stop().await;
}

#[tokio::test]
async fn racing_registrations_spend_a_single_use_token_once() {
    let dir = TempDir::new("token-race");
    let srv = start(&dir.0, "race").await;
    let admin = srv.admin().await;
    let t = token(&admin, 0).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let admin = admin.clone();
        let req = register(&t, &format!("web-{i}"));
        tasks.push(tokio::spawn(async move { admin.register_agent(req).await }));
    }
    let mut ok = 0;
    for task in tasks {
        ok += usize::from(task.await.unwrap().is_ok());
    }
    assert_eq!(ok, 1, "a single-use token enrolled {ok} agents");
    srv.stop().await;
}

/// A token of another kind (a bot's) presented by an agent is refused with both kinds named,
/// and its use is not spent.
#[test]
fn a_token_of_another_kind_is_refused_and_not_spent() {
    use postern_auth::storage::{Backend, Condition, SqliteBackend};
    use postern_auth::tokens::{StoredToken, TokenError, spend};
    let dir = TempDir::new("token-kind");
    let db = SqliteBackend::open(&dir.0.join("auth.db")).unwrap();
    let hash = postern_auth::service::hash_secret("bot-secret");
    let stored = StoredToken {
        hash: hash.clone(),
        kind: "bot".into(),
        expires: postern_dial::mint::now_unix() + 600,
        uses: 1,
        uses_left: 1,
        user: "robot".into(),
    };
    let id = &hash[..12];
    db.put(
        "token",
        id,
        &serde_json::to_string(&stored).unwrap(),
        Condition::Absent,
    )
    .unwrap();
    let now = postern_dial::mint::now_unix();
    let e = spend(&db, id, &hash, now, "agent").unwrap_err();
    assert!(matches!(e, TokenError::WrongKind { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("'bot' token, not a token of type 'agent'"),
        "{msg}"
    );
    // Still spendable by what it is for.
    spend(&db, id, &hash, now, "bot").unwrap();
}
