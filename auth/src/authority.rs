//! The cluster's certificate authorities: an SSH user CA, an SSH host CA and a TLS CA, created at
//! the first start and kept in storage; and the certificates they issue.

use postern_dial::mint::{self, CertSpec};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SignatureAlgorithm,
};
use russh::keys::ssh_key::{LineEnding, PrivateKey, PublicKey};
use sha2::{Digest, Sha256};

use std::sync::RwLock;

use crate::rotation::{CaKeys, CaKind};
use crate::storage::{Backend, StorageError};
use crate::tls_ca::{self, TlsCaKeys, TlsSigner, ca_params};

/// Meta keys the authorities are stored under.
mod keys {
    pub const CLUSTER: &str = "cluster_name";
    pub const USER_CA: &str = "ssh_user_ca";
    pub const HOST_CA: &str = "ssh_host_ca";
    pub use crate::tls_ca::keys::{CERT as TLS_CA_CERT, KEY as TLS_CA_KEY};
}
/// Backdating of every certificate, to absorb clock skew between hosts.
pub(crate) const BACKDATE_SECS: u64 = 60;

/// A problem with the cluster's authorities.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// No cluster name was configured for the first start.
    #[error(
        "this data dir holds no cluster yet: give its name with --cluster (or `cluster` in auth.toml)"
    )]
    NoClusterName,
    /// The configured name differs from the stored one.
    #[error(
        "the data dir belongs to cluster '{stored}', not '{configured}': a cluster cannot be renamed"
    )]
    NameMismatch {
        /// Stored name.
        stored: String,
        /// Configured name.
        configured: String,
    },
    /// A stored key does not parse.
    #[error("stored {what} is corrupt: {message}")]
    Corrupt {
        /// Which key.
        what: &'static str,
        /// What failed.
        message: String,
    },
    /// A public key or certificate cannot be built.
    #[error("{0}")]
    Issue(String),
}

/// The loaded authorities.
pub struct Authorities {
    /// The cluster's name.
    pub cluster: String,
    /// The user CA's keys (more than one trusted during a rotation, see [`crate::rotation`]).
    user_ca: RwLock<CaKeys>,
    /// The host CA's keys.
    host_ca: RwLock<CaKeys>,
    /// The TLS CA's keys (two during a rotation).
    tls: RwLock<TlsCaKeys>,
    /// On a cluster migrated from an Ed25519 TLS CA: the old CA certificate (still trusted for
    /// client certificates until a TLS CA rotation completes) and the cross certificate sent
    /// after the server's own.
    tls_legacy: Option<(String, String)>,
    /// Counts changes of the TLS CA's keys: the API listener rebuilds its TLS config, the admin
    /// identity is re-issued.
    tls_changed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Authorities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorities")
            .field("cluster", &self.cluster)
            .field("keys", &"MASKED")
            .finish()
    }
}

/// Certificates issued for one key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// OpenSSH certificate line.
    pub ssh_cert: String,
    /// PEM TLS certificate (empty for host certificates).
    pub tls_cert: String,
    /// SHA-256 of the TLS certificate's DER (hex; empty for host certificates).
    pub tls_fingerprint: String,
    /// Unix seconds.
    pub expires: u64,
}

