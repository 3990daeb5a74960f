//! Starting the Auth server: data dir and file checks, storage, CAs, the admin identity, the TLS
//! listener feeding tonic, and the embedded agent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postern_api::proto::auth_service_server::AuthServiceServer;
use postern_dial::mint;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::audit::Audit;
use crate::authority::{Authorities, AuthorityError};
use crate::config::{AuthConfig, ConfigError};
use crate::listener::TlsConn;
use crate::service::{self, Service, State};
use crate::storage::{
    Backend, Condition, PostgresBackend, PostgresOptions, SqliteBackend, StorageError,
};

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
    /// A stored CA rotation cannot be loaded.
    #[error(transparent)]
    Rotation(#[from] crate::rotation::RotationError),
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
    mint::running_as_root()
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
    tls: Arc<crate::server_tls::ServerTls>,
    /// The configuration it was prepared from.
    pub config: AuthConfig,
}

impl Prepared {
    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.state.authorities.cluster
    }
}

/// Checks the environment, opens storage, loads or creates the cluster, and builds the TLS
/// config. Nothing is issued here: the admin identity is written by [`serve`], once the listener
/// is bound.
pub fn prepare(config: &AuthConfig) -> Result<Prepared, AuthError> {
    config.validate()?;
    if running_as_root() && !config.allow_root {
        return Err(AuthError::Root);
    }
    let dir = &config.data_dir;
    check_data_dir(dir)?;
    let backend = open_backend(config)?;
    let authorities = Arc::new(Authorities::load_or_create(
        backend.as_ref(),
        config.cluster.as_deref(),
    )?);
    // An Auth restart mid-rotation resumes the phase it was in.
    crate::rotation::resume(backend.as_ref(), &authorities)?;
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

    let tls = Arc::new(crate::server_tls::ServerTls::new(authorities.clone())?);
    let audit = Audit::open(backend.clone(), &dir.join(files::AUDIT_LOG))
        .map_err(io_err(&dir.join(files::AUDIT_LOG)))?;
    info!(cluster = %authorities.cluster, data_dir = %dir.display(), "cluster loaded");
    Ok(Prepared {
        state: Arc::new(State {
            backend,
            authorities,
            audit,
            watches: Default::default(),
            admin_file: Some(crate::admin::AdminFile::new(config)),
        }),
        tls,
        config: config.clone(),
    })
}

/// The environment variables the PostgreSQL password is read from when no
/// `backend_password_file` is set, in this order.
pub const PASSWORD_ENV: [&str; 2] = ["POSTERN_BACKEND_PASSWORD", "PGPASSWORD"];

/// Opens the configured backend: SQLite in the data dir, or a PostgreSQL database (the password
/// from `backend_password_file`, else from [`PASSWORD_ENV`]).
pub fn open_backend(config: &AuthConfig) -> Result<Arc<dyn Backend>, AuthError> {
    let url = match config.backend.as_deref() {
        None | Some("sqlite") => {
            let db = SqliteBackend::open(&config.data_dir.join(files::DB))?;
            return Ok(Arc::new(db));
        }
        Some(url) => url,
    };
    let password = match &config.backend_password_file {
        Some(path) => {
            check_mode(path, 0o600)?;
            let text = std::fs::read_to_string(path).map_err(io_err(path))?;
            Some(text.trim_end_matches(['\r', '\n']).to_string())
        }
        None => PASSWORD_ENV
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|p| !p.is_empty())),
    };
    let db = PostgresBackend::open(&PostgresOptions {
        url: url.into(),
        password,
        ca_file: config.backend_ca_file.clone(),
    })?;
    info!(database = db.addr(), "storage: PostgreSQL");
    Ok(Arc::new(db))
}

/// Reopens the audit log file on each SIGHUP (logrotate's `postrotate`), until `shutdown`.
fn reopen_audit_on_sighup(
    state: &Arc<State>,
    shutdown: &CancellationToken,
) -> Result<(), AuthError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup =
        signal(SignalKind::hangup()).map_err(|e| AuthError::Serve(format!("SIGHUP: {e}")))?;
    let (state, shutdown) = (state.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = hup.recv() => if r.is_none() { return },
            }
            match state.audit.reopen() {
                Ok(()) => info!("SIGHUP: audit log reopened"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: audit log not reopened; still writing the old file")
                }
            }
        }
    });
    Ok(())
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
) -> Result<
    Option<(
        postern_agent::AgentConfig,
        crate::renewal::AgentRenewal,
        u64,
    )>,
    AuthError,
