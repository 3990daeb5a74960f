//! `pctl lock`, `pctl get locks`, `pctl rm lock/ID`.

use anyhow::bail;
use clap::Args;
use postern_api::duration;
use postern_api::proto::{DeleteLockRequest, ListLocksRequest, Lock};
use postern_client::auth::AuthClient;

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
    println!(
        "lock/{} created: {} ({})",
        l.id,
        l.message,
        if l.expires == 0 {
            "until removed".to_string()
        } else {
            format!("expires {}", l.expires)
        }
    );
    Ok(())
}

/// `pctl get locks`, as text or JSON.
pub async fn print(client: &AuthClient, json: bool) -> anyhow::Result<()> {
    let locks = client.list_locks(ListLocksRequest {}).await?.locks;
    for l in locks {
        let target = if !l.user.is_empty() {
            format!("user={}", l.user)
        } else if !l.role.is_empty() {
            format!("role={}", l.role)
        } else if !l.access_request.is_empty() {
            format!("request={}", l.access_request)
        } else {
            format!("agent={}", l.agent)
        };
        if json {
            let v = serde_json::json!({
                "id": l.id, "target": target, "message": l.message,
                "expires": l.expires, "created": l.created, "created_by": l.created_by,
            });
            println!("{v}");
        } else {
            println!(
                "lock/{}  {target}  expires {}  by {}  {}",
                l.id,
                if l.expires == 0 {
                    "never".to_string()
                } else {
                    l.expires.to_string()
                },
                l.created_by,
                l.message
            );
        }
    }
    Ok(())
}

/// `pctl rm lock/ID`.
pub async fn rm(client: &AuthClient, id: &str) -> anyhow::Result<()> {
    client
        .delete_lock(DeleteLockRequest { id: id.into() })
        .await?;
    println!("lock '{id}' has been removed");
    Ok(())
}
