//! The five credential loaders, as Teleport's API client has them:
//!
//! | | profile | identity file | dynamic identity file | key pair | TLS |
//! |---|---|---|---|---|---|
//! | SSH through the proxy | yes | yes | yes | no | no |
//! | proxy address discovery | yes | no | no | no | no |
//!
//! A loader is asked for fresh material at every new connection, so a dynamic identity file
//! replaced on disk (atomic rename) is used by the next connection without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use postern_api::identity::IdentityFile;
use postern_dial::ssh::{Identity, parse_ca_lines};
use postern_dial::web::WebTrust;
use russh::keys::ssh_key::{Certificate, Fingerprint, PrivateKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tracing::error;

use crate::profile::Profile;

/// Where credentials come from.
#[derive(Clone)]
pub enum Credentials {
    /// The profile `psh login` wrote (`dir` default: `$POSTERN_HOME` or `~/.postern`). With
    /// `proxy`, only a profile for that proxy is accepted.
    Profile {
        /// Profile directory.
        dir: Option<PathBuf>,
        /// Expected proxy web address.
        proxy: Option<String>,
    },
    /// An identity file from `pctl auth sign`, read once.
    IdentityFile(PathBuf),
    /// An identity file that another tool rotates: re-read whenever it changes on disk.
    DynamicIdentityFile(Arc<DynamicIdentity>),
    /// TLS key pair files from `pctl auth sign --format=tls` (no SSH: direct to the Auth server).
    KeyPair {
        /// PEM certificate.
        cert: PathBuf,
        /// PEM PKCS#8 key.
        key: PathBuf,
        /// PEM CA certificates of the cluster's TLS CA.
        cas: PathBuf,
    },
    /// The caller's own rustls config (no SSH: direct to the Auth server).
    Tls(Arc<rustls::ClientConfig>),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A credential loader that cannot produce credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// Missing, corrupt or expired profile.
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
    /// Unusable identity file.
    #[error(transparent)]
    Identity(#[from] postern_api::identity::IdentityError),
    /// The certificates have expired.
    #[error(
        "certificate expired: {what} expired at {expires}; run psh login or pctl auth sign again"
    )]
    Expired {
        /// Which credentials.
        what: String,
        /// Unix seconds.
        expires: u64,
    },
    /// A key or certificate does not parse.
    #[error("{what}: {problem}")]
    Bad {
        /// Which file or part.
        what: String,
        /// What is wrong.
        problem: String,
    },
}

/// What one connection attempt uses.
#[derive(Clone)]
pub struct Loaded {
    /// mTLS config for the Auth API.
    pub tls: Arc<rustls::ClientConfig>,
    /// The name verified on the Auth server's certificate.
    pub server_name: ServerName<'static>,
    /// The cluster, when known.
    pub cluster: Option<String>,
    /// SSH login material for proxies, when the loader has it.
    pub ssh: Option<SshLogin>,
    /// The proxy and its web trust, from a profile.
    pub proxy: Option<(String, WebTrust)>,
}

/// What logging in to a proxy needs.
#[derive(Clone)]
pub struct SshLogin {
    /// Login name.
    pub user: String,
    /// Key and user certificate.
    pub identity: Identity,
    /// The cluster's host CA (verifies the proxy).
    pub host_cas: Vec<Fingerprint>,
}

impl Credentials {
    /// The profile `psh login` wrote.
    pub fn profile(dir: Option<PathBuf>, proxy: Option<String>) -> Credentials {
        Credentials::Profile { dir, proxy }
    }

    /// An identity file, read once.
    pub fn identity_file(path: impl Into<PathBuf>) -> Credentials {
        Credentials::IdentityFile(path.into())
    }

    /// An identity file re-read whenever it changes.
    pub fn dynamic_identity_file(path: impl Into<PathBuf>) -> Credentials {
        Credentials::DynamicIdentityFile(Arc::new(DynamicIdentity::new(path.into())))
    }

