//! Access requests with the real binaries through a real proxy: `psh request create` (waiting and
//! `--nowait`), `psh request show`, `pctl requests ls|approve|deny` as a reviewer, `psh login
//! --request-id`, and the elevated profile's UpsertRole allowed where the standing one is denied.

mod support;

use support::{psh, text};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use postern_api::identity::IdentityFile;
use postern_api::proto::CreateUserRequest;
use postern_client::auth::AuthClient;
use postern_client::profile::Profile;

const ROLES: &str = "kind: role\nmetadata: {name: requester}\nspec:\n  allow:\n    request: {roles: [editor], max_duration: 1h}\nversion: v7\n---\nkind: role\nmetadata: {name: reviewer}\nspec:\n  allow:\n    review_requests: {roles: [editor]}\nversion: v7\n";

async fn run_psh(home: &Path, args: &[&str]) -> Output {
    let (h, a): (PathBuf, Vec<String>) =
        (home.into(), args.iter().map(|s| s.to_string()).collect());
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        psh(&h, &a)
    })
    .await
    .unwrap()
}

async fn run_pctl(auth: &str, identity: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pctl"));
    cmd.arg("--auth-server")
        .arg(auth)
        .arg("-i")
        .arg(identity)
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// The request id in `psh request create`'s first line (`request ID created: ...`).
fn request_id(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("request "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no request id in: {out}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psh_and_pctl_carry_an_access_request_from_ask_to_elevated_call() {
    let d = tempfile::tempdir().unwrap();
    let (_demo, r) = postern_demo::auth_flow::run(d.path()).await.unwrap();
    let admin_id = IdentityFile::load(&r.auth_dir.join("admin.identity")).unwrap();
    let auth = r.auth_addr.to_string();
    let admin = AuthClient::connect_direct(&auth, &admin_id).await.unwrap();
    for role in postern_api::resource::parse_roles(ROLES).unwrap() {
        admin.upsert_role(role).await.unwrap();
    }
    let secret = admin
        .create_user(CreateUserRequest {
            name: "alice".into(),
            roles: vec!["api-role".into(), "requester".into()],
            secret_ttl_secs: 0,
        })
        .await
        .unwrap()
        .signup_secret;
    admin
        .create_user(CreateUserRequest {
            name: "bob".into(),
            roles: vec!["reviewer".into()],
            secret_ttl_secs: 0,
        })
        .await
        .unwrap();
    // Bob reviews with pctl and an identity file.
    let key = postern_dial::mint::generate_key();
    let certs = admin
        .generate_user_certs(postern_api::proto::GenerateUserCertsRequest {
            user: "bob".into(),
            public_key: key.public_key().to_openssh().unwrap(),
            ttl_secs: 3600,
        })
        .await
        .unwrap();
    let bob_file = d.path().join("bob.identity");
    IdentityFile::from_certs(
        "bob",
        key.to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .unwrap()
            .to_string(),
        certs,
    )
    .save(&bob_file)
    .unwrap();

    let home = d.path().join("home");
    let (secret_file, pw_file) = (d.path().join("alice.signup"), d.path().join("alice.pw"));
    std::fs::write(&secret_file, &secret).unwrap();
    std::fs::write(&pw_file, "correct horse battery staple\n").unwrap();
    let web = r.web.to_string();
    let o = run_psh(
        &home,
        &[
            "login",
            "--proxy",
            &web,
            "--user",
            "alice",
            "--web-pin",
            &r.web_pin,
            "--secret-file",
            secret_file.to_str().unwrap(),
            "--password-file",
            pw_file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));

    // --nowait, then show: pending.
    let o = run_psh(
        &home,
        &[
            "request",
            "create",
            "--roles=editor",
            "--reason=fix prod",
            "--duration=10m",
            "--nowait",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let first = request_id(&text(&o));
    let o = run_psh(&home, &["request", "show", &first]).await;
    assert!(text(&o).contains("pending"), "{}", text(&o));

    // A request above max_duration is refused with the reason.
    let o = run_psh(
        &home,
        &[
            "request",
            "create",
            "--roles=editor",
            "--duration=2h",
            "--nowait",
        ],
    )
    .await;
    assert!(!o.status.success());
    assert!(text(&o).contains("max_duration"), "{}", text(&o));

    // Bob lists and denies the first.
    let o = run_pctl(&auth, &bob_file, &["requests", "ls", "--state=pending"]).await;
    assert!(
        o.status.success() && text(&o).contains(&first),
        "{}",
        text(&o)
    );
    let o = run_pctl(
        &auth,
        &bob_file,
        &["requests", "deny", &first, "--reason=use the runbook"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = run_psh(&home, &["request", "show", &first]).await;
    assert!(
        text(&o).contains("denied") && text(&o).contains("use the runbook"),
        "{}",
        text(&o)
    );
    let o = run_psh(&home, &["login", &format!("--request-id={first}")]).await;
    assert!(!o.status.success());
    assert!(text(&o).contains("denied by 'bob'"), "{}", text(&o));

    // psh waits while Bob approves the second.
    let h = home.clone();
    let waiting = tokio::task::spawn_blocking(move || {
        psh(
            &h,
            &["request", "create", "--roles=editor", "--reason=again"],
        )
    });
    let bob = AuthClient::connect_direct(&auth, &IdentityFile::load(&bob_file).unwrap())
        .await
        .unwrap();
    let second = loop {
        let pending = bob.list_access_requests("pending").await.unwrap();
        if let Some(r) = pending.iter().find(|r| r.reason == "again") {
            break r.id.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let o = run_pctl(
        &auth,
        &bob_file,
        &["requests", "approve", &second, "--reason=ok"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("psh stopped waiting after the approval")
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("approved")
            && text(&o).contains(&format!("psh login --request-id={second}")),
        "{}",
        text(&o)
    );

    // Standing profile: UpsertRole denied; after psh login --request-id: allowed.
    let role = postern_api::resource::parse_roles(ROLES).unwrap().remove(0);
    let (_, standing) = Profile::load(&home).unwrap();
    let c = AuthClient::connect_direct(&auth, &standing).await.unwrap();
    assert!(c.upsert_role(role.clone()).await.is_err());
    let o = run_psh(&home, &["login", &format!("--request-id={second}")]).await;
    assert!(o.status.success(), "{}", text(&o));
    let o = run_psh(&home, &["status"]).await;
    assert!(text(&o).contains("editor"), "{}", text(&o));
    let (_, elevated) = Profile::load(&home).unwrap();
    let c = AuthClient::connect_direct(&auth, &elevated).await.unwrap();
    c.upsert_role(role).await.unwrap();
}
