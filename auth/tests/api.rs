//! The Auth API against a real server on loopback: the seed's flow, RBAC, authentication
//! failures, concurrency, limits, audit.

mod support;

use postern_api::proto::*;
use postern_client::auth::{AuthClient, AuthClientError};
use support::*;

#[tokio::test]
async fn the_seed_flow_get_role_allowed_upsert_role_denied() {
    let dir = TempDir::new("seed");
    let srv = start(&dir.0, "seed").await;
    let admin = srv.admin().await;
    assert_eq!(admin.user, "@admin");
    admin.create_role(seed_role()).await.unwrap();
    let id = identity_for(&admin, "api-user", &["api-role"], 8 * 3600).await;
    let api = AuthClient::connect_direct(&srv.addr.to_string(), &id)
        .await
        .unwrap();
    assert_eq!(api.user, "api-user");
    assert_eq!(api.roles, ["api-role"]);

    let role = api.get_role("api-role").await.unwrap();
    assert_eq!(role.name, "api-role");
    assert_eq!(role.spec.unwrap().allow.unwrap().rules[0].verbs, ["read"]);

    let e = api.upsert_role(seed_role()).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied));
    let msg = e.to_string();
    assert!(
        msg.contains("verb 'create'") && msg.contains("resource 'role'"),
        "{msg}"
    );
    assert!(msg.contains("api-user"), "{msg}");

    // read is not list, and users are another resource.
    assert_eq!(
        api.list_roles(ListRolesRequest {})
            .await
            .unwrap_err()
            .code(),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        api.get_user("api-user").await.unwrap_err().code(),
        Some(tonic::Code::PermissionDenied)
    );
    srv.stop().await;
}

