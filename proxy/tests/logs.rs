//! Operators' conventions for logs and versions, on the real binary: `--log-format json` (or
//! `POSTERN_LOG_FORMAT=json`) writes one JSON object per line; text logs written to a pipe carry no
//! colour codes; `--version` names the git commit.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts the proxy on ephemeral ports with `args` and `env`, returns its stderr lines up to and
/// including the "serving" line (or everything within 20 s), then kills it.
fn startup_lines(args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nallow_root = true\n[listen]\nweb = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\nops = \"127.0.0.1:0\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern-proxy"));
    cmd.args(args)
        .arg("--config")
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .env_remove("POSTERN_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let done = line.contains("postern-proxy serving");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

#[test]
fn json_logs_are_one_object_per_line() {
    for (args, env) in [
        (vec!["--log-format", "json"], vec![]),
        (vec![], vec![("POSTERN_LOG_FORMAT", "json")]),
    ] {
        let lines = startup_lines(&args, &env);
        assert!(
            lines.iter().any(|l| l.contains("postern-proxy serving")),
            "no start-up line: {lines:?}"
        );
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        }
    }
}

#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let lines = startup_lines(&[], &[]);
    assert!(
        lines.iter().any(|l| l.contains("postern-proxy serving")),
        "no start-up line: {lines:?}"
    );
    for line in &lines {
        assert!(
            !line.contains('\u{1b}'),
            "ANSI escape in a piped log line: {line:?}"
        );
    }
}

#[test]
fn version_names_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_postern-proxy"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("postern-proxy {} (", env!("CARGO_PKG_VERSION")))
            && text.trim_end().ends_with(')'),
        "{text}"
    );
}
