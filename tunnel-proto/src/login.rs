//! The login relay's JSON: `psh login` posts a [`LoginRequest`] to the proxy's
//! `POST /webapi/login`; the proxy passes it, as one line, down a stream to target `login` of the
//! cluster (served by the Auth server's agent) and returns the one-line [`LoginResponse`].

use serde::{Deserialize, Serialize};

/// The web path of the login relay.
pub const LOGIN_PATH: &str = "/webapi/login";
/// The target name the Auth server's agent registers for logins.
pub const LOGIN_TARGET: &str = "login";
/// Largest request or response line, bytes.
pub const MAX_LOGIN_BYTES: usize = 64 * 1024;
/// Longest user name a login may carry, bytes (the Auth server's resource names are 1–64
/// characters); longer ones are refused at the proxy and at the Auth server before any lookup.
pub const MAX_USER_LEN: usize = 64;

/// A login. `Debug` masks the secret and the passwords.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// The cluster to log in to.
    pub cluster: String,
    /// The user.
    pub user: String,
    /// First login: the one-time signup secret from `pctl users add`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// First login: the password to set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_password: Option<String>,
    /// Later logins: the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// OpenSSH public key line the certificates are for (the private key never leaves the user).
    pub public_key: String,
    /// Requested lifetime, seconds (0: the roles' cap).
    #[serde(default)]
    pub ttl_secs: u64,
    /// The client's address as the proxy saw it (set by the proxy; ignored from clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masked = |v: &Option<String>| v.as_ref().map(|_| "MASKED");
        f.debug_struct("LoginRequest")
            .field("cluster", &self.cluster)
            .field("user", &self.user)
            .field("secret", &masked(&self.secret))
            .field("new_password", &masked(&self.new_password))
            .field("password", &masked(&self.password))
            .field("ttl_secs", &self.ttl_secs)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoginResponse {
    /// Empty on success; else why the login failed.
    #[serde(default)]
    pub error: String,
    /// HTTP status the proxy answers with (200, 400, 401, 429, 502, ...).
    #[serde(default)]
    pub status: u16,
    /// The cluster.
    #[serde(default)]
    pub cluster: String,
    /// OpenSSH user certificate line.
    #[serde(default)]
    pub ssh_cert: String,
    /// PEM TLS client certificate.
    #[serde(default)]
    pub tls_cert: String,
    /// PEM certificates of the cluster's TLS CA.
    #[serde(default)]
    pub tls_cas: Vec<String>,
    /// OpenSSH lines of the cluster's host CA.
    #[serde(default)]
    pub ssh_host_cas: Vec<String>,
    /// Unix seconds.
    #[serde(default)]
    pub expires: u64,
    /// The user's roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// With status 503 or 429: seconds to wait before retrying (the proxy sends it as
    /// `Retry-After`); 0 means no advice.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_after_secs: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl LoginResponse {
    /// A failure with `status` and a message.
    pub fn failed(status: u16, error: impl Into<String>) -> LoginResponse {
        LoginResponse {
            status,
            error: error.into(),
            ..Default::default()
        }
    }

    /// A "busy, retry" answer: 503 with a `Retry-After` of `secs`.
    pub fn busy(secs: u64, error: impl Into<String>) -> LoginResponse {
        LoginResponse {
            status: 503,
            error: error.into(),
            retry_after_secs: secs,
            ..Default::default()
        }
    }
}
