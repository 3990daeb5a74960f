//! Access requests end to end, on the demo stack (an Auth server behind a proxy): api-user holds
//! only the seed's `api-role` and asks for `editor`; `approver`, whose role may review `editor`
//! requests, approves; api-user has its certificates reissued with the request and its UpsertRole
//! is allowed, through the proxy; once the elevation ends, UpsertRole is denied again.
//!
//! ```sh
//! cargo run -p postern-client --example access_request
//! ```

use std::time::{Duration, Instant};

use postern_api::identity::IdentityFile;
use postern_api::proto::{CreateUserRequest, GenerateUserCertsRequest, User};
use postern_api::resource::parse_roles;
use postern_client::auth::AuthClient;
use postern_client::connect::Config;
use postern_client::credentials::Credentials;
use postern_dial::web::WebTrust;
use russh::keys::ssh_key::LineEnding;

/// What an administrator sets up once: who may ask for `editor`, and who may approve.
const ROLES: &str = "kind: role
metadata: {name: editor-requester}
spec:
  allow:
    request:
      roles: [editor]
      max_duration: 1h
version: v7
---
kind: role
metadata: {name: editor-reviewer}
spec:
  allow:
    review_requests:
      roles: [editor]
version: v7
";

/// How long the example's elevation lasts.
const ELEVATION_SECS: u64 = 5;

/// An API client through the demo's proxy with `identity` (saved to `path`).
async fn through_proxy(
    web: &str,
    pin: &str,
    identity: &IdentityFile,
    path: &std::path::Path,
) -> anyhow::Result<AuthClient> {
    identity.save(path)?;
    Ok(AuthClient::connect(Config {
        addrs: vec![web.to_string()],
        credentials: vec![Credentials::identity_file(path.to_path_buf())],
        web_trust: Some(WebTrust::Pin(pin.to_string())),
        ..Default::default()
    })
    .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?.keep();
    let (demo, report) = postern_demo::auth_flow::run(&dir).await?;
    println!("\n--- access requests ---");
    let (web, pin) = (report.web.to_string(), report.web_pin.clone());

    // The administrator: the two roles, api-user may request, approver may review.
    let admin_id = IdentityFile::load(&report.auth_dir.join("admin.identity"))?;
    let admin = AuthClient::connect_direct(&report.auth_addr.to_string(), &admin_id).await?;
    for role in parse_roles(ROLES)? {
        admin.upsert_role(role).await?;
    }
    let api_user = admin.get_user("api-user").await?;
    admin
        .update_user(User {
            roles: vec!["api-role".into(), "editor-requester".into()],
            ..api_user
        })
        .await?;
    admin
        .create_user(CreateUserRequest {
            name: "approver".into(),
            roles: vec!["editor-reviewer".into()],
            secret_ttl_secs: 0,
        })
        .await?;
    let key = postern_dial::mint::generate_key();
    let certs = admin
        .generate_user_certs(GenerateUserCertsRequest {
            user: "approver".into(),
            public_key: key.public_key().to_openssh()?,
            ttl_secs: 3600,
        })
        .await?;
    let approver_id = IdentityFile::from_certs(
        "approver",
        key.to_openssh(LineEnding::LF)?.to_string(),
        certs,
    );
    println!("admin: api-user may request 'editor'; approver may review 'editor' requests");

    // api-user, through the proxy, with its standing identity.
    let api_id = IdentityFile::load(&report.identity)?;
    let api = through_proxy(&web, &pin, &api_id, &dir.join("api-user.identity")).await?;
    let editor = parse_roles(ROLES)?.remove(0);
    let denied = api.upsert_role(editor.clone()).await.unwrap_err();
    println!("api-user UpsertRole with its standing roles: denied: {denied}");
    let req = api
        .create_access_request(&["editor".into()], "fix prod", ELEVATION_SECS)
        .await?;
    println!(
        "api-user asks for editor for {ELEVATION_SECS}s: request {} is {}",
        req.id, req.state
    );

    // approver reviews.
    let approver = through_proxy(&web, &pin, &approver_id, &dir.join("approver.identity")).await?;
    let t0 = Instant::now();
    let approved = approver
        .review_access_request(&req.id, true, "go ahead")
        .await?;
    println!(
        "approver approves: elevation ends at {} (unix)",
        approved.expires
    );

    // api-user uses the approval: new certificates, editor included.
    let elevated_id = api.reissue_with_request(&req.id).await?;
    let elevated = through_proxy(
        &web,
        &pin,
        &elevated_id,
        &dir.join("api-user-elevated.identity"),
    )
    .await?;
    elevated.upsert_role(editor.clone()).await?;
    println!(
        "api-user UpsertRole with the request's certificates (roles {}): allowed, {:?} after the approval",
        elevated.roles.join(", "),
        t0.elapsed()
    );

    // After the end: the elevated certificates have expired, the standing ones are denied.
    let now = postern_dial::mint::now_unix();
    tokio::time::sleep(Duration::from_secs(
        approved.expires.saturating_sub(now) + 1,
    ))
    .await;
    match elevated.upsert_role(editor.clone()).await {
        Ok(_) => anyhow::bail!("UpsertRole still allowed after the elevation's end"),
        Err(e) => println!("after the elevation's end, with the elevated certificates: {e}"),
    }
    match api.upsert_role(editor).await {
        Ok(_) => anyhow::bail!("UpsertRole allowed with the standing roles"),
        Err(e) => println!("after the elevation's end, with the standing roles: denied: {e}"),
    }
    demo.stop().await?;
    Ok(())
}
