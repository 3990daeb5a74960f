//! `pctl doctor` and `psh doctor` against a real cluster (the demo's Auth server, tunnel and
//! proxy): every step ✓ on a working path; then each break in turn gets its own ✗ and fix: a wrong
//! port, a wrong pin, the wrong host CA, an expired certificate, and no agent connected for the
//! cluster. (A skewed clock is covered by the doctor's unit test: the clock cannot be moved here.)

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn doctor(web: &str, pin: &str, identity: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pctl"))
        .args(["--proxy", web, "--web-pin", pin, "-i"])
        .arg(identity)
        .arg("doctor")
        .output()
        .unwrap()
}

async fn run(web: String, pin: String, identity: std::path::PathBuf) -> (bool, String) {
    let o = tokio::task::spawn_blocking(move || doctor(&web, &pin, &identity))
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_walks_the_path_and_names_each_fix() {
    let d = tempfile::tempdir().unwrap();
    let (demo, r) = postern_demo::auth_flow::run(d.path()).await.unwrap();
    let (web, pin, id) = (r.web.to_string(), r.web_pin.clone(), r.identity.clone());

    let (ok, text) = run(web.clone(), pin.clone(), id.clone()).await;
    assert!(ok, "{text}");
    for step in [
        "DNS",
        "TCP",
        "TLS",
        "discovery",
        "tunnel address",
        "clock",
        "certificate",
        "SSH",
        "Auth API",
    ] {
        assert!(text.contains(&format!("✓ {step}:")), "{step}: {text}");
    }
    assert!(!text.contains('✗'), "{text}");
    assert!(
        text.contains("✓ clock: within"),
        "the proxy's clock is read: {text}"
    );

    // psh doctor: the same walk from the psh login profile.
    let home = d.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let profile = format!(
        "proxy = \"{web}\"\nweb_cert_sha256 = \"{pin}\"\nuser = \"api-user\"\ncluster = \"demo\"\n"
    );
    std::fs::write(home.join("profile.toml"), profile).unwrap();
    std::fs::copy(&id, home.join("identity")).unwrap();
    let h = home.clone();
    let o = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_psh"))
            .arg("--home")
            .arg(&h)
            .arg("doctor")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && said.contains("✓ Auth API:") && !said.contains('✗'),
        "psh doctor: {said}{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A port nothing listens on.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = free.local_addr().unwrap().to_string();
    drop(free);
    let (ok, text) = run(dead, pin.clone(), id.clone()).await;
    assert!(
        !ok && text.contains("✗ TCP:") && text.contains("3080"),
        "{text}"
    );

    // A wrong pin: the fix names the certificate the proxy presents.
    let wrong = "00".repeat(32);
    let (ok, text) = run(web.clone(), wrong, id.clone()).await;
    assert!(
        !ok && text.contains("✗ TLS:") && text.contains(&format!("--web-pin {pin}")),
        "{text}"
    );

    // The cluster's host CA is not the one that signed the proxy's host certificate.
    let mut foreign = postern_api::identity::IdentityFile::load(&id).unwrap();
    let other_ca = postern_dial::mint::generate_key();
    foreign.ssh_host_cas = vec![other_ca.public_key().to_openssh().unwrap()];
    let foreign_path = d.path().join("foreign.identity");
    foreign.save(&foreign_path).unwrap();
    let (ok, text) = run(web.clone(), pin.clone(), foreign_path).await;
    assert!(
        !ok && text.contains("✗ SSH:") && text.contains("host CA"),
        "{text}"
    );

    // An expired certificate.
    let mut expired = postern_api::identity::IdentityFile::load(&id).unwrap();
    expired.expires = 1;
    let expired_path = d.path().join("expired.identity");
    expired.save(&expired_path).unwrap();
    let (ok, text) = run(web.clone(), pin.clone(), expired_path).await;
    assert!(
        !ok && text.contains("✗ certificate:") && text.contains("psh login"),
        "{text}"
    );

    // No agent connected: the Auth server (and its tunnel) stops, the proxy stays.
    demo.auth_shutdown.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, text) = run(web.clone(), pin.clone(), id.clone()).await;
        if !ok && text.contains("✗ tunnel:") {
            assert!(text.contains("no agent of cluster"), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "doctor did not report the missing tunnel: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    demo.shutdown.cancel();
}