    /// TLS key pair files.
    pub fn key_pair(
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
        cas: impl Into<PathBuf>,
    ) -> Credentials {
        Credentials::KeyPair {
            cert: cert.into(),
            key: key.into(),
            cas: cas.into(),
        }
    }

    /// The caller's rustls config (with its client certificate and the cluster's TLS CA).
    pub fn tls(config: rustls::ClientConfig) -> Credentials {
        Credentials::Tls(Arc::new(config))
    }

    /// How errors name this loader.
    pub fn describe(&self) -> String {
        match self {
            Credentials::Profile { dir, .. } => format!(
                "profile {}",
                dir.clone().unwrap_or_else(Profile::default_dir).display()
            ),
            Credentials::IdentityFile(p) => format!("identity file {}", p.display()),
            Credentials::DynamicIdentityFile(d) => {
                format!("dynamic identity file {}", d.path.display())
            }
            Credentials::KeyPair { cert, .. } => format!("key pair {}", cert.display()),
            Credentials::Tls(_) => "TLS config".into(),
        }
    }

    /// Fresh material for one connection.
    pub fn load(&self) -> Result<Loaded, CredentialError> {
        match self {
            Credentials::Profile { dir, proxy } => {
                let dir = dir.clone().unwrap_or_else(Profile::default_dir);
                let (profile, id) = Profile::load(&dir)?;
                if let Some(want) = proxy
                    && *want != profile.proxy
                {
                    return Err(CredentialError::Bad {
                        what: format!("profile {}", dir.display()),
                        problem: format!(
                            "it is for proxy {}, not {want}: run psh login --proxy={want}",
                            profile.proxy
                        ),
                    });
                }
                let trust = profile
                    .web_trust()
                    .map_err(|problem| CredentialError::Bad {
                        what: format!("profile {}", dir.display()),
                        problem,
                    })?;
                let mut loaded = from_identity(&id, &format!("profile {}", dir.display()))?;
                loaded.proxy = Some((profile.proxy, trust));
                Ok(loaded)
            }
            Credentials::IdentityFile(p) => {
                let id = IdentityFile::load(p)?;
                from_identity(&id, &format!("identity file {}", p.display()))
            }
            Credentials::DynamicIdentityFile(d) => {
                let id = d.current()?;
                from_identity(&id, &format!("identity file {}", d.path.display()))
            }
            Credentials::KeyPair { cert, key, cas } => {
                let bad = |p: &Path| {
                    let what = p.display().to_string();
                    move |e: rustls_pki_types::pem::Error| CredentialError::Bad {
                        what: what.clone(),
                        problem: e.to_string(),
                    }
                };
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(bad(cert))?
                    .collect::<Result<_, _>>()
                    .map_err(bad(cert))?;
                if chain.is_empty() {
                    return Err(CredentialError::Bad {
                        what: cert.display().to_string(),
                        problem: "no PEM certificate".into(),
                    });
                }
                let k = PrivateKeyDer::from_pem_file(key).map_err(bad(key))?;
                let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cas)
                    .map_err(bad(cas))?
                    .collect::<Result<_, _>>()
                    .map_err(bad(cas))?;
                let tls =
                    client_config(roots, chain, k).map_err(|problem| CredentialError::Bad {
                        what: format!("key pair {}", cert.display()),
                        problem,
                    })?;
                Ok(Loaded {
                    tls: Arc::new(tls),
                    server_name: ServerName::try_from(postern_api::AUTH_SERVER_NAME_ANY)
                        .expect("valid name"),
                    cluster: None,
                    ssh: None,
                    proxy: None,
                })
            }
            Credentials::Tls(cfg) => Ok(Loaded {
                tls: cfg.clone(),
                server_name: ServerName::try_from(postern_api::AUTH_SERVER_NAME_ANY)
                    .expect("valid name"),
                cluster: None,
                ssh: None,
                proxy: None,
            }),
        }
    }
}

