//! The PostgreSQL backend: several Auth servers on one database.
//!
//! - **Driver**: `tokio-postgres` through a `deadpool-postgres` pool, on a two-thread runtime
//!   owned by the backend. [`Backend`] is synchronous and is called from blocking threads; each
//!   call is spawned on that runtime and waited for, under [`CALL_TIMEOUT`]. A call made from a
//!   tokio worker thread by mistake is wrapped in `block_in_place`, so it never stalls the others.
//! - **Conditional writes** are single statements (`INSERT … ON CONFLICT`, `UPDATE … WHERE
//!   revision = $n`): PostgreSQL's row locks give exactly one winner among any number of Auth
//!   servers.
//! - **The change feed** is global: one sequence, written by a trigger under an advisory lock
//!   held to commit (see `migrations`). Watches poll it, so they see every server's writes.
//! - **Cluster init**: `init_meta` takes an advisory lock on the guard key, so of two first starts
//!   exactly one stores its CAs; the other loads them.
//! - **Outages**: a lost connection is dropped by the pool and a new one is made on the next call;
//!   calls during the outage fail with [`StorageError::Unavailable`] naming the database.
//! - **TLS**: with `backend_ca_file` the connection is TLS (rustls, ring), verifying the server's
//!   certificate chain and host name against that CA; `sslmode=require` without a CA file is
//!   refused by the configuration check.

use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};

use super::migrations::{PG_MIGRATE_LOCK, POSTGRES as MIGRATIONS};
use super::*;

/// The longest one storage call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a new connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per Auth server.
pub const POOL_SIZE: usize = 16;
/// The advisory-lock namespace of `init_meta` guards (the two-key form: this, hash of the key).
const META_LOCK_NS: i32 = 0x7073_746e;

/// Where and how to reach the database.
#[derive(Clone)]
pub struct PostgresOptions {
    /// `postgres://user@host:port/db[?options]`, without a password.
    pub url: String,
    /// The password (from a file or the environment), if the server asks for one.
    pub password: Option<String>,
    /// PEM CA certificate(s) the server's certificate must chain to; set means TLS.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "MASKED"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// A problem with `backend` or its files, before any connection.
#[derive(Debug, thiserror::Error)]
pub enum PostgresConfigError {
    /// The URL does not parse.
    #[error("not a PostgreSQL URL ({0}): write postgres://user@host:port/database")]
    Url(String),
    /// The URL carries a password.
    #[error(
        "the URL holds a password: remove it and put it in backend_password_file or POSTERN_BACKEND_PASSWORD"
    )]
    PasswordInUrl,
    /// `sslmode=require` without a CA to verify the server with.
    #[error(
        "sslmode=require needs backend_ca_file (the CA that signed the database's certificate)"
    )]
    TlsWithoutCa,
    /// The CA file cannot be read or holds no certificate.
    #[error("backend_ca_file {path}: {problem}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Parses and checks a `postgres://` URL (no connection).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, PostgresConfigError> {
    let c = tokio_postgres::Config::from_str(url)
        .map_err(|e| PostgresConfigError::Url(e.to_string()))?;
    if c.get_password().is_some() {
        return Err(PostgresConfigError::PasswordInUrl);
    }
    Ok(c)
}

/// `postgres://user@host:port/db` for messages: never a password.
fn display_addr(c: &tokio_postgres::Config) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        c.get_user().unwrap_or(""),
        c.get_dbname().unwrap_or("")
    )
}

