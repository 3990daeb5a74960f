//! Certificate rules: which OpenSSH certificate means what, and the checks russh leaves to us.
//!
//! russh checks only a certificate's own signature and validity window. Postern also checks that
//! the signing CA is one this cluster trusts, the certificate type, the principals against the
//! login, the Postern extensions, and that no critical option it cannot honour is present.
//!
//! | who | cert type | principal | extensions | login |
//! |---|---|---|---|---|
//! | agent | host | `<host-id>.<cluster>` | `postern-cluster@postern=<cluster>`, `postern-role@postern=auth` (the Auth server's agent) or `service` | `@agent/<host-id>.<cluster>` |
//! | client | user | the user name | none required; `postern-roles@postern` (roles), `postern-request@postern` (the access request its elevated roles come from) when issued by the Auth server | the user name |
//! | proxy | host | every name clients dial it by | none required | — |

pub use russh::keys::ssh_key::{
    Certificate, Fingerprint, HashAlg, PublicKey, certificate::CertType,
};

use crate::names::{EXT_CLUSTER, EXT_ROLE, ROLE_AUTH, ROLE_SERVICE};

/// Why a certificate was refused. `reason()` gives the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// A plain public key was offered where a certificate is required.
    #[error(
        "a plain public key was offered: Postern requires a certificate signed by the cluster's CA"
    )]
    NoCertificate,
    /// The certificate was signed by a CA this cluster does not trust.
    #[error("certificate signed by an untrusted CA ({0})")]
    UntrustedCa(String),
    /// The certificate's signature does not verify against its CA key.
    #[error("certificate signature does not verify")]
    BadSignature,
    /// `now` is at or past `valid_before`.
    #[error("certificate expired at {valid_before} (unix time; now {now})")]
    Expired {
        /// End of the validity window.
        valid_before: u64,
        /// The time of the check.
        now: u64,
    },
    /// `now` is before `valid_after`.
    #[error("certificate not valid before {valid_after} (unix time; now {now})")]
    NotYetValid {
        /// Start of the validity window.
        valid_after: u64,
        /// The time of the check.
        now: u64,
    },
    /// A user certificate was presented for an agent login, or the reverse.
    #[error("{got} certificate presented where a {expected} certificate is required")]
    WrongType {
        /// The type this login requires.
        expected: &'static str,
        /// The type presented.
        got: &'static str,
    },
    /// No principal of the certificate matches the login or host name.
    #[error("certificate principals {principals:?} do not include '{wanted}'")]
    PrincipalMismatch {
        /// The name that had to be listed.
        wanted: String,
        /// What the certificate lists.
        principals: Vec<String>,
    },
    /// A Postern extension is absent.
    #[error("host certificate lacks the extension {0}")]
    MissingExtension(&'static str),
    /// The cluster extension names another cluster than the principal and CA do.
    #[error("certificate is for cluster '{got}', not '{expected}'")]
    ClusterMismatch {
        /// The cluster of the login and CA.
        expected: String,
        /// The cluster in the extension.
        got: String,
    },
    /// The role extension is not one an agent may take.
    #[error("certificate role '{0}' may not register tunnels (role must be 'auth' or 'service')")]
    WrongRole(String),
    /// A critical option Postern cannot enforce is present (OpenSSH would refuse it too).
    #[error("certificate has critical option '{0}', which Postern does not support")]
    UnsupportedCriticalOption(String),
}

impl CertError {
    /// Short label for the `reason` of `postern_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            CertError::NoCertificate => "no_certificate",
            CertError::UntrustedCa(_) => "untrusted_ca",
            CertError::BadSignature => "bad_signature",
            CertError::Expired { .. } => "expired",
            CertError::NotYetValid { .. } => "not_yet_valid",
            CertError::WrongType { .. } => "wrong_cert_type",
            CertError::PrincipalMismatch { .. } => "principal_mismatch",
            CertError::MissingExtension(_) => "missing_extension",
            CertError::ClusterMismatch { .. } => "cluster_mismatch",
            CertError::WrongRole(_) => "wrong_role",
            CertError::UnsupportedCriticalOption(_) => "critical_option",
        }
    }
}

/// SHA-256 fingerprint of a CA public key, as trust lists hold them.
pub fn ca_fingerprint(key: &PublicKey) -> Fingerprint {
    key.fingerprint(HashAlg::Sha256)
}

/// SHA-256 fingerprint of the CA that signed `cert`.
pub fn signer_fingerprint(cert: &Certificate) -> Fingerprint {
    cert.signature_key().fingerprint(HashAlg::Sha256)
}

