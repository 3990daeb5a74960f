//! [`AuthClient`]: the Auth API over mTLS, dialled directly or carried inside a tunnel stream
//! through the proxy (the proxy only ever sees ciphertext).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use postern_api::identity::IdentityFile;
use postern_api::proto::auth_service_client::AuthServiceClient;
use postern_api::proto::*;
use postern_dial::ssh::{Identity, parse_ca_lines};
use russh::keys::ssh_key::{Certificate, PrivateKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tonic::transport::{Channel, Endpoint};

use crate::{ConnectOptions, ProxyAddr, ProxySession};

/// How long a direct TCP connect (or a tunnel stream open) plus TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the Auth API could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthClientError {
    /// The identity file is unusable.
    #[error(transparent)]
    Identity(#[from] postern_api::identity::IdentityError),
    /// A key or certificate inside the identity does not parse.
    #[error("identity of '{user}': {what}: {problem}")]
    BadCredentials {
        /// The identity's user.
        user: String,
        /// Which part.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// No connection to the Auth server.
    #[error("cannot reach the Auth server at {addr}: {reason}")]
    Connect {
        /// Where it was dialled.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{}: {message}", code_name(*code))]
    Api {
        /// gRPC status code.
        code: tonic::Code,
        /// The server's message (names the verb and resource on a denial).
        message: String,
    },
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unauthenticated => "not authenticated",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::InvalidArgument => "invalid request",
        tonic::Code::FailedPrecondition => "conflict",
        tonic::Code::ResourceExhausted | tonic::Code::OutOfRange => "request too large",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    }
}

impl From<tonic::Status> for AuthClientError {
    fn from(s: tonic::Status) -> Self {
        AuthClientError::Api {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

impl AuthClientError {
    /// The gRPC code, for an error the server returned.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            AuthClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn bad<'a>(id: &'a IdentityFile, what: &'static str) -> impl Fn(String) -> AuthClientError + 'a {
    move |problem| AuthClientError::BadCredentials {
        user: id.user.clone(),
        what,
        problem,
    }
}

/// The PKCS#8 form of an OpenSSH Ed25519 private key (TLS signs with the same key as SSH).
pub fn ed25519_pkcs8(key: &PrivateKey) -> Result<PrivateKeyDer<'static>, String> {
    let kp = key
        .key_data()
        .ed25519()
        .ok_or_else(|| format!("{} keys are not supported; use ed25519", key.algorithm()))?;
    // RFC 8410 PrivateKeyInfo v1: SEQUENCE { INTEGER 0, AlgorithmIdentifier { id-Ed25519 },
    // OCTET STRING { OCTET STRING seed } }.
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&kp.private.to_bytes());
    Ok(PrivatePkcs8KeyDer::from(der).into())
}

/// The mTLS client config an identity gives: TLS 1.3, the cluster's TLS CA as the only root,
/// the identity's certificate as the client certificate.
pub fn tls_config(id: &IdentityFile) -> Result<rustls::ClientConfig, AuthClientError> {
    let key = PrivateKey::from_openssh(&id.private_key)
        .map_err(|e| bad(id, "private_key")(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for pem in &id.tls_cas {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| bad(id, "tls_cas")(e.to_string()))?;
        roots
            .add(der)
            .map_err(|e| bad(id, "tls_cas")(e.to_string()))?;
    }
    let cert = CertificateDer::from_pem_slice(id.tls_cert.as_bytes())
        .map_err(|e| bad(id, "tls_cert")(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(id, "tls")(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![cert],
            ed25519_pkcs8(&key).map_err(bad(id, "private_key"))?,
        )
        .map_err(|e| bad(id, "tls_cert")(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Proxy login options from an identity: its user, SSH certificate and the cluster's host CA.
pub fn proxy_options(
    id: &IdentityFile,
    proxy: ProxyAddr,
) -> Result<ConnectOptions, AuthClientError> {
    let key = PrivateKey::from_openssh(&id.private_key)
        .map_err(|e| bad(id, "private_key")(e.to_string()))?;
    let cert =
        Certificate::from_openssh(&id.ssh_cert).map_err(|e| bad(id, "ssh_cert")(e.to_string()))?;
    Ok(ConnectOptions {
        proxy,
        user: id.user.clone(),
        identity: Identity::new(key, cert).map_err(bad(id, "ssh_cert"))?,
        proxy_host_cas: parse_ca_lines(&id.ssh_host_cas).map_err(bad(id, "ssh_host_cas"))?,
        proxy_host_keys: Vec::new(),
    })
}

/// A connected Auth API client with typed methods for every call.
#[derive(Clone)]
pub struct AuthClient {
    rpc: AuthServiceClient<Channel>,
    /// The cluster (from the identity, confirmed by Ping).
    pub cluster: String,
    /// The user the server sees.
    pub user: String,
    /// The roles the server sees.
    pub roles: Vec<String>,
}

fn endpoint() -> Endpoint {
    Endpoint::from_static("http://auth.postern")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
}

impl AuthClient {
    /// Connects straight to the Auth server at `addr` (`host:port`) with mTLS.
    pub async fn connect_direct(
        addr: &str,
        id: &IdentityFile,
    ) -> Result<AuthClient, AuthClientError> {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(id)?));
        let name = ServerName::try_from(postern_api::auth_server_name(&id.cluster))
            .map_err(|e| bad(id, "cluster")(e.to_string()))?;
        let target = addr.to_string();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let (tls, name, target) = (tls.clone(), name.clone(), target.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                let _ = tcp.set_nodelay(true);
                let s = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        });
        let channel = endpoint()
            .connect_with_connector(connector)
            .await
            .map_err(|e| AuthClientError::Connect {
                addr: addr.into(),
                reason: error_chain(&e),
            })?;
        Self::finish(channel, id, addr).await
    }

    /// Connects through a logged-in proxy session: a tunnel stream to `auth.<cluster>`, with
    /// mTLS end to end inside it.
    pub async fn connect_via_proxy(
        session: Arc<ProxySession>,
        id: &IdentityFile,
    ) -> Result<AuthClient, AuthClientError> {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(id)?));
        let name = ServerName::try_from(postern_api::auth_server_name(&id.cluster))
            .map_err(|e| bad(id, "cluster")(e.to_string()))?;
        let cluster = id.cluster.clone();
        let s2 = session.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let (tls, name, session, cluster) =
                (tls.clone(), name.clone(), s2.clone(), cluster.clone());
            async move {
                let stream = session
                    .open(
                        tunnel_proto::names::ROLE_AUTH,
                        &cluster,
                        tunnel_proto::names::DEFAULT_AUTH_PORT as u32,
                    )
                    .await
                    .map_err(std::io::Error::other)?;
                let s = tls.connect(name, stream).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        });
        let addr = format!("auth.{} through proxy {}", id.cluster, session.tunnel_addr);
        let channel = endpoint()
            .connect_with_connector(connector)
            .await
            .map_err(|e| AuthClientError::Connect {
                addr: addr.clone(),
                reason: error_chain(&e),
            })?;
        Self::finish(channel, id, &addr).await
    }

    async fn finish(
        channel: Channel,
        id: &IdentityFile,
        addr: &str,
    ) -> Result<AuthClient, AuthClientError> {
        let mut rpc = AuthServiceClient::new(channel)
            .max_decoding_message_size(16 * postern_api::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(4 * postern_api::MAX_MESSAGE_BYTES);
        // Ping proves the whole path, the client certificate included (TLS 1.3 reports a refused
        // client certificate only on the first read).
        let pong = rpc.ping(PingRequest {}).await.map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal => {
                AuthClientError::Connect {
                    addr: addr.into(),
                    reason: status_chain(&s),
                }
            }
            _ => s.into(),
        })?;
        let pong = pong.into_inner();
        if pong.cluster != id.cluster {
            return Err(AuthClientError::Connect {
                addr: addr.into(),
                reason: format!(
                    "the server is cluster '{}', the identity is for '{}'",
                    pong.cluster, id.cluster
                ),
            });
        }
        Ok(AuthClient {
            rpc,
            cluster: pong.cluster,
            user: pong.user,
            roles: pong.roles,
        })
    }

    /// The raw generated client, for calls not wrapped here.
    pub fn rpc(&self) -> AuthServiceClient<Channel> {
        self.rpc.clone()
    }
}

/// Adds what to do to the TLS alerts a refused client certificate produces.
fn with_hint(reason: String) -> String {
    let hint = if reason.contains("UnknownCA") || reason.contains("BadCertificate") {
        "the Auth server does not trust this identity's certificate: it was issued by another cluster's CA"
    } else if reason.contains("CertificateExpired") || reason.contains("Expired") {
        "certificate expired: run psh login (or pctl auth sign) again"
    } else if reason.contains("CertificateRequired") {
        "the Auth server wants a client certificate"
    } else {
        return reason;
    };
    format!("{hint} ({reason})")
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    with_hint(out)
}

fn status_chain(s: &tonic::Status) -> String {
    use std::error::Error;
    let mut out = s.message().to_string();
    let mut cur = s.source();
    while let Some(e) = cur {
        let t = e.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = e.source();
    }
    with_hint(out)
}

macro_rules! calls {
    ($($(#[$doc:meta])* $name:ident($req:ty) -> $resp:ty;)*) => {
        impl AuthClient {
            $(
                $(#[$doc])*
                pub async fn $name(&self, req: $req) -> Result<$resp, AuthClientError> {
                    Ok(self.rpc.clone().$name(req).await?.into_inner())
                }
            )*
        }
    };
}

calls! {
    /// Cluster name, server version, and the caller as the server sees it.
    ping(PingRequest) -> PingResponse;
    /// All roles (`role: list`).
    list_roles(ListRolesRequest) -> ListRolesResponse;
    /// Creates a role (`role: create`); fails if the name is taken.
    create_role(Role) -> Role;
    /// Replaces a role (`role: update`), only at `revision` when it is set.
    update_role(Role) -> Role;
    /// Creates or replaces a role (`role: create` and `update`).
    upsert_role(Role) -> Role;
    /// All users (`user: list`).
    list_users(ListUsersRequest) -> ListUsersResponse;
    /// Creates a user; the response carries its one-time signup secret (`user: create`).
    create_user(CreateUserRequest) -> CreateUserResponse;
    /// Replaces a user's roles (`user: update`).
    update_user(User) -> User;
    /// Certificates for a user's public key (`user_cert: create`).
    generate_user_certs(GenerateUserCertsRequest) -> Certs;
    /// A host certificate for an agent or a proxy (`host_cert: create`).
    generate_host_certs(GenerateHostCertsRequest) -> Certs;
    /// An agent's host certificate against a join token (no client certificate needed).
    register_agent(RegisterAgentRequest) -> Certs;
    /// A join token (`token: create`).
    create_token(CreateTokenRequest) -> CreateTokenResponse;
    /// Join tokens (`token: list`).
    list_tokens(ListTokensRequest) -> ListTokensResponse;
    /// The public parts of a CA (`cert_authority: read`).
    export_authorities(ExportAuthoritiesRequest) -> ExportAuthoritiesResponse;
    /// Newest audit events first (`event: list`).
    list_audit_events(ListAuditEventsRequest) -> ListAuditEventsResponse;
}

impl AuthClient {
    /// One role by name (`role: read`).
    pub async fn get_role(&self, name: &str) -> Result<Role, AuthClientError> {
        Ok(self
            .rpc
            .clone()
            .get_role(GetRoleRequest { name: name.into() })
            .await?
            .into_inner())
    }

    /// Deletes a role (`role: delete`).
    pub async fn delete_role(&self, name: &str) -> Result<(), AuthClientError> {
        self.rpc
            .clone()
            .delete_role(DeleteRoleRequest { name: name.into() })
            .await?;
        Ok(())
    }

    /// One user by name (`user: read`).
    pub async fn get_user(&self, name: &str) -> Result<User, AuthClientError> {
        Ok(self
            .rpc
            .clone()
            .get_user(GetUserRequest { name: name.into() })
            .await?
            .into_inner())
    }

    /// Deletes a user; its certificates stop working at once (`user: delete`).
    pub async fn delete_user(&self, name: &str) -> Result<(), AuthClientError> {
        self.rpc
            .clone()
            .delete_user(DeleteUserRequest { name: name.into() })
            .await?;
        Ok(())
    }

    /// Deletes a join token by id (`token: delete`).
    pub async fn delete_token(&self, id: &str) -> Result<(), AuthClientError> {
        self.rpc
            .clone()
            .delete_token(DeleteTokenRequest { id: id.into() })
            .await?;
        Ok(())
    }

    /// Connects with an identity file: directly when `addr` names the Auth server, through the
    /// proxy when `proxy` is given.
    pub async fn connect(id: &IdentityFile, target: Target) -> Result<AuthClient, AuthClientError> {
        match target {
            Target::Direct(addr) => Self::connect_direct(&addr, id).await,
            Target::Proxy(proxy) => {
                let opts = proxy_options(id, proxy.clone())?;
                let addr = match &proxy {
                    ProxyAddr::Web { addr, .. } | ProxyAddr::Tunnel(addr) => addr.clone(),
                };
                let session =
                    ProxySession::connect(&opts)
                        .await
                        .map_err(|e| AuthClientError::Connect {
                            addr: format!("proxy {addr}"),
                            reason: e.to_string(),
                        })?;
                Self::connect_via_proxy(Arc::new(session), id).await
            }
        }
    }
}

/// Where the Auth API is.
#[derive(Debug, Clone)]
pub enum Target {
    /// The Auth server's own address (inside its network).
    Direct(String),
    /// Through a proxy.
    Proxy(ProxyAddr),
}
