//! Any gRPC client: Python's `grpcio` (BoringSSL, which offers no Ed25519 in its handshake) calls
//! `Ping` and `GetRole` with stubs generated from `auth.proto`, over mTLS with the files from
//! `pctl auth sign --format=tls`, directly and through `ssh -W` (Debian's OpenSSH through the
//! proxy to the Auth API target). The client is `tests/grpcio/call_auth.py`.
//!
//! scripts/test and .ci/run install grpcio and grpcio-tools with pip. Outside CI, a machine
//! without them skips this test with a loud message; under CI (`CI` set) that is a failure.

use std::path::Path;
use std::process::{Command, Output};

use postern_api::identity::IdentityFile;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `pctl --auth-server ADDR -i ADMIN ARGS…`.
fn pctl(addr: &str, admin: &Path, args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_pctl"))
        .arg("--auth-server")
        .arg(addr)
        .arg("-i")
        .arg(admin)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "pctl {args:?}: {}", text(&o));
}

/// Whether Python can import grpcio and grpcio-tools; otherwise says so loudly (and fails in CI).
fn grpcio_present() -> bool {
    let o = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output();
    if o.as_ref().is_ok_and(|o| o.status.success()) {
        return true;
    }
    let why = o.map(|o| text(&o)).unwrap_or_else(|e| e.to_string());
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have Python grpcio and grpcio-tools (scripts/test installs them): {why}"
    );
    eprintln!(
        "\n\n!!!!! SKIPPED grpcio interop: python3 cannot import grpc/grpc_tools \
         (pip install grpcio grpcio-tools; scripts/test does): {why}\n\n"
    );
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_calls_the_api_directly_and_through_ssh_w() {
    if !grpcio_present() {
        return;
    }
    assert!(
        Path::new("/usr/bin/ssh").exists(),
        "/usr/bin/ssh is missing: run `apt-get install openssh-client`"
    );
    let d = tempfile::tempdir().unwrap();
    let (demo, r) = postern_demo::auth_flow::run(d.path()).await.unwrap();
    let admin = r.auth_dir.join("admin.identity");
    let cluster = IdentityFile::load(&admin).unwrap().cluster;
    let addr = r.auth_addr.to_string();
    let base = d.path().join("api");
    let ssh_base = d.path().join("api-ssh");
    let (a, ad, b, sb) = (addr.clone(), admin.clone(), base.clone(), ssh_base.clone());
    tokio::task::spawn_blocking(move || {
        let out = format!("--out={}", b.display());
        pctl(
            &a,
            &ad,
            &["auth", "sign", "--user=api-user", "--format=tls", &out],
        );
        let out = format!("--out={}", sb.display());
        pctl(
            &a,
            &ad,
            &["auth", "sign", "--user=api-user", "--format=openssh", &out],
        );
    })
    .await
    .unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpcio/call_auth.py");
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/proto");
    let server_name = format!("auth.{cluster}");
    let call = |target: String, via: Vec<String>| {
        let (script, proto, base, server_name) = (
            script.clone(),
            proto.clone(),
            base.clone(),
            server_name.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let file = |ext: &str| format!("{}.{ext}", base.display());
            let mut c = Command::new("python3");
            c.arg(&script)
                .arg(&proto)
                .args([file("key"), file("crt"), file("cas")])
                .arg(&server_name)
                .arg(target);
            if !via.is_empty() {
                c.arg("--").args(via);
            }
            c.output().unwrap()
        })
    };

    // Directly to the Auth server's API listener.
    let o = call(addr.clone(), Vec::new()).await.unwrap();
    let said = text(&o);
    assert!(o.status.success(), "grpcio, direct: {said}");
    assert!(
        said.contains(&format!("ping cluster={cluster} user=api-user"))
            && said.contains("role api-role"),
        "{said}"
    );

    // Through the proxy: Debian's ssh -W to the Auth API target, with pctl's OpenSSH files.
    let (host, port) = r.tunnel.rsplit_once(':').unwrap();
    let key = ssh_base.display().to_string();
    let via: Vec<String> = [
        "/usr/bin/ssh",
        "-F",
        "none",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-i",
        &key,
        "-o",
        &format!("CertificateFile={key}-cert.pub"),
        "-o",
        &format!("UserKnownHostsFile={key}.known_hosts"),
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-l",
        "api-user",
        "-p",
        port,
        "-W",
        &format!("auth.{cluster}:3025"),
        host,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = call("unused:0".into(), via).await.unwrap();
    let said = text(&o);
    assert!(o.status.success(), "grpcio through ssh -W: {said}");
    assert!(
        said.contains(&format!("ping cluster={cluster} user=api-user"))
            && said.contains("role api-role"),
        "{said}"
    );
    demo.stop().await.unwrap();
}
