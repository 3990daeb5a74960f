//! The proxy set: every proxy of the cluster's edge, as its heartbeats describe it.
//!
//! Each proxy calls `ProxyHeartbeat` through the cluster's own tunnel with its own identity
//! (preset role `proxy`: `proxy` create + list) every few seconds. A heartbeat stores the proxy's
//! record (id, public web and tunnel addresses, expiry) as a resource of kind `proxy` in the
//! backend, so every Auth server on a shared database sees the same set; a record whose expiry
//! passed is no longer in the set and is removed at the next heartbeat of any proxy. A draining
//! proxy sends `leaving` and its record goes at once. Proxy records are not policy: they are not
//! in the change feed (`changes` only records roles, users and locks).
//!
//! A successful heartbeat is not written to the audit log (one per proxy every few seconds would
//! drown it); a refused one is, as every refusal is, and a proxy joining or leaving the set is
//! logged.

use postern_api::proto::{ProxyHeartbeatRequest, ProxyHeartbeatResponse, ProxyRecord};
use postern_api::rbac::Verb;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::service::{Service, storage_status};
use crate::storage::{Backend, Condition, StorageError};

/// The resource kind proxy records are stored under.
pub const KIND: &str = "proxy";
/// Longest record lifetime a heartbeat may ask for, in seconds.
pub const MAX_TTL_SECS: u32 = 600;
/// Longest proxy id or address accepted, in bytes.
const MAX_FIELD: usize = 256;

/// A proxy record as stored (the id is the resource's name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProxy {
    /// Public web address.
    pub web_addr: String,
    /// Public tunnel address.
    pub tunnel_addr: String,
    /// Unix milliseconds after which the record is gone.
    pub expires_ms: u64,
}

/// Checks a heartbeat's fields; the error says which one is wrong.
pub fn validate(req: &ProxyHeartbeatRequest) -> Result<&ProxyRecord, Status> {
    let p = req
        .proxy
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("proxy: required"))?;
    if p.id.is_empty() || p.id.len() > MAX_FIELD || p.id.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "proxy.id: 1 to {MAX_FIELD} bytes without control characters"
        )));
    }
    for (field, v) in [
        ("proxy.web_addr", &p.web_addr),
        ("proxy.tunnel_addr", &p.tunnel_addr),
    ] {
        if v.len() > MAX_FIELD || v.chars().any(|c| c.is_control()) {
            return Err(Status::invalid_argument(format!(
                "{field}: at most {MAX_FIELD} bytes without control characters"
            )));
        }
    }
    Ok(p)
}

