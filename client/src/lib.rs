//! # postern-client: reach a target behind an agent, through the proxy
//!
//! [`ProxySession::connect`] discovers the tunnel address from the proxy's web address, logs in
//! with a user certificate (checking the proxy's host certificate against the cluster's host CA),
//! and [`ProxySession::open`] opens a `direct-tcpip` channel to `<target>.<cluster>`, returned as
//! a [`TunnelStream`] (`AsyncRead + AsyncWrite`). [`connect_target`] does both for one stream.
//!
//! [`auth::AuthClient`] calls the Auth API over mTLS, directly or inside such a stream.
//!
//! ## Layout
//! - this file: options, session, errors; `stream`: [`TunnelStream`] and its per-stream credit;
//!   `quic`: the session over QUIC ([`Transport::Quic`]);
//! - [`auth`]: the Auth API client (mTLS, direct or through the proxy, typed calls);
//! - [`credentials`]: the five credential loaders; [`profile`]: what `psh login` writes;
//! - [`requests`]: access requests from the SDK (create, get, list, review, reissue);
//! - [`bot`]: Machine ID, the bot behind `psh bot start` that keeps an identity file renewed;
//! - [`times`]: times for people (RFC 3339 with a relative hint);
//! - [`connect`]: `Config` and connecting to the first address that works;
//! - [`doctor`]: each step of the path to the Auth API checked, with the fix for the first that
//!   fails (`pctl doctor`, `psh doctor`);
//!
//! The admin and user CLIs, `pctl` and `psh`, are the `postern-cli` crate: this SDK depends on
//! no command-line crates.

pub mod auth;
pub mod bot;
pub mod connect;
pub mod credentials;
pub mod doctor;
pub mod profile;
mod quic;
pub mod requests;
mod stream;
pub mod times;

pub use stream::TunnelStream;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use postern_dial::DialError;
use postern_dial::ssh::{Identity, ProxyVerifier, client_config, login_with_id};
use postern_dial::web::{WebTrust, discover_tunnel_addr, host_of};
use russh::client::{Handle, Session};
use russh::keys::PublicKeyOrCertificate;
use russh::keys::ssh_key::Fingerprint;
use russh::{ChannelId, ChannelOpenFailure};
use tunnel_proto::names::StreamTarget;

/// Where the proxy is and how to trust it.
#[derive(Debug, Clone)]
pub enum ProxyAddr {
    /// The proxy's web address: the tunnel address is discovered over HTTPS.
    Web {
        /// `host:port` of the web listener.
        addr: String,
        /// How its TLS certificate is trusted.
        trust: WebTrust,
    },
    /// The proxy's tunnel address, dialled directly.
    Tunnel(String),
}

/// Everything needed to log in to a proxy as a user.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The proxy.
    pub proxy: ProxyAddr,
    /// Login name (a principal of the user certificate).
    pub user: String,
    /// User key and certificate.
    pub identity: Identity,
    /// Fingerprints of the cluster's host CA keys (they sign the proxy's host certificate).
    pub proxy_host_cas: Vec<Fingerprint>,
    /// Plain proxy host keys trusted without a certificate.
    pub proxy_host_keys: Vec<Fingerprint>,
}

/// Why a stream could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Discovery, connect, host verification or login failed.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The proxy (or the agent behind it) refused the stream, saying why.
    #[error("stream to {host} refused: {reason}")]
    Refused {
        /// `<target>.<cluster>` asked for.
        host: String,
        /// The proxy's reason ("no tunnel for cluster X", ...).
        reason: String,
    },
    /// The SSH session failed while opening the stream.
    #[error("opening stream to {host}: {source}")]
    Ssh {
        /// `<target>.<cluster>` asked for.
        host: String,
        /// What russh said.
        source: russh::Error,
    },
}

/// Records why the proxy refused each channel, since russh reports only the code, and why it
/// closed the connection (a lock, a deleted user), since russh reports only "disconnected".
#[derive(Default)]
struct Refusals(Mutex<Vec<(ChannelId, String)>>, Mutex<Option<String>>);

/// The session's russh handler.
pub(crate) struct ClientHandler {
    verifier: ProxyVerifier,
    refusals: Arc<Refusals>,
}

impl russh::client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(self.verifier.verify(key))
    }

    async fn channel_open_failure(
        &mut self,
        channel: ChannelId,
        _reason: ChannelOpenFailure,
        description: &str,
        _language: &str,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let mut v = self.refusals.0.lock().unwrap_or_else(|p| p.into_inner());
        v.push((channel, description.to_owned()));
        if v.len() > 64 {
            v.remove(0);
        }
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: russh::client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        match reason {
            russh::client::DisconnectReason::ReceivedDisconnect(info) => {
                *self.refusals.1.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.message);
                Ok(())
            }
            russh::client::DisconnectReason::Error(e) => Err(e),
        }
    }
}