fn tls(
    path: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PostgresConfigError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let bad = |problem: String| PostgresConfigError::Ca {
        path: path.into(),
        problem,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The PostgreSQL backend (see the module docs).
pub struct PostgresBackend {
    addr: String,
    pool: Pool,
    /// Runs the driver; taken and shut down in the background on drop (a runtime must not be
    /// dropped inside another one's async context).
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        self.pool.close();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Maps driver errors for one database address.
#[derive(Clone)]
struct Errs(Arc<str>);

impl Errs {
    fn pg(&self, e: tokio_postgres::Error) -> StorageError {
        if e.is_closed() {
            return self.gone(format!("connection lost ({e})"));
        }
        StorageError::Postgres {
            addr: self.0.to_string(),
            source: e,
        }
    }

    fn pool(&self, e: PoolError) -> StorageError {
        match e {
            PoolError::Backend(e) if e.as_db_error().is_some() => self.pg(e),
            PoolError::Backend(e) => self.gone(chain(&e)),
            PoolError::Timeout(_) => self.gone(format!(
                "no connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            )),
            other => self.gone(other.to_string()),
        }
    }

    fn gone(&self, problem: String) -> StorageError {
        StorageError::Unavailable {
            addr: self.0.to_string(),
            problem,
        }
    }
}

/// An error and its causes, `a: b: c` (the driver's connect errors keep the OS error in the
/// cause).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cause = c.source();
    }
    s
}

impl PostgresBackend {
    /// Connects, migrates, and returns the backend. Fails (naming the address) if the database
    /// cannot be reached within a few seconds.
    pub fn open(opts: &PostgresOptions) -> Result<PostgresBackend, StorageError> {
        let mut pg = parse_url(&opts.url).map_err(|e| StorageError::Unavailable {
            addr: opts.url.clone(),
            problem: e.to_string(),
        })?;
        let addr = display_addr(&pg);
        let errs = Errs(addr.as_str().into());
        if let Some(p) = &opts.password {
            pg.password(p.as_bytes());
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(CONNECT_TIMEOUT);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("postern-auth");
        }
        let mgr_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match &opts.ca_file {
            Some(ca) => Manager::from_config(
                pg,
                tls(ca).map_err(|e| errs.gone(e.to_string()))?,
                mgr_config,
            ),
            None => {
                if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                    return Err(errs.gone(PostgresConfigError::TlsWithoutCa.to_string()));
                }
                Manager::from_config(pg, tokio_postgres::NoTls, mgr_config)
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("postern-pg")
            .enable_all()
            .build()
            .map_err(|e| errs.gone(format!("cannot start its runtime: {e}")))?;
        let pool = {
            let _in_rt = rt.enter();
            Pool::builder(mgr)
                .max_size(POOL_SIZE)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(CONNECT_TIMEOUT))
                .create_timeout(Some(CONNECT_TIMEOUT))
                .recycle_timeout(Some(CONNECT_TIMEOUT))
                .build()
                .map_err(|e| errs.gone(e.to_string()))?
        };
        let b = PostgresBackend {
            addr,
            pool,
            rt: Some(rt),
        };
        b.migrate()?;
        Ok(b)
    }

    /// The database, as `postgres://user@host:port/db`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The schema version this build migrates to.
    pub fn schema_version() -> u32 {
        MIGRATIONS.len() as u32
    }

    /// Runs `f` with a pooled connection on the backend's runtime and waits for it.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Client, Errs) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StorageError>> + Send + 'static,
    {
        let errs = Errs(self.addr.as_str().into());
        let pool = self.pool.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let timeout_errs = errs.clone();
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        rt.spawn(async move {
            let work = async {
                let client = pool.get().await.map_err(|e| errs.pool(e))?;
                f(client, errs).await
            };
            let r = tokio::time::timeout(CALL_TIMEOUT, work)
                .await
                .unwrap_or_else(|_| {
                    Err(timeout_errs.gone(format!("no answer within {} s", CALL_TIMEOUT.as_secs())))
                });
            let _ = tx.send(r);
        });
        let wait = move || {
            rx.recv().unwrap_or_else(|_| {
                Err(StorageError::Unavailable {
                    addr: self.addr.clone(),
                    problem: "the storage runtime stopped".into(),
                })
            })
        };
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
    }

    fn migrate(&self) -> Result<(), StorageError> {
        let addr = self.addr.clone();
        self.call(move |mut c, e| async move {
            let tx = c.transaction().await.map_err(|x| e.pg(x))?;
            // Two servers starting at once: the second waits here, then finds the schema current.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_MIGRATE_LOCK])
                .await
                .map_err(|x| e.pg(x))?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
            )
            .await
            .map_err(|x| e.pg(x))?;
            let current: i32 = tx
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
                .await
                .map_err(|x| e.pg(x))?
                .get(0);
            if current as usize > MIGRATIONS.len() {
                return Err(StorageError::TooNew {
                    path: addr.into(),
                    found: current as u32,
                    supported: MIGRATIONS.len() as u32,
                });
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
                tx.batch_execute(sql).await.map_err(|x| e.pg(x))?;
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES ($1)",
                    &[&(i as i32 + 1)],
                )
                .await
                .map_err(|x| e.pg(x))?;
            }
            tx.commit().await.map_err(|x| e.pg(x))
        })
    }
}

mod queries;
