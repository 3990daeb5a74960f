//! A proxy's Auth identity renews itself: a user holding the preset role `proxy` may have
//! `GenerateUserCerts` issue certificates for itself (capped by its roles, audited), but not for
//! another user; a user without that role may not renew itself; a locked proxy user is refused.

mod support;

use postern_api::proto::*;
use postern_client::auth::AuthClient;
use support::*;

fn request(user: &str, ttl_secs: u64) -> GenerateUserCertsRequest {
    GenerateUserCertsRequest {
        user: user.into(),
        public_key: postern_dial::mint::generate_key()
            .public_key()
            .to_openssh()
            .unwrap(),
        ttl_secs,
    }
}

#[tokio::test]
async fn only_a_proxy_identity_renews_itself_and_only_itself() {
    let dir = TempDir::new("ownrenew");
    let srv = start(&dir.0, "ownrenew").await;
    let admin = srv.admin().await;
    admin.create_role(seed_role()).await.unwrap();
    let id = identity_for(&admin, "edge-1", &["proxy"], 600).await;
    let proxy = AuthClient::connect_direct(&srv.addr.to_string(), &id)
        .await
        .unwrap();
    let renewed = proxy
        .generate_user_certs(request("edge-1", 600))
        .await
        .unwrap();
    assert_eq!(renewed.roles, ["proxy"]);
    assert!(renewed.expires <= postern_dial::mint::now_unix() + 600);
    // Over the roles' cap (30 h by default): capped, not refused.
    let long = proxy
        .generate_user_certs(request("edge-1", 1000 * 3600))
        .await
        .unwrap();
    assert!(long.expires <= postern_dial::mint::now_unix() + 30 * 3600);

    let other = identity_for(&admin, "api-user", &["api-role"], 600).await;
    let e = proxy
        .generate_user_certs(request("api-user", 600))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e}");
    let api = AuthClient::connect_direct(&srv.addr.to_string(), &other)
        .await
        .unwrap();
    let e = api
        .generate_user_certs(request("api-user", 600))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e}");

    let events = admin
        .list_audit_events(ListAuditEventsRequest { limit: 50 })
        .await
        .unwrap()
        .events;
    assert!(
        events
            .iter()
            .any(|e| e.action == "GenerateUserCerts" && e.user == "edge-1" && e.allowed),
        "the renewal is audited"
    );

    admin
        .create_lock(Lock {
            user: "edge-1".into(),
            message: "proxy retired".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = proxy
        .generate_user_certs(request("edge-1", 600))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("proxy retired"), "{e}");
    srv.stop().await;
}