/// The system's CA bundle (Debian's path), for a proxy web certificate from a public CA.
pub fn system_roots() -> Result<WebTrust, String> {
    for p in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ] {
        if Path::new(p).exists() {
            return WebTrust::roots_from_pem_file(Path::new(p)).map_err(|e| e.to_string());
        }
    }
    Err("no system CA bundle found: pin the proxy's web certificate (web_cert_sha256) or give a CA file".into())
}

/// An mTLS client config: TLS 1.3, `roots` only, the client chain and key.
pub fn client_config(
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, String> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r).map_err(|e| format!("CA certificate: {e}"))?;
    }
    if store.is_empty() {
        return Err("no CA certificate to verify the Auth server with".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(store)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Everything an identity file gives, checked (expiry included).
pub fn from_identity(id: &IdentityFile, what: &str) -> Result<Loaded, CredentialError> {
    let bad = |part: &str| {
        let what = format!("{what}: {part}");
        move |problem: String| CredentialError::Bad {
            what: what.clone(),
            problem,
        }
    };
    if id.expires <= postern_dial::mint::now_unix() {
        return Err(CredentialError::Expired {
            what: what.into(),
            expires: id.expires,
        });
    }
    let key =
        PrivateKey::from_openssh(&id.private_key).map_err(|e| bad("private_key")(e.to_string()))?;
    let cert =
        Certificate::from_openssh(&id.ssh_cert).map_err(|e| bad("ssh_cert")(e.to_string()))?;
    let tls_cert = CertificateDer::from_pem_slice(id.tls_cert.as_bytes())
        .map_err(|e| bad("tls_cert")(e.to_string()))?;
    let mut roots = Vec::new();
    for pem in &id.tls_cas {
        roots.push(
            CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| bad("tls_cas")(e.to_string()))?,
        );
    }
    let pkcs8 = crate::auth::ed25519_pkcs8(&key).map_err(bad("private_key"))?;
    let tls = client_config(roots, vec![tls_cert], pkcs8).map_err(bad("tls"))?;
    let server_name = ServerName::try_from(postern_api::auth_server_name(&id.cluster))
        .map_err(|e| bad("cluster")(e.to_string()))?;
    Ok(Loaded {
        tls: Arc::new(tls),
        server_name,
        cluster: Some(id.cluster.clone()),
        ssh: Some(SshLogin {
            user: id.user.clone(),
            identity: Identity::new(key, cert).map_err(bad("ssh_cert"))?,
            host_cas: parse_ca_lines(&id.ssh_host_cas).map_err(bad("ssh_host_cas"))?,
        }),
        proxy: None,
    })
}

/// An identity file watched for changes: re-read when its size, mtime or inode changes. A
/// replacement that does not parse is logged and the last good identity is kept.
pub struct DynamicIdentity {
    path: PathBuf,
    state: Mutex<Option<(Stamp, IdentityFile)>>,
}

type Stamp = (SystemTime, u64, u64);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.modified()?, m.len(), m.ino()))
}

impl DynamicIdentity {
    /// Watches `path` (read at the first use).
    pub fn new(path: PathBuf) -> DynamicIdentity {
        DynamicIdentity {
            path,
            state: Mutex::new(None),
        }
    }

    /// The current identity: re-read if the file changed, else the cached one.
    pub fn current(&self) -> Result<IdentityFile, CredentialError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.path);
        if let (Some((seen, id)), Ok(now)) = (st.as_ref(), &now)
            && seen == now
        {
            return Ok(id.clone());
        }
        match IdentityFile::load(&self.path) {
            Ok(id) => {
                if let Ok(s) = now {
                    *st = Some((s, id.clone()));
                }
                Ok(id)
            }
            Err(e) => match st.as_ref() {
                Some((_, last)) => {
                    error!(error = %e, "dynamic identity file changed but cannot be used: keeping the last good one");
                    Ok(last.clone())
                }
                None => Err(e.into()),
            },
        }
    }
}