/// How a client reaches the proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// SSH over TCP (the tunnel address): what OpenSSH speaks too.
    #[default]
    Ssh,
    /// QUIC over UDP (the proxy's QUIC listener, from discovery or a tunnel address's UDP
    /// twin): one QUIC stream per stream, flow-controlled by QUIC itself.
    Quic,
    /// QUIC when the proxy offers it and its handshake completes within 1.5 s, else SSH (UDP
    /// blocked on the way, or QUIC off at the proxy). A refused login or an untrusted proxy is
    /// not retried over SSH: it is the answer.
    Auto,
}

/// The variable that picks the transport of `psh` and `pctl` (`ssh`, `quic` or `auto`).
pub const TRANSPORT_ENV: &str = "POSTERN_TRANSPORT";
/// The variable that sets [`DialOptions::quic_mtu_upper_bound`] for `psh` and `pctl`.
pub const QUIC_MTU_ENV: &str = "POSTERN_QUIC_MTU";

/// How a client dials a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialOptions {
    /// The transport ([`Transport::Ssh`] by default).
    pub transport: Transport,
    /// On QUIC, the upper bound of path MTU discovery, UDP payload bytes (1200..=6500). Default
    /// 1452, what a 1,500-byte path carries; discovery settles on what the path carries, so a
    /// higher bound is safe and pays on loopback and jumbo-frame networks, at the cost of a
    /// larger receive buffer (about 13 MiB at 6500 instead of 3).
    pub quic_mtu_upper_bound: u16,
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            transport: Transport::Ssh,
            quic_mtu_upper_bound: tunnel_proto::quic::MTU_UPPER_BOUND_DEFAULT,
        }
    }
}

impl DialOptions {
    /// The options [`TRANSPORT_ENV`] and [`QUIC_MTU_ENV`] name (the defaults where unset or
    /// empty); a value that is not one is an error naming the variable.
    pub fn from_env() -> Result<DialOptions, String> {
        let quic_mtu_upper_bound = match std::env::var(QUIC_MTU_ENV) {
            Ok(v) if !v.is_empty() => v
                .parse::<u16>()
                .ok()
                .filter(|m| tunnel_proto::quic::mtu_bound_ok(*m))
                .ok_or_else(|| {
                    format!(
                        "{QUIC_MTU_ENV}: '{v}' is not a UDP payload size in {}..={}",
                        tunnel_proto::quic::MTU_UPPER_BOUND_MIN,
                        tunnel_proto::quic::MTU_UPPER_BOUND_MAX
                    )
                })?,
            _ => tunnel_proto::quic::MTU_UPPER_BOUND_DEFAULT,
        };
        Ok(DialOptions {
            transport: Transport::from_env()?,
            quic_mtu_upper_bound,
        })
    }
}

