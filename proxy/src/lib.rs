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
//! - [`trust`]: which CA keys each cluster trusts (replaced when a CA rotates,
//!   [`policy::authorities`]).
//! - [`renewal`]: the proxy's host certificate, renewed at two-thirds of its life.
//! - [`tunnel`]: the SSH listener, login checks, stream routing and splicing, control channel.
//! - [`quic`]: the QUIC listener for agents (login bound to the TLS exporter, one QUIC stream per
//!   client stream). [`link`]: a tunnel's link to its agent, either transport.
//! - [`routing`]: the cluster → tunnels table, with each target's labels.
//! - [`proxy_protocol`]: PROXY headers from trusted load balancers.
//! - [`rate`]: per-key rate limits (`governor`) and failed-login counts.
//! - [`audit`]: the stream access audit: events logged, spooled in the data dir, shipped.
//! - [`policy`]: who may open streams to which target (roles by labels, locks, deleted users),
//!   watched from each cluster's Auth server through the cluster's own tunnel.
//! - [`peers`]: each cluster's proxy set, heartbeated to its Auth server, sent to agents.
//! - [`web`]: HTTPS discovery. [`ops`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`metrics`]: every `postern_*` metric. [`mint`]: minting CAs and certificates (`certs`).
//!
//! [`run`] takes bound listeners and a shutdown token; `main.rs` only parses flags and binds.

pub mod audit;
pub mod config;
pub mod keys;
pub mod link;
pub mod login;
pub mod metrics;
pub use postern_dial::mint;
pub mod ops;
pub mod peers;
pub mod policy;
pub mod proxy_protocol;
pub mod quic;
pub mod rate;
pub mod renewal;
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
    /// Running as root without `--allow-root` (or `allow_root = true`).
    #[error(
        "refusing to run as root: the proxy needs no privileges (for a port under 1024 give it CAP_NET_BIND_SERVICE). Run it as its own user, or pass --allow-root"
    )]
    Root,
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

/// The stream audit: a spool in `<data_dir>/audit/<cluster>` for each cluster whose policy
/// source is `auth` (their events are shipped to the Auth server); others are only logged.
fn stream_audit(config: &ProxyConfig, proxy_id: &str) -> Result<audit::StreamAudit, ProxyError> {
    let mut spools = std::collections::HashMap::new();
    for c in &config.clusters {
        if c.policy.source != config::PolicySource::Auth {
            continue;
        }
        let dir = config.data_dir.join("audit").join(&c.name);
        let spool = audit::Spool::open(&dir, AUDIT_SPOOL_MAX_BYTES).map_err(|source| {
            ProxyError::DataDir {
                path: dir.display().to_string(),
                source,
            }
        })?;
        spools.insert(c.name.clone(), Arc::new(spool));
    }
    Ok(audit::StreamAudit::new(proxy_id.to_owned(), spools))
}

/// Largest audit spool per cluster, bytes (about 1.5 million events).
const AUDIT_SPOOL_MAX_BYTES: u64 = 256 << 20;

/// Starts one audit shipper per spooled cluster; they stop at hard stop (what is left stays
/// spooled for the next start).
fn audit_shippers(
    config: &ProxyConfig,
    shared: &Arc<tunnel::TunnelShared>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for c in &config.clusters {
        let (Some(spool), Some(identity_file)) = (
            shared.audit.spools().get(&c.name).cloned(),
            c.policy.identity_file.clone(),
        ) else {
            continue;
        };
        let shipper = audit::ship::Shipper {
            cluster: c.name.clone(),
            spool,
            identity_file,
            shared: shared.clone(),
        };
        tasks.push(tokio::spawn(shipper.run(shared.hard_stop.clone())));
    }
    tasks
}

/// Starts, per cluster whose policy source is `auth`, its policy watcher, its CA refresher and
/// its Auth identity renewal; they stop at hard stop.
fn policy_watchers(
    config: &ProxyConfig,
    shared: &Arc<tunnel::TunnelShared>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for c in &config.clusters {
        let (config::PolicySource::Auth, Some(identity_file)) =
            (c.policy.source, c.policy.identity_file.clone())
        else {
            continue;
        };
        let Some(policy) = shared.policies.cluster(&c.name).cloned() else {
            continue;
        };
        let watcher = policy::watch::Watcher {
            policy,
            identity_file,
            shared: shared.clone(),
            registry: shared.policies.registry.clone(),
        };
        tasks.push(tokio::spawn(watcher.run(shared.hard_stop.clone())));
        let refresher = policy::authorities::CaRefresher {
            cluster: c.name.clone(),
            identity_file: c.policy.identity_file.clone().unwrap_or_default(),
            every: std::time::Duration::from_secs(c.policy.ca_refresh_secs),
            renew_spread_secs: c.policy.renew_spread_secs,
            cache: trust::CaCache::new(&config.data_dir),
            shared: shared.clone(),
        };
        tasks.push(tokio::spawn(refresher.run(shared.hard_stop.clone())));
        let renewal = policy::identity::IdentityRenewal {
            cluster: c.name.clone(),
            identity_file: c.policy.identity_file.clone().unwrap_or_default(),
            shared: shared.clone(),
        };
        tasks.push(tokio::spawn(renewal.run(shared.hard_stop.clone())));
    }
    tasks
}

