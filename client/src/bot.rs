//! Machine ID: a bot (`psh bot start`) that keeps an identity file fresh for programs using
//! [`crate::credentials::Credentials::dynamic_identity_file`].
//!
//! At its first start the bot makes its key locally and joins through the proxy's web listener
//! (`POST /webapi/join` with `kind = "bot"`), presenting a bot token bound to a user (`pctl
//! tokens add --type=bot --user=NAME`) and the cluster's CA pin. It gets that user's identity
//! for its own key and writes it as an identity file (0600, temporary file + fsync + rename, so
//! a reader never sees half of one). Every `interval` it renews (`POST /webapi/renew`),
//! authenticated by the certificate it holds, and replaces the file the same way. A refused
//! renewal (its user locked or deleted, its certificate expired) stops the bot with that
//! message; an unreachable proxy or Auth server is retried until the identity expires.

use std::path::PathBuf;
use std::time::Duration;

use postern_api::identity::{IDENTITY_VERSION, IdentityFile};
use postern_dial::mint;
use postern_dial::web::WebTrust;
use russh::keys::HashAlg;
use russh::keys::ssh_key::{Certificate, LineEnding, PrivateKey, PublicKey};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tunnel_proto::join::{JoinRequest, KIND_BOT, RenewRequest};
use tunnel_proto::login::LoginResponse;

/// What a bot needs.
#[derive(Debug, Clone)]
pub struct BotConfig {
    /// The proxy's web address (host:port).
    pub proxy: String,
    /// How the proxy's web certificate is verified.
    pub trust: WebTrust,
    /// The cluster to join.
    pub cluster: String,
    /// The bot's name (in the audit log).
    pub name: String,
    /// File holding the bot token (read at the first join only).
    pub token_file: PathBuf,
    /// The cluster's CA pin (`sha256:…`, as `pctl status` prints it).
    pub ca_pin: String,
    /// The identity file written and renewed.
    pub out: PathBuf,
    /// How often the identity is renewed.
    pub interval: Duration,
    /// The lifetime asked for (capped by the user's roles); longer than `interval`.
    pub ttl: Duration,
}

/// Why a bot stopped.
#[derive(Debug, thiserror::Error)]
pub enum BotError {
    /// The token file cannot be read or is empty.
    #[error("bot token file {path}: {detail}")]
    TokenFile {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A setting is unusable (names it).
    #[error("{0}")]
    Config(String),
    /// The cluster refused the join or a renewal (its words: a used, expired or unknown token,
    /// one of another kind, a locked or deleted user).
    #[error("the cluster refused the bot: {0}")]
    Refused(String),
    /// The answer is not from the cluster the pin names, or not for this bot's key.
    #[error("the identity received is unusable: {0}")]
    BadIdentity(String),
    /// The proxy or the Auth server could not be reached in time.
    #[error("could not reach the cluster: {0}")]
    Unreachable(String),
    /// The identity file could not be written (the previous one, if any, is kept).
    #[error("cannot write the identity file {path}: {detail}")]
    Save {
        /// The file.
        path: String,
        /// The OS error.
        detail: String,
    },
}

/// Attempts to reach the cluster for a join before giving up.
const JOIN_ATTEMPTS: u32 = 8;

/// Runs the bot until `shutdown`: joins (or reuses an identity file still valid at `out`), then
/// renews every `interval`. Returns an error when the cluster refuses it.
pub async fn run(cfg: BotConfig, shutdown: CancellationToken) -> Result<(), BotError> {
    if cfg.ttl <= cfg.interval {
        return Err(BotError::Config(format!(
            "ttl ({}s) must be longer than interval ({}s), or the identity expires before it is renewed",
            cfg.ttl.as_secs(),
            cfg.interval.as_secs()
        )));
    }
    let mut current = match usable(&cfg) {
        Some(id) => {
            info!(out = %cfg.out.display(), "identity file still valid: renewing it, not joining");
            id
        }
        None => {
            let id = join(&cfg).await?;
            save(&cfg, &id)?;
            info!(out = %cfg.out.display(), user = %id.user, expires = id.expires, "bot joined: identity file written");
            id
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(cfg.interval) => {}
        }
        current = renew_until_expiry(&cfg, &current, &shutdown).await?;
        save(&cfg, &current)?;
        info!(out = %cfg.out.display(), expires = current.expires, "identity renewed");
    }
}

/// The identity at `out` if it is for this cluster and still valid for at least `interval`.
fn usable(cfg: &BotConfig) -> Option<IdentityFile> {
    let id = IdentityFile::load(&cfg.out).ok()?;
    let left = id.expires.saturating_sub(mint::now_unix());
    (id.cluster == cfg.cluster && left > cfg.interval.as_secs()).then_some(id)
}

/// Joins with the token: a new key, the user's identity for it, checked against the CA pin.
pub async fn join(cfg: &BotConfig) -> Result<IdentityFile, BotError> {
    let token_err = |detail: String| BotError::TokenFile {
        path: cfg.token_file.display().to_string(),
        detail,
    };
    let token = std::fs::read_to_string(&cfg.token_file).map_err(|e| token_err(e.to_string()))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(token_err("the file is empty".into()));
    }
    let pin = tunnel_proto::join::parse_pin(&cfg.ca_pin)
        .map_err(|e| BotError::Config(format!("ca_pin: {e}")))?;
    let key = mint::generate_key();
    let req = JoinRequest {
        cluster: cfg.cluster.clone(),
        host_id: cfg.name.clone(),
        token,
        public_key: key
            .public_key()
            .to_openssh()
            .map_err(|e| BotError::Config(e.to_string()))?,
        ca_pin: tunnel_proto::join::ca_pin(&pin),
        kind: KIND_BOT.into(),
        ttl_secs: cfg.ttl.as_secs(),
        source: None,
    };
    let mut last = String::new();
    for attempt in 0..JOIN_ATTEMPTS {
        match postern_dial::web::join(&cfg.proxy, &cfg.trust, &req).await {
            Ok(r) if r.error.is_empty() => return identity(cfg, &key, r, Some(&pin)),
            Ok(r) if r.status >= 500 => last = r.error,
            Ok(r) => return Err(BotError::Refused(r.error)),
            Err(e) => last = e.to_string(),
        }
        warn!(attempt, error = %last, "bot join attempt failed: retrying");
        tokio::time::sleep(Duration::from_millis(250) * (attempt + 1)).await;
    }
    Err(BotError::Unreachable(last))
}

