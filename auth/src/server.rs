//! Starting the Auth server: data dir and file checks, storage, CAs, the admin identity, the TLS
//! listener feeding tonic, and the embedded agent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use postern_api::identity::IdentityFile;
use postern_api::proto::auth_service_server::AuthServiceServer;
use postern_dial::mint;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::audit::Audit;
use crate::authority::{self, Authorities, AuthorityError};
use crate::config::{AuthConfig, ConfigError};
use crate::service::{self, ConnInfo, Service, State};
use crate::storage::{Backend, Condition, SqliteBackend, StorageError};

/// How long a client has from TCP accept to a finished TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress, at most (slowloris guard).
const MAX_HANDSHAKES: usize = 256;
/// Lifetime of the server's own TLS certificate (re-issued at every start).
const SERVER_CERT_TTL: u64 = 365 * 24 * 3600;

/// Files in the data dir.
pub mod files {
    /// The SQLite database.
    pub const DB: &str = "auth.db";
    /// The admin identity `pctl --data-dir` uses.
    pub const ADMIN_IDENTITY: &str = "admin.identity";
    /// The API's bound address, for `pctl --data-dir`.
    pub const ADDR: &str = "auth_addr";
    /// The JSON-lines audit log.
    pub const AUDIT_LOG: &str = "audit.log";
    /// The embedded agent's key (its certificate is `agent_key-cert.pub`).
    pub const AGENT_KEY: &str = "agent_key";
}

/// Why the Auth server cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Running as root without `--allow-root`.
    #[error(
        "refusing to run as root: the Auth server needs no privileges (only an SSH service needs root). Run it as its own user, or pass --allow-root"
    )]
    Root,
    /// A secret file or the data dir is readable by others.
    #[error("{path} has mode {mode:o}, readable by other users: run chmod {want:o} {path}")]
    LoosePermissions {
        /// The file or directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// The mode it should have.
        want: u32,
    },
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The CAs cannot be loaded or used.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// TLS setup failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The listener failed.
    #[error("serving the API: {0}")]
    Serve(String),
    /// The embedded agent's configuration is unusable.
    #[error("embedded agent: {0}")]
    Agent(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Io {
        path: path.into(),
        source,
    }
}

/// Whether this process runs as root (the owner of `/proc/self` is the effective user).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn check_mode(path: &Path, want: u32) -> Result<(), AuthError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(AuthError::LoosePermissions {
                    path: path.into(),
                    mode,
                    want,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Creates the data dir (0700) or checks its mode and that of every secret file in it.
pub fn check_data_dir(dir: &Path) -> Result<(), AuthError> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
    }
    check_mode(dir, 0o700)?;
    for f in [
        files::DB,
        "auth.db-wal",
        "auth.db-shm",
        files::ADMIN_IDENTITY,
        files::AUDIT_LOG,
        files::AGENT_KEY,
    ] {
        check_mode(&dir.join(f), 0o600)?;
    }
    Ok(())
}

/// Everything `run` serves, ready before the listener accepts.
pub struct Prepared {
    /// The service state.
    pub state: Arc<State>,
    tls: Arc<rustls::ServerConfig>,
    config: AuthConfig,
}

impl Prepared {
    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.state.authorities.cluster
    }
}

