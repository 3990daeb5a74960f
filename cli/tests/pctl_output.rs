//! pctl's output with the real binary against a real Auth server: `--format` honoured by every
//! `get` with one schema per resource, RFC 3339 times, users written back with `create -f`,
//! `get events` filters, a closed pipe, a TTL over the cap refused naming it, shell completion
//! and man pages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tokio_util::sync::CancellationToken;

struct Env {
    dir: tempfile::TempDir,
    data: PathBuf,
    shutdown: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = postern_auth::AuthConfig {
        cluster: Some("out".into()),
        data_dir: data.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        allow_root: true,
        ..Default::default()
    };
    let prepared = postern_auth::server::prepare(&cfg).unwrap();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(postern_auth::server::start(listener, prepared, shutdown.clone()).unwrap());
    Env {
        dir,
        data,
        shutdown,
    }
}

fn cmd(env: &Env, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pctl"));
    c.arg("--data-dir")
        .arg(&env.data)
        .args(args)
        .current_dir(env.dir.path());
    c
}

async fn pctl(env: &Env, args: &[&str]) -> Output {
    let mut c = cmd(env, args);
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "pctl failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "pctl should have failed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `2026-11-30T20:00:00Z` or with fractional seconds.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && s.ends_with('Z')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_get_honours_format_with_one_schema() {
    let env = start().await;
    while !env.data.join("auth_addr").exists() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    ok(&pctl(&env, &["users", "add", "alice", "--roles=access"]).await);
    ok(&pctl(&env, &["tokens", "add", "--out=join.token"]).await);

    // Roles: a listing is an array, a named role an object; the same for users.
    let roles = json(&ok(&pctl(&env, &["get", "roles", "--format=json"]).await));
    assert!(roles.is_array() && roles[0]["kind"] == "role", "{roles}");
    let role = json(&ok(
        &pctl(&env, &["get", "role/access", "--format=json"]).await
    ));
    assert_eq!(role["kind"], "role");
    let user = json(&ok(
        &pctl(&env, &["get", "user/alice", "--format=json"]).await
    ));
    assert_eq!(user["kind"], "user", "a named user is one object: {user}");
    assert_eq!(user["spec"]["roles"][0], "access");
    assert!(
        user["metadata"]["created"].as_str().is_some_and(is_rfc3339),
        "{user}"
    );
    let users = json(&ok(&pctl(&env, &["get", "users", "--format=json"]).await));
    assert_eq!(users[0], user, "one schema for a user, listed or named");
    let yaml = ok(&pctl(&env, &["get", "user/alice"]).await);
    let from_yaml: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(from_yaml, user, "the same schema in YAML and JSON");

    // Users round-trip through create -f (YAML and JSON).
    std::fs::write(env.dir.path().join("alice.yaml"), &yaml).unwrap();
    ok(&pctl(&env, &["rm", "user/alice"]).await);
    ok(&pctl(&env, &["create", "-f", "alice.yaml"]).await);
    let again = json(&ok(
        &pctl(&env, &["get", "user/alice", "--format=json"]).await
    ));
    assert_eq!(again["spec"], user["spec"]);
    let e = err(&pctl(&env, &["create", "-f", "alice.yaml"]).await);
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    std::fs::write(
        env.dir.path().join("users.json"),
        ok(&pctl(&env, &["get", "users", "--format=json"]).await)
            .replace("\"access\"", "\"editor\""),
    )
    .unwrap();
    ok(&pctl(&env, &["create", "--force", "-f", "users.json"]).await);
    let edited = json(&ok(
        &pctl(&env, &["get", "user/alice", "--format=json"]).await
    ));
    assert_eq!(edited["spec"]["roles"][0], "editor");

    // Tokens and events honour --format, with RFC 3339 times.
    let tokens = json(&ok(&pctl(&env, &["get", "tokens", "--format=json"]).await));
    assert!(
        tokens[0]["expires"].as_str().is_some_and(is_rfc3339),
        "{tokens}"
    );
    let t_yaml = ok(&pctl(&env, &["get", "tokens", "--format=yaml"]).await);
    assert!(t_yaml.contains("expires: "), "{t_yaml}");
    let t_text = ok(&pctl(&env, &["get", "tokens"]).await);
    assert!(t_text.contains("(in "), "a relative hint in text: {t_text}");
    let events = json(&ok(&pctl(&env, &["get", "events", "--format=json"]).await));
    let events = events.as_array().unwrap();
    assert!(!events.is_empty());
    assert!(
        events
            .iter()
            .all(|e| e["time"].as_str().is_some_and(is_rfc3339))
    );
    // pctl's own Ping on each call is not recorded.
    assert!(!events.iter().any(|e| e["action"] == "Ping"), "{events:?}");
    let text = ok(&pctl(&env, &["get", "events"]).await);
    assert!(
        text.lines()
            .all(|l| is_rfc3339(l.split(' ').next().unwrap())),
        "{text}"
    );

    // Event filters.
    let one = json(&ok(&pctl(
        &env,
        &["get", "events", "--format=json", "--limit=1"],
    )
    .await));
    assert_eq!(one.as_array().unwrap().len(), 1);
    let none = json(&ok(&pctl(
        &env,
        &["get", "events", "--format=json", "--user=nobody"],
    )
    .await));
    assert_eq!(none, serde_json::json!([]));
    let recent = json(&ok(&pctl(
        &env,
        &[
            "get",
            "events",
            "--format=json",
            "--since=1h",
            "--until=2000-01-01T00:00:00Z",
        ],
    )
    .await));
    assert_eq!(
        recent,
        serde_json::json!([]),
        "--until in the past selects nothing"
    );
    let recent = json(&ok(&pctl(
        &env,
        &["get", "events", "--format=json", "--since=1h"],
    )
    .await));
    assert!(!recent.as_array().unwrap().is_empty());
    let e = err(&pctl(&env, &["get", "events", "--since=yesterday"]).await);
    assert!(e.contains("--since") && e.contains("RFC 3339"), "{e}");
    let e = err(&pctl(&env, &["get", "events", "--type=bogus"]).await);
    assert!(e.contains("--type 'bogus'"), "{e}");
    let e = err(&pctl(&env, &["get", "widgets"]).await);
    assert!(e.contains("cannot get 'widgets'"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_pipe_and_ttl_over_the_cap() {
    let env = start().await;
    while !env.data.join("auth_addr").exists() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Standard output closed before pctl writes: it ends quietly, no panic.
    let mut c = cmd(&env, &["get", "roles", "--format=json"]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let o = tokio::task::spawn_blocking(move || {
        let mut child = c.spawn().unwrap();
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !stderr.contains("panicked"),
        "a closed pipe: {:?} {stderr}",
        o.status
    );

    // A TTL over the cap is refused, naming the cap (never silently cut).
    ok(&pctl(&env, &["users", "add", "bob", "--roles=access"]).await);
    let e = err(&pctl(
        &env,
        &["auth", "sign", "--user=bob", "--ttl=9000h", "--out=bob.id"],
    )
    .await);
    assert!(e.contains("exceeds the cap of"), "{e}");
    let e = err(&pctl(
        &env,
        &["auth", "sign", "--host=h1", "--ttl=400d", "--out=h1"],
    )
    .await);
    assert!(e.contains("exceeds the cap of 8760h"), "{e}");
    let e = err(&pctl(&env, &["users", "add", "carol", "--ttl=30d"]).await);
    assert!(e.contains("exceeds the cap of 168h"), "{e}");
    ok(&pctl(
        &env,
        &["auth", "sign", "--user=bob", "--ttl=1h", "--out=bob.id"],
    )
    .await);
}

#[test]
fn completion_and_man_pages_need_no_server() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef pctl"),
        ("fish", "complete -c pctl"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_pctl"))
            .args(["completion", shell])
            .output()
            .unwrap();
        let text = ok(&o);
        assert!(
            text.contains(marker) && text.contains("auth"),
            "{shell}: {text}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_pctl"))
        .args(["man", "--out-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    ok(&o);
    let page = std::fs::read_to_string(dir.path().join("pctl.1")).unwrap();
    assert!(page.contains(".TH pctl"), "{page}");
    assert!(Path::new(&dir.path().join("pctl-get.1")).exists());
}
