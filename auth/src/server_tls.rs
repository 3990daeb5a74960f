//! The API listener's TLS config, rebuilt when the TLS CA's keys change (a TLS CA rotation moved):
//! each accepted connection takes the config of the moment, so the serving certificate switches
//! to the new CA at `update_servers` and the client-certificate roots follow every phase, with no
//! restart. Connections already open keep the config they were accepted with.
//!
//! After a completed rotation (or a rollback) the retired (or dropped) CA's client certificates
//! still pass the handshake, so that the API can refuse them with a reason (a failed handshake only shows the client an
//! `UnknownCA` alert): the listener marks such a connection (see [`Snapshot::retired_only`]) and
//! every call on it is refused.

use std::sync::{Arc, RwLock};

use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tracing::{info, warn};

use crate::authority::Authorities;
use crate::server::AuthError;

/// Lifetime of the server's own TLS certificate (re-issued at every start and every TLS CA
/// change).
const SERVER_CERT_TTL: u64 = 365 * 24 * 3600;

/// The TLS config of one moment, and its client-certificate verifier.
#[derive(Clone)]
pub struct Snapshot {
    /// What the handshake runs with.
    pub config: Arc<rustls::ServerConfig>,
    /// The verifier inside `config`.
    verifier: Arc<RotatingVerifier>,
}

impl Snapshot {
    /// Whether a client certificate chain that passed the handshake chains only to the CA a
    /// completed TLS CA rotation retired.
    pub fn retired_only(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((ee, rest)) = chain.split_first() else {
            return false;
        };
        self.verifier.retired.is_some()
            && self
                .verifier
                .current
                .verify_client_cert(ee, rest, UnixTime::now())
                .is_err()
    }
}

/// The listener's TLS config, rebuilt on a TLS CA change.
pub struct ServerTls {
    authorities: Arc<Authorities>,
    /// The TLS CA change counter the snapshot was built at, and the snapshot.
    current: RwLock<(u64, Snapshot)>,
}

impl ServerTls {
    /// Builds the config from the authorities' current TLS CA keys.
    pub fn new(authorities: Arc<Authorities>) -> Result<ServerTls, AuthError> {
        let generation = authorities.tls_generation();
        let snapshot = build(&authorities)?;
        Ok(ServerTls {
            authorities,
            current: RwLock::new((generation, snapshot)),
        })
    }

    /// The config to accept a connection with: rebuilt first if the TLS CA changed (a failed
    /// rebuild keeps the last config, and is tried again at the next connection).
    pub fn current(&self) -> Snapshot {
        let generation = self.authorities.tls_generation();
        {
            let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
            if cur.0 == generation {
                return cur.1.clone();
            }
        }
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        if cur.0 != generation {
            match build(&self.authorities) {
                Ok(s) => {
                    let phase = self.authorities.tls_keys().phase.as_str();
                    info!(
                        phase,
                        "TLS CA changed: the API serves with a new certificate and client roots"
                    );
                    *cur = (generation, s);
                }
                Err(e) => {
                    warn!(error = %e, "TLS CA changed but the TLS config cannot be rebuilt: keeping the last one")
                }
            }
        }
        cur.1.clone()
    }
}

fn tls_err(e: impl std::fmt::Display) -> AuthError {
    AuthError::Tls(e.to_string())
}

fn verifier(
    roots: Vec<CertificateDer<'static>>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, AuthError> {
    let mut store = rustls::RootCertStore::empty();
    for ca in roots {
        store.add(ca).map_err(tls_err)?;
    }
    // Clients without a certificate get through the handshake but can call only Ping and
    // RegisterAgent (the join token is their credential); a certificate that does not chain to
    // the cluster's TLS CA, or is expired, fails the handshake.
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(tls_err)
}

/// The TLS config for the authorities' TLS CA keys of now.
fn build(a: &Authorities) -> Result<Snapshot, AuthError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let current = verifier(a.tls_client_roots()?, &provider)?;
    let retired = match a.tls_retired_root()? {
        Some(root) => Some(verifier(vec![root], &provider)?),
        None => None,
    };
    let verifier = Arc::new(RotatingVerifier { current, retired });
    let (chain, key) = a.server_tls(SERVER_CERT_TTL)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Snapshot {
        config: Arc::new(cfg),
        verifier,
    })
}

/// Verifies client certificates against the trusted TLS CAs; one of the retired CA passes too,
/// to be refused by the API with a reason (see the module docs).
#[derive(Debug)]
struct RotatingVerifier {
    /// The trusted CAs.
    current: Arc<dyn ClientCertVerifier>,
    /// The CA the last completed rotation retired.
    retired: Option<Arc<dyn ClientCertVerifier>>,
}

impl ClientCertVerifier for RotatingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.current.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.current.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.current.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .current
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(v) => Ok(v),
            Err(e) => match &self.retired {
                Some(r) if r.verify_client_cert(end_entity, intermediates, now).is_ok() => {
                    Ok(ClientCertVerified::assertion())
                }
                _ => Err(e),
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current.supported_verify_schemes()
    }
}