> {
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
    // A fresh host certificate at every start, issued by this cluster's own host CA, renewed
    // at two-thirds of its life while the server runs (see `renewal`).
    let cert_path = mint::cert_path(&key_path);
    let renewal = crate::renewal::AgentRenewal {
        authorities: p.state.authorities.clone(),
        key: key.public_key().clone(),
        host_id: t.host_id.clone(),
        cert_path: cert_path.clone(),
        ttl: p.config.agent_cert_ttl_secs,
    };
    let expires = renewal.issue_and_write()?;
    let proxy_host_ca = if t.proxy_host_ca.is_empty() {
        a.host_ca_lines()
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
        join_token_file: None,
        ca_pin: None,
        proxy_host_ca,
        proxy_host_keys: Vec::new(),
        targets: [
            (tunnel_proto::names::ROLE_AUTH.to_string(), api.into()),
            (tunnel_proto::login::LOGIN_TARGET.to_string(), login.into()),
        ]
        .into(),
        keepalive_interval_secs: t.keepalive_interval_secs,
        reconnect: Default::default(),
        ops_listen: None,
        transport: Default::default(),
        // Proxies join the proxy set only through this agent's tunnels: it finds new ones by
        // dialling the balanced address (see `postern_agent::pool`).
        pool: postern_agent::pool::PoolConfig {
            probe_secs: 5,
            probe_after_gain: true,
            ..Default::default()
        },
    };
    cfg.validate()
        .map_err(|e| AuthError::Agent(e.to_string()))?;
    Ok(Some((cfg, renewal, expires)))
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
    start(listener, prepared, shutdown)?.await
}

/// The steps that need the bound listener, done before this returns: the address file for
/// `pctl --data-dir`, and the admin identity (issued or reused only now, so that a start that
/// cannot bind issues nothing). The returned future serves until `shutdown`.
pub fn start(
    listener: TcpListener,
    prepared: Prepared,
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = Result<(), AuthError>> + Send, AuthError> {
    let bound = listener
        .local_addr()
        .map_err(|e| AuthError::Serve(e.to_string()))?;
    let dial = local_dial_addr(bound);
    crate::admin::ensure_identity(&prepared.state, &prepared.config)?;
    // Written last: its presence tells `pctl --data-dir` (and tests) the server is up.
    let addr_file = prepared.config.data_dir.join(files::ADDR);
    mint::write_file(&addr_file, format!("{dial}\n").as_bytes(), 0o644)
        .map_err(|e| AuthError::Serve(e.to_string()))?;
    Ok(serve_bound(listener, bound, dial, prepared, shutdown))
}

async fn serve_bound(
    listener: TcpListener,
    bound: SocketAddr,
    dial: SocketAddr,
    prepared: Prepared,
    shutdown: CancellationToken,
) -> Result<(), AuthError> {
    info!(listen = %bound, cluster = %prepared.cluster(), "Auth API listening (mTLS, TLS 1.3)");
    reopen_audit_on_sighup(&prepared.state, &shutdown)?;
    if let Some(addr) = prepared.config.ops_listen {
        // Only with an ops listener: a process embedding the Auth server may install its own.
        crate::metrics::install();
        postern_ops::http::bind_and_serve(addr, crate::metrics::ready(), shutdown.child_token())
            .await
            .map_err(|e| AuthError::Serve(format!("ops listener {addr}: {e}")))?;
    }

    // The login service: loopback only, reached through the agent's `login` target.
    let login_listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| AuthError::Serve(format!("login listener: {e}")))?;
    let login_addr = login_listener
        .local_addr()
        .map_err(|e| AuthError::Serve(e.to_string()))?;
    tokio::spawn(crate::login::serve(
        login_listener,
        Arc::new(crate::login::Logins {
            agent_ttl: prepared.config.agent_cert_ttl_secs,
            ..crate::login::Logins::new(prepared.state.clone(), &prepared.config.limits)
        }),
        shutdown.clone(),
    ));

    tokio::spawn(crate::rotation::run(
        prepared.state.backend.clone(),
        prepared.state.authorities.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(crate::admin::follow_tls_ca(
        prepared.state.clone(),
        shutdown.clone(),
    ));

    let agent = match agent_config(&prepared, dial, login_addr)? {
        Some((cfg, renewal, expires)) => {
            info!(proxy = ?cfg.proxy, "dialling out to the proxy");
            tokio::spawn(renewal.run(expires, shutdown.clone()));
            Some(tokio::spawn(postern_agent::run(cfg, shutdown.clone())))
        }
        None => None,
    };

    let (tx, rx) = tokio::sync::mpsc::channel::<TlsConn>(64);
    let accept = tokio::spawn(crate::listener::accept_loop(
        listener,
        prepared.tls.clone(),
        prepared.config.limits.clone(),
        tx,
        shutdown.clone(),
    ));
    // Pings keep a live but quiet client from reaching the idle timeout.
    let ping = Duration::from_secs((prepared.config.limits.api_idle_timeout_secs / 3).clamp(1, 30));

    // Policy watch streams never end on their own: end them first, or the graceful shutdown
    // below would wait for them.
    let watches = prepared.state.watches.clone();
    let watch_stop = shutdown.clone();
    tokio::spawn(async move {
        watch_stop.cancelled().await;
        watches.stop()
    });
    let svc = AuthServiceServer::new(Service::new(prepared.state.clone()))
        .max_decoding_message_size(postern_api::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(16 * postern_api::MAX_MESSAGE_BYTES);
    // Server reflection, so that grpcurl, grpcui and Postman find the API without the .proto (it
    // describes the schema only; every call is still authorized).
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(postern_api::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AuthError::Serve(format!("reflection: {e}")))?;
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    let incoming = tokio_stream::StreamExt::map(incoming, Ok::<_, std::io::Error>);
    crate::metrics::ready().set(true);
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(ping))
        .layer(crate::metrics::ApiCallsLayer)
        .add_service(svc)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await
        .map_err(|e| AuthError::Serve(e.to_string()));
    crate::metrics::ready().set(false);
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
