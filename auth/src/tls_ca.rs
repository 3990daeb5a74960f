//! The cluster's TLS CA: an ECDSA P-256 key, the key type every mainstream TLS stack offers
//! (BoringSSL, under Python's and C++'s gRPC, offers no Ed25519 signature in its ClientHello), and
//! the one-time migration of a cluster created with an Ed25519 TLS CA.
//!
//! The migration runs at Auth start, once, in one storage transaction: a new P-256 CA key and
//! certificate replace the Ed25519 ones, and two certificates are kept beside them:
//! - the **legacy CA certificate**, still in the server's client-certificate roots, so client
//!   certificates the old CA issued keep working until they expire;
//! - a **cross certificate**: the new CA's name and key signed by the old CA key, sent after the
//!   server's own certificate, so a client holding only the old CA (an identity file issued before
//!   the migration) still verifies the server. A client holding the new CA stops at its anchor.
//!
//! The old CA's private key is not kept: it signs the cross certificate once and is dropped.

use postern_dial::mint;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tracing::info;

use crate::authority::AuthorityError;
use crate::storage::Backend;

/// Meta keys the TLS CA is stored under.
pub(crate) mod keys {
    /// The CA's private key (PKCS#8 PEM).
    pub const KEY: &str = "tls_ca_key";
    /// The CA's certificate (PEM).
    pub const CERT: &str = "tls_ca_cert";
    /// The Ed25519 CA certificate a migrated cluster had (PEM); absent on clusters created P-256.
    pub const LEGACY_CERT: &str = "tls_ca_legacy_cert";
    /// The current CA's name and key signed by the legacy CA key (PEM).
    pub const CROSS_CERT: &str = "tls_ca_cross_cert";
}

/// Lifetime of the TLS CA certificate.
const LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

/// The loaded TLS CA.
pub(crate) struct TlsCa {
    /// The CA key (P-256 once migrated).
    pub key: KeyPair,
    /// The CA certificate (PEM).
    pub cert_pem: String,
    /// The legacy CA certificate (PEM), on a migrated cluster.
    pub legacy_pem: Option<String>,
    /// The cross certificate (PEM), on a migrated cluster.
    pub cross_pem: Option<String>,
}

/// The CA's certificate parameters: the same name before and after a migration, so a cross
/// certificate chains by name.
pub(crate) fn ca_params(cluster: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Postern TLS CA of {cluster}"));
    dn.push(DnType::OrganizationName, cluster);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn issue(e: impl std::fmt::Display) -> AuthorityError {
    AuthorityError::Issue(e.to_string())
}

fn corrupt(what: &'static str) -> impl Fn(String) -> AuthorityError {
    move |message| AuthorityError::Corrupt { what, message }
}

/// A new P-256 CA for `cluster`: its key and self-signed certificate (PEM), valid from a little
/// before now.
pub(crate) fn generate(cluster: &str, backdate: u64) -> Result<(KeyPair, String), AuthorityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(issue)?;
    let mut params = ca_params(cluster);
    let now = mint::now_unix();
    params.not_before = crate::authority::stamp(now - backdate);
    params.not_after = crate::authority::stamp(now + LIFETIME_SECS);
    let cert = params.self_signed(&key).map_err(issue)?;
    Ok((key, cert.pem()))
}

fn text(b: &dyn Backend, key: &'static str) -> Result<Option<String>, AuthorityError> {
    match b.meta(key)? {
        None => Ok(None),
        Some(v) => String::from_utf8(v)
            .map(Some)
            .map_err(|e| corrupt(key)(e.to_string())),
    }
}

/// Loads the TLS CA, migrating an Ed25519 one to P-256 first (see the module doc).
pub(crate) fn load(b: &dyn Backend, cluster: &str, backdate: u64) -> Result<TlsCa, AuthorityError> {
    let key_pem = text(b, keys::KEY)?.ok_or_else(|| corrupt(keys::KEY)("missing".into()))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| corrupt(keys::KEY)(e.to_string()))?;
    if key.algorithm() == &PKCS_ED25519 {
        let old_pem = text(b, keys::CERT)?.ok_or_else(|| corrupt(keys::CERT)("missing".into()))?;
        let (new_key, new_pem) = generate(cluster, backdate)?;
        let mut cross = ca_params(cluster);
        let now = mint::now_unix();
        cross.not_before = crate::authority::stamp(now - backdate);
        cross.not_after = crate::authority::stamp(now + LIFETIME_SECS);
        let cross = cross
            .signed_by(&new_key, &Issuer::new(ca_params(cluster), &key))
            .map_err(issue)?;
        // Guarded by the legacy key: of two racing starts, one migrates and the other reloads.
        let wrote = b.init_meta(
            keys::LEGACY_CERT,
            &[
                (keys::KEY, new_key.serialize_pem().into_bytes()),
                (keys::CERT, new_pem.into_bytes()),
                (keys::LEGACY_CERT, old_pem.into_bytes()),
                (keys::CROSS_CERT, cross.pem().into_bytes()),
            ],
        )?;
        if wrote {
            info!(
                cluster,
                "TLS CA migrated from Ed25519 to ECDSA P-256; certificates of the old CA stay trusted until they expire"
            );
        }
        return load(b, cluster, backdate);
    }
    Ok(TlsCa {
        key,
        cert_pem: text(b, keys::CERT)?.ok_or_else(|| corrupt(keys::CERT)("missing".into()))?,
        legacy_pem: text(b, keys::LEGACY_CERT)?,
        cross_pem: text(b, keys::CROSS_CERT)?,
    })
}