/// Starts one proxy-set heartbeater per cluster with an Auth identity (policy source `auth`);
/// each leaves the set when draining begins and stops at hard stop.
fn peer_heartbeaters(
    config: &ProxyConfig,
    shared: &Arc<tunnel::TunnelShared>,
    tunnel_addr: std::net::SocketAddr,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for c in &config.clusters {
        let (config::PolicySource::Auth, Some(identity_file)) =
            (c.policy.source, c.policy.identity_file.clone())
        else {
            continue;
        };
        let record = postern_api::proto::ProxyRecord {
            id: shared.proxy_id.clone(),
            web_addr: config.public.web_addr.clone().unwrap_or_default(),
            tunnel_addr: config
                .public
                .tunnel_addr
                .clone()
                .unwrap_or_else(|| tunnel_addr.to_string()),
            expires_ms: 0,
        };
        let hb = peers::Heartbeater {
            cluster: c.name.clone(),
            identity_file,
            shared: shared.clone(),
            record,
            config: config.peers.clone(),
        };
        tasks.push(tokio::spawn(
            hb.run(shared.draining.clone(), shared.hard_stop.clone()),
        ));
    }
    tasks
}

/// Runs the proxy on bound listeners until `shutdown` is cancelled, then drains: stop accepting,
/// tell agents to move, let streams finish for `shutdown.grace_secs`, close the rest.
pub async fn run(
    listeners: Listeners,
    config: ProxyConfig,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    config.validate()?;
    if mint::running_as_root() && !config.allow_root {
        return Err(ProxyError::Root);
    }
    let prom = metrics::install();
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(|source| ProxyError::DataDir {
                path: config.data_dir.display().to_string(),
                source,
            })?;
    }
    if let Some(nofile) = postern_dial::accept::nofile_limit() {
        let budget = config.limits.web_max_connections + config.limits.max_unauthenticated + 64;
        if (budget as u64) > nofile {
            tracing::warn!(
                nofile,
                web_max_connections = config.limits.web_max_connections,
                max_unauthenticated = config.limits.max_unauthenticated,
                "the descriptor limit is below what the web and tunnel listeners may hold before login: raise LimitNOFILE or lower the limits"
            );
        }
    }
    let proxy_id = proxy_id(&config)?;
    let (host_key, host_cert) = keys::ssh_host(&config)?;
    let (web_tls, web_fp) = keys::web_tls(&config)?;
    let trust = trust::Trust::from_config(&config.clusters, &trust::CaCache::new(&config.data_dir))
        .map_err(|e| config::ConfigError::Invalid {
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
            config.quic.mtu_upper_bound,
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
    // Renewal needs the key, whether there is a certificate to renew, and how to dial itself.
    let renew_with = (
        host_key.clone(),
        host_cert.is_some(),
        web_self_addr(&listeners.web),
    );
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
    shared.set_limits(config.limits.clone());
    shared.proxy_protocol = config.proxy_protocol.policy().map_err(|message| {
        ProxyError::Config(config::ConfigError::Invalid {
            field: "proxy_protocol.trusted_networks".into(),
            message,
        })
    })?;
    metrics::zero_cluster_counters(config.clusters.iter().map(|c| c.name.as_str()));
    shared.policies = Arc::new(policy::Policies::from_config(&config.clusters));
    shared.audit = Arc::new(stream_audit(&config, &proxy_id)?);
    let heartbeating: Vec<String> = config
        .clusters
        .iter()
        .filter(|c| {
            c.policy.source == config::PolicySource::Auth && c.policy.identity_file.is_some()
        })
        .map(|c| c.name.clone())
        .collect();
    shared.peers = Arc::new(peers::Peers::new(
        &proxy_id,
        config.clusters.iter().map(|c| c.name.as_str()),
        &heartbeating,
    ));
    let shared = Arc::new(shared);
    let mut watchers = policy_watchers(&config, &shared);
    if let (key, true, Some(web)) = renew_with
        && config
            .clusters
            .iter()
            .any(|c| c.policy.source == config::PolicySource::Auth)
    {
        let renewal = renewal::HostCertRenewal {
            key,
            cert_path: config.host_cert_path(),
            web,
            web_fp: web_fp.clone(),
            keepalive: (config.keepalive(), config.ssh.keepalive_max),
            shared: shared.clone(),
            quic_proof: proof.clone(),
        };
        watchers.push(tokio::spawn(renewal.run(shared.hard_stop.clone())));
    }
    watchers.extend(peer_heartbeaters(&config, &shared, tunnel_addr));
    watchers.extend(audit_shippers(&config, &shared));
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
        web::WebLimits::from_config(&config.limits),
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
    ready.set(false);
    if config.shutdown.unready_secs > 0 {
        // Out of the balancer's rotation first (it checks /readyz), then stop accepting: a
        // connection the balancer sends meanwhile is still served.
        info!(
            unready_s = config.shutdown.unready_secs,
            "shutdown: /readyz is 503, still accepting"
        );
        tokio::time::sleep(Duration::from_secs(config.shutdown.unready_secs)).await;
    }
    info!(grace_s = config.shutdown.grace_secs, "shutdown: draining");
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
    for w in watchers {
        let _ = w.await;
    }
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

/// The address this proxy dials its own web listener at (loopback for a wildcard bind).
fn web_self_addr(web: &TcpListener) -> Option<String> {
    let mut addr = web.local_addr().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Some(addr.to_string())
}
