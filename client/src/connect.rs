//! Connecting with a [`Config`]: each credential loader in order, each address in order, until
//! one works; otherwise one error listing every attempt and why it failed.
//!
//! An address may be the Auth server itself (mTLS straight to it), a proxy's tunnel address (it
//! greets with an SSH banner), or a proxy's web address (HTTPS discovery first). Which one it is
//! is found out by dialling: an SSH banner means a tunnel address; a TLS server whose certificate
//! the cluster's TLS CA did not sign is taken for a proxy's web listener.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use postern_dial::web::WebTrust;
use tokio::io::AsyncReadExt;

use crate::auth::{AuthClient, AuthClientError, reloading};
use crate::credentials::{Credentials, Loaded};
use crate::{ConnectOptions, DialOptions, ProxyAddr, ProxySession};

/// What [`AuthClient::connect`] needs.
#[derive(Clone)]
pub struct Config {
    /// Addresses to try, in order: the Auth server, a proxy's web address or a proxy's tunnel
    /// address. Empty with a profile: the profile's proxy.
    pub addrs: Vec<String>,
    /// Credential loaders to try, in order.
    pub credentials: Vec<Credentials>,
    /// How a proxy's web certificate is trusted when the credentials do not say (a profile
    /// does). Default: the system CA bundle.
    pub web_trust: Option<WebTrust>,
    /// How long to wait for an SSH banner before taking an address for a TLS server.
    pub banner_wait: Duration,
    /// How to dial a proxy (SSH by default).
    pub dial: DialOptions,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addrs: Vec::new(),
            credentials: Vec::new(),
            web_trust: None,
            banner_wait: Duration::from_millis(300),
            dial: DialOptions::default(),
        }
    }
}

/// One failed attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The credential loader.
    pub credentials: String,
    /// The address (or `-` when the loader failed before dialling).
    pub addr: String,
    /// Why it failed.
    pub error: String,
}

/// Every attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConnectError {
    /// Each attempt, in order.
    pub attempts: Vec<Attempt>,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.attempts.is_empty() {
            return f.write_str("no credentials given: set Config.credentials");
        }
        write!(
            f,
            "cannot reach the Auth server ({} attempts):",
            self.attempts.len()
        )?;
        for a in &self.attempts {
            write!(f, "\n  - {} via {}: {}", a.credentials, a.addr, a.error)?;
        }
        Ok(())
    }
}

/// What is listening at an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// It spoke first with an SSH banner: a proxy's tunnel listener.
    Ssh,
    /// It waited for us: a TLS server (the Auth server or a proxy's web listener).
    Tls,
}

async fn classify(addr: &str, wait: Duration) -> Result<Kind, String> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| format!("cannot connect to {addr}: timed out"))?
    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(wait, s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"SSH-" => Ok(Kind::Ssh),
        Ok(Ok(_)) => Err(format!(
            "{addr} spoke first but not SSH: not a Postern address"
        )),
        Ok(Err(e)) => Err(format!("{addr} closed the connection at once: {e}")),
        Err(_) => Ok(Kind::Tls),
    }
}

/// Whether a direct attempt met a TLS server that is not the cluster's Auth server: its
/// certificate is not from the cluster's TLS CA, or it does not speak gRPC (a proxy's web
/// listener refuses ALPN `h2`).
fn is_not_auth_server(e: &AuthClientError) -> bool {
    let t = e.to_string();
    [
        "invalid peer certificate",
        "UnknownIssuer",
        "NotValidForName",
        "NoApplicationProtocol",
    ]
    .iter()
    .any(|m| t.contains(m))
}

impl AuthClient {
    /// Tries every credential loader with every address until one connects (see the module
    /// docs); the error lists each attempt.
    pub async fn connect(config: Config) -> Result<AuthClient, ConnectError> {
        let mut attempts = Vec::new();
        for creds in &config.credentials {
            let name = creds.describe();
            let loaded = match creds.load() {
                Ok(l) => l,
                Err(e) => {
                    attempts.push(Attempt {
                        credentials: name,
                        addr: "-".into(),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let mut addrs = config.addrs.clone();
            if addrs.is_empty()
                && let Some((proxy, _)) = &loaded.proxy
            {
                addrs.push(proxy.clone());
            }
            if addrs.is_empty() {
                attempts.push(Attempt {
                    credentials: name,
                    addr: "-".into(),
                    error:
                        "no address to dial: set Config.addrs (only a profile brings its proxy's)"
                            .into(),
                });
                continue;
            }
            for addr in addrs {
                match try_addr(&addr, creds, &loaded, &config).await {
                    Ok(c) => return Ok(c),
                    Err(error) => attempts.push(Attempt {
                        credentials: name.clone(),
                        addr,
                        error,
                    }),
                }
            }
        }
        Err(ConnectError { attempts })
    }
}

fn ssh_options(
    loaded: &Loaded,
    creds: &Credentials,
    proxy: ProxyAddr,
) -> Result<ConnectOptions, String> {
    let ssh = loaded.ssh.clone().ok_or_else(|| {
        format!(
            "this is a proxy address, and {} cannot log in to a proxy (no SSH certificate): give the Auth server's address, or use a profile or an identity file",
            creds.describe()
        )
    })?;
    Ok(ConnectOptions {
        proxy,
        user: ssh.user,
        identity: ssh.identity,
        proxy_host_cas: ssh.host_cas,
        proxy_host_keys: Vec::new(),
    })
}

async fn through_proxy(
    proxy: ProxyAddr,
    creds: &Credentials,
    loaded: &Loaded,
    dial: DialOptions,
) -> Result<AuthClient, String> {
    let opts = ssh_options(loaded, creds, proxy)?;
    let cluster = loaded
        .cluster
        .clone()
        .ok_or("the credentials do not name their cluster")?;
    let session = ProxySession::connect_with(&opts, dial)
        .await
        .map_err(|e| e.to_string())?;
    AuthClient::via_proxy(Arc::new(session), &cluster, reloading(creds.clone()))
        .await
        .map_err(|e| e.to_string())
}

async fn try_addr(
    addr: &str,
    creds: &Credentials,
    loaded: &Loaded,
    config: &Config,
) -> Result<AuthClient, String> {
    // The Auth server first: the common case costs one TLS handshake and nothing more.
    let direct = match AuthClient::direct(addr, reloading(creds.clone())).await {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    if is_not_auth_server(&direct) {
        // A TLS server that is not the cluster's Auth server: a proxy's web listener.
        let trust = match (&loaded.proxy, &config.web_trust) {
            (Some((p, t)), _) if p == addr => t.clone(),
            (_, Some(t)) => t.clone(),
            _ => crate::credentials::system_roots()?,
        };
        if loaded.ssh.is_none() {
            return Err(format!(
                "{addr} is not the cluster's Auth server (its certificate is not from the cluster's TLS CA), and {} cannot go through a proxy: give the Auth server's address",
                creds.describe()
            ));
        }
        return through_proxy(
            ProxyAddr::Web {
                addr: addr.into(),
                trust,
            },
            creds,
            loaded,
            config.dial,
        )
        .await;
    }
    // Not TLS at all? A proxy's tunnel listener greets with an SSH banner.
    match classify(addr, config.banner_wait).await {
        Ok(Kind::Ssh) => {
            through_proxy(ProxyAddr::Tunnel(addr.into()), creds, loaded, config.dial).await
        }
        _ => Err(direct.to_string()),
    }
}