#[tokio::test]
async fn every_call_is_audited_in_the_database_and_the_json_log() {
    let dir = TempDir::new("audit");
    let srv = start(&dir.0, "audit").await;
    let admin = srv.admin().await;
    admin.create_role(seed_role()).await.unwrap();
    let id = identity_for(&admin, "api-user", &["api-role"], 0).await;
    let api = AuthClient::connect_direct(&srv.addr.to_string(), &id)
        .await
        .unwrap();
    api.get_role("api-role").await.unwrap();
    let _ = api.upsert_role(seed_role()).await.unwrap_err();

    let events = admin
        .list_audit_events(ListAuditEventsRequest { limit: 50 })
        .await
        .unwrap()
        .events;
    let denied = events
        .iter()
        .find(|e| e.action == "UpsertRole")
        .expect("UpsertRole audited");
    assert_eq!(denied.user, "api-user");
    assert_eq!(denied.resource, "role/api-role");
    assert!(!denied.allowed);
    assert!(denied.error.contains("verb 'create'"));
    let allowed = events
        .iter()
        .find(|e| e.action == "GetRole")
        .expect("GetRole audited");
    assert!(allowed.allowed && allowed.error.is_empty());
    assert!(allowed.peer.starts_with("127.0.0.1:"));

    let log = std::fs::read_to_string(srv.data_dir.join("audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines.iter().any(|l| l["action"] == "UpsertRole"
            && l["allowed"] == false
            && l["user"] == "api-user")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(srv.data_dir.join("audit.log"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_user_with_no_roles_can_do_nothing() {
    let dir = TempDir::new("noroles");
    let srv = start(&dir.0, "noroles").await;
    let admin = srv.admin().await;
    admin.create_role(seed_role()).await.unwrap();
    let id = identity_for(&admin, "nobody", &[], 0).await;
    let c = AuthClient::connect_direct(&srv.addr.to_string(), &id)
        .await
        .unwrap();
    let e = c.get_role("api-role").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied));
    assert!(e.to_string().contains("roles held: none"), "{e}");
    for kind in ["host", "user", "tls"] {
        assert!(
            c.export_authorities(ExportAuthoritiesRequest { kind: kind.into() })
                .await
                .is_err()
        );
    }
    assert!(c.list_users(ListUsersRequest {}).await.is_err());
    assert!(
        c.create_token(CreateTokenRequest {
            kind: "agent".into(),
            ttl_secs: 0,
            uses: 0,
            ..Default::default()
        })
        .await
        .is_err()
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_deleted_users_certificate_is_refused_at_once() {
    let dir = TempDir::new("deleted");
    let srv = start(&dir.0, "deleted").await;
    let admin = srv.admin().await;
    admin.create_role(seed_role()).await.unwrap();
    let id = identity_for(&admin, "leaver", &["api-role"], 0).await;
    let c = AuthClient::connect_direct(&srv.addr.to_string(), &id)
        .await
        .unwrap();
    c.get_role("api-role").await.unwrap();
    admin.delete_user("leaver").await.unwrap();
    // The same open connection: refused on its next call.
    let e = c.get_role("api-role").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated), "{e}");
    // A user of the same name created again does not revive the old certificate.
    let _ = identity_for(&admin, "leaver", &["api-role"], 0).await;
    let e = c.get_role("api-role").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated), "{e}");
    srv.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_cluster_is_refused() {
    let (d1, d2) = (TempDir::new("ca1"), TempDir::new("ca2"));
    let one = start(&d1.0, "one").await;
    let two = start(&d2.0, "two").await;
    // Two's admin identity, pointed at one (and claiming one's cluster name, so that only the
    // CA differs).
    let mut foreign = two.admin_identity();
    foreign.cluster = "one".into();
    foreign.tls_cas = one.admin_identity().tls_cas;
    let e = AuthClient::connect_direct(&one.addr.to_string(), &foreign)
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, AuthClientError::Connect { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("issued by another cluster's CA"), "{text}");
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let dir = TempDir::new("expired");
    let srv = start(&dir.0, "expired").await;
    let admin = srv.admin().await;
    admin.create_role(seed_role()).await.unwrap();
    // Certificates are backdated 60 s for clock skew, so a 1 s certificate expires 1 s from now.
    let id = identity_for(&admin, "brief", &["api-role"], 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    // The client notices by itself...
    let e = AuthClient::connect_direct(&srv.addr.to_string(), &id)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("certificate expired"), "{e}");
    // ...and a client that does not check is refused by the server's TLS handshake.
    use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
    let key = russh::keys::PrivateKey::from_openssh(&id.private_key).unwrap();
    let tls = postern_client::credentials::client_config(
        vec![CertificateDer::from_pem_slice(id.tls_cas[0].as_bytes()).unwrap()],
        vec![CertificateDer::from_pem_slice(id.tls_cert.as_bytes()).unwrap()],
        postern_client::auth::ed25519_pkcs8(&key).unwrap(),
    )
    .unwrap();
    let loaded = postern_client::credentials::Loaded {
        tls: std::sync::Arc::new(tls),
        server_name: ServerName::try_from("auth.expired").unwrap(),
        cluster: Some("expired".into()),
        ssh: None,
        proxy: None,
    };
    let e = AuthClient::direct(&srv.addr.to_string(), postern_client::auth::fixed(loaded))
        .await
        .err()
        .expect("refused");
    let text = e.to_string();
    assert!(
        text.contains("certificate expired: run psh login") && text.contains("CertificateExpired"),
        "{text}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn certificate_ttl_over_the_roles_cap_is_refused_naming_it() {
    let dir = TempDir::new("ttl");
    let srv = start(&dir.0, "ttl").await;
    let admin = srv.admin().await;
    let mut role = seed_role();
    role.spec.as_mut().unwrap().options = Some(RoleOptions {
        max_session_ttl_secs: 3600,
    });
    admin.create_role(role).await.unwrap();
    // Over the cap: refused, naming the cap (never silently cut).
    let _ = identity_for(&admin, "capped", &["api-role"], 60).await;
    let key = postern_dial::mint::generate_key();
    let e = admin
        .generate_user_certs(GenerateUserCertsRequest {
            user: "capped".into(),
            public_key: key.public_key().to_openssh().unwrap(),
            ttl_secs: 48 * 3600,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds the cap of 1h"), "{e}");
    // No TTL asked: the cap.
    let id = sign(&admin, "capped", 0).await;
    let now = postern_dial::mint::now_unix();
    assert!(
        id.expires <= now + 3600 && id.expires + 60 > now + 3600,
        "expires {} now {now}",
        id.expires
    );
    srv.stop().await;
}

#[tokio::test]
async fn concurrent_writes_lose_no_update() {
    let dir = TempDir::new("race");
    let srv = start(&dir.0, "race").await;
    let admin = srv.admin().await;
    let created = admin.create_role(seed_role()).await.unwrap();
    assert_eq!(created.revision, 1);

    // 20 concurrent upserts: all succeed, each gets its own revision.
    let mut tasks = Vec::new();
    for i in 1..=20u64 {
        let c = admin.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = seed_role();
            r.spec.as_mut().unwrap().options = Some(RoleOptions {
                max_session_ttl_secs: i * 60,
            });
            c.upsert_role(r).await.unwrap().revision
        }));
    }
    let mut revisions = Vec::new();
    for t in tasks {
        revisions.push(t.await.unwrap());
    }
    revisions.sort();
    assert_eq!(revisions, (2..=21).collect::<Vec<_>>());
    let stored = admin.get_role("api-role").await.unwrap();
    assert_eq!(stored.revision, 21);

    // 10 read-modify-writes from the same revision: exactly one wins, the others are told.
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let c = admin.clone();
        let mut r = stored.clone();
        tasks.push(tokio::spawn(async move {
            r.spec.as_mut().unwrap().options = Some(RoleOptions {
                max_session_ttl_secs: 7200 + i,
            });
            c.update_role(r).await
        }));
    }
    let (mut won, mut lost) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.revision, 22);
                won += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition), "{e}");
                assert!(e.to_string().contains("read it again and retry"), "{e}");
                lost += 1;
            }
        }
    }
    assert_eq!((won, lost), (1, 9));
    srv.stop().await;
}

