//! The proxy's own key material: SSH host key and certificate, web TLS certificate. Generated into
//! the data dir when absent, with a log line saying so.

use std::path::Path;
use std::sync::Arc;

use russh::keys::{Certificate, PrivateKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

use crate::config::ProxyConfig;
use crate::mint;

/// A startup failure loading or creating key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file is unreadable or malformed.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A private key is unreadable, readable by others, or malformed (the message names the
    /// file and what to do).
    #[error("{0}")]
    Key(String),
}

fn file_err(path: &Path, detail: impl ToString) -> KeyError {
    KeyError::File {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// The SSH host key (generated if absent) and certificate (if present).
pub fn ssh_host(config: &ProxyConfig) -> Result<(PrivateKey, Option<Certificate>), KeyError> {
    let key_path = config.host_key_path();
    let key = if key_path.exists() {
        mint::read_key(&key_path).map_err(|e| KeyError::Key(e.to_string()))?
    } else {
        let key = mint::generate_key();
        mint::write_key_pair(&key_path, &key).map_err(|e| file_err(&key_path, e))?;
        info!(path = %key_path.display(), fingerprint = %key.public_key().fingerprint(russh::keys::HashAlg::Sha256), "generated SSH host key");
        key
    };
    let cert_path = config.host_cert_path();
    let cert = if cert_path.exists() {
        let text = std::fs::read_to_string(&cert_path).map_err(|e| file_err(&cert_path, e))?;
        let cert = Certificate::from_openssh(text.trim()).map_err(|e| file_err(&cert_path, e))?;
        if cert.public_key() != key.public_key().key_data() {
            return Err(file_err(
                &cert_path,
                "host certificate is not for the host key",
            ));
        }
        Some(cert)
    } else {
        warn!(
            path = %cert_path.display(),
            fingerprint = %key.public_key().fingerprint(russh::keys::HashAlg::Sha256),
            "no SSH host certificate: agents and clients must pin this host key; issue one with `postern-proxy certs issue --kind proxy`"
        );
        None
    };
    Ok((key, cert))
}

/// Refuses a private key readable by group or others (`postern_dial::mint::check_private_mode`).
pub fn check_private_mode(path: &Path) -> Result<(), KeyError> {
    mint::check_private_mode(path).map_err(|e| KeyError::Key(e.to_string()))
}

/// The web TLS config: the configured certificate, or a self-signed one kept in the data dir.
/// Returns the config and the SHA-256 fingerprint of the leaf certificate.
pub fn web_tls(config: &ProxyConfig) -> Result<(Arc<rustls::ServerConfig>, String), KeyError> {
    let (cert_path, key_path) = match (&config.web_tls.cert_file, &config.web_tls.key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let c = config.data_dir.join("web.crt");
            let k = config.data_dir.join("web.key");
            if !c.exists() || !k.exists() {
                let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
                if let Some(addr) = &config.public.web_addr {
                    names.push(postern_dial::web::host_of(addr).to_owned());
                }
                let ck = rcgen::generate_simple_self_signed(names).map_err(|e| file_err(&c, e))?;
                mint::write_file(&k, ck.signing_key.serialize_pem().as_bytes(), 0o600)
                    .map_err(|e| file_err(&k, e))?;
                mint::write_file(&c, ck.cert.pem().as_bytes(), 0o644)
                    .map_err(|e| file_err(&c, e))?;
                info!(path = %c.display(), "generated self-signed web TLS certificate");
            }
            (c, k)
        }
    };
    check_private_mode(&key_path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| file_err(&cert_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&cert_path, e))?;
    let leaf = certs
        .first()
        .ok_or_else(|| file_err(&cert_path, "no certificate in file"))?;
    let fingerprint = postern_dial::web::cert_fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_err(&key_path, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| file_err(&cert_path, e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| file_err(&cert_path, e))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(tls), fingerprint))
}
