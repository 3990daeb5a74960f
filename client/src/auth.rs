//! [`AuthClient`]: the Auth API over mTLS, dialled directly or carried inside a tunnel stream
//! through the proxy (the proxy only ever sees ciphertext).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use postern_api::identity::IdentityFile;
use postern_api::proto::auth_service_client::AuthServiceClient;
use postern_api::proto::*;
use russh::keys::ssh_key::PrivateKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::{Channel, Endpoint};

use crate::credentials::{CredentialError, Credentials, Loaded, from_identity};
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
    /// The credentials cannot be loaded.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    /// The proxy is up but cannot reach the cluster's Auth server.
    #[error("auth server unreachable through proxy {proxy}: {reason}")]
    Unreachable {
        /// The proxy's tunnel address.
        proxy: String,
        /// Why (the proxy's refusal: no tunnel for the cluster, ...).
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

/// Proxy login options from an identity: its user, SSH certificate and the cluster's host CA.
pub fn proxy_options(
    id: &IdentityFile,
    proxy: ProxyAddr,
) -> Result<ConnectOptions, AuthClientError> {
    let loaded = from_identity(id, "identity")?;
    let ssh = loaded.ssh.expect("identities carry SSH credentials");
    Ok(ConnectOptions {
        proxy,
        user: ssh.user,
        identity: ssh.identity,
        proxy_host_cas: ssh.host_cas,
        proxy_host_keys: Vec::new(),
    })
}

/// Fresh credentials for each new connection.
pub type Source = Arc<dyn Fn() -> Result<Loaded, String> + Send + Sync>;

/// A source that always gives the same credentials.
pub fn fixed(loaded: Loaded) -> Source {
    Arc::new(move || Ok(loaded.clone()))
}

/// A source that asks `creds` at every connection (a dynamic identity file reloads there).
pub fn reloading(creds: Credentials) -> Source {
    Arc::new(move || creds.load().map_err(|e| e.to_string()))
}

/// A byte stream TLS can run over: TCP, or a tunnel stream.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Opens a fresh byte stream to an Auth server for each connection: what
/// [`AuthClient::over_dialer`] runs mTLS over (a proxy uses a stream to the `auth` target of its
/// own tunnel).
pub type Dialer = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = std::io::Result<Box<dyn Io>>> + Send>,
        > + Send
        + Sync,
>;

/// A connected Auth API client with typed methods for every call.
#[derive(Clone)]
pub struct AuthClient {
    rpc: AuthServiceClient<Channel>,
    /// The connection, for other services of the Auth server (reflection, health).
    channel: Channel,
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
        Self::direct(addr, fixed(from_identity(id, "identity")?)).await
    }

    /// Connects straight to `addr`, taking credentials from `source` at every connection.
    pub async fn direct(addr: &str, source: Source) -> Result<AuthClient, AuthClientError> {
        let first = source().map_err(|reason| AuthClientError::Connect {
            addr: addr.into(),
            reason,
        })?;
        let cluster = first.cluster.clone();
        let target = addr.to_string();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let (source, target) = (source.clone(), target.clone());
            async move {
                let l = source().map_err(std::io::Error::other)?;
                let tcp =
                    tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&target))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                        })??;
                let _ = tcp.set_nodelay(true);
                let s = tokio_rustls::TlsConnector::from(l.tls)
                    .connect(l.server_name, Box::new(tcp) as Box<dyn Io>)
                    .await?;
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
        Self::finish(channel, cluster.as_deref(), addr).await
    }

    /// Connects through a logged-in proxy session: a tunnel stream to `auth.<cluster>`, with
    /// mTLS end to end inside it.
    pub async fn connect_via_proxy(
        session: Arc<ProxySession>,
        id: &IdentityFile,
    ) -> Result<AuthClient, AuthClientError> {
        Self::via_proxy(session, &id.cluster, fixed(from_identity(id, "identity")?)).await
    }

    /// Connects through `session` to cluster `cluster`'s Auth server, taking credentials from
    /// `source` at every connection.
    pub async fn via_proxy(
        session: Arc<ProxySession>,
        cluster: &str,
        source: Source,
    ) -> Result<AuthClient, AuthClientError> {
        let proxy = session.tunnel_addr.clone();
        let unreachable = |reason: String| AuthClientError::Unreachable {
            proxy: proxy.clone(),
            reason,
        };
        // Open the first stream here, so that a refusal (no tunnel for the cluster) is reported
        // as such instead of as a transport error.
        let first = session
            .open(
                tunnel_proto::names::ROLE_AUTH,
                cluster,
                tunnel_proto::names::DEFAULT_AUTH_PORT as u32,
            )
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let first = Arc::new(std::sync::Mutex::new(Some(first)));
        let cluster_s = cluster.to_string();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let (source, session, cluster, first) = (
                source.clone(),
                session.clone(),
                cluster_s.clone(),
                first.clone(),
            );
            async move {
                let l = source().map_err(std::io::Error::other)?;
                let ready = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                let stream = match ready {
                    Some(s) => s,
                    None => session
                        .open(
                            tunnel_proto::names::ROLE_AUTH,
                            &cluster,
                            tunnel_proto::names::DEFAULT_AUTH_PORT as u32,
                        )
                        .await
                        .map_err(std::io::Error::other)?,
                };
                let s = tokio_rustls::TlsConnector::from(l.tls)
                    .connect(l.server_name, Box::new(stream) as Box<dyn Io>)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        });
        let addr = format!("auth.{cluster} through proxy {proxy}");
        let channel = endpoint()
            .connect_with_connector(connector)
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        Self::finish(channel, Some(cluster), &addr).await
    }

    /// Connects over streams `dial` opens, with mTLS from `source`; `what` names the path in
    /// errors.
    pub async fn over_dialer(
        source: Source,
        what: &str,
        dial: Dialer,
    ) -> Result<AuthClient, AuthClientError> {
        let first = source().map_err(|reason| AuthClientError::Connect {
            addr: what.into(),
            reason,
        })?;
        let cluster = first.cluster.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let (source, dial) = (source.clone(), dial.clone());
            async move {
                let l = source().map_err(std::io::Error::other)?;
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, dial())
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "stream open timed out")
                    })??;
                let s = tokio_rustls::TlsConnector::from(l.tls)
                    .connect(l.server_name, stream)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        });
        let channel = endpoint()
            .connect_with_connector(connector)
            .await
            .map_err(|e| AuthClientError::Connect {
                addr: what.into(),
                reason: error_chain(&e),
            })?;
        Self::finish(channel, cluster.as_deref(), what).await
    }

    async fn finish(
        channel: Channel,
        cluster: Option<&str>,
        addr: &str,
    ) -> Result<AuthClient, AuthClientError> {
        let mut rpc = AuthServiceClient::new(channel.clone())
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
        if let Some(want) = cluster.filter(|c| *c != pong.cluster) {
            return Err(AuthClientError::Connect {
                addr: addr.into(),
                reason: format!(
                    "the server is cluster '{}', the credentials are for '{want}'",
                    pong.cluster
                ),
            });
        }
        Ok(AuthClient {
            rpc,
            channel,
            cluster: pong.cluster,
            user: pong.user,
            roles: pong.roles,
        })
    }

    /// The raw generated client, for calls not wrapped here.
    pub fn rpc(&self) -> AuthServiceClient<Channel> {
        self.rpc.clone()
    }

    /// The authenticated connection, for the Auth server's other gRPC services (server
    /// reflection).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

