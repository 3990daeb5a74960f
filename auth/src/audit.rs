//! The audit log: every API call, allowed or denied, recorded in the database and appended as a
//! JSON line to `<data_dir>/audit.log` (0600) for log shippers. SIGHUP reopens the file (for
//! logrotate: move it away, then signal; or use `copytruncate`).
//!
//! A record counts as kept when at least one of the two sinks took it. When neither did (a full
//! disk, say), [`Audit::record`] says so: the call it records is failed (nothing is issued or
//! returned unrecorded), the whole record is written to the process log at `error`, and
//! `postern_auth_audit_failures_total{sink="both"}` counts it. See `docs/reliability.md`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use metrics::counter;
use tracing::error;

use crate::metrics as m;
use crate::storage::{AuditRecord, Backend};

/// Neither sink took an audit record.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the audit log cannot be written ({0}): the call was not completed; free space in the Auth server's data dir"
)]
pub struct AuditError(pub String);

/// Writes audit records to both sinks.
pub struct Audit {
    backend: Arc<dyn Backend>,
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

/// A string from the wire made safe for logs and records: control characters (newlines, ANSI
/// escapes) escaped, and cut to 64 characters with the original length noted.
pub fn untrusted(s: &str) -> String {
    const KEEP: usize = 64;
    let mut out: String = s.chars().take(KEEP).flat_map(char::escape_debug).collect();
    // `escape_debug` also escapes quotes and backslashes; that is fine for a log.
    if s.chars().nth(KEEP).is_some() {
        out.push_str(&format!("…({} bytes)", s.len()));
    }
    out
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

impl Audit {
    /// Opens (creating 0600) the JSON-lines file.
    pub fn open(backend: Arc<dyn Backend>, path: &Path) -> std::io::Result<Audit> {
        Ok(Audit {
            backend,
            path: path.into(),
            file: Mutex::new(open_log(path)?),
        })
    }

    /// Reopens the file at its path (creating it 0600): after logrotate moved it away, the
    /// Auth server does this on SIGHUP. On failure the old file stays in use.
    pub fn reopen(&self) -> std::io::Result<()> {
        let new = open_log(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    /// Records one event (blocking: call from a blocking context). A failing sink is logged at
    /// `error` and counted; if both fail, the record goes to the process log and the error is
    /// returned, so that the caller fails the call it records.
    pub fn record(&self, mut rec: AuditRecord) -> Result<(), AuditError> {
        let db = match self.backend.append_audit(&rec) {
            Ok(id) => {
                rec.id = id;
                Ok(())
            }
            Err(e) => {
                counter!(m::AUDIT_FAILURES, "sink" => "database").increment(1);
                error!(error = %e, action = %rec.action, "audit event not stored in the database");
                Err(e.to_string())
            }
        };
        let line = serde_json::to_string(&rec).unwrap_or_default();
        let file = {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            // One write of the whole line, then a flush to the kernel: a full disk shows here.
            writeln!(f, "{line}").and_then(|()| f.flush())
        };
        let file = file.map_err(|e| {
            counter!(m::AUDIT_FAILURES, "sink" => "file").increment(1);
            error!(error = %e, path = %self.path.display(), "audit event not written to the log file");
            e.to_string()
        });
        match (db, file) {
            (Err(db), Err(file)) => {
                counter!(m::AUDIT_FAILURES, "sink" => "both").increment(1);
                error!(record = %line, "AUDIT RECORD LOST BY BOTH SINKS (kept only here); the call was failed");
                Err(AuditError(format!(
                    "database: {db}; {}: {file}",
                    self.path.display()
                )))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::untrusted;

    #[test]
    fn untrusted_strings_cannot_forge_log_lines() {
        let s = untrusted("bob\n2026-11-30T00:00:00Z  INFO forged\x1b[31m");
        assert!(!s.contains('\n') && !s.contains('\x1b'), "{s}");
        assert!(s.starts_with("bob\\n2026"), "{s}");
        let long = untrusted(&"a".repeat(59_000));
        assert!(
            long.len() < 100 && long.ends_with("(59000 bytes)"),
            "{long}"
        );
    }
}