/// A PEM certificate as DER.
pub(crate) fn der(
    pem: &str,
    what: &'static str,
) -> Result<CertificateDer<'static>, AuthorityError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| corrupt(what)(e.to_string()))
}

/// A TLS CA that signs: its key and its certificate.
pub struct TlsSigner {
    /// The CA key.
    pub key: KeyPair,
    /// The CA certificate (PEM).
    pub cert_pem: String,
}

impl TlsSigner {
    /// The rotation state's text of this CA: the key's PEM, then the certificate's.
    pub(crate) fn material(&self) -> String {
        format!("{}{}", self.key.serialize_pem(), self.cert_pem)
    }

    /// Parses [`TlsSigner::material`].
    pub(crate) fn parse(text: &str) -> Result<TlsSigner, String> {
        let at = text
            .find("-----BEGIN CERTIFICATE-----")
            .ok_or("no CA certificate after the key")?;
        let key = KeyPair::from_pem(&text[..at]).map_err(|e| e.to_string())?;
        Ok(TlsSigner {
            key,
            cert_pem: text[at..].to_string(),
        })
    }

    /// A new CA for `cluster` (a TLS CA rotation's next key).
    pub(crate) fn generate(cluster: &str, backdate: u64) -> Result<TlsSigner, AuthorityError> {
        let (key, cert_pem) = generate(cluster, backdate)?;
        Ok(TlsSigner { key, cert_pem })
    }
}

/// The certificate part of [`TlsSigner::material`] (what a completed rotation keeps of the old CA).
pub(crate) fn material_cert(text: &str) -> Option<String> {
    text.find("-----BEGIN CERTIFICATE-----")
        .map(|at| text[at..].to_string())
}

/// The TLS CA as a rotation phase leaves it (see [`crate::rotation`]): which CA signs client
/// certificates, which signs the Auth server's own, and which are trusted.
#[derive(Clone)]
pub struct TlsCaKeys {
    /// Signs client certificates (the new CA from `update_clients` on).
    pub(crate) client: std::sync::Arc<TlsSigner>,
    /// Signs the Auth server's serving certificate (the new CA from `update_servers` on).
    pub(crate) server: std::sync::Arc<TlsSigner>,
    /// Every trusted CA certificate (PEM), the client signer's first: what identity files carry
    /// and what client certificates may chain to.
    pub trusted: Vec<String>,
    /// A migrated cluster's Ed25519 CA certificate (PEM): also a client-certificate root.
    pub(crate) legacy: Option<String>,
    /// The cross certificate sent after a serving certificate of the migrated CA (PEM).
    pub(crate) cross: Option<String>,
    /// The CA the last completed rotation retired, or the last rollback dropped (PEM): its client
    /// certificates are refused with a reason saying so.
    pub retired: Option<String>,
    /// The rotation phase.
    pub phase: crate::rotation::Phase,
}

impl TlsCaKeys {
    /// The keys of a TLS CA rotation state: `current`, `next` during a rotation; the legacy CA
    /// and cross certificate (`migrated`) are kept until a rotation completes, the cross
    /// certificate only while the migrated CA serves.
    pub(crate) fn build(
        current: TlsSigner,
        next: Option<TlsSigner>,
        phase: crate::rotation::Phase,
        migrated: Option<&(String, String)>,
        retired: Option<String>,
    ) -> TlsCaKeys {
        use crate::rotation::Phase;
        let current = std::sync::Arc::new(current);
        let next = next.map(std::sync::Arc::new);
        let pick = |new: bool| match (&next, new) {
            (Some(n), true) => n.clone(),
            _ => current.clone(),
        };
        let client = pick(matches!(phase, Phase::UpdateClients | Phase::UpdateServers));
        let server = pick(phase == Phase::UpdateServers);
        let mut trusted = vec![client.cert_pem.clone()];
        for s in std::iter::once(&current).chain(next.iter()) {
            if !trusted.contains(&s.cert_pem) {
                trusted.push(s.cert_pem.clone());
            }
        }
        let server_is_current = std::sync::Arc::ptr_eq(&server, &current);
        TlsCaKeys {
            client,
            server,
            trusted,
            legacy: migrated.map(|(l, _)| l.clone()),
            cross: migrated
                .filter(|_| server_is_current)
                .map(|(_, c)| c.clone()),
            retired,
            phase,
        }
    }
}
