//! A cluster's spool of stream events in the proxy's data dir: segment files of length-prefixed
//! protobuf records (`<dir>/<segment>.events`, 0600). The writer appends to the current segment;
//! the shipper closes it, ships closed segments and deletes each once the Auth server stored it.
//! A record cut short by a kill is ignored when read. The spool is bounded: past `max_bytes` the
//! oldest segment is dropped (counted in `postern_audit_events_dropped_total`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use metrics::counter;
use postern_api::proto::StreamEvent;
use prost::Message;
use tokio::sync::Notify;

use crate::metrics as m;

/// A segment is closed once it holds this many bytes (or when the shipper takes it).
const SEGMENT_BYTES: u64 = 1 << 20;

struct Current {
    seg: u64,
    file: Option<std::fs::File>,
    len: u64,
}

/// One cluster's spool.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    cur: Mutex<Current>,
    /// Signalled at every append: the shipper wakes up.
    pub appended: Notify,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.dir).finish()
    }
}

fn seg_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:016x}.events"))
}

fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let seg = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".events"))
            .and_then(|n| u64::from_str_radix(n, 16).ok());
        if let Some(seg) = seg {
            out.push((seg, p));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads a segment's whole records (a torn last record is ignored).
pub fn read(path: &Path) -> std::io::Result<Vec<StreamEvent>> {
    let bytes = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut rest = bytes.as_slice();
    while rest.len() >= 4 {
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() < 4 + n {
            break;
        }
        if let Ok(e) = StreamEvent::decode(&rest[4..4 + n]) {
            out.push(e);
        }
        rest = &rest[4 + n..];
    }
    Ok(out)
}

impl Spool {
    /// Opens (creating, 0700) the spool in `dir`; new events go to a new segment.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Spool> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let next = segments(dir)?.last().map_or(0, |(s, _)| s + 1);
        Ok(Spool {
            dir: dir.to_owned(),
            max_bytes,
            cur: Mutex::new(Current {
                seg: next,
                file: None,
                len: 0,
            }),
            appended: Notify::new(),
        })
    }

    /// Appends one event (one `write` of the whole record).
    pub fn append(&self, e: &StreamEvent) -> std::io::Result<()> {
        let body = e.encode_to_vec();
        let mut rec = Vec::with_capacity(4 + body.len());
        rec.extend_from_slice(&(body.len() as u32).to_be_bytes());
        rec.extend_from_slice(&body);
        let mut c = self.cur.lock().unwrap_or_else(|p| p.into_inner());
        if c.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            c.file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(seg_path(&self.dir, c.seg))?,
            );
            c.len = 0;
        }
        c.file.as_mut().expect("just opened").write_all(&rec)?;
        c.len += rec.len() as u64;
        if c.len >= SEGMENT_BYTES {
            c.file = None;
            c.seg += 1;
            drop(c);
            self.enforce_bound();
        } else {
            drop(c);
        }
        self.appended.notify_one();
        Ok(())
    }

    /// Closes the current segment if it holds anything, so the shipper can take it.
    pub fn rotate(&self) {
        let mut c = self.cur.lock().unwrap_or_else(|p| p.into_inner());
        if c.file.is_some() && c.len > 0 {
            c.file = None;
            c.seg += 1;
        }
    }

    /// The closed segments, oldest first.
    pub fn closed(&self) -> std::io::Result<Vec<PathBuf>> {
        let current = self.cur.lock().unwrap_or_else(|p| p.into_inner()).seg;
        Ok(segments(&self.dir)?
            .into_iter()
            .filter(|(s, _)| *s < current)
            .map(|(_, p)| p)
            .collect())
    }

    /// Events waiting to be shipped (closed segments and the current one).
    pub fn pending(&self) -> usize {
        segments(&self.dir)
            .unwrap_or_default()
            .iter()
            .map(|(_, p)| read(p).map(|v| v.len()).unwrap_or(0))
            .sum()
    }

    /// Drops the oldest closed segments while the spool is over its bound.
    fn enforce_bound(&self) {
        let Ok(closed) = self.closed() else { return };
        let mut total: u64 = closed
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        for p in closed {
            if total <= self.max_bytes {
                break;
            }
            let n = read(&p).map(|v| v.len()).unwrap_or(0);
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(&p).is_ok() {
                total = total.saturating_sub(len);
                counter!(m::AUDIT_DROPPED, "reason" => "spool_full").increment(n as u64);
                tracing::error!(dropped = n, spool = %self.dir.display(), "audit spool full: oldest events dropped (is the Auth server unreachable?)");
            }
        }
    }
}
