//! Joining and renewing through the proxy's web listener: an agent with no certificate posts a
//! [`JoinRequest`] to `POST /webapi/join`; the proxy relays it, as one line, down a stream to
//! target `login` of the cluster (as it relays logins), and returns the one-line
//! [`crate::login::LoginResponse`] (the host certificate in `ssh_cert`, the host CA in
//! `ssh_host_cas`). The agent then checks that certificate against its CA pin ([`ca_pin`]).

use serde::{Deserialize, Serialize};

/// The web path of the join relay.
pub const JOIN_PATH: &str = "/webapi/join";
/// Prefix of a CA pin.
pub const PIN_PREFIX: &str = "sha256:";

/// A join: the token (its secret) and the public key the host certificate is for. `Debug`
/// masks the token. A Machine ID bot joins the same way with `kind = "bot"` and gets a user
/// identity instead of a host certificate.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The cluster to join.
    pub cluster: String,
    /// The agent's host id (its certificate's principal is `<host_id>.<cluster>`).
    pub host_id: String,
    /// The join token's secret.
    pub token: String,
    /// OpenSSH public-key line (ssh-ed25519) the certificate is for.
    pub public_key: String,
    /// The CA pin the agent was given: the Auth server refuses the join before spending the
    /// token when it is not the pin of its host CA (the agent checks the certificate too).
    pub ca_pin: String,
    /// The agent's address as the proxy saw it (set by the proxy; ignored from agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What joins: empty or [`KIND_AGENT`] for an agent, [`KIND_BOT`] for a Machine ID bot.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// A bot's wanted identity lifetime, seconds (0: the Auth server's choice); capped by the
    /// roles' `max_session_ttl`. Ignored for agents.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ttl_secs: u64,
}

/// [`JoinRequest::kind`] of an agent.
pub const KIND_AGENT: &str = "agent";
/// [`JoinRequest::kind`] of a Machine ID bot.
pub const KIND_BOT: &str = "bot";

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("cluster", &self.cluster)
            .field("host_id", &self.host_id)
            .field("kind", &self.kind)
            .field("token", &"MASKED")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The web path of certificate renewal.
pub const RENEW_PATH: &str = "/webapi/renew";

/// A renewal: the certificate in use (still valid) and nothing else. The new certificate is
/// for the same public key, so the request needs no secret: only the holder of the private key
/// can use what it returns. A locked agent, an expired certificate or one from another CA is
/// refused. A bot renews its user certificate the same way (`renew_cert` is then its SSH user
/// certificate).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The cluster.
    pub cluster: String,
    /// The OpenSSH certificate line in use.
    pub renew_cert: String,
    /// The agent's address as the proxy saw it (set by the proxy; ignored from agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A bot's wanted identity lifetime, seconds (0: as at its join); ignored for agents.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ttl_secs: u64,
}

/// The CA pin of a CA public key given as its raw SHA-256 fingerprint bytes:
/// `sha256:<64 lowercase hex digits>`.
pub fn ca_pin(sha256: &[u8]) -> String {
    let mut s = String::from(PIN_PREFIX);
    for b in sha256 {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses a CA pin into its 32 bytes; the error says what is wrong.
pub fn parse_pin(pin: &str) -> Result<[u8; 32], String> {
    let hex = pin
        .trim()
        .strip_prefix(PIN_PREFIX)
        .ok_or_else(|| format!("a CA pin starts with '{PIN_PREFIX}' (pctl status prints it)"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a CA pin is 'sha256:' and 64 hex digits (pctl status prints it)".into());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_round_trip_and_bad_ones_say_why() {
        let bytes: Vec<u8> = (0u8..32).collect();
        let pin = ca_pin(&bytes);
        assert_eq!(parse_pin(&pin).unwrap().to_vec(), bytes);
        assert!(parse_pin("sha256:00").unwrap_err().contains("64 hex"));
        assert!(parse_pin(&pin[7..]).unwrap_err().contains("starts with"));
        assert!(parse_pin(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }
}
