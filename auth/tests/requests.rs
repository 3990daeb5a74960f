//! Access requests against a real Auth server on loopback: the flow (request, approval, reissue,
//! elevated call, end of the elevation), and every refusal the issue names.

mod support;

use std::time::{Duration, Instant};

use postern_api::proto::*;
use postern_client::auth::AuthClient;
use support::*;

const REQUESTER: &str = "kind: role\nmetadata: {name: requester}\nspec:\n  allow:\n    request:\n      roles: [editor]\n      max_duration: 1h\nversion: v7\n";
const REVIEWER: &str = "kind: role\nmetadata: {name: reviewer}\nspec:\n  allow:\n    review_requests:\n      roles: [editor]\nversion: v7\n";

fn role(yaml: &str) -> Role {
    postern_api::resource::parse_roles(yaml).unwrap().remove(0)
}

/// A server with the seed role, a requester and a reviewer role; clients for `api-user`
/// (api-role + requester), `approver` (reviewer) and `mallory` (requester).
struct Setup {
    dir: TempDir,
    srv: Running,
    api: AuthClient,
    approver: AuthClient,
    mallory: AuthClient,
}

async fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let srv = start(&dir.0, tag).await;
    let admin = srv.admin().await;
    for r in [seed_role(), role(REQUESTER), role(REVIEWER)] {
        admin.create_role(r).await.unwrap();
    }
    let addr = srv.addr.to_string();
    let connect = |id| {
        let addr = addr.clone();
        async move { AuthClient::connect_direct(&addr, &id).await.unwrap() }
    };
    let api = connect(identity_for(&admin, "api-user", &["api-role", "requester"], 0).await).await;
    let approver = connect(identity_for(&admin, "approver", &["reviewer"], 0).await).await;
    let mallory = connect(identity_for(&admin, "mallory", &["requester"], 0).await).await;
    Setup {
        dir,
        srv,
        api,
        approver,
        mallory,
    }
}

fn editor() -> Vec<String> {
    vec!["editor".into()]
}

fn denied(e: &postern_client::auth::AuthClientError, code: tonic::Code, text: &str) {
    assert_eq!(e.code(), Some(code), "{e}");
    assert!(e.to_string().contains(text), "expected '{text}' in: {e}");
}

#[tokio::test]
async fn approval_elevates_the_api_until_the_elevations_end() {
    let s = setup("reqflow").await;
    let e = s.api.upsert_role(seed_role()).await.unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "verb 'create'");

    let req = s
        .api
        .create_access_request(&editor(), "fix prod", 2)
        .await
        .unwrap();
    assert_eq!(req.state, "pending");
    assert_eq!(req.user, "api-user");
    // The reviewer sees it; an unrelated requester does not.
    let pending = s.approver.list_access_requests("pending").await.unwrap();
    assert!(pending.iter().any(|r| r.id == req.id));
    let e = s.mallory.get_access_request(&req.id).await.unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "another user's");

    let t0 = Instant::now();
    let approved = s
        .approver
        .review_access_request(&req.id, true, "ok")
        .await
        .unwrap();
    assert_eq!(approved.state, "approved");
    let shown = s.api.get_access_request(&req.id).await.unwrap();
    assert_eq!(
        (shown.state.as_str(), shown.reviewer.as_str()),
        ("approved", "approver")
    );
    let id = s.api.reissue_with_request(&req.id).await.unwrap();
    let elevated = AuthClient::connect_direct(&s.srv.addr.to_string(), &id)
        .await
        .unwrap();
    assert!(
        elevated.roles.contains(&"editor".to_string()),
        "{:?}",
        elevated.roles
    );
    elevated.upsert_role(seed_role()).await.unwrap();
    eprintln!(
        "figure: approval to a usable elevated certificate (review + reissue + connect + first elevated call): {:?}",
        t0.elapsed()
    );
    assert!(
        id.expires <= approved.expires,
        "certs end no later than the elevation"
    );

    // Used once.
    let e = s.api.reissue_with_request(&req.id).await.unwrap_err();
    denied(&e, tonic::Code::FailedPrecondition, "already used");

    // After the end: the elevated certificate no longer works, the standing one is denied.
    tokio::time::sleep(Duration::from_millis(
        (approved.expires * 1000 + 1100).saturating_sub(now_ms()),
    ))
    .await;
    let e = elevated.upsert_role(seed_role()).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated), "{e}");
    let e = s.api.upsert_role(seed_role()).await.unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "verb 'create'");

    // Every step is in the audit log.
    let admin = s.srv.admin().await;
    let events = admin
        .list_audit_events(ListAuditEventsRequest { limit: 200 })
        .await
        .unwrap()
        .events;
    let resource = format!("access_request/{}", req.id);
    for (action, user, allowed) in [
        ("CreateAccessRequest", "api-user", true),
        ("ApproveAccessRequest", "approver", true),
        ("ReissueUserCerts", "api-user", true),
        ("ReissueUserCerts", "api-user", false),
    ] {
        assert!(
            events.iter().any(|e| e.action == action
                && e.user == user
                && e.allowed == allowed
                && e.resource == resource),
            "{action} by {user} (allowed {allowed}) not audited"
        );
    }
    drop(s.dir);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn reviews_are_refused_to_the_requester_and_to_roles_that_cannot_review() {
    let s = setup("reqreview").await;
    let req = s.api.create_access_request(&editor(), "", 0).await.unwrap();
    assert_eq!(req.duration_secs, 3600);
    // Self-approval (api-user given the reviewer role too).
    let admin = s.srv.admin().await;
    let both = identity_for(&admin, "selfish", &["requester", "reviewer"], 0).await;
    let selfish = AuthClient::connect_direct(&s.srv.addr.to_string(), &both)
        .await
        .unwrap();
    let own = selfish
        .create_access_request(&editor(), "", 0)
        .await
        .unwrap();
    let e = selfish
        .review_access_request(&own.id, true, "")
        .await
        .unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "your own access request");
    // A user whose roles cannot review `editor`.
    let e = s
        .mallory
        .review_access_request(&req.id, true, "")
        .await
        .unwrap_err();
    denied(
        &e,
        tonic::Code::PermissionDenied,
        "allow.review_requests.roles",
    );
    // Neither changed anything.
    assert_eq!(
        s.api.get_access_request(&req.id).await.unwrap().state,
        "pending"
    );
    // A denied request is not usable, and cannot be approved afterwards.
    s.approver
        .review_access_request(&req.id, false, "not today")
        .await
        .unwrap();
    let e = s.api.reissue_with_request(&req.id).await.unwrap_err();
    denied(
        &e,
        tonic::Code::PermissionDenied,
        "denied by 'approver': not today",
    );
    let e = s
        .approver
        .review_access_request(&req.id, true, "")
        .await
        .unwrap_err();
    denied(&e, tonic::Code::FailedPrecondition, "already denied");
}