/// Adds what to do to the TLS alerts a refused client certificate produces.
fn with_hint(reason: String) -> String {
    let hint = if reason.contains("UnknownCA")
        || reason.contains("BadCertificate")
        || reason.contains("alert: DecryptError")
    {
        "the Auth server does not trust this identity's certificate: it was issued by another cluster's CA, or by a TLS CA a rotation rolled back or retired: get a new identity"
    } else if reason.contains("invalid peer certificate: BadSignature")
        || reason.contains("invalid peer certificate: UnknownIssuer")
    {
        "this identity does not trust the Auth server's certificate: the cluster's TLS CA was rotated since it was issued (or it is another cluster): get a new identity (psh login, pctl auth sign)"
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
    /// Starts, advances or rolls back a CA rotation (`cert_authority: update`).
    rotate_cert_authority(RotateCertAuthorityRequest) -> CaRotation;
    /// Each rotatable CA's rotation state (`cert_authority: read`).
    list_ca_rotations(ListCaRotationsRequest) -> ListCaRotationsResponse;
    /// Newest audit events first (`event: list`).
    list_audit_events(ListAuditEventsRequest) -> ListAuditEventsResponse;
    /// Locks a user, a role or an agent (`lock: create`); every proxy enforces it within seconds.
    create_lock(Lock) -> Lock;
    /// Every lock (`lock: list`).
    list_locks(ListLocksRequest) -> ListLocksResponse;
    /// Removes a lock (`lock: delete`).
    delete_lock(DeleteLockRequest) -> Empty;
    /// Stores a proxy's stream access events (`event: create`), idempotent by event id.
    emit_stream_events(EmitStreamEventsRequest) -> EmitStreamEventsResponse;
    /// Stream access events, newest first (`event: list`).
    list_stream_events(ListStreamEventsRequest) -> ListStreamEventsResponse;
    /// A proxy's heartbeat into the proxy set; answers the live set (`proxy: create` and `list`).
    proxy_heartbeat(ProxyHeartbeatRequest) -> ProxyHeartbeatResponse;
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
    pub async fn connect_identity(
        id: &IdentityFile,
        target: Target,
    ) -> Result<AuthClient, AuthClientError> {
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