/// Applies one heartbeat at `now_ms` and returns the live set, sorted by id. Expired records are
/// removed on the way. Returns also whether `id` was not in the live set before (it joined).
pub fn heartbeat(
    backend: &dyn Backend,
    req: &ProxyHeartbeatRequest,
    now_ms: u64,
) -> Result<(Vec<ProxyRecord>, bool), StorageError> {
    let p = req.proxy.clone().unwrap_or_default();
    let mut live = Vec::new();
    let mut joined = true;
    for item in backend.list(KIND)? {
        let Ok(s) = serde_json::from_str::<StoredProxy>(&item.value) else {
            backend.delete(KIND, &item.name)?;
            continue;
        };
        if s.expires_ms <= now_ms {
            backend.delete(KIND, &item.name)?;
            continue;
        }
        if item.name == p.id {
            joined = false;
            continue;
        }
        live.push(ProxyRecord {
            id: item.name,
            web_addr: s.web_addr,
            tunnel_addr: s.tunnel_addr,
            expires_ms: s.expires_ms,
        });
    }
    if req.leaving {
        backend.delete(KIND, &p.id)?;
        joined = false;
    } else {
        let ttl = u64::from(req.ttl_secs.clamp(1, MAX_TTL_SECS));
        let stored = StoredProxy {
            web_addr: p.web_addr.clone(),
            tunnel_addr: p.tunnel_addr.clone(),
            expires_ms: now_ms + ttl * 1000,
        };
        let json = serde_json::to_string(&stored).expect("proxy record serializes");
        backend.put(KIND, &p.id, &json, Condition::Any)?;
        live.push(ProxyRecord {
            id: p.id,
            web_addr: stored.web_addr,
            tunnel_addr: stored.tunnel_addr,
            expires_ms: stored.expires_ms,
        });
    }
    live.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((live, joined))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Service {
    /// `ProxyHeartbeat`: see the module docs.
    pub(crate) async fn proxy_heartbeat_rpc(
        &self,
        req: Request<ProxyHeartbeatRequest>,
    ) -> Result<Response<ProxyHeartbeatResponse>, Status> {
        let caller = self
            .authorize(
                &req,
                "ProxyHeartbeat",
                KIND,
                "",
                &[Verb::Create, Verb::List],
            )
            .await?;
        validate(req.get_ref())?;
        let r = req.into_inner();
        let (id, leaving) = (r.proxy.as_ref().map(|p| p.id.clone()), r.leaving);
        let (proxies, joined) = self
            .blocking(move |s| heartbeat(s.backend.as_ref(), &r, now_ms()))
            .await?
            .map_err(storage_status)?;
        let id = id.unwrap_or_default();
        if joined {
            info!(proxy = %id, user = %caller.user, set = proxies.len(), "proxy joined the proxy set");
        } else if leaving {
            info!(proxy = %id, user = %caller.user, set = proxies.len(), "proxy left the proxy set");
        }
        Ok(Response::new(ProxyHeartbeatResponse { proxies }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sqlite::SqliteBackend;

    fn beat(id: &str, ttl: u32, leaving: bool) -> ProxyHeartbeatRequest {
        ProxyHeartbeatRequest {
            proxy: Some(ProxyRecord {
                id: id.into(),
                web_addr: format!("{id}:3080"),
                tunnel_addr: format!("{id}:3024"),
                expires_ms: 0,
            }),
            ttl_secs: ttl,
            leaving,
        }
    }

    fn open() -> (std::path::PathBuf, SqliteBackend) {
        let dir = std::env::temp_dir().join(format!("postern-proxies-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let b = SqliteBackend::open(&dir.join("auth.db")).unwrap();
        (dir, b)
    }

    fn ids(set: &[ProxyRecord]) -> Vec<&str> {
        set.iter().map(|p| p.id.as_str()).collect()
    }

    #[test]
    fn records_expire_and_leaving_removes_at_once() {
        let (dir, b) = open();
        let (set, joined) = heartbeat(&b, &beat("b", 3, false), 1_000).unwrap();
        assert!(joined);
        assert_eq!(ids(&set), ["b"]);
        let (set, _) = heartbeat(&b, &beat("a", 3, false), 2_000).unwrap();
        assert_eq!(ids(&set), ["a", "b"]);
        let (set, joined) = heartbeat(&b, &beat("a", 3, false), 3_000).unwrap();
        assert!(!joined, "a renewal is not a join");
        assert_eq!(ids(&set), ["a", "b"]);
        // b's record (expires at 4_000) is gone at 4_000 without another heartbeat.
        let (set, _) = heartbeat(&b, &beat("a", 3, false), 4_000).unwrap();
        assert_eq!(ids(&set), ["a"]);
        assert!(
            b.get(KIND, "b").unwrap().is_none(),
            "expired record removed"
        );
        heartbeat(&b, &beat("c", 3, false), 4_100).unwrap();
        let (set, _) = heartbeat(&b, &beat("c", 3, true), 4_200).unwrap();
        assert_eq!(ids(&set), ["a"]);
        assert!(
            b.changes_since(0, 100).unwrap().changes.is_empty(),
            "proxy records are not policy"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ttl_is_clamped_and_bad_fields_named() {
        let (dir, b) = open();
        let (set, _) = heartbeat(&b, &beat("a", 100_000, false), 0).unwrap();
        assert_eq!(set[0].expires_ms, u64::from(MAX_TTL_SECS) * 1000);
        let (set, _) = heartbeat(&b, &beat("z", 0, false), 0).unwrap();
        assert_eq!(set[1].expires_ms, 1000);
        let e = validate(&ProxyHeartbeatRequest::default()).unwrap_err();
        assert!(e.message().contains("proxy: required"));
        let e = validate(&beat("", 3, false)).unwrap_err();
        assert!(e.message().contains("proxy.id"));
        let mut r = beat("a", 3, false);
        r.proxy.as_mut().unwrap().tunnel_addr = "x\n".into();
        assert!(validate(&r).unwrap_err().message().contains("tunnel_addr"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
