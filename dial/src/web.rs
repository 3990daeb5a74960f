//! HTTPS discovery against a proxy's web listener.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tunnel_proto::discovery::{FIND_PATH, FindResponse, PING_PATH, PingResponse, split_host_port};

use crate::DialError;

/// Largest discovery answer read.
const MAX_BODY: usize = 1 << 20;
/// Deadline for one discovery request, connect to last byte.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// How the web listener's TLS certificate is trusted.
#[derive(Debug, Clone)]
pub enum WebTrust {
    /// Trust exactly the certificate with this SHA-256 fingerprint (hex, `:` allowed), as the
    /// proxy logs it at start. The way to trust a self-signed proxy.
    Pin(String),
    /// Trust certificates chaining to these CA certificates, for the dialled host name.
    Roots(Vec<CertificateDer<'static>>),
    /// Trust anything: for local experiments only.
    Insecure,
}

impl WebTrust {
    /// Reads PEM CA certificates from `path` as [`WebTrust::Roots`].
    pub fn roots_from_pem_file(path: &std::path::Path) -> Result<WebTrust, DialError> {
        use rustls_pki_types::pem::PemObject;
        let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
            .map_err(|e| DialError::Config(format!("{}: {e}", path.display())))?
            .collect();
        let certs = certs.map_err(|e| DialError::Config(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(DialError::Config(format!(
                "{}: no PEM certificates found",
                path.display()
            )));
        }
        Ok(WebTrust::Roots(certs))
    }
}

/// Normalises a fingerprint: lowercase hex without separators.
pub fn normalize_fingerprint(fp: &str) -> String {
    fp.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// SHA-256 fingerprint of a DER certificate, lowercase hex.
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

#[derive(Debug)]
struct PinVerifier {
    /// Expected fingerprint; `None` accepts any certificate (insecure mode).
    pin: Option<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pin {
            None => Ok(ServerCertVerified::assertion()),
            Some(pin) if *pin == cert_fingerprint(end_entity) => {
                Ok(ServerCertVerified::assertion())
            }
            Some(pin) => Err(rustls::Error::General(format!(
                "certificate fingerprint {} does not match the pinned {pin}",
                cert_fingerprint(end_entity)
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Builds the rustls client config for a trust choice.
pub fn tls_config(trust: &WebTrust) -> Result<rustls::ClientConfig, DialError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DialError::Config(e.to_string()))?;
    let config = match trust {
        WebTrust::Roots(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for c in roots {
                store
                    .add(c.clone())
                    .map_err(|e| DialError::Config(format!("bad CA certificate: {e}")))?;
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        WebTrust::Pin(pin) => {
            let pin = normalize_fingerprint(pin);
            if pin.len() != 64 {
                return Err(DialError::Config(format!(
                    "web certificate pin must be a SHA-256 fingerprint (64 hex digits), got {} digits",
                    pin.len()
                )));
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    pin: Some(pin),
                    provider,
                }))
                .with_no_client_auth()
        }
        WebTrust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: None,
                provider,
            }))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// Host part of a `host:port` address, brackets removed.
pub fn host_of(addr: &str) -> &str {
    split_host_port(addr)
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// `GET path` on the web listener at `addr` and parse the JSON answer.
pub async fn get_json<T: DeserializeOwned>(
    addr: &str,
    path: &str,
    trust: &WebTrust,
) -> Result<T, DialError> {
    tokio::time::timeout(DISCOVERY_TIMEOUT, get_json_inner(addr, path, trust))
        .await
        .map_err(|_| DialError::Timeout {
            what: "discovery",
            addr: addr.to_owned(),
            after: DISCOVERY_TIMEOUT,
        })?
}

async fn get_json_inner<T: DeserializeOwned>(
    addr: &str,
    path: &str,
    trust: &WebTrust,
) -> Result<T, DialError> {
    let (status, body) = exchange(addr, trust, hyper::Method::GET, path, Bytes::new()).await?;
    let not_postern = |detail: String| DialError::NotAPostern {
        addr: addr.to_owned(),
        detail,
    };
    if !status.is_success() {
        return Err(not_postern(format!("{path} answered HTTP {status}")));
    }
    serde_json::from_slice(&body)
        .map_err(|e| not_postern(format!("{path} did not answer discovery JSON: {e}")))
}

/// One HTTPS request to the web listener at `addr`; the status and the body (at most 1 MiB).
async fn exchange(
    addr: &str,
    trust: &WebTrust,
    method: hyper::Method,
    path: &str,
    body: Bytes,
) -> Result<(hyper::StatusCode, Bytes), DialError> {
    if split_host_port(addr).is_none() {
        return Err(DialError::Config(format!(
            "web proxy address '{addr}' must be host:port"
        )));
    }
    let host = host_of(addr).to_owned();
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| DialError::Config(format!("'{host}' is not a valid host name")))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| DialError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(trust)?));
    let tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| DialError::Tls {
            addr: addr.to_owned(),
            detail: e.to_string(),
        })?;
    let not_postern = |detail: String| DialError::NotAPostern {
        addr: addr.to_owned(),
        detail,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| not_postern(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(body))
        .map_err(|e| DialError::Config(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| not_postern(format!("HTTP request: {e}")))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| not_postern(format!("reading answer: {e}")))?
        .to_bytes();
    Ok((status, body))
}

/// `POST /webapi/login`: the proxy relays it to the cluster's Auth server. A refused login is
/// returned as a [`tunnel_proto::login::LoginResponse`] with its `error` set.
pub async fn login(
    addr: &str,
    trust: &WebTrust,
    req: &tunnel_proto::login::LoginRequest,
) -> Result<tunnel_proto::login::LoginResponse, DialError> {
    post_relayed(addr, trust, tunnel_proto::login::LOGIN_PATH, req).await
}

/// `POST /webapi/join`: an agent's join, relayed to the cluster's Auth server like a login. A
/// refused join is returned with its `error` set.
pub async fn join(
    addr: &str,
    trust: &WebTrust,
    req: &tunnel_proto::join::JoinRequest,
) -> Result<tunnel_proto::login::LoginResponse, DialError> {
    post_relayed(addr, trust, tunnel_proto::join::JOIN_PATH, req).await
}

/// `POST /webapi/renew`: an agent's renewal, relayed to the cluster's Auth server like a login.
/// A refused renewal is returned with its `error` set.
pub async fn renew(
    addr: &str,
    trust: &WebTrust,
    req: &tunnel_proto::join::RenewRequest,
) -> Result<tunnel_proto::login::LoginResponse, DialError> {
    post_relayed(addr, trust, tunnel_proto::join::RENEW_PATH, req).await
}

/// Posts `req` as JSON to `path` and reads the relayed login-shaped answer.
async fn post_relayed<T: serde::Serialize>(
    addr: &str,
    trust: &WebTrust,
    path: &'static str,
    req: &T,
) -> Result<tunnel_proto::login::LoginResponse, DialError> {
    let body = serde_json::to_vec(req).map_err(|e| DialError::Config(e.to_string()))?;
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(30),
        exchange(addr, trust, hyper::Method::POST, path, Bytes::from(body)),
    )
    .await
    .map_err(|_| DialError::Timeout {
        what: "login",
        addr: addr.to_owned(),
        after: Duration::from_secs(30),
    })??;
    match serde_json::from_slice::<tunnel_proto::login::LoginResponse>(&body) {
        Ok(mut r) => {
            if r.error.is_empty() && !status.is_success() {
                r.error = format!("HTTP {status}");
            }
            if r.status == 0 {
                r.status = status.as_u16();
            }
            Ok(r)
        }
        Err(_) => Err(DialError::NotAPostern {
            addr: addr.to_owned(),
            detail: format!("{path} answered HTTP {status} without a login response"),
        }),
    }
}

/// `GET /webapi/ping`.
pub async fn ping(addr: &str, trust: &WebTrust) -> Result<PingResponse, DialError> {
    get_json(addr, PING_PATH, trust).await
}

/// `GET /webapi/find`.
pub async fn find(addr: &str, trust: &WebTrust) -> Result<FindResponse, DialError> {
    get_json(addr, FIND_PATH, trust).await
}

/// Discovers the tunnel address behind the web address `addr`, in the documented order
/// (the `POSTERN_TUNNEL_ADDR` variable first; see
/// [`tunnel_proto::discovery::ProxySettings::tunnel_addr`]).
pub async fn discover_tunnel_addr(addr: &str, trust: &WebTrust) -> Result<String, DialError> {
    let found = find(addr, trust).await?;
    let env = std::env::var(tunnel_proto::discovery::TUNNEL_ADDR_ENV).ok();
    Ok(found.proxy.tunnel_addr(env.as_deref(), host_of(addr)))
}
