//! `pctl requests ls|approve ID|deny ID`: review access requests (the caller's roles must allow
//! reviewing the roles asked for: `allow.review_requests.roles`).

use clap::Subcommand;
use postern_client::auth::AuthClient;
use postern_client::requests::describe;

/// `pctl requests ...`.
#[derive(Subcommand)]
pub enum RequestsCommand {
    /// Requests you may see: yours, and those you may read or review (newest first).
    Ls {
        /// Only requests in this state: pending, approved or denied.
        #[arg(long)]
        state: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending request: its requester may then get certificates with the roles.
    Approve {
        /// The request id.
        id: String,
        /// Why (kept with the request and in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a pending request.
    Deny {
        /// The request id.
        id: String,
        /// Why (shown to the requester).
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Runs one `pctl requests` command.
pub async fn run(client: &AuthClient, cmd: RequestsCommand) -> anyhow::Result<()> {
    match cmd {
        RequestsCommand::Ls { state, json } => {
            let list = client
                .list_access_requests(state.as_deref().unwrap_or(""))
                .await?;
            if list.is_empty() && !json {
                println!("no access requests");
            }
            for r in list {
                if json {
                    let v = serde_json::json!({
                        "id": r.id, "user": r.user, "roles": r.roles, "reason": r.reason,
                        "state": r.state, "duration_secs": r.duration_secs, "created": r.created,
                        "reviewer": r.reviewer, "reviewed": r.reviewed,
                        "review_reason": r.review_reason, "expires": r.expires,
                    });
                    println!("{v}");
                } else {
                    println!("{}", describe(&r));
                }
            }
        }
        RequestsCommand::Approve { id, reason } => review(client, &id, true, reason).await?,
        RequestsCommand::Deny { id, reason } => review(client, &id, false, reason).await?,
    }
    Ok(())
}

async fn review(
    client: &AuthClient,
    id: &str,
    approve: bool,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let r = client
        .review_access_request(id, approve, reason.as_deref().unwrap_or(""))
        .await?;
    println!("{}", describe(&r));
    Ok(())
}