#[tokio::test]
async fn requests_outside_the_roles_rules_are_refused() {
    let s = setup("reqrules").await;
    let e = s
        .api
        .create_access_request(&["access".to_string()], "", 0)
        .await
        .unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "allow.request.roles");
    let e = s
        .api
        .create_access_request(&editor(), "", 3601)
        .await
        .unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "max_duration");
    // The approver holds no request rule at all.
    let e = s
        .approver
        .create_access_request(&editor(), "", 0)
        .await
        .unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "roles held: reviewer");
    assert!(s.api.list_access_requests("").await.unwrap().is_empty());
}

#[tokio::test]
async fn an_expired_approval_and_another_users_request_are_refused() {
    let s = setup("reqreplay").await;
    let req = s.api.create_access_request(&editor(), "", 1).await.unwrap();
    // Mallory replays api-user's request id, before and after approval.
    let e = s.mallory.reissue_with_request(&req.id).await.unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "belongs to another user");
    let approved = s
        .approver
        .review_access_request(&req.id, true, "")
        .await
        .unwrap();
    let e = s.mallory.reissue_with_request(&req.id).await.unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "belongs to another user");
    tokio::time::sleep(Duration::from_millis(
        (approved.expires * 1000 + 100).saturating_sub(now_ms()),
    ))
    .await;
    let e = s.api.reissue_with_request(&req.id).await.unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "expired");
}

#[tokio::test]
async fn a_lock_on_the_user_or_the_request_ends_the_elevation_at_the_api() {
    let s = setup("reqlock").await;
    let admin = s.srv.admin().await;
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let req = s
            .api
            .create_access_request(&editor(), "", 600)
            .await
            .unwrap();
        s.approver
            .review_access_request(&req.id, true, "")
            .await
            .unwrap();
        let id = s.api.reissue_with_request(&req.id).await.unwrap();
        let c = AuthClient::connect_direct(&s.srv.addr.to_string(), &id)
            .await
            .unwrap();
        c.upsert_role(seed_role()).await.unwrap();
        clients.push(c);
        ids.push(req.id);
    }
    // A lock on the first request: that elevation ends, the second still works.
    admin
        .create_lock(Lock {
            access_request: ids[0].clone(),
            message: "elevation revoked".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = clients[0].upsert_role(seed_role()).await.unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "elevation revoked");
    clients[1].upsert_role(seed_role()).await.unwrap();
    // A lock on the user: every certificate of the user stops, elevated or not.
    admin
        .create_lock(Lock {
            user: "api-user".into(),
            message: "api-user is under investigation".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = clients[1].upsert_role(seed_role()).await.unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "under investigation");
    let e = s.api.get_role("api-role").await.unwrap_err();
    denied(&e, tonic::Code::PermissionDenied, "under investigation");
}

#[tokio::test]
async fn an_approval_survives_an_auth_restart() {
    let s = setup("reqrestart").await;
    let req = s
        .api
        .create_access_request(&editor(), "", 600)
        .await
        .unwrap();
    s.approver
        .review_access_request(&req.id, true, "")
        .await
        .unwrap();
    let api_id = {
        // The same identity as `s.api`, read back after the restart.
        s.api.user.clone()
    };
    let Setup { dir, srv, api, .. } = s;
    drop(api);
    let cfg = config(&dir.0, "reqrestart");
    srv.stop().await;
    let srv = start_with(cfg).await;
    let admin = srv.admin().await;
    let id = sign(&admin, &api_id, 0).await;
    let api = AuthClient::connect_direct(&srv.addr.to_string(), &id)
        .await
        .unwrap();
    let shown = api.get_access_request(&req.id).await.unwrap();
    assert_eq!(shown.state, "approved");
    let elevated = api.reissue_with_request(&req.id).await.unwrap();
    let c = AuthClient::connect_direct(&srv.addr.to_string(), &elevated)
        .await
        .unwrap();
    c.upsert_role(seed_role()).await.unwrap();
    srv.stop().await;
}
