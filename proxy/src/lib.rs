//! # postern-proxy: the edge proxy
//!
//! Agents dial in over SSH with host certificates and register targets with `tcpip-forward`;
//! clients dial in with user certificates and open `direct-tcpip` channels to
//! `<target>.<cluster>`; the proxy opens a `forwarded-tcpip` channel on a live tunnel of that
//! cluster and splices the two. A web listener answers discovery; an ops listener serves metrics.
//!
//! ## Layout
//! - [`config`]: `proxy.toml`, defaults and validation.
//! - [`keys`]: host key/certificate and web TLS certificate, generated when absent.
//! - [`trust`]: which CA keys each cluster trusts.
//! - [`tunnel`]: the SSH listener, login checks, stream routing and splicing, control channel.
//! - [`quic`]: the QUIC listener for agents (login bound to the TLS exporter, one QUIC stream per
//!   client stream). [`link`]: a tunnel's link to its agent, either transport.
//! - [`routing`]: the cluster → tunnels table.
//! - [`web`]: HTTPS discovery. [`ops`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`metrics`]: every `postern_*` metric. [`mint`]: minting CAs and certificates (`certs`).
//!
//! [`run`] takes bound listeners and a shutdown token; `main.rs` only parses flags and binds.

pub mod config;
pub mod keys;
pub mod link;
pub mod login;
pub mod metrics;
pub use postern_dial::mint;
pub mod ops;
pub mod quic;
pub mod routing;
pub mod trust;
pub mod tunnel;
pub mod web;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;
use tunnel_proto::discovery::{ProxySettings, TRANSPORT_QUIC, TRANSPORT_SSH};

pub use config::ProxyConfig;

/// The bound listeners.
pub struct Listeners {
    /// HTTPS discovery.
    pub web: TcpListener,
    /// SSH tunnel listener.
    pub tunnel: TcpListener,
    /// Ops HTTP.
    pub ops: TcpListener,
    /// The QUIC listener's UDP socket (`None` with `quic.enabled = false`).
    pub quic: Option<std::net::UdpSocket>,
}

impl Listeners {
    /// Binds the addresses of `config.listen`.
    pub async fn bind(config: &ProxyConfig) -> Result<Listeners, ProxyError> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Bind { addr, source })
        };
        let web = bind(config.listen.web).await?;
        let tunnel = bind(config.listen.tunnel).await?;
        let ops = bind(config.listen.ops).await?;
        let quic = if config.quic.enabled {
            // The UDP twin of the tunnel listener: same address, and the same port when the
            // tunnel's was picked by the OS (port 0).
            let mut addr = config.quic_listen();
            if config.quic.listen.is_none()
                && let Ok(t) = tunnel.local_addr()
            {
                addr.set_port(t.port());
            }
            Some(
                quic::bind_udp(addr, config.quic.udp_buffer_bytes).map_err(|e| match e {
                    quic::QuicError::Socket { addr, source } => ProxyError::Bind { addr, source },
                    other => ProxyError::Bind {
                        addr,
                        source: std::io::Error::other(other.to_string()),
                    },
                })?,
            )
        } else {
            None
        };
        Ok(Listeners {
            web,
            tunnel,
            ops,
            quic,
        })
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Key material unusable.
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The QUIC listener could not start.
    #[error(transparent)]
    Quic(#[from] quic::QuicError),
    /// The data dir could not be prepared.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

fn proxy_id(config: &ProxyConfig) -> Result<String, ProxyError> {
    if let Some(id) = &config.proxy_id {
        return Ok(id.clone());
    }
    let path = config.data_dir.join("proxy_id");
    let err = |source| ProxyError::DataDir {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let id = format!("proxy-{:08x}", rand::random::<u32>());
            mint::write_file(&path, format!("{id}\n").as_bytes(), 0o644).map_err(|e| match e {
                mint::MintError::Io { source, .. } => err(source),
                other => err(std::io::Error::other(other.to_string())),
            })?;
            Ok(id)
        }
    }
}