/// What an accepted agent certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The agent's host id (principal before the cluster).
    pub host_id: String,
    /// The cluster it serves.
    pub cluster: String,
    /// Its role extension: `auth` (the Auth server's own agent, which alone may register the
    /// reserved targets) or `service`.
    pub role: String,
}

fn type_name(t: CertType) -> &'static str {
    match t {
        CertType::Host => "host",
        CertType::User => "user",
    }
}

/// The checks common to every certificate: trusted CA, signature, window, type, principal.
fn check_common(
    cert: &Certificate,
    now: u64,
    trusted: &[Fingerprint],
    expected: CertType,
    principal: &str,
) -> Result<(), CertError> {
    let signer = signer_fingerprint(cert);
    if !trusted.contains(&signer) {
        return Err(CertError::UntrustedCa(signer.to_string()));
    }
    cert.verify_signature()
        .map_err(|_| CertError::BadSignature)?;
    if now < cert.valid_after() {
        return Err(CertError::NotYetValid {
            valid_after: cert.valid_after(),
            now,
        });
    }
    if now >= cert.valid_before() {
        return Err(CertError::Expired {
            valid_before: cert.valid_before(),
            now,
        });
    }
    if cert.cert_type() != expected {
        return Err(CertError::WrongType {
            expected: type_name(expected),
            got: type_name(cert.cert_type()),
        });
    }
    // An empty principal list means "any principal" to OpenSSH; Postern never accepts that.
    if !cert.valid_principals().iter().any(|p| p == principal) {
        return Err(CertError::PrincipalMismatch {
            wanted: principal.to_owned(),
            principals: cert.valid_principals().to_vec(),
        });
    }
    if let Some((name, _)) = cert.critical_options().iter().next() {
        return Err(CertError::UnsupportedCriticalOption(name.clone()));
    }
    Ok(())
}

/// Checks an agent's host certificate for the login principal `<host-id>.<cluster>`.
///
/// `trusted` holds the fingerprints of the cluster's host CA keys (several while rotating).
pub fn check_agent_cert(
    cert: &Certificate,
    host_id: &str,
    cluster: &str,
    now: u64,
    trusted: &[Fingerprint],
) -> Result<AgentIdentity, CertError> {
    let principal = crate::names::agent_principal(host_id, cluster);
    check_common(cert, now, trusted, CertType::Host, &principal)?;
    let ext_cluster = cert
        .extensions()
        .get(EXT_CLUSTER)
        .ok_or(CertError::MissingExtension(EXT_CLUSTER))?;
    if ext_cluster != cluster {
        return Err(CertError::ClusterMismatch {
            expected: cluster.to_owned(),
            got: ext_cluster.clone(),
        });
    }
    let role = cert
        .extensions()
        .get(EXT_ROLE)
        .ok_or(CertError::MissingExtension(EXT_ROLE))?;
    if role != ROLE_AUTH && role != ROLE_SERVICE {
        return Err(CertError::WrongRole(role.clone()));
    }
    Ok(AgentIdentity {
        host_id: host_id.to_owned(),
        cluster: cluster.to_owned(),
        role: role.clone(),
    })
}

/// Checks a client's user certificate for the login `user`.
pub fn check_user_cert(
    cert: &Certificate,
    user: &str,
    now: u64,
    trusted: &[Fingerprint],
) -> Result<(), CertError> {
    check_common(cert, now, trusted, CertType::User, user)
}

