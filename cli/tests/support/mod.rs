//! Helpers shared by the client's integration tests: running the real `psh` binary.
#![allow(dead_code, missing_docs)]

use std::path::Path;
use std::process::Command;

/// Runs `psh --home HOME ARGS…` to completion.
pub fn psh(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_psh"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap()
}

/// A finished command's stdout and stderr together, for assertions and failure messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
