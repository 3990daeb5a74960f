//! The stream access audit: every stream open, close and refusal becomes a
//! `postern.auth.v1.StreamEvent` (user, certificate key id, the source address the proxy saw,
//! cluster, target, proxy id, transport, bytes each way, duration, result, reason). Each is logged
//! at `info`, and, for a cluster whose policy source is `auth`, appended to that cluster's spool
//! in the data dir before anything else happens, then shipped to the cluster's Auth server in
//! batches ([`ship`]). Memory holds no backlog: the spool is the queue, bounded on disk.
//!
//! Durability: an event is written to the spool file (no fsync) before the stream is answered, so
//! a killed proxy (SIGKILL) loses no event of an answered stream; a machine crash can lose what
//! the kernel had not yet written. Each event has a unique id, and the Auth server stores an id
//! once, so a batch resent after a crash is not counted twice.

pub mod ship;
pub mod spool;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::counter;
use postern_api::proto::StreamEvent;
use tracing::{info, warn};

use crate::metrics as m;
pub use spool::Spool;

/// What a stream event says beyond its kind and result.
#[derive(Debug, Clone, Default)]
pub struct StreamInfo {
    /// The user.
    pub user: String,
    /// The user certificate's key id.
    pub key_id: String,
    /// The client's address as the proxy saw it.
    pub source: String,
    /// The cluster.
    pub cluster: String,
    /// The target (`<target>.<cluster>` as asked, when it did not parse).
    pub target: String,
    /// The transport of the tunnel the stream was routed to (`ssh`, `quic`); empty before it
    /// was routed, recorded as `ssh`.
    pub transport: &'static str,
}

/// Builds, logs and spools stream events.
#[derive(Debug, Default)]
pub struct StreamAudit {
    proxy_id: String,
    /// Random per start: ids stay unique across restarts.
    boot: u64,
    seq: AtomicU64,
    spools: HashMap<String, Arc<Spool>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl StreamAudit {
    /// An audit for `proxy_id`, spooling the events of the clusters in `spools`.
    pub fn new(proxy_id: String, spools: HashMap<String, Arc<Spool>>) -> StreamAudit {
        StreamAudit {
            proxy_id,
            boot: rand::random(),
            seq: AtomicU64::new(0),
            spools,
        }
    }

    /// The spool of each cluster that ships its events.
    pub fn spools(&self) -> &HashMap<String, Arc<Spool>> {
        &self.spools
    }

    fn event(&self, kind: &str, s: &StreamInfo, result: &str, reason: &str) -> StreamEvent {
        StreamEvent {
            id: format!(
                "{}-{:016x}-{}",
                self.proxy_id,
                self.boot,
                self.seq.fetch_add(1, Ordering::Relaxed)
            ),
            time_ms: now_ms(),
            kind: kind.into(),
            user: s.user.clone(),
            key_id: s.key_id.clone(),
            source: s.source.clone(),
            cluster: s.cluster.clone(),
            target: s.target.clone(),
            proxy_id: self.proxy_id.clone(),
            transport: if s.transport.is_empty() {
                tunnel_proto::discovery::TRANSPORT_SSH.into()
            } else {
                s.transport.into()
            },
            result: result.into(),
            reason: reason.into(),
            ..Default::default()
        }
    }

    fn record(&self, e: StreamEvent) {
        info!(
            target: "postern::audit",
            kind = %e.kind, user = %e.user, key_id = %e.key_id, source = %e.source,
            cluster = %e.cluster, target_name = %e.target, proxy_id = %e.proxy_id,
            transport = %e.transport, bytes_in = e.bytes_in, bytes_out = e.bytes_out,
            duration_ms = e.duration_ms, result = %e.result, reason = %e.reason,
            "stream audit"
        );
        counter!(m::AUDIT_EVENTS, "kind" => e.kind.clone()).increment(1);
        if let Some(spool) = self.spools.get(&e.cluster)
            && let Err(err) = spool.append(&e)
        {
            counter!(m::AUDIT_DROPPED, "reason" => "spool_write").increment(1);
            warn!(cluster = %e.cluster, error = %err, "stream audit event not spooled");
        }
    }

    /// A stream was refused (by the proxy, the policy, or the agent).
    pub fn refused(&self, s: &StreamInfo, result: &str, reason: &str) {
        self.record(self.event("refused", s, result, reason));
    }

    /// A stream was opened.
    pub fn opened(&self, s: &StreamInfo) {
        self.record(self.event("open", s, "ok", ""));
    }

    /// A stream ended after `duration`, having moved `bytes_in` (client to target) and
    /// `bytes_out`; `reason` says why if the proxy ended it.
    pub fn closed(
        &self,
        s: &StreamInfo,
        bytes_in: u64,
        bytes_out: u64,
        duration: Duration,
        reason: &str,
    ) {
        let mut e = self.event("close", s, "ok", reason);
        e.bytes_in = bytes_in;
        e.bytes_out = bytes_out;
        e.duration_ms = duration.as_millis() as u64;
        self.record(e);
    }
}