/// Unix seconds as a certificate time.
pub(crate) fn stamp(secs: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// An Ed25519 public key in the form rcgen signs for.
struct Ed25519Spki(Vec<u8>);

impl rcgen::PublicKeyData for Ed25519Spki {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

fn ed25519_spki(key: &PublicKey) -> Result<Ed25519Spki, AuthorityError> {
    match key.key_data().ed25519() {
        Some(k) => Ok(Ed25519Spki(k.0.to_vec())),
        None => Err(AuthorityError::Issue(format!(
            "public key must be ssh-ed25519, got {}",
            key.algorithm()
        ))),
    }
}

fn corrupt(what: &'static str) -> impl Fn(String) -> AuthorityError {
    move |message| AuthorityError::Corrupt { what, message }
}

fn load_text(b: &dyn Backend, key: &'static str) -> Result<Option<String>, AuthorityError> {
    match b.meta(key)? {
        None => Ok(None),
        Some(v) => String::from_utf8(v)
            .map(Some)
            .map_err(|e| corrupt(key)(e.to_string())),
    }
}

impl Authorities {
    /// Loads the cluster's authorities, creating them at the first start (atomically: two
    /// racing first starts end with one set).
    pub fn load_or_create(
        backend: &dyn Backend,
        configured: Option<&str>,
    ) -> Result<Authorities, AuthorityError> {
        if load_text(backend, keys::CLUSTER)?.is_none() {
            let name = configured.ok_or(AuthorityError::NoClusterName)?;
            let ssh = |k: PrivateKey| -> Result<Vec<u8>, AuthorityError> {
                Ok(k.to_openssh(LineEnding::LF)
                    .map_err(|e| AuthorityError::Issue(e.to_string()))?
                    .as_bytes()
                    .to_vec())
            };
            let (tls_key, tls_cert_pem) = tls_ca::generate(name, BACKDATE_SECS)?;
            backend.init_meta(
                keys::CLUSTER,
                &[
                    (keys::CLUSTER, name.as_bytes().to_vec()),
                    (keys::USER_CA, ssh(mint::generate_key())?),
                    (keys::HOST_CA, ssh(mint::generate_key())?),
                    (keys::TLS_CA_KEY, tls_key.serialize_pem().into_bytes()),
                    (keys::TLS_CA_CERT, tls_cert_pem.into_bytes()),
                ],
            )?;
        }
        let cluster = load_text(backend, keys::CLUSTER)?.ok_or(AuthorityError::NoClusterName)?;
        if let Some(c) = configured.filter(|c| *c != cluster) {
            return Err(AuthorityError::NameMismatch {
                stored: cluster,
                configured: c.into(),
            });
        }
        let ssh_key = |key: &'static str| -> Result<PrivateKey, AuthorityError> {
            let text = load_text(backend, key)?.ok_or_else(|| corrupt(key)("missing".into()))?;
            PrivateKey::from_openssh(text).map_err(|e| corrupt(key)(e.to_string()))
        };
        let user_ca = ssh_key(keys::USER_CA)?;
        let host_ca = ssh_key(keys::HOST_CA)?;
        let tls = tls_ca::load(backend, &cluster, BACKDATE_SECS)?;
        let tls_legacy = tls.legacy_pem.zip(tls.cross_pem);
        let signer = TlsSigner {
            key: tls.key,
            cert_pem: tls.cert_pem,
        };
        let keys = TlsCaKeys::build(
            signer,
            None,
            crate::rotation::Phase::Standby,
            tls_legacy.as_ref(),
            None,
        );
        Ok(Authorities {
            cluster,
            user_ca: RwLock::new(CaKeys::single(user_ca)),
            host_ca: RwLock::new(CaKeys::single(host_ca)),
            tls: RwLock::new(keys),
            tls_legacy,
            tls_changed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// A copy of the TLS CA's keys.
    pub fn tls_keys(&self) -> TlsCaKeys {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets the TLS CA's keys from a rotation state (see [`TlsCaKeys::build`]); `completed`:
    /// a rotation has completed once, so a migrated cluster's legacy CA is no longer trusted.
    pub(crate) fn set_tls_rotation(
        &self,
        current: TlsSigner,
        next: Option<TlsSigner>,
        phase: crate::rotation::Phase,
        completed: bool,
        retired: Option<String>,
    ) {
        let migrated = self.tls_legacy.as_ref().filter(|_| !completed);
        let keys = TlsCaKeys::build(current, next, phase, migrated, retired);
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = keys;
        self.tls_changed.send_modify(|g| *g += 1);
    }

    /// Changes of the TLS CA's keys (a counter).
    pub fn tls_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.tls_changed.subscribe()
    }

    /// How many times the TLS CA's keys have changed since the start.
    pub fn tls_generation(&self) -> u64 {
        *self.tls_changed.borrow()
    }

    /// The current TLS CA's material for a rotation state (key and certificate PEM).
    pub(crate) fn tls_material(&self) -> String {
        self.tls_keys().client.material()
    }

    /// Every trusted TLS CA certificate (PEM), the one signing client certificates first: what
    /// identity files carry (two during a rotation, so clients trust the server under either).
    pub fn tls_ca_pems(&self) -> Vec<String> {
        self.tls_keys().trusted
    }

    fn ca(&self, kind: CaKind) -> &RwLock<CaKeys> {
        match kind {
            CaKind::Host => &self.host_ca,
            CaKind::User => &self.user_ca,
            // Callers ask for SSH kinds only; the TLS CA's keys are `tls_keys`.
            CaKind::Tls => unreachable!("the TLS CA has no SSH keys"),
        }
    }

    /// A copy of one CA's keys (signer and trusted set).
    pub fn ca_keys(&self, kind: CaKind) -> CaKeys {
        self.ca(kind)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces one CA's keys (a rotation moved).
    pub fn set_ca_keys(&self, kind: CaKind, keys: CaKeys) {
        *self.ca(kind).write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    fn lines(&self, kind: CaKind) -> Vec<String> {
        self.ca_keys(kind)
            .trusted
            .iter()
            .filter_map(|k| k.to_openssh().ok())
            .collect()
    }

    /// The SSH user CA's signing public key line.
    pub fn user_ca_line(&self) -> String {
        let k = self.ca_keys(CaKind::User).signer;
        k.public_key().to_openssh().unwrap_or_default()
    }

    /// Every trusted SSH user CA key line (two during a rotation).
    pub fn user_ca_lines(&self) -> Vec<String> {
        self.lines(CaKind::User)
    }

    /// The SSH host CA's signing public key line.
    pub fn host_ca_line(&self) -> String {
        let k = self.ca_keys(CaKind::Host).signer;
        k.public_key().to_openssh().unwrap_or_default()
    }

    /// Every trusted SSH host CA key line (two during a rotation).
    pub fn host_ca_lines(&self) -> Vec<String> {
        self.lines(CaKind::Host)
    }

    /// The SSH host CA key that signs proxies' certificates now (see `CaKeys::server_signer`).
    pub fn host_ca_server_line(&self) -> String {
        let k = self.ca_keys(CaKind::Host).server_signer;
        k.public_key().to_openssh().unwrap_or_default()
    }

    /// SHA-256 fingerprint of the host CA's signing key.
    pub fn host_ca_fingerprint(&self) -> russh::keys::ssh_key::Fingerprint {
        self.ca_keys(CaKind::Host)
            .signer
            .public_key()
            .fingerprint(russh::keys::HashAlg::Sha256)
    }

    /// SHA-256 fingerprints of every trusted key of `kind` (what a presented certificate's
    /// signer must be among).
    pub fn trusted_fingerprints(&self, kind: CaKind) -> Vec<russh::keys::ssh_key::Fingerprint> {
        self.ca_keys(kind)
            .trusted
            .iter()
            .map(|k| k.fingerprint(russh::keys::HashAlg::Sha256))
            .collect()
    }

    /// The cluster's CA pin (`sha256:<hex>` of the host CA's signing key), what an agent's
    /// `ca_pin` names. It changes when a host CA rotation reaches `update_clients`.
    pub fn host_ca_pin(&self) -> String {
        tunnel_proto::join::ca_pin(self.host_ca_fingerprint().as_bytes())
    }

    fn tls_sign(
        &self,
        subject: &impl rcgen::PublicKeyData,
        cn: &str,
        sans: Vec<String>,
        eku: ExtendedKeyUsagePurpose,
        ttl: u64,
    ) -> Result<rcgen::Certificate, AuthorityError> {
        self.tls_sign_ext(subject, cn, sans, eku, ttl, Vec::new())
    }

    fn tls_sign_ext(
        &self,
        subject: &impl rcgen::PublicKeyData,
        cn: &str,
        sans: Vec<String>,
        eku: ExtendedKeyUsagePurpose,
        ttl: u64,
        extensions: Vec<rcgen::CustomExtension>,
    ) -> Result<rcgen::Certificate, AuthorityError> {
        let mut p =
            CertificateParams::new(sans).map_err(|e| AuthorityError::Issue(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, self.cluster.as_str());
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = mint::now_unix();
        p.not_before = stamp(now - BACKDATE_SECS);
        p.not_after = stamp(now + ttl);
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        p.custom_extensions = extensions;
        let keys = self.tls_keys();
        let signer = if eku == ExtendedKeyUsagePurpose::ServerAuth {
            &keys.server
        } else {
            &keys.client
        };
        let issuer = Issuer::new(ca_params(&self.cluster), &signer.key);
        p.extended_key_usages = vec![eku];
        p.signed_by(subject, &issuer)
            .map_err(|e| AuthorityError::Issue(e.to_string()))
    }

    /// An SSH user certificate and a TLS client certificate for `key`, valid `ttl` seconds. Both
    /// carry `roles`: the SSH one in the extension `postern-roles@postern`, the TLS one in the
    /// extension [`ROLES_OID`] (a UTF8String of the comma-separated names).
    pub fn issue_user(
        &self,
        user: &str,
        key: &PublicKey,
        ttl: u64,
        roles: &[String],
    ) -> Result<Issued, AuthorityError> {
        self.issue_user_for_request(user, key, ttl, roles, None)
    }

    /// A user certificate pair whose `roles` include those of the access request `request`
    /// (named in the SSH certificate's `postern-request@postern` extension).
    pub fn issue_user_for_request(
        &self,
        user: &str,
        key: &PublicKey,
        ttl: u64,
        roles: &[String],
        request: Option<&str>,
    ) -> Result<Issued, AuthorityError> {
        let now = mint::now_unix();
        let expires = now + ttl;
        let spec = CertSpec::UserWithRoles {
            user: user.into(),
            roles: roles.to_vec(),
            request: request.map(str::to_owned),
        };
        let signer = self.ca_keys(CaKind::User).signer;
        let ssh = mint::issue(&signer, key, &spec, now - BACKDATE_SECS, expires)
            .map_err(|e| AuthorityError::Issue(e.to_string()))?;
        let tls = self.tls_sign_ext(
            &ed25519_spki(key)?,
            user,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            ttl,
            vec![roles_extension(roles)],
        )?;
        Ok(Issued {
            ssh_cert: ssh
                .to_openssh()
                .map_err(|e| AuthorityError::Issue(e.to_string()))?,
            tls_fingerprint: hex::encode(Sha256::digest(tls.der())),
            tls_cert: tls.pem(),
            expires,
        })
    }

    /// A host certificate: the Auth server's own agent's (`host_id`, role `auth`) or, with
    /// `proxy_principals`, a proxy's. Other agents get [`Authorities::issue_service_agent`].
    pub fn issue_host(
        &self,
        key: &PublicKey,
        host_id: &str,
        proxy_principals: &[String],
        ttl: u64,
    ) -> Result<Issued, AuthorityError> {
        let spec = if proxy_principals.is_empty() {
            CertSpec::Agent {
                host_id: host_id.into(),
                cluster: self.cluster.clone(),
            }
        } else {
            CertSpec::Proxy {
                principals: proxy_principals.to_vec(),
            }
        };
        self.issue_from_host_ca(key, &spec, ttl)
    }

    /// Signs `spec` for `key` with the host CA, valid from a little before now for `ttl`.
    fn issue_from_host_ca(
        &self,
        key: &PublicKey,
        spec: &CertSpec,
        ttl: u64,
    ) -> Result<Issued, AuthorityError> {
        let now = mint::now_unix();
        let keys = self.ca_keys(CaKind::Host);
        let signer = match spec {
            CertSpec::Proxy { .. } => keys.server_signer,
            _ => keys.signer,
        };
        let cert = mint::issue(&signer, key, spec, now - BACKDATE_SECS, now + ttl)
            .map_err(|e| AuthorityError::Issue(e.to_string()))?;
        Ok(Issued {
            ssh_cert: cert
                .to_openssh()
                .map_err(|e| AuthorityError::Issue(e.to_string()))?,
            tls_cert: String::new(),
            tls_fingerprint: String::new(),
            expires: now + ttl,
        })
    }

    /// A service agent's host certificate (role `service`): what `RegisterAgent` and
    /// `GenerateHostCerts` issue. The proxy refuses such an agent the reserved targets.
    pub fn issue_service_agent(
        &self,
        key: &PublicKey,
        host_id: &str,
        ttl: u64,
    ) -> Result<Issued, AuthorityError> {
        let spec = CertSpec::ServiceAgent {
            host_id: host_id.into(),
            cluster: self.cluster.clone(),
        };
        self.issue_from_host_ca(key, &spec, ttl)
    }

    /// A fresh TLS server key (ECDSA P-256) and certificate for `auth.<cluster>` from the CA
    /// that signs serving certificates in this rotation phase (DER cert chain, PKCS#8 key). On a
    /// migrated cluster whose migrated CA serves, the chain ends with the cross certificate.
    pub fn server_tls(
        &self,
        ttl: u64,
    ) -> Result<
        (
            Vec<rustls_pki_types::CertificateDer<'static>>,
            rustls_pki_types::PrivateKeyDer<'static>,
        ),
        AuthorityError,
    > {
        let cross = self.tls_keys().cross;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AuthorityError::Issue(e.to_string()))?;
        let name = postern_api::auth_server_name(&self.cluster);
        let cert = self.tls_sign(
            &key,
            &name,
            vec![name.clone(), postern_api::AUTH_SERVER_NAME_ANY.to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
            ttl,
        )?;
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let mut chain = vec![cert.der().clone()];
        if let Some(cross) = &cross {
            chain.push(tls_ca::der(cross, tls_ca::keys::CROSS_CERT)?);
        }
        Ok((chain, der.into()))
    }

    /// The CA certificates client certificates may chain to (DER): every trusted TLS CA (two
    /// during a rotation), and on a migrated cluster the old one too until a rotation completes.
    pub fn tls_client_roots(
        &self,
    ) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, AuthorityError> {
        let k = self.tls_keys();
        let mut roots = Vec::new();
        for pem in &k.trusted {
            roots.push(tls_ca::der(pem, keys::TLS_CA_CERT)?);
        }
        if let Some(legacy) = &k.legacy {
            roots.push(tls_ca::der(legacy, tls_ca::keys::LEGACY_CERT)?);
        }
        Ok(roots)
    }

    /// The CA the last completed TLS CA rotation retired (DER), if any.
    pub fn tls_retired_root(
        &self,
    ) -> Result<Option<rustls_pki_types::CertificateDer<'static>>, AuthorityError> {
        self.tls_keys()
            .retired
            .map(|pem| tls_ca::der(&pem, keys::TLS_CA_CERT))
            .transpose()
    }
}

/// OID of the TLS client-certificate extension carrying the user's roles (a UTF8String of the
/// comma-separated names). A placeholder private arc until the project registers its own.
pub const ROLES_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 99999, 1, 1];

/// The roles extension of a TLS client certificate: DER UTF8String, not critical.
fn roles_extension(roles: &[String]) -> rcgen::CustomExtension {
    let text = roles.join(",");
    let mut der = vec![0x0c];
    let n = text.len();
    if n < 0x80 {
        der.push(n as u8);
    } else if n < 0x100 {
        der.extend([0x81, n as u8]);
    } else {
        der.extend([0x82, (n >> 8) as u8, n as u8]);
    }
    der.extend_from_slice(text.as_bytes());
    rcgen::CustomExtension::from_oid_content(ROLES_OID, der)
}

/// SHA-256 (hex) of a DER certificate: how client certificates are looked up.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}
