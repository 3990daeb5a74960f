//! The first start with a join token: the agent makes its key locally, presents the token and
//! its public key to the Auth server **through the proxy's web listener** (`POST /webapi/join`,
//! relayed over the cluster's tunnel), checks the host certificate it gets against its CA pin,
//! and saves key and certificate (both 0600).
//!
//! A refused join (a wrong, used or expired token, a token of another kind) or a certificate
//! from a CA other than the pinned one stops the agent with one message; only an unreachable
//! proxy or Auth server is retried.

use std::time::Duration;

use postern_dial::DialError;
use postern_dial::mint;
use russh::keys::HashAlg;
use russh::keys::ssh_key::Certificate;
use russh::keys::ssh_key::certificate::CertType;
use tracing::{info, warn};
use tunnel_proto::join::JoinRequest;

use crate::config::AgentConfig;
use crate::failure::utc;

pub use tunnel_proto::join::parse_pin;

/// Attempts to reach the proxy and the Auth server before giving up on a join.
const JOIN_ATTEMPTS: u32 = 8;

/// Why a join failed. Each is final: the agent exits.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The token file cannot be read or is empty.
    #[error("join token file {path}: {detail}")]
    TokenFile {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The Auth server refused the join (its words: a used, expired, unknown token, or a
    /// token of another kind).
    #[error("the cluster refused to join this agent: {0}")]
    Refused(String),
    /// The certificate is not signed by the CA the pin names: the proxy or the answer is not
    /// the cluster's.
    #[error(
        "CA pin mismatch: the certificate received is signed by a CA with pin {got}, but ca_pin is {want}: check ca_pin against `pctl status` on the cluster, and that `proxy` is the cluster's proxy"
    )]
    PinMismatch {
        /// The pin of the CA that signed what came back.
        got: String,
        /// The configured pin.
        want: String,
    },
    /// The certificate received is not a valid host certificate for this agent's key and name.
    #[error("the certificate received is unusable: {0}")]
    BadCertificate(String),
    /// The proxy or the Auth server could not be reached after several attempts.
    #[error("could not reach the cluster to join after {attempts} attempts: {last}")]
    Unreachable {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// The key or certificate could not be saved.
    #[error("cannot save the agent's identity: {0}")]
    Save(String),
}

/// Joins the cluster with the token in `join_token_file` and writes `host_key_file` and the
/// host certificate. Returns when both are on disk.
pub async fn join(config: &AgentConfig) -> Result<(), JoinError> {
    let token_path = config
        .join_token_file
        .as_ref()
        .expect("validated: join() needs join_token_file");
    let token_file = |detail: String| JoinError::TokenFile {
        path: token_path.display().to_string(),
        detail,
    };
    let token = std::fs::read_to_string(token_path).map_err(|e| token_file(e.to_string()))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(token_file("the file is empty".into()));
    }
    let want = parse_pin(config.ca_pin.as_deref().unwrap_or_default())
        .map_err(|e| JoinError::Save(format!("ca_pin: {e}")))?;
    let web = config
        .proxy
        .as_deref()
        .expect("validated: joining needs proxy");
    let trust = crate::tunnel::web_trust(config).map_err(|e| JoinError::Unreachable {
        attempts: 0,
        last: e.to_string(),
    })?;
    let key = mint::generate_key();
    let req = JoinRequest {
        cluster: config.cluster.clone(),
        host_id: config.host_id.clone(),
        token,
        ca_pin: tunnel_proto::join::ca_pin(&want),
        public_key: key
            .public_key()
            .to_openssh()
            .map_err(|e| JoinError::Save(e.to_string()))?,
        source: None,
        ..Default::default()
    };
    info!(proxy = web, cluster = %config.cluster, host_id = %config.host_id, "joining the cluster with a token");
    let mut last = String::new();
    let mut answer = None;
    for attempt in 0..JOIN_ATTEMPTS {
        match postern_dial::web::join(web, &trust, &req).await {
            Ok(resp) if resp.error.is_empty() => {
                answer = Some(resp);
                break;
            }
            // 5xx: the Auth server is unreachable through the proxy, or busy: retry.
            Ok(resp) if resp.status >= 500 => last = resp.error,
            Ok(resp) => return Err(JoinError::Refused(resp.error)),
            Err(e @ (DialError::Config(_) | DialError::NotAPostern { .. })) => {
                return Err(JoinError::Unreachable {
                    attempts: attempt + 1,
                    last: e.to_string(),
                });
            }
            Err(e) => last = e.to_string(),
        }
        warn!(attempt, error = %last, "join attempt failed: retrying");
        let wait =
            crate::backoff_ceiling(Duration::from_millis(250), Duration::from_secs(5), attempt);
        tokio::time::sleep(crate::full_jitter(wait) + Duration::from_millis(50)).await;
    }
    let Some(resp) = answer else {
        return Err(JoinError::Unreachable {
            attempts: JOIN_ATTEMPTS,
            last,
        });
    };
    let cert = Certificate::from_openssh(resp.ssh_cert.trim())
        .map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    check_joined_cert(&cert, &want, config, key.public_key())?;
    mint::write_key_pair(&config.host_key_file, &key)
        .map_err(|e| JoinError::Save(e.to_string()))?;
    let line = cert
        .to_openssh()
        .map_err(|e| JoinError::Save(e.to_string()))?;
    mint::write_file_atomic(
        &config.host_cert_path(),
        format!("{line}\n").as_bytes(),
        0o600,
    )
    .map_err(|e| JoinError::Save(e.to_string()))?;
    info!(
        cluster = %config.cluster,
        host_id = %config.host_id,
        expires = %utc(cert.valid_before()),
        key = %config.host_key_file.display(),
        "joined: host certificate saved (the token is spent; it is not needed again)"
    );
    Ok(())
}

/// Checks a certificate received at a join: signed by the pinned CA (signature verified), a
/// host certificate for this key and `<host_id>.<cluster>`, valid now.
pub fn check_joined_cert(
    cert: &Certificate,
    pin: &[u8; 32],
    config: &AgentConfig,
    key: &russh::keys::ssh_key::PublicKey,
) -> Result<(), JoinError> {
    let signer = cert.signature_key().fingerprint(HashAlg::Sha256);
    if signer.as_bytes() != pin {
        return Err(JoinError::PinMismatch {
            got: tunnel_proto::join::ca_pin(signer.as_bytes()),
            want: tunnel_proto::join::ca_pin(pin),
        });
    }
    cert.validate_at(mint::now_unix(), [&signer])
        .map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    if cert.cert_type() != CertType::Host {
        return Err(JoinError::BadCertificate("not a host certificate".into()));
    }
    if cert.public_key() != key.key_data() {
        return Err(JoinError::BadCertificate(
            "it is for another key than the one this agent made".into(),
        ));
    }
    let principal = tunnel_proto::names::agent_principal(&config.host_id, &config.cluster);
    if !cert.valid_principals().contains(&principal) {
        return Err(JoinError::BadCertificate(format!(
            "it does not list {principal}"
        )));
    }
    Ok(())
}