#[tokio::test]
async fn oversized_and_invalid_requests_are_refused_cleanly() {
    let dir = TempDir::new("limits");
    let srv = start(&dir.0, "limits").await;
    let admin = srv.admin().await;
    let mut huge = seed_role();
    huge.spec.as_mut().unwrap().allow.as_mut().unwrap().logins = vec!["x".repeat(1024); 2048];
    let e = admin.upsert_role(huge).await.unwrap_err();
    eprintln!("oversized: {e}");
    assert_eq!(e.code(), Some(tonic::Code::OutOfRange), "{e}");
    assert!(e.to_string().starts_with("request too large"), "{e}");
    // The server is still fine.
    admin.create_role(seed_role()).await.unwrap();

    let mut bad = seed_role();
    bad.spec.as_mut().unwrap().allow.as_mut().unwrap().rules[0].verbs = vec!["raed".into()];
    let e = admin.upsert_role(bad).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    assert!(e.to_string().contains("spec.allow.rules[0].verbs"), "{e}");

    let e = admin
        .create_user(CreateUserRequest {
            name: "u".into(),
            roles: vec!["missing".into()],
            secret_ttl_secs: 0,
        })
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("role 'missing' does not exist"),
        "{e}"
    );
    let e = admin
        .generate_user_certs(GenerateUserCertsRequest {
            user: "nobody".into(),
            public_key: "ssh-ed25519 AAAA".into(),
            ttl_secs: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    assert_eq!(
        admin.get_role("nope").await.unwrap_err().code(),
        Some(tonic::Code::NotFound)
    );
    srv.stop().await;
}

#[tokio::test]
async fn join_tokens_register_agents_and_nothing_else() {
    let dir = TempDir::new("tokens");
    let srv = start(&dir.0, "tokens").await;
    let admin = srv.admin().await;
    let t = admin
        .create_token(CreateTokenRequest {
            kind: "agent".into(),
            ttl_secs: 600,
            uses: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    let listed = admin
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .tokens;
    assert_eq!(listed.len(), 1);
    assert!(
        !t.token.starts_with(&listed[0].id),
        "the list shows a hash, not the secret"
    );
    let key = postern_dial::mint::generate_key();
    let pk = key.public_key().to_openssh().unwrap();
    let certs = admin
        .register_agent(RegisterAgentRequest {
            token: t.token.clone(),
            host_id: "auth-2".into(),
            public_key: pk.clone(),
        })
        .await
        .unwrap();
    let cert = russh::keys::ssh_key::Certificate::from_openssh(&certs.ssh_cert).unwrap();
    assert_eq!(cert.valid_principals(), ["auth-2.tokens"]);
    let e = admin
        .register_agent(RegisterAgentRequest {
            token: "0".repeat(64),
            host_id: "x".into(),
            public_key: pk.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied));
    admin.delete_token(&listed[0].id).await.unwrap();
    let e = admin
        .register_agent(RegisterAgentRequest {
            token: t.token,
            host_id: "auth-2".into(),
            public_key: pk,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied));
    srv.stop().await;
}
