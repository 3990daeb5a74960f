//! `WatchPolicy` and locks: what the preset `proxy` role may do (and nothing more), the snapshot,
//! resuming from a revision without a snapshot, users carried as name and roles only, and user
//! certificates carrying the user's roles.

mod support;

use postern_api::proto::*;
use postern_client::auth::AuthClient;
use support::*;

async fn next(s: &mut tonic::Streaming<PolicyEvent>) -> PolicyEvent {
    tokio::time::timeout(std::time::Duration::from_secs(5), s.message())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .expect("stream open")
}

/// Skips heartbeats.
async fn next_change(s: &mut tonic::Streaming<PolicyEvent>) -> PolicyEvent {
    loop {
        let e = next(s).await;
        if !e.kind.is_empty() {
            return e;
        }
    }
}

#[tokio::test]
async fn the_proxy_role_watches_and_resumes_from_a_revision() {
    let dir = TempDir::new("watch");
    let srv = start(&dir.0, "watch").await;
    let admin = srv.admin().await;
    admin.create_role(seed_role()).await.unwrap();
    identity_for(&admin, "api-user", &["api-role"], 0).await;
    let id = identity_for(&admin, "proxy-1", &["proxy"], 0).await;
    let proxy = AuthClient::connect_direct(&srv.addr.to_string(), &id)
        .await
        .unwrap();

    let mut s = proxy
        .rpc()
        .watch_policy(WatchPolicyRequest { from_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut snapshot = Vec::new();
    let end = loop {
        let e = next(&mut s).await;
        assert!(e.snapshot, "a new watcher starts with a snapshot");
        if e.snapshot_end {
            break e;
        }
        snapshot.push(e);
    };
    let api_user = snapshot
        .iter()
        .find(|e| e.kind == "user" && e.name == "api-user")
        .expect("users are in the snapshot");
    assert_eq!(api_user.user.as_ref().unwrap().roles, ["api-role"]);
    assert!(
        snapshot
            .iter()
            .any(|e| e.kind == "role" && e.name == "api-role")
    );
    drop(s);

    // Changes while nobody watches; a watcher resuming from the snapshot's revision gets exactly
    // them, in order, and no snapshot.
    let lock = admin
        .create_lock(Lock {
            user: "api-user".into(),
            message: "suspended".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin.delete_user("api-user").await.unwrap();
    let mut s = proxy
        .rpc()
        .watch_policy(WatchPolicyRequest {
            from_revision: end.revision,
        })
        .await
        .unwrap()
        .into_inner();
    let first = next_change(&mut s).await;
    assert!(!first.snapshot);
    assert_eq!(
        (first.kind.as_str(), first.name.as_str()),
        ("lock", lock.id.as_str())
    );
    assert_eq!(first.lock.unwrap().message, "suspended");
    let second = next_change(&mut s).await;
    assert_eq!(
        (second.kind.as_str(), second.name.as_str(), second.deleted),
        ("user", "api-user", true)
    );
    assert!(second.revision > first.revision && first.revision > end.revision);
    // A quiet stream heartbeats at the newest revision.
    let beat = next(&mut s).await;
    assert!(beat.kind.is_empty() && beat.revision == second.revision);

    // Least privilege: the proxy role cannot write policy or read users.
    let e = proxy.upsert_role(seed_role()).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied));
    let e = proxy
        .create_lock(Lock {
            user: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied));
    assert!(proxy.get_user("proxy-1").await.is_err());
    srv.stop().await;
}

#[tokio::test]
async fn only_holders_of_role_and_lock_read_may_watch_and_certs_carry_roles() {
    let dir = TempDir::new("watch-deny");
    let srv = start(&dir.0, "watchdeny").await;
    let admin = srv.admin().await;
    admin.create_role(seed_role()).await.unwrap();
    let id = identity_for(&admin, "api-user", &["api-role"], 0).await;
    let cert = russh::keys::ssh_key::Certificate::from_openssh(&id.ssh_cert).unwrap();
    assert_eq!(
        cert.extensions()
            .get(tunnel_proto::names::EXT_ROLES)
            .map(String::as_str),
        Some("api-role")
    );
    let api = AuthClient::connect_direct(&srv.addr.to_string(), &id)
        .await
        .unwrap();
    let e = api
        .rpc()
        .watch_policy(WatchPolicyRequest { from_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    srv.stop().await;
}
