//! `pctl lock`, `pctl get locks`, `pctl rm lock/ID`.

use anyhow::bail;
use clap::Args;
use postern_api::duration;
use postern_api::proto::{DeleteLockRequest, ListLocksRequest, Lock};
use postern_client::auth::AuthClient;

use crate::output::{self, Format, human_time, outln, rfc3339};

/// What `pctl lock` locks: exactly one of a user, a role, an agent or an access request.
#[derive(Args)]
pub struct LockArgs {
    /// Lock this user: its new streams and logins are refused, its open streams closed.
    #[arg(long, conflicts_with_all = ["role", "agent", "request"])]
    user: Option<String>,
    /// Lock every holder of this role.
    #[arg(long, conflicts_with_all = ["agent", "request"])]
    role: Option<String>,
    /// Lock this agent (host id): its tunnels are closed and its logins refused.
    #[arg(long, conflicts_with = "request")]
    agent: Option<String>,
    /// End the elevation of this access request (id) at once, at the Auth API and every proxy.
    #[arg(long)]
    request: Option<String>,
    /// How long (e.g. 1h); until removed if absent.
    #[arg(long)]
    ttl: Option<String>,
    /// The reason the locked identity is shown.
    #[arg(long)]
    message: Option<String>,
}

/// Creates the lock and prints its id.
pub async fn lock(client: &AuthClient, a: LockArgs) -> anyhow::Result<()> {
    if a.user.is_none() && a.role.is_none() && a.agent.is_none() && a.request.is_none() {
        bail!("say what to lock: --user=NAME, --role=NAME, --agent=HOST_ID or --request=ID");
    }
    let ttl_secs = match a.ttl {
        Some(t) => duration::parse_secs(&t).map_err(anyhow::Error::msg)?,
        None => 0,
    };
    let l = client
        .create_lock(Lock {
            user: a.user.unwrap_or_default(),
            role: a.role.unwrap_or_default(),
            agent: a.agent.unwrap_or_default(),
            access_request: a.request.unwrap_or_default(),
            message: a.message.unwrap_or_default(),
            ttl_secs,
            ..Default::default()
        })
        .await?;
    outln!(
        "lock/{} created: {} ({})",
        l.id,
        l.message,
        if l.expires == 0 {
            "until removed".to_string()
        } else {
            format!("expires {}", human_time(l.expires))
        }
    );
    Ok(())
}

/// A lock as `get locks` prints it in JSON and YAML.
#[derive(serde::Serialize)]
struct LockDoc {
    id: String,
    target: String,
    message: String,
    /// RFC 3339; empty: until removed.
    expires: String,
    created: String,
    created_by: String,
}

/// `pctl get locks`, in `format`.
pub async fn print(client: &AuthClient, format: Format) -> anyhow::Result<()> {
    let locks = client.list_locks(ListLocksRequest {}).await?.locks;
    let expiries: Vec<u64> = locks.iter().map(|l| l.expires).collect();
    let docs: Vec<LockDoc> = locks
        .into_iter()
        .map(|l| LockDoc {
            target: if !l.user.is_empty() {
                format!("user={}", l.user)
            } else if !l.role.is_empty() {
                format!("role={}", l.role)
            } else if !l.access_request.is_empty() {
                format!("request={}", l.access_request)
            } else {
                format!("agent={}", l.agent)
            },
            id: l.id,
            message: l.message,
            expires: rfc3339(l.expires),
            created: rfc3339(l.created),
            created_by: l.created_by,
        })
        .collect();
    if format != Format::Text {
        return output::list(&docs, format);
    }
    for (l, expires) in docs.iter().zip(expiries) {
        outln!(
            "lock/{}  {}  expires {}  by {}  {}",
            l.id,
            l.target,
            human_time(expires),
            l.created_by,
            l.message
        );
    }
    Ok(())
}

/// `pctl rm lock/ID`.
pub async fn rm(client: &AuthClient, id: &str) -> anyhow::Result<()> {
    client
        .delete_lock(DeleteLockRequest { id: id.into() })
        .await?;
    outln!("lock '{id}' has been removed");
    Ok(())
}