/// Checks the environment, opens storage, loads or creates the cluster, writes the admin
/// identity, and builds the TLS config.
pub fn prepare(config: &AuthConfig) -> Result<Prepared, AuthError> {
    config.validate()?;
    if running_as_root() && !config.allow_root {
        return Err(AuthError::Root);
    }
    let dir = &config.data_dir;
    check_data_dir(dir)?;
    let backend: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&dir.join(files::DB))?);
    let authorities = Arc::new(Authorities::load_or_create(
        backend.as_ref(),
        config.cluster.as_deref(),
    )?);
    for role in service::preset_roles() {
        let json =
            serde_json::to_string(&postern_api::resource::to_doc(&role)).expect("role serializes");
        match backend.put("role", &role.name, &json, Condition::Absent) {
            Ok(_) | Err(StorageError::Exists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let pruned = backend.forget_certs(None, mint::now_unix())?;
    debug!(pruned, "expired client certificates forgotten");

    // The admin identity, re-issued at every start.
    let key = mint::generate_key();
    let issued = authorities.issue_user(
        service::ADMIN_USER,
        key.public_key(),
        config.admin_identity_ttl_secs,
    )?;
    backend.add_cert(&issued.tls_fingerprint, service::ADMIN_USER, issued.expires)?;
    let admin = IdentityFile {
        version: postern_api::identity::IDENTITY_VERSION,
        cluster: authorities.cluster.clone(),
        user: service::ADMIN_USER.into(),
        expires: issued.expires,
        private_key: key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .map_err(|e| AuthError::Tls(e.to_string()))?
            .to_string(),
        ssh_cert: issued.ssh_cert,
        tls_cert: issued.tls_cert,
        tls_cas: vec![authorities.tls_ca_pem.clone()],
        ssh_host_cas: vec![authorities.host_ca_line()],
    };
    let admin_path = dir.join(files::ADMIN_IDENTITY);
    admin
        .save(&admin_path)
        .map_err(|e| AuthError::Tls(e.to_string()))?;

    let tls = server_tls(&authorities)?;
    let audit = Audit::open(backend.clone(), &dir.join(files::AUDIT_LOG))
        .map_err(io_err(&dir.join(files::AUDIT_LOG)))?;
    info!(cluster = %authorities.cluster, data_dir = %dir.display(), "cluster loaded");
    Ok(Prepared {
        state: Arc::new(State {
            backend,
            authorities,
            audit,
        }),
        tls,
        config: config.clone(),
    })
}

fn server_tls(a: &Authorities) -> Result<Arc<rustls::ServerConfig>, AuthError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(a.tls_ca_der()?)
        .map_err(|e| AuthError::Tls(e.to_string()))?;
    // Clients without a certificate get through the handshake but can call only Ping and
    // RegisterAgent (the join token is their credential); a certificate that does not chain to
    // the cluster's TLS CA, or is expired, fails the handshake.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| AuthError::Tls(e.to_string()))?;
    let (chain, key) = a.server_tls(SERVER_CERT_TTL)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AuthError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| AuthError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A TLS connection tonic serves, carrying who is on the other end.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The address `pctl --data-dir` and the embedded agent dial: the bound one, with an
/// unspecified host replaced by loopback.
pub fn local_dial_addr(bound: SocketAddr) -> SocketAddr {
    let mut a = bound;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}

fn agent_config(
    p: &Prepared,
    api: SocketAddr,
    login: SocketAddr,
) -> Result<Option<postern_agent::AgentConfig>, AuthError> {
    let Some(t) = &p.config.tunnel else {
        return Ok(None);
    };
    let a = &p.state.authorities;
    let dir = &p.config.data_dir;
    let key_path = dir.join(files::AGENT_KEY);
    let key = if key_path.exists() {
        mint::read_key(&key_path).map_err(|e| AuthError::Agent(e.to_string()))?
    } else {
        let k = mint::generate_key();
        mint::write_key_pair(&key_path, &k).map_err(|e| AuthError::Agent(e.to_string()))?;
        k
    };
    // A fresh host certificate at every start, issued by this cluster's own host CA.
    let issued = a.issue_host(key.public_key(), &t.host_id, &[], 30 * 24 * 3600)?;
    let cert_path = mint::cert_path(&key_path);
    mint::write_file(
        &cert_path,
        format!("{}\n", issued.ssh_cert).as_bytes(),
        0o644,
    )
    .map_err(|e| AuthError::Agent(e.to_string()))?;
    let proxy_host_ca = if t.proxy_host_ca.is_empty() {
        vec![a.host_ca_line()]
    } else {
        t.proxy_host_ca.clone()
    };
    let cfg = postern_agent::AgentConfig {
        host_id: t.host_id.clone(),
        cluster: a.cluster.clone(),
        proxy: Some(t.proxy.clone()),
        tunnel_addr: None,
        web: t.web.clone(),
        host_key_file: key_path,
        host_cert_file: Some(cert_path),
        proxy_host_ca,
        proxy_host_keys: Vec::new(),
        targets: [
            (tunnel_proto::names::ROLE_AUTH.to_string(), api),
            (tunnel_proto::login::LOGIN_TARGET.to_string(), login),
        ]
        .into(),
        keepalive_interval_secs: t.keepalive_interval_secs,
        reconnect: Default::default(),
        transport: Default::default(),
    };
    cfg.validate()
        .map_err(|e| AuthError::Agent(e.to_string()))?;
    Ok(Some(cfg))
}

/// Prepares and serves until `shutdown`: the API on `listener`, and the tunnel if configured.
pub async fn run(
    listener: TcpListener,
    config: AuthConfig,
    shutdown: CancellationToken,
) -> Result<(), AuthError> {
    let prepared = prepare(&config)?;
    serve(listener, prepared, shutdown).await
}

/// Serves a prepared Auth server until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    prepared: Prepared,
    shutdown: CancellationToken,
) -> Result<(), AuthError> {
    let bound = listener
        .local_addr()
        .map_err(|e| AuthError::Serve(e.to_string()))?;
    let dial = local_dial_addr(bound);
    let addr_file = prepared.config.data_dir.join(files::ADDR);
    mint::write_file(&addr_file, format!("{dial}\n").as_bytes(), 0o644)
        .map_err(|e| AuthError::Serve(e.to_string()))?;
    info!(listen = %bound, cluster = %prepared.cluster(), "Auth API listening (mTLS, TLS 1.3)");

    // The login service: loopback only, reached through the agent's `login` target.
    let login_listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| AuthError::Serve(format!("login listener: {e}")))?;
    let login_addr = login_listener
        .local_addr()
        .map_err(|e| AuthError::Serve(e.to_string()))?;
    tokio::spawn(crate::login::serve(
        login_listener,
        prepared.state.clone(),
        shutdown.clone(),
    ));

    let agent = match agent_config(&prepared, dial, login_addr)? {
        Some(cfg) => {
            info!(proxy = ?cfg.proxy, "dialling out to the proxy");
            Some(tokio::spawn(postern_agent::run(cfg, shutdown.clone())))
        }
        None => None,
    };

    let (tx, rx) = tokio::sync::mpsc::channel::<TlsConn>(64);
    let acceptor = TlsAcceptor::from(prepared.tls.clone());
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let accept_shutdown = shutdown.clone();
    let accept = tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = accept_shutdown.cancelled() => return,
                p = handshakes.clone().acquire_owned() => p.expect("semaphore open"),
            };
            let (tcp, peer) = tokio::select! {
                _ = accept_shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let cert_fingerprint = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| authority::fingerprint(c));
                        let info = ConnInfo {
                            peer,
                            cert_fingerprint,
                        };
                        let _ = tx.send(TlsConn { inner: tls, info }).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });

    let svc = AuthServiceServer::new(Service::new(prepared.state.clone()))
        .max_decoding_message_size(postern_api::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(16 * postern_api::MAX_MESSAGE_BYTES);
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    let incoming = tokio_stream::StreamExt::map(incoming, Ok::<_, std::io::Error>);
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await
        .map_err(|e| AuthError::Serve(e.to_string()));
    accept.abort();
    if let Some(a) = agent {
        match a.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "embedded agent stopped with an error"),
            Err(e) => warn!(error = %e, "embedded agent task failed"),
        }
    }
    info!("Auth server stopped");
    result
}
