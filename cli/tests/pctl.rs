//! `pctl` (the real binary) against a real Auth server on loopback, in local mode
//! (`--data-dir`) and with `--auth-server ADDR -i FILE`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use postern_api::identity::IdentityFile;
use tokio_util::sync::CancellationToken;

const SEED: &str = "kind: role\nmetadata:\n  name: api-role\nspec:\n  allow:\n    rules:\n      - resources: ['role']\n        verbs: ['read']\n  deny:\n    node_labels:\n      '*': '*'\nversion: v5\n";

struct Env {
    dir: PathBuf,
    data: PathBuf,
    shutdown: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start() -> Env {
    let dir = std::env::temp_dir().join(format!(
        "postern-pctl-{}-{}",
        std::process::id(),
        rand_u32()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    let cfg = postern_auth::AuthConfig {
        cluster: Some("pctl".into()),
        data_dir: data.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        allow_root: true,
        ..Default::default()
    };
    let prepared = postern_auth::server::prepare(&cfg).unwrap();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(postern_auth::server::start(listener, prepared, shutdown.clone()).unwrap());
    while !data.join("auth_addr").exists() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Env {
        dir,
        data,
        shutdown,
    }
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

async fn pctl(env: &Env, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pctl"));
    cmd.arg("--data-dir")
        .arg(&env.data)
        .args(args)
        .current_dir(&env.dir);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let input = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        let mut si = child.stdin.take().unwrap();
        if let Some(i) = input {
            si.write_all(i.as_bytes()).unwrap();
        }
        drop(si);
        child.wait_with_output().unwrap()
    })
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

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_users_and_identities_with_pctl() {
    let env = start().await;
    std::fs::write(env.dir.join("api-role.yaml"), SEED).unwrap();

    let out = ok(&pctl(&env, &["create", "-f", "api-role.yaml"], None).await);
    assert!(out.contains("role 'api-role' has been created"), "{out}");
    let e = err(&pctl(&env, &["create", "-f", "api-role.yaml"], None).await);
    assert!(e.contains("already exists: use --force"), "{e}");
    ok(&pctl(&env, &["create", "-f", "api-role.yaml", "--force"], None).await);
    // stdin, two documents.
    let two = format!("{SEED}---\n{}", SEED.replace("api-role", "second"));
    let out = ok(&pctl(&env, &["create", "-f", "-", "--force"], Some(&two)).await);
    assert!(out.contains("'second'"), "{out}");
    // Bad YAML names the line.
    let e = err(&pctl(
        &env,
        &["create", "-f", "-"],
        Some(&SEED.replace("rules:", "rulez:")),
    )
    .await);
    assert!(e.contains("rulez") && e.contains("line 6"), "{e}");

    let yaml = ok(&pctl(&env, &["get", "role/api-role"], None).await);
    assert_eq!(
        postern_api::resource::parse_roles(&yaml).unwrap()[0].name,
        "api-role"
    );
    let json = ok(&pctl(&env, &["get", "role/api-role", "--format", "json"], None).await);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["spec"]["allow"]["rules"][0]["verbs"][0], "read");
    let text = ok(&pctl(&env, &["get", "roles", "--format", "text"], None).await);
    for name in ["access", "api-role", "editor", "second"] {
        assert!(text.contains(name), "{text}");
    }
    ok(&pctl(&env, &["rm", "role/second"], None).await);
    let e = err(&pctl(&env, &["get", "role/second"], None).await);
    assert!(e.contains("not found"), "{e}");

    // The signup secret goes to a 0600 file, never to the terminal.
    let out = ok(&pctl(
        &env,
        &["users", "add", "api-user", "--roles=api-role"],
        None,
    )
    .await);
    let secret_file = env.dir.join("api-user.signup");
    assert_eq!(mode(&secret_file), 0o600);
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    assert!(!out.contains(secret.trim()), "secret printed: {out}");
    let ls = ok(&pctl(&env, &["users", "ls"], None).await);
    assert!(ls.contains("api-user") && ls.contains("api-role"), "{ls}");

    // An identity file, then a call with it through --auth-server -i.
    ok(&pctl(
        &env,
        &[
            "auth",
            "sign",
            "--user=api-user",
            "--ttl=8h",
            "--out=api-user.identity",
        ],
        None,
    )
    .await);
    let id_path = env.dir.join("api-user.identity");
    assert_eq!(mode(&id_path), 0o600);
    let id = IdentityFile::load(&id_path).unwrap();
    assert_eq!(
        (id.user.as_str(), id.cluster.as_str()),
        ("api-user", "pctl")
    );
    let addr = std::fs::read_to_string(env.data.join("auth_addr")).unwrap();
    let as_user = |args: &'static [&'static str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pctl"));
        c.args(["--auth-server", addr.trim(), "-i"])
            .arg(&id_path)
            .args(args);
        tokio::task::spawn_blocking(move || c.output().unwrap())
    };
    let out = ok(&as_user(&["get", "role/api-role"]).await.unwrap());
    assert!(out.contains("api-role"), "{out}");
    let e = err(&as_user(&["create", "-f", "/dev/null"]).await.unwrap());
    assert!(e.contains("no resource found"), "{e}");
    std::fs::write(env.dir.join("in.yaml"), SEED).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_pctl"));
    c.args(["--auth-server", addr.trim(), "-i"])
        .arg(&id_path)
        .args(["create", "--force", "-f"])
        .arg(env.dir.join("in.yaml"));
    let e = err(&tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap());
    assert!(
        e.contains("permission denied") && e.contains("verb 'create' on resource 'role'"),
        "{e}"
    );

    // Key pair format.
    ok(&pctl(
        &env,
        &[
            "auth",
            "sign",
            "--user=api-user",
            "--format=tls",
            "--out=api-user",
        ],
        None,
    )
    .await);
    assert_eq!(mode(&env.dir.join("api-user.key")), 0o600);
    assert!(
        std::fs::read_to_string(env.dir.join("api-user.crt"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert!(
        std::fs::read_to_string(env.dir.join("api-user.cas"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    // OpenSSH format: a key, a certificate ssh-keygen reads, and known_hosts for the host CA.
    ok(&pctl(
        &env,
        &[
            "auth",
            "sign",
            "--user=api-user",
            "--format=openssh",
            "--out=api-user-ssh",
        ],
        None,
    )
    .await);
    assert_eq!(mode(&env.dir.join("api-user-ssh")), 0o600);
    let listed = std::process::Command::new("/usr/bin/ssh-keygen")
        .args(["-L", "-f"])
        .arg(env.dir.join("api-user-ssh-cert.pub"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("api-user"),
        "{listed:?}"
    );
    let derived = std::process::Command::new("/usr/bin/ssh-keygen")
        .args(["-y", "-f"])
        .arg(env.dir.join("api-user-ssh"))
        .output()
        .unwrap();
    assert!(derived.status.success(), "ssh-keygen reads the private key");
    assert!(
        std::fs::read_to_string(env.dir.join("api-user-ssh.known_hosts"))
            .unwrap()
            .starts_with("@cert-authority * ssh-ed25519 ")
    );

    // Host certificates, tokens, CA export.
    ok(&pctl(
        &env,
        &["auth", "sign", "--host=auth-2", "--out=agent_key"],
        None,
    )
    .await);
    let cert = std::fs::read_to_string(env.dir.join("agent_key-cert.pub")).unwrap();
    let cert = russh::keys::ssh_key::Certificate::from_openssh(cert.trim()).unwrap();
    assert_eq!(cert.valid_principals(), ["auth-2.pctl"]);
    ok(&pctl(
        &env,
        &["tokens", "add", "--type=agent", "--out=join.token"],
        None,
    )
    .await);
    assert_eq!(mode(&env.dir.join("join.token")), 0o600);
    let host = ok(&pctl(&env, &["auth", "export", "--type=host"], None).await);
    assert!(host.starts_with("ssh-ed25519 "), "{host}");
    let tls = ok(&pctl(&env, &["auth", "export", "--type=tls"], None).await);
    assert!(tls.contains("BEGIN CERTIFICATE"), "{tls}");
    let events = ok(&pctl(&env, &["get", "events"], None).await);
    assert!(
        events.contains("api-user UpsertRole role/api-role DENIED"),
        "{events}"
    );

    ok(&pctl(&env, &["users", "rm", "api-user"], None).await);
    let e = err(&as_user(&["get", "role/api-role"]).await.unwrap());
    assert!(
        e.contains("not authenticated") && e.contains("no longer"),
        "{e}"
    );
}

#[tokio::test]
async fn pctl_says_what_is_missing() {
    let dir = std::env::temp_dir().join(format!("postern-pctl-none-{}", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_pctl"))
        .arg("--data-dir")
        .arg(&dir)
        .arg("status")
        .output()
        .unwrap();
    let e = err(&o);
    assert!(e.contains("is the Auth server running"), "{e}");
    let o = Command::new(env!("CARGO_BIN_EXE_pctl"))
        .args(["--auth-server", "127.0.0.1:1", "status"])
        .output()
        .unwrap();
    assert!(err(&o).contains("needs an identity file"));
}

/// `pctl lock`, `pctl get locks`, `pctl rm lock/ID`; `tokens add --uses`.
#[tokio::test]
async fn pctl_locks_and_multi_use_tokens() {
    let env = start().await;
    let e = err(&pctl(&env, &["lock"], None).await);
    assert!(e.contains("--user=NAME"), "{e}");
    let out = ok(&pctl(
        &env,
        &["lock", "--user=carol", "--ttl=1h", "--message=incident 42"],
        None,
    )
    .await);
    let id = out
        .split_whitespace()
        .next()
        .and_then(|w| w.strip_prefix("lock/"))
        .expect("lock id printed")
        .to_string();
    let listed = ok(&pctl(&env, &["get", "locks", "--format=json"], None).await);
    assert!(
        listed.contains("\"user=carol\"") && listed.contains("incident 42"),
        "{listed}"
    );
    ok(&pctl(&env, &["rm", &format!("lock/{id}")], None).await);
    assert!(
        ok(&pctl(&env, &["get", "locks"], None).await)
            .trim()
            .is_empty()
    );
    let out = ok(&pctl(
        &env,
        &["tokens", "add", "--out=many.token", "--uses=3"],
        None,
    )
    .await);
    assert!(out.contains("3 uses"), "{out}");
}

/// `pctl get events --type=stream --user=NAME --since=1h --format=json` shows what proxies
/// shipped (emitted here as the admin, which may create events).
#[tokio::test]
async fn pctl_shows_stream_events_by_user_and_time() {
    use postern_api::proto::{EmitStreamEventsRequest, StreamEvent};
    let env = start().await;
    let admin_id = IdentityFile::load(&env.data.join("admin.identity")).unwrap();
    let addr = std::fs::read_to_string(env.data.join("auth_addr")).unwrap();
    let admin = postern_client::auth::AuthClient::connect_direct(addr.trim(), &admin_id)
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ev = |id: &str, user: &str, time_ms: u64| StreamEvent {
        id: id.into(),
        time_ms,
        kind: "close".into(),
        user: user.into(),
        target: "web".into(),
        cluster: "pctl".into(),
        bytes_in: 5,
        ..Default::default()
    };
    let events = vec![
        ev("p-1", "carol", now - 1000),
        ev("p-2", "dave", now - 1000),
        ev("p-3", "carol", now - 3 * 3600 * 1000),
    ];
    let r = admin
        .emit_stream_events(EmitStreamEventsRequest {
            events: events.clone(),
        })
        .await
        .unwrap();
    assert_eq!(r.stored, 3);
    let again = admin
        .emit_stream_events(EmitStreamEventsRequest { events })
        .await
        .unwrap();
    assert_eq!(again.stored, 0, "a resent batch stores nothing twice");
    let out = ok(&pctl(
        &env,
        &[
            "get",
            "events",
            "--type=stream",
            "--user=carol",
            "--since=1h",
            "--format=json",
        ],
        None,
    )
    .await);
    let lines: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0]["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.contains('T')),
        "RFC 3339: {out}"
    );
    assert_eq!(lines[0]["id"], "p-1");
    assert_eq!(lines[0]["user"], "carol");
    assert_eq!(lines[0]["bytes_in"], 5);
}

/// `pctl status` prints the CA pin agents join with: `sha256:` and the hex SHA-256 of the
/// cluster's host CA key (the key `pctl auth export --type=host` prints).
#[tokio::test]
async fn pctl_status_prints_the_ca_pin() {
    let env = start().await;
    let out = ok(&pctl(&env, &["status"], None).await);
    let pin = out
        .lines()
        .find_map(|l| l.strip_prefix("CA pin:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no CA pin in: {out}"));
    let line = ok(&pctl(&env, &["auth", "export", "--type=host"], None).await);
    let key = russh::keys::ssh_key::PublicKey::from_openssh(line.trim()).unwrap();
    let fp = key.fingerprint(russh::keys::HashAlg::Sha256);
    assert_eq!(pin, tunnel_proto::join::ca_pin(fp.as_bytes()));
    assert!(tunnel_proto::join::parse_pin(pin).is_ok());
}

/// `pctl auth rotate` moves a host CA rotation phase by phase; `pctl status` shows the phase
/// and the pin of the signing key, which changes at `update_clients`; an out-of-order phase is
/// refused, saying which phase comes next.
#[tokio::test]
async fn pctl_rotates_the_host_ca_phase_by_phase() {
    let env = start().await;
    let pin = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("CA pin:"))
            .map(|p| p.trim().to_string())
            .unwrap_or_else(|| panic!("no CA pin in: {out}"))
    };
    let status = ok(&pctl(&env, &["status"], None).await);
    assert!(
        status.contains("host CA:  phase standby, 1 trusted key(s)"),
        "{status}"
    );
    let old_pin = pin(&status);
    let e = err(&pctl(
        &env,
        &[
            "auth",
            "rotate",
            "--type=host",
            "--manual",
            "--phase=standby",
        ],
        None,
    )
    .await);
    assert!(e.contains("the next phase is init"), "{e}");
    let out = ok(&pctl(
        &env,
        &["auth", "rotate", "--type=host", "--manual", "--phase=init"],
        None,
    )
    .await);
    assert!(
        out.contains("host CA:  phase init (manual), 2 trusted key(s)"),
        "{out}"
    );
    let status = ok(&pctl(&env, &["status"], None).await);
    assert_eq!(pin(&status), old_pin, "init: the old key still signs");
    let export = ok(&pctl(&env, &["auth", "export", "--type=host"], None).await);
    assert_eq!(export.lines().count(), 2, "both keys exported: {export}");
    ok(&pctl(
        &env,
        &[
            "auth",
            "rotate",
            "--type=host",
            "--manual",
            "--phase=update_clients",
        ],
        None,
    )
    .await);
    let status = ok(&pctl(&env, &["status"], None).await);
    assert!(
        status.contains("host CA:  phase update_clients (manual)"),
        "{status}"
    );
    assert_ne!(pin(&status), old_pin, "update_clients: the new key signs");
    let e = err(&pctl(&env, &["auth", "rotate", "--type=db"], None).await);
    assert!(e.contains("give host, user or tls"), "{e}");
    ok(&pctl(
        &env,
        &[
            "auth",
            "rotate",
            "--type=host",
            "--manual",
            "--phase=rollback",
        ],
        None,
    )
    .await);
    let status = ok(&pctl(&env, &["status"], None).await);
    assert!(
        status.contains("host CA:  phase rollback (manual), 2 trusted key(s)"),
        "{status}"
    );
    assert_eq!(pin(&status), old_pin, "rollback: the old key signs again");
    ok(&pctl(
        &env,
        &[
            "auth",
            "rotate",
            "--type=host",
            "--manual",
            "--phase=standby",
        ],
        None,
    )
    .await);
    let status = ok(&pctl(&env, &["status"], None).await);
    assert!(
        status.contains("host CA:  phase standby, 1 trusted key(s)"),
        "{status}"
    );
    assert_eq!(pin(&status), old_pin);

    // The TLS CA through the same commands; `pctl status` shows its phase. The admin identity
    // in the data dir follows the rotation, so pctl keeps working.
    assert!(
        status.contains("tls CA:  phase standby, 1 trusted key(s)"),
        "{status}"
    );
    let out = ok(&pctl(
        &env,
        &["auth", "rotate", "--type=tls", "--manual", "--phase=init"],
        None,
    )
    .await);
    assert!(
        out.contains("tls CA:  phase init (manual), 2 trusted key(s)"),
        "{out}"
    );
    let export = ok(&pctl(&env, &["auth", "export", "--type=tls"], None).await);
    assert_eq!(
        export.matches("BEGIN CERTIFICATE").count(),
        2,
        "both CAs exported: {export}"
    );
    ok(&pctl(
        &env,
        &[
            "auth",
            "rotate",
            "--type=tls",
            "--manual",
            "--phase=rollback",
        ],
        None,
    )
    .await);
    let status = ok(&pctl(&env, &["status"], None).await);
    assert!(
        status.contains("tls CA:  phase standby, 1 trusted key(s)"),
        "{status}"
    );
}