impl Transport {
    /// The transport [`TRANSPORT_ENV`] names; SSH when it is unset or empty.
    pub fn from_env() -> Result<Transport, String> {
        match std::env::var(TRANSPORT_ENV) {
            Ok(v) if !v.is_empty() => v.parse().map_err(|e| format!("{TRANSPORT_ENV}: {e}")),
            _ => Ok(Transport::Ssh),
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Transport, String> {
        match s {
            "ssh" => Ok(Transport::Ssh),
            "quic" => Ok(Transport::Quic),
            "auto" => Ok(Transport::Auto),
            other => Err(format!("unknown transport '{other}': ssh, quic or auto")),
        }
    }
}

/// A logged-in session with a proxy (SSH or QUIC); opens any number of streams.
pub struct ProxySession {
    link: Link,
    /// The address dialled (the tunnel address on SSH, the QUIC address on QUIC).
    pub tunnel_addr: String,
}

/// The session's transport.
enum Link {
    Ssh {
        handle: Arc<Handle<ClientHandler>>,
        refusals: Arc<Refusals>,
        /// Whether the proxy speaks per-stream credit on client channels (its SSH
        /// identification string says so): then each stream is flow-controlled on its own, and
        /// one the application stops reading holds back none of the session's others.
        credit: bool,
    },
    Quic(quic::QuicLink),
}

impl ProxySession {
    /// Discovers (if given a web address), connects, verifies the proxy and logs in over SSH.
    pub async fn connect(opts: &ConnectOptions) -> Result<ProxySession, ClientError> {
        ProxySession::connect_over(opts, Transport::Ssh).await
    }

    /// As [`ProxySession::connect`], over `transport`.
    pub async fn connect_over(
        opts: &ConnectOptions,
        transport: Transport,
    ) -> Result<ProxySession, ClientError> {
        let dial = DialOptions {
            transport,
            ..DialOptions::default()
        };
        ProxySession::connect_with(opts, dial).await
    }

    /// As [`ProxySession::connect`], as `dial` says.
    pub async fn connect_with(
        opts: &ConnectOptions,
        dial: DialOptions,
    ) -> Result<ProxySession, ClientError> {
        if !tunnel_proto::quic::mtu_bound_ok(dial.quic_mtu_upper_bound) {
            return Err(DialError::Config(format!(
                "QUIC MTU upper bound {} is outside {}..={}",
                dial.quic_mtu_upper_bound,
                tunnel_proto::quic::MTU_UPPER_BOUND_MIN,
                tunnel_proto::quic::MTU_UPPER_BOUND_MAX
            ))
            .into());
        }
        let mtu = dial.quic_mtu_upper_bound;
        let quic = match dial.transport {
            Transport::Ssh => None,
            Transport::Quic => {
                Some(quic::QuicLink::connect(opts, quic::HANDSHAKE_TIMEOUT, mtu).await)
            }
            Transport::Auto => {
                match quic::QuicLink::connect(opts, quic::AUTO_HANDSHAKE_TIMEOUT, mtu).await {
                    // No QUIC here (not offered, no handshake): SSH instead.
                    Err(ClientError::Dial(e @ DialError::Quic { .. })) => {
                        tracing::debug!(error = %e, "no QUIC session with the proxy: using SSH");
                        None
                    }
                    other => Some(other),
                }
            }
        };
        if let Some(quic) = quic {
            let (link, addr) = quic?;
            return Ok(ProxySession {
                link: Link::Quic(link),
                tunnel_addr: addr,
            });
        }
        let addr = match &opts.proxy {
            ProxyAddr::Web { addr, trust } => discover_tunnel_addr(addr, trust).await?,
            ProxyAddr::Tunnel(a) => a.clone(),
        };
        let verifier = ProxyVerifier::new(
            host_of(&addr),
            opts.proxy_host_cas.clone(),
            opts.proxy_host_keys.clone(),
        );
        let refusals = Arc::new(Refusals::default());
        let handler = ClientHandler {
            verifier: verifier.clone(),
            refusals: refusals.clone(),
        };
        let mut config = client_config(Duration::from_secs(15));
        config.client_id = russh::SshId::Standard(
            format!(
                "SSH-2.0-PosternClient_{} {}",
                env!("CARGO_PKG_VERSION"),
                tunnel_proto::credit::CREDIT_ID_TAG
            )
            .into(),
        );
        let (handle, server_id) = login_with_id(
            &addr,
            Arc::new(config),
            handler,
            &verifier,
            &opts.user,
            &opts.identity,
        )
        .await?;
        Ok(ProxySession {
            link: Link::Ssh {
                handle: Arc::new(handle),
                credit: tunnel_proto::credit::id_speaks_credit(&server_id),
                refusals,
            },
            tunnel_addr: addr,
        })
    }

    /// Opens a stream to `target` of `cluster` (`port` is passed through to the agent).
    pub async fn open(
        &self,
        target: &str,
        cluster: &str,
        port: u32,
    ) -> Result<TunnelStream, ClientError> {
        let host = StreamTarget {
            target: target.to_owned(),
            cluster: cluster.to_owned(),
        }
        .host();
        self.open_host(&host, port).await
    }

    /// Opens a stream to a raw `direct-tcpip` host (what `ssh -W host:port` sends).
    pub async fn open_host(&self, host: &str, port: u32) -> Result<TunnelStream, ClientError> {
        let (handle, refusals, credit) = match &self.link {
            Link::Ssh {
                handle,
                refusals,
                credit,
            } => (handle, refusals, *credit),
            Link::Quic(q) => return q.open(host, port).await,
        };
        match handle
            .channel_open_direct_tcpip(host, port, "127.0.0.1", 0)
            .await
        {
            Ok(ch) => Ok(TunnelStream::new(ch, handle.clone(), credit)),
            Err(russh::Error::ChannelOpenFailure(code)) => {
                // russh hands the failure code to the channel, then the description to the
                // handler: wait a moment for the description to land.
                let mut reason = None;
                for _ in 0..40 {
                    reason = refusals.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    if reason.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let reason = reason
                    .map(|(_, d)| d)
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| code.description().to_owned());
                Err(ClientError::Refused {
                    host: host.to_owned(),
                    reason,
                })
            }
            Err(source) => {
                let closed = refusals
                    .1
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .filter(|m| !m.is_empty());
                match closed {
                    Some(why) => Err(ClientError::Refused {
                        host: host.to_owned(),
                        reason: format!("the proxy closed the connection: {why}"),
                    }),
                    None => Err(ClientError::Ssh {
                        host: host.to_owned(),
                        source,
                    }),
                }
            }
        }
    }

    /// The transport this session runs on (what [`Transport::Auto`] chose).
    pub fn transport(&self) -> Transport {
        match self.link {
            Link::Ssh { .. } => Transport::Ssh,
            Link::Quic(_) => Transport::Quic,
        }
    }

    /// Why the proxy closed this session, if it said (a lock's message, a deleted user).
    pub fn closed_reason(&self) -> Option<String> {
        match &self.link {
            Link::Ssh { refusals, .. } => {
                refusals.1.lock().unwrap_or_else(|p| p.into_inner()).clone()
            }
            Link::Quic(q) => q.closed_reason(),
        }
    }
}

/// Discovers, logs in and opens one stream to `<target>.<cluster>`.
pub async fn connect_target(
    opts: &ConnectOptions,
    target: &str,
    cluster: &str,
    port: u32,
) -> Result<TunnelStream, ClientError> {
    ProxySession::connect(opts)
        .await?
        .open(target, cluster, port)
        .await
}