/// One renewal of `current` (same key).
pub async fn renew(cfg: &BotConfig, current: &IdentityFile) -> Result<IdentityFile, RenewError> {
    let key = PrivateKey::from_openssh(&current.private_key)
        .map_err(|e| RenewError::Final(BotError::BadIdentity(format!("private_key: {e}"))))?;
    let req = RenewRequest {
        cluster: cfg.cluster.clone(),
        renew_cert: current.ssh_cert.trim().to_owned(),
        source: None,
        ttl_secs: cfg.ttl.as_secs(),
    };
    match postern_dial::web::renew(&cfg.proxy, &cfg.trust, &req).await {
        Ok(r) if r.error.is_empty() => identity(cfg, &key, r, None).map_err(RenewError::Final),
        Ok(r) if r.status >= 500 => Err(RenewError::Retry(r.error)),
        Ok(r) => Err(RenewError::Final(BotError::Refused(r.error))),
        Err(e) => Err(RenewError::Retry(e.to_string())),
    }
}

/// How a renewal failed.
#[derive(Debug)]
pub enum RenewError {
    /// The cluster was unreachable or busy: try again.
    Retry(String),
    /// Refused or unusable: the bot stops.
    Final(BotError),
}

/// Renews, retrying transient failures (1 s to 30 s apart) until `current` expires.
async fn renew_until_expiry(
    cfg: &BotConfig,
    current: &IdentityFile,
    shutdown: &CancellationToken,
) -> Result<IdentityFile, BotError> {
    let mut wait = Duration::from_secs(1);
    loop {
        match renew(cfg, current).await {
            Ok(id) => return Ok(id),
            Err(RenewError::Final(e)) => return Err(e),
            Err(RenewError::Retry(e)) => {
                if mint::now_unix() >= current.expires {
                    return Err(BotError::Unreachable(format!(
                        "{e}; the identity expired meanwhile: the bot must join again with a new token"
                    )));
                }
                warn!(error = %e, "renewal failed: retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(BotError::Unreachable("stopped while retrying a renewal".into())),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

/// The identity file from an answer, checked: a user certificate for `key`, and, at a join,
/// a host CA whose pin is `pin` (what clients verify proxies with).
fn identity(
    cfg: &BotConfig,
    key: &PrivateKey,
    r: LoginResponse,
    pin: Option<&[u8; 32]>,
) -> Result<IdentityFile, BotError> {
    let bad = |s: String| BotError::BadIdentity(s);
    let cert = Certificate::from_openssh(r.ssh_cert.trim()).map_err(|e| bad(e.to_string()))?;
    if cert.public_key() != key.public_key().key_data() {
        return Err(bad(
            "the certificate is for another key than the bot's".into()
        ));
    }
    if let Some(pin) = pin {
        let pinned = r.ssh_host_cas.iter().any(|line| {
            PublicKey::from_openssh(line.trim())
                .is_ok_and(|k| k.fingerprint(HashAlg::Sha256).as_bytes() == pin)
        });
        if !pinned {
            return Err(bad(format!(
                "the cluster's host CA does not match ca_pin {}: check it against `pctl status`",
                tunnel_proto::join::ca_pin(pin)
            )));
        }
    }
    let user = cert
        .valid_principals()
        .first()
        .cloned()
        .ok_or_else(|| bad("the certificate names no user".into()))?;
    Ok(IdentityFile {
        version: IDENTITY_VERSION,
        cluster: cfg.cluster.clone(),
        user,
        expires: r.expires,
        private_key: key
            .to_openssh(LineEnding::LF)
            .map_err(|e| bad(e.to_string()))?
            .to_string(),
        ssh_cert: r.ssh_cert,
        tls_cert: r.tls_cert,
        tls_cas: r.tls_cas,
        ssh_host_cas: r.ssh_host_cas,
    })
}

/// Writes the identity file 0600 atomically (temporary file, fsync, rename).
fn save(cfg: &BotConfig, id: &IdentityFile) -> Result<(), BotError> {
    mint::write_file_atomic(&cfg.out, id.to_toml().as_bytes(), 0o600).map_err(|e| BotError::Save {
        path: cfg.out.display().to_string(),
        detail: format!("{e} (the previous identity file is kept)"),
    })
}