/// Checks a proxy's host certificate, as an agent or client dialling `host` sees it.
pub fn check_proxy_cert(
    cert: &Certificate,
    host: &str,
    now: u64,
    trusted: &[Fingerprint],
) -> Result<(), CertError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    check_common(cert, now, trusted, CertType::Host, host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::{Algorithm, PrivateKey, certificate::Builder};

    const NOW: u64 = 1_800_000_000;

    fn key() -> PrivateKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
    }

    struct Mint<'a> {
        ca: &'a PrivateKey,
        kind: CertType,
        principals: Vec<&'a str>,
        ext: Vec<(&'a str, &'a str)>,
        crit: Vec<(&'a str, &'a str)>,
        window: (u64, u64),
    }

    impl Mint<'_> {
        fn sign(&self) -> Certificate {
            let subject = key();
            let mut b = Builder::new_with_random_nonce(
                &mut rand::rng(),
                subject.public_key(),
                self.window.0,
                self.window.1,
            )
            .unwrap();
            b.cert_type(self.kind).unwrap();
            for p in &self.principals {
                b.valid_principal(*p).unwrap();
            }
            for (k, v) in &self.ext {
                b.extension(*k, *v).unwrap();
            }
            for (k, v) in &self.crit {
                b.critical_option(*k, *v).unwrap();
            }
            b.sign(self.ca).unwrap()
        }
    }

    fn agent_mint(ca: &PrivateKey) -> Mint<'_> {
        Mint {
            ca,
            kind: CertType::Host,
            principals: vec!["h1.example"],
            ext: vec![(EXT_CLUSTER, "example"), (EXT_ROLE, "auth")],
            crit: vec![],
            window: (NOW - 60, NOW + 3600),
        }
    }

    #[test]
    fn agent_cert_rules() {
        let ca = key();
        let other = key();
        let fp = [ca_fingerprint(ca.public_key())];
        let ok = agent_mint(&ca).sign();
        assert_eq!(
            check_agent_cert(&ok, "h1", "example", NOW, &fp)
                .unwrap()
                .role,
            "auth"
        );
        let err = |c: &Certificate| check_agent_cert(c, "h1", "example", NOW, &fp).unwrap_err();
        assert_eq!(err(&agent_mint(&other).sign()).reason(), "untrusted_ca");
        let mut m = agent_mint(&ca);
        m.window = (NOW - 100, NOW - 1);
        assert_eq!(err(&m.sign()).reason(), "expired");
        m.window = (NOW + 10, NOW + 100);
        assert_eq!(err(&m.sign()).reason(), "not_yet_valid");
        let mut m = agent_mint(&ca);
        m.kind = CertType::User;
        assert_eq!(err(&m.sign()).reason(), "wrong_cert_type");
        let mut m = agent_mint(&ca);
        m.principals = vec!["h2.example"];
        assert_eq!(err(&m.sign()).reason(), "principal_mismatch");
        let mut m = agent_mint(&ca);
        m.ext = vec![(EXT_ROLE, "auth")];
        assert_eq!(err(&m.sign()).reason(), "missing_extension");
        m.ext = vec![(EXT_CLUSTER, "example")];
        assert_eq!(err(&m.sign()).reason(), "missing_extension");
        m.ext = vec![(EXT_CLUSTER, "other"), (EXT_ROLE, "auth")];
        assert_eq!(err(&m.sign()).reason(), "cluster_mismatch");
        m.ext = vec![(EXT_CLUSTER, "example"), (EXT_ROLE, "proxy")];
        assert_eq!(err(&m.sign()).reason(), "wrong_role");
        m.ext = vec![(EXT_CLUSTER, "example"), (EXT_ROLE, "service")];
        let service = check_agent_cert(&m.sign(), "h1", "example", NOW, &fp).unwrap();
        assert_eq!(service.role, "service");
        let mut m = agent_mint(&ca);
        m.crit = vec![("force-command", "/bin/true")];
        assert_eq!(err(&m.sign()).reason(), "critical_option");
    }

    #[test]
    fn user_and_proxy_cert_rules() {
        let ca = key();
        let fp = [ca_fingerprint(ca.public_key())];
        let user = Mint {
            ca: &ca,
            kind: CertType::User,
            principals: vec!["alice"],
            ext: vec![],
            crit: vec![],
            window: (NOW - 1, NOW + 1),
        };
        let cert = user.sign();
        check_user_cert(&cert, "alice", NOW, &fp).unwrap();
        assert_eq!(
            check_user_cert(&cert, "bob", NOW, &fp)
                .unwrap_err()
                .reason(),
            "principal_mismatch"
        );
        assert_eq!(
            check_user_cert(&cert, "alice", NOW + 1, &fp)
                .unwrap_err()
                .reason(),
            "expired"
        );
        let host = agent_mint(&ca).sign();
        assert_eq!(
            check_user_cert(&host, "h1.example", NOW, &fp)
                .unwrap_err()
                .reason(),
            "wrong_cert_type"
        );
        let mut proxy = agent_mint(&ca);
        proxy.principals = vec!["localhost", "::1"];
        proxy.ext = vec![];
        let proxy = proxy.sign();
        check_proxy_cert(&proxy, "localhost", NOW, &fp).unwrap();
        check_proxy_cert(&proxy, "[::1]", NOW, &fp).unwrap();
        assert!(check_proxy_cert(&proxy, "evil.example", NOW, &fp).is_err());
    }
}
