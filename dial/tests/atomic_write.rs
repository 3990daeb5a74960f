//! A renewed certificate is written to a temporary file and renamed over the old one: when the
//! write fails for lack of space, the old file is untouched and no temporary file is left.
//! The failure is real: a child process runs under `prlimit --fsize` (RLIMIT_FSIZE), so the
//! kernel refuses the write with EFBIG, as a full disk refuses it with ENOSPC (the child catches
//! SIGXFSZ so that it is told, not killed).

use std::process::Command;

const CHILD: &str = "POSTERN_ATOMIC_WRITE_CHILD";
const OLD: &str = "ssh-ed25519-cert-v01@openssh.com AAAA old certificate\n";

/// The child half: runs only when the parent sets [`CHILD`] to a file path.
#[tokio::test]
async fn child_writes_under_a_file_size_limit() {
    let Ok(path) = std::env::var(CHILD) else {
        return;
    };
    // SIGXFSZ (25 on Linux) caught: the write fails with EFBIG instead of killing the process.
    let _sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(25)).unwrap();
    let big = vec![b'x'; 64 * 1024];
    let r = postern_dial::mint::write_file_atomic(std::path::Path::new(&path), &big, 0o600);
    println!("RESULT: {r:?}");
    assert!(r.is_err(), "the write is refused under the limit");
}

#[test]
fn a_failed_write_keeps_the_old_certificate() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("agent_key-cert.pub");
    std::fs::write(&cert, OLD).unwrap();
    let out = Command::new("prlimit")
        .arg("--fsize=1024")
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_writes_under_a_file_size_limit",
            "--nocapture",
        ])
        .env(CHILD, &cert)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("RESULT: Err"), "{stdout}");
    assert!(
        stdout.contains("File too large"),
        "the kernel refused the write: {stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&cert).unwrap(),
        OLD,
        "the old certificate is intact"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "no temporary file is left behind: {left:?}");
}