/// Runs the proxy on bound listeners until `shutdown` is cancelled, then drains: stop accepting,
/// tell agents to move, let streams finish for `shutdown.grace_secs`, close the rest.
pub async fn run(
    listeners: Listeners,
    config: ProxyConfig,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    config.validate()?;
    let prom = metrics::install();
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ProxyError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let proxy_id = proxy_id(&config)?;
    let (host_key, host_cert) = keys::ssh_host(&config)?;
    let (web_tls, web_fp) = keys::web_tls(&config)?;
    let trust =
        trust::Trust::from_config(&config.clusters).map_err(|e| config::ConfigError::Invalid {
            field: "clusters".into(),
            message: e,
        })?;
    let tunnel_addr = listeners
        .tunnel
        .local_addr()
        .map_err(|source| ProxyError::Bind {
            addr: config.listen.tunnel,
            source,
        })?;
    let quic_endpoint = match listeners.quic {
        Some(socket) => Some(quic::endpoint(
            socket,
            quic::server_config(&web_tls, &config)?,
            &quic::reset_key(&config.data_dir)?,
        )?),
        None => None,
    };
    let quic_port = quic_endpoint
        .as_ref()
        .and_then(|e| e.local_addr().ok())
        .map(|a| a.port());
    let transports = match quic_port {
        Some(_) => vec![TRANSPORT_QUIC.into(), TRANSPORT_SSH.into()],
        None => vec![TRANSPORT_SSH.into()],
    };
    let proof = Arc::new(quic::ProxyProof::new(host_key.clone(), host_cert.as_ref()));
    let discovery = Arc::new(web::Discovery {
        cluster_names: trust.names(),
        settings: ProxySettings {
            web_public_addr: config.public.web_addr.clone(),
            tunnel_public_addr: config.public.tunnel_addr.clone(),
            tunnel_listen_addr: tunnel_addr.to_string(),
            tls_routing_enabled: false,
            transports,
            quic_port,
            proxy_id: proxy_id.clone(),
            proxy_ids: vec![proxy_id.clone()],
        },
    });
    let ssh = tunnel::ssh_config(
        host_key,
        host_cert,
        config.keepalive(),
        config.ssh.keepalive_max,
    );
    let mut shared = tunnel::TunnelShared::new(
        trust,
        Arc::new(ssh),
        config.handshake_timeout(),
        config.limits.max_streams_per_tunnel,
        u32::try_from(config.shutdown.grace_secs).unwrap_or(u32::MAX),
        proxy_id.clone(),
    );
    shared.limits = config.limits.clone();
    let shared = Arc::new(shared);
    info!(
        proxy_id = %proxy_id,
        web = ?listeners.web.local_addr().ok(),
        tunnel = %tunnel_addr,
        quic = ?quic_port,
        ops = ?listeners.ops.local_addr().ok(),
        web_cert_sha256 = %web_fp,
        clusters = ?discovery.cluster_names,
        "postern-proxy serving"
    );

    let ready = Arc::new(ops::Ready::default());
    let ops_stop = CancellationToken::new();
    let ops_task = tokio::spawn(ops::serve(
        listeners.ops,
        prom,
        ready.clone(),
        ops_stop.clone(),
    ));
    let conns = TaskTracker::new();
    let web_task = tokio::spawn(web::serve(
        listeners.web,
        web_tls,
        discovery,
        Arc::new(login::LoginRelay::new(shared.clone())),
        web::WebLimits {
            header_timeout: Duration::from_secs(config.limits.web_header_timeout_secs),
            max_header_bytes: config.limits.web_max_header_bytes,
        },
        shared.draining.clone(),
        conns.clone(),
    ));
    let tunnel_task = tokio::spawn(tunnel::serve(
        listeners.tunnel,
        shared.clone(),
        config.limits.max_unauthenticated,
        conns.clone(),
    ));
    let quic_task = quic_endpoint.map(|endpoint| {
        tokio::spawn(quic::serve(
            endpoint,
            shared.clone(),
            proof,
            config.limits.max_unauthenticated,
            conns.clone(),
        ))
    });
    ready.set(true);

    shutdown.cancelled().await;
    info!(grace_s = config.shutdown.grace_secs, "shutdown: draining");
    ready.set(false);
    shared.draining.cancel();
    let _ = web_task.await;
    let _ = tunnel_task.await;
    if let Some(t) = quic_task {
        let _ = t.await;
    }
    let deadline = tokio::time::Instant::now() + config.grace();
    loop {
        let open: usize = shared
            .routing
            .all()
            .iter()
            .map(|t| t.active_streams.load(Ordering::Relaxed))
            .sum();
        if open == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            info!(
                open_streams = open,
                "grace period over: closing remaining streams"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shared.hard_stop.cancel();
    conns.close();
    shared.streams.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        conns.wait().await;
        shared.streams.wait().await;
    })
    .await;
    ops_stop.cancel();
    let _ = ops_task.await;
    info!("shutdown complete");
    Ok(())
}
