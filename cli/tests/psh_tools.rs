//! psh beyond login, with the real binaries: `psh login` also writes the key and certificate in
//! OpenSSH's formats; `psh config` prints a `Host` block that Debian's `ssh` reads and whose
//! `ProxyCommand` (plain `ssh -W` with those files) reaches a target through the proxy; `psh proxy
//! tcp` forwards a local port to a target, and an API client calls the Auth API through it.

mod support;

use support::{psh, text};

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use postern_api::identity::IdentityFile;
use postern_api::proto::CreateUserRequest;
use postern_client::auth::AuthClient;

/// Runs the block's `ProxyCommand` for `host:port` with `input` on stdin.
fn proxy_command(config: &str, host: &str, port: u16, input: &[u8]) -> std::process::Output {
    let line = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("ProxyCommand "))
        .expect("a ProxyCommand line");
    let cmd = line.replace("%h", host).replace("%p", &port.to_string());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psh_config_and_psh_proxy_reach_targets() {
    assert!(
        Path::new("/usr/bin/ssh").exists(),
        "/usr/bin/ssh is missing: run `apt-get install openssh-client`"
    );
    let d = tempfile::tempdir().unwrap();
    let (demo, r) = postern_demo::auth_flow::run(d.path()).await.unwrap();
    let admin_id = IdentityFile::load(&r.auth_dir.join("admin.identity")).unwrap();
    let admin = AuthClient::connect_direct(&r.auth_addr.to_string(), &admin_id)
        .await
        .unwrap();
    let cluster = admin_id.cluster.clone();
    let secret = admin
        .create_user(CreateUserRequest {
            name: "alice".into(),
            roles: vec!["api-role".into()],
            secret_ttl_secs: 0,
        })
        .await
        .unwrap()
        .signup_secret;
    let secret_file = d.path().join("alice.signup");
    std::fs::write(&secret_file, &secret).unwrap();
    let pw_file = d.path().join("alice.pw");
    std::fs::write(&pw_file, "correct horse battery staple\n").unwrap();
    let home = d.path().join("home");
    let (web, pin) = (r.web.to_string(), r.web_pin.clone());
    let (h, s, p) = (home.clone(), secret_file.clone(), pw_file.clone());
    let o = tokio::task::spawn_blocking(move || {
        psh(
            &h,
            &[
                "login",
                "--proxy",
                &web,
                "--user",
                "alice",
                "--web-pin",
                &pin,
                "--secret-file",
                s.to_str().unwrap(),
                "--password-file",
                p.to_str().unwrap(),
            ],
        )
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // The OpenSSH files, private where they must be.
    for (f, private) in [
        ("keys/id", true),
        ("keys/id-cert.pub", true),
        ("keys/known_hosts", true),
    ] {
        let meta = std::fs::metadata(home.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        if private {
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
        }
    }
    let keygen = Command::new("/usr/bin/ssh-keygen")
        .args(["-L", "-f"])
        .arg(home.join("keys/id-cert.pub"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&keygen.stdout).contains("alice"),
        "ssh-keygen reads the certificate: {}",
        text(&keygen)
    );

    // psh config: a block Debian's ssh reads, whose ProxyCommand reaches the Auth API target.
    let h = home.clone();
    let o = tokio::task::spawn_blocking(move || psh(&h, &["config"]))
        .await
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let config = String::from_utf8(o.stdout).unwrap();
    assert!(config.contains(&format!("Host *.{cluster}")), "{config}");
    let cfg_path = d.path().join("ssh_config");
    std::fs::write(&cfg_path, &config).unwrap();
    let g = Command::new("/usr/bin/ssh")
        .arg("-F")
        .arg(&cfg_path)
        .arg("-G")
        .arg(format!("auth.{cluster}"))
        .output()
        .unwrap();
    let resolved = String::from_utf8_lossy(&g.stdout);
    assert!(
        g.status.success() && resolved.contains("proxycommand ssh -F none"),
        "ssh reads the block: {}",
        text(&g)
    );
    let (cfg2, c2) = (config.clone(), cluster.clone());
    let ok = tokio::task::spawn_blocking(move || {
        proxy_command(&cfg2, &format!("auth.{c2}"), 3025, b"not TLS\r\n")
    })
    .await
    .unwrap();
    assert!(
        ok.status.success(),
        "ssh -W through the proxy with psh login's OpenSSH files: {}",
        text(&ok)
    );
    let (cfg3, c3) = (config.clone(), cluster.clone());
    let refused =
        tokio::task::spawn_blocking(move || proxy_command(&cfg3, &format!("nope.{c3}"), 22, b""))
            .await
            .unwrap();
    assert!(
        !refused.status.success() && text(&refused).contains("nope"),
        "a target nobody serves is refused with the proxy's reason: {}",
        text(&refused)
    );

    // psh proxy tcp: a local port forwarding to the Auth API; a real API call through it, with
    // psh logged in to the proxy over SSH, then over QUIC.
    let id = IdentityFile::load(&home.join("identity")).unwrap();
    for transport in ["ssh", "quic"] {
        let (mut fwd, port) = forward_auth(&home, transport);
        let c = tokio::time::timeout(
            Duration::from_secs(20),
            AuthClient::connect_direct(&format!("127.0.0.1:{port}"), &id),
        )
        .await
        .unwrap_or_else(|_| panic!("connects through the local forward ({transport})"))
        .unwrap();
        assert_eq!(c.get_role("api-role").await.unwrap().name, "api-role");
        let _ = fwd.kill();
        let _ = fwd.wait();
    }
    // A transport psh does not know, a QUIC MTU bound out of range: refused, naming the variable.
    for (var, value) in [
        ("POSTERN_TRANSPORT", "carrier-pigeon"),
        ("POSTERN_QUIC_MTU", "9000"),
    ] {
        let bad = Command::new(env!("CARGO_BIN_EXE_psh"))
            .arg("--home")
            .arg(&home)
            .args(["proxy", "ssh", &format!("auth.{cluster}:3025")])
            .env(var, value)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            !bad.status.success() && text(&bad).contains(var),
            "{var}={value}: {}",
            text(&bad)
        );
    }
    demo.stop().await.unwrap();
}

/// Starts `psh proxy tcp auth` with `POSTERN_TRANSPORT=transport`; returns it and its local port.
fn forward_auth(home: &std::path::Path, transport: &str) -> (std::process::Child, u16) {
    let mut fwd = Command::new(env!("CARGO_BIN_EXE_psh"))
        .arg("--home")
        .arg(home)
        .args(["proxy", "tcp", "auth"])
        .env("POSTERN_TRANSPORT", transport)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(fwd.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .strip_prefix("forwarding 127.0.0.1:")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("psh proxy tcp ({transport}) said: {line:?}"));
    (fwd, port)
}
