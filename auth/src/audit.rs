//! The audit log: every API call, allowed or denied, recorded in the database and appended as a
//! JSON line to `<data_dir>/audit.log` (0600) for log shippers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::error;

use crate::storage::{AuditRecord, Backend};

/// Writes audit records to both sinks.
pub struct Audit {
    backend: Arc<dyn Backend>,
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl Audit {
    /// Opens (creating 0600) the JSON-lines file.
    pub fn open(backend: Arc<dyn Backend>, path: &Path) -> std::io::Result<Audit> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        Ok(Audit {
            backend,
            path: path.into(),
            file: Mutex::new(file),
        })
    }

    /// Records one event (blocking: call from a blocking context). A failing sink is logged at
    /// `error` and does not undo the call it records.
    pub fn record(&self, mut rec: AuditRecord) {
        match self.backend.append_audit(&rec) {
            Ok(id) => rec.id = id,
            Err(e) => {
                error!(error = %e, action = %rec.action, "audit event not stored in the database")
            }
        }
        let line = serde_json::to_string(&rec).unwrap_or_default();
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = writeln!(f, "{line}") {
            error!(error = %e, path = %self.path.display(), "audit event not written to the log file");
        }
    }
}
