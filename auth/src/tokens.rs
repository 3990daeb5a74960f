//! Join tokens: what is stored (a hash, never the secret), and spending one use of a token
//! atomically when an agent registers with it.
//!
//! A token enrolls one agent unless it was created with `uses` > 1 (`pctl tokens add --uses N`).
//! Spending is a conditional write at the revision just read, so two agents racing with the same
//! single-use token cannot both succeed.

use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::storage::{Backend, Condition, StorageError};

/// The kind of token that enrolls an agent.
pub const KIND_AGENT: &str = "agent";
/// The kind of token that enrolls a Machine ID bot for the user it is bound to.
pub const KIND_BOT: &str = "bot";

/// The most uses one token may be created with.
pub const MAX_USES: u32 = 1000;

/// How many times a conditional write is retried when another registration raced it.
const SPEND_RETRIES: usize = 16;

fn one() -> u32 {
    1
}

/// A join token as stored (only its hash).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredToken {
    /// SHA-256 (hex) of the secret.
    pub hash: String,
    /// `agent`.
    pub kind: String,
    /// Unix seconds after which it is refused.
    pub expires: u64,
    /// Uses it was created with (tokens stored before uses existed count as single-use).
    #[serde(default = "one")]
    pub uses: u32,
    /// Uses left; 0 once spent (kept until it expires, so a reuse gets a clear refusal).
    #[serde(default = "one")]
    pub uses_left: u32,
    /// The user a `bot` token is bound to (empty for `agent` tokens).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No such token, a different secret, the wrong kind, or past its expiry.
    #[error(
        "join token is unknown, expired or deleted: ask an admin for a new one (pctl tokens add)"
    )]
    Unknown,
    /// The token exists but is for something else (a bot token presented by an agent).
    #[error(
        "join token {id} is a '{kind}' token, not a token of type '{wanted}': ask an admin for a token of the right type (pctl tokens add --type={wanted})"
    )]
    WrongKind {
        /// The token's id.
        id: String,
        /// Its kind.
        kind: String,
        /// The kind this use needs.
        wanted: String,
    },
    /// Every use has been spent.
    #[error(
        "join token {id} has already been used ({uses} of {uses} uses spent): a token enrolls one agent unless created with `pctl tokens add --uses N`; ask an admin for a new one"
    )]
    Used {
        /// The token's id.
        id: String,
        /// The uses it was created with.
        uses: u32,
    },
    /// Storage failed.
    #[error("{0}")]
    Storage(#[from] StorageError),
}

impl From<TokenError> for Status {
    fn from(e: TokenError) -> Status {
        match e {
            TokenError::Storage(s) => {
                Status::unavailable(format!("the Auth server's storage failed: {s}"))
            }
            other => Status::permission_denied(other.to_string()),
        }
    }
}

/// Spends one use of the token `id` of kind `kind` whose secret hashes to `hash`, at unix time
/// `now`; returns the token as it was stored (a bot token names its user).
pub fn spend(
    backend: &dyn Backend,
    id: &str,
    hash: &str,
    now: u64,
    kind: &str,
) -> Result<StoredToken, TokenError> {
    let mut raced = None;
    for _ in 0..SPEND_RETRIES {
        let item = backend.get("token", id)?.ok_or(TokenError::Unknown)?;
        let mut t: StoredToken =
            serde_json::from_str(&item.value).map_err(|_| TokenError::Unknown)?;
        if t.hash != hash || t.expires < now {
            return Err(TokenError::Unknown);
        }
        if t.kind != kind {
            return Err(TokenError::WrongKind {
                id: id.to_owned(),
                kind: t.kind,
                wanted: kind.to_owned(),
            });
        }
        if t.uses_left == 0 {
            return Err(TokenError::Used {
                id: id.to_owned(),
                uses: t.uses,
            });
        }
        t.uses_left -= 1;
        let json = serde_json::to_string(&t).expect("token serializes");
        match backend.put("token", id, &json, Condition::Revision(item.revision)) {
            Ok(_) => return Ok(t),
            Err(e @ StorageError::Conflict { .. }) => raced = Some(e),
            Err(StorageError::NotFound { .. }) => return Err(TokenError::Unknown),
            Err(e) => return Err(e.into()),
        }
    }
    Err(TokenError::Storage(raced.expect("the loop ran")))
}
