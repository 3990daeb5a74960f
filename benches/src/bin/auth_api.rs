//! `postern-auth-bench`: Auth API calls per second (GetRole, UpsertRole) on each storage
//! backend, direct (mTLS to the Auth server) and through the tunnel (client → proxy → the Auth
//! server's own agent → API), in one run, one table.
//!
//! Everything runs in this process on 127.0.0.1: a proxy, and per backend an Auth server whose
//! embedded agent dials out to it. SQLite is always measured; PostgreSQL when `--postgres-url`
//! is given (`benches/auth.sh` starts a throwaway server and passes it). Every call is a real
//! call: authenticated by its certificate, authorized by RBAC, audited (database and file).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use postern_api::identity::IdentityFile;
use postern_api::proto::Role;
use postern_auth::AuthConfig;
use postern_auth::config::TunnelConfig;
use postern_client::auth::{AuthClient, proxy_options};
use postern_client::{ProxyAddr, ProxySession};
use postern_dial::mint;
use postern_dial::web::WebTrust;
use postern_proxy::{Listeners, ProxyConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    about = "Auth API calls per second on SQLite and PostgreSQL, direct and through the tunnel"
)]
struct Cli {
    /// A PostgreSQL database to measure too (use a fresh one: `benches/auth.sh` makes it).
    #[arg(long)]
    postgres_url: Option<String>,
    /// The file holding its password (0600).
    #[arg(long)]
    postgres_password_file: Option<std::path::PathBuf>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Calls in flight at once (one HTTP/2 connection, as one SDK client).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

const CLUSTER: &str = "bench";

const ROLE: &str = r#"kind: role
metadata:
  name: bench-role
spec:
  allow:
    rules:
      - resources: ['role']
        verbs: ['read']
version: v5
"#;

/// A proxy on loopback trusting the cluster's CAs; returns its web address and certificate pin.
async fn start_proxy(
    dir: &Path,
    auth: &postern_auth::server::Prepared,
    shutdown: &CancellationToken,
) -> anyhow::Result<(std::net::SocketAddr, String)> {
    let a = &auth.state.authorities;
    let key = mint::generate_key();
    let cert = a.issue_host(key.public_key(), "", &["127.0.0.1".into()], 86400)?;
    let proxy_dir = dir.join("proxy");
    let toml = format!(
        "data_dir = {proxy_dir:?}\nallow_root = true\n\n[listen]\nweb = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\nops = \"127.0.0.1:0\"\n\n\
         [[clusters]]\nname = \"{CLUSTER}\"\nhost_ca = [{:?}]\nuser_ca = [{:?}]\n",
        a.host_ca_line(),
        a.user_ca_line()
    );
    std::fs::write(dir.join("proxy.toml"), toml)?;
    let config = ProxyConfig::from_file(&dir.join("proxy.toml"))?;
    config.validate()?;
    mint::write_key_pair(&config.host_key_path(), &key)?;
    mint::write_file(
        &config.host_cert_path(),
        format!("{}\n", cert.ssh_cert).as_bytes(),
        0o644,
    )?;
    let listeners = Listeners::bind(&config).await?;
    let web = listeners.web.local_addr()?;
    tokio::spawn(postern_proxy::run(listeners, config, shutdown.clone()));
    let crt = proxy_dir.join("web.crt");
    let deadline = Instant::now() + Duration::from_secs(10);
    let pin = loop {
        if let Ok(pem) = std::fs::read(&crt) {
            use rustls_pki_types::pem::PemObject;
            if let Ok(der) = rustls_pki_types::CertificateDer::from_pem_slice(&pem) {
                break postern_dial::web::cert_fingerprint(&der);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "proxy web certificate not written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Ok((web, pin))
}

struct Row {
    backend: &'static str,
    path: &'static str,
    call: &'static str,
    calls: u64,
    errors: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn measure(
    client: &AuthClient,
    upsert: bool,
    secs: u64,
    concurrency: usize,
) -> (u64, u64, f64, Vec<Duration>) {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (c, stop) = (client.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut err, mut lat) = (0u64, 0u64, Vec::new());
            let mut i = 0u64;
            let base = postern_api::resource::parse_roles(ROLE)
                .expect("role")
                .remove(0);
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = if upsert {
                    let mut role: Role = base.clone();
                    role.name = format!("bench-{t}-{}", i % 64);
                    i += 1;
                    c.upsert_role(role).await.map(|_| ())
                } else {
                    c.get_role("bench-role").await.map(|_| ())
                };
                lat.push(t0.elapsed());
                match r {
                    Ok(()) => ok += 1,
                    Err(_) => err += 1,
                }
            }
            (ok, err, lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut err, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (o, e, l) = t.await.expect("task");
        ok += o;
        err += e;
        lat.extend(l);
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    (ok, err, elapsed, lat)
}

fn pct(lat: &[Duration], p: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0
}

async fn bench_backend(
    cli: &Cli,
    backend: &'static str,
    cfg: AuthConfig,
    dir: &Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    // The proxy trusts this cluster's CAs: prepare once to read them, then again with the tunnel.
    let first = {
        let c = cfg.clone();
        tokio::task::spawn_blocking(move || postern_auth::server::prepare(&c)).await??
    };
    let (web, pin) = start_proxy(dir, &first, &shutdown).await?;
    drop(first);
    let mut cfg = cfg;
    cfg.tunnel = Some(TunnelConfig {
        proxy: web.to_string(),
        host_id: "auth".into(),
        web: postern_agent::config::WebTrustConfig {
            cert_sha256: Some(pin.clone()),
            ..Default::default()
        },
        proxy_host_ca: Vec::new(),
        keepalive_interval_secs: 15,
    });
    let prepared = {
        let c = cfg.clone();
        tokio::task::spawn_blocking(move || postern_auth::server::prepare(&c)).await??
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(postern_auth::server::start(
        listener,
        prepared,
        shutdown.clone(),
    )?);
    let admin_id = IdentityFile::load(&cfg.data_dir.join("admin.identity"))?;
    let direct = AuthClient::connect_direct(&addr.to_string(), &admin_id).await?;
    for role in postern_api::resource::parse_roles(ROLE)? {
        direct.upsert_role(role).await?;
    }
    let opts = proxy_options(
        &admin_id,
        ProxyAddr::Web {
            addr: web.to_string(),
            trust: WebTrust::Pin(pin),
        },
    )?;
    let session = Arc::new(ProxySession::connect(&opts).await?);
    let deadline = Instant::now() + Duration::from_secs(10);
    let tunneled = loop {
        match AuthClient::connect_via_proxy(session.clone(), &admin_id).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e).context("the Auth server's tunnel did not come up"),
        }
    };
    for (path, client) in [("direct", &direct), ("tunnel", &tunneled)] {
        for (call, upsert) in [("GetRole", false), ("UpsertRole", true)] {
            let (calls, errors, secs, lat) =
                measure(client, upsert, cli.secs, cli.concurrency).await;
            rows.push(Row {
                backend,
                path,
                call,
                calls,
                errors,
                secs,
                p50_ms: pct(&lat, 0.50),
                p99_ms: pct(&lat, 0.99),
            });
            eprintln!("{backend} {path} {call}: {calls} calls, {errors} errors in {secs:.1} s");
        }
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tmp = tempfile::tempdir()?;
    let base = |name: &str| AuthConfig {
        cluster: Some(CLUSTER.into()),
        data_dir: tmp.path().join(name).join("data"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        allow_root: true,
        ..AuthConfig::default()
    };
    let mut rows = Vec::new();
    let sqlite_dir = tmp.path().join("sqlite");
    std::fs::create_dir_all(&sqlite_dir)?;
    bench_backend(&cli, "SQLite", base("sqlite"), &sqlite_dir, &mut rows).await?;
    if let Some(url) = &cli.postgres_url {
        let pg_dir = tmp.path().join("postgres");
        std::fs::create_dir_all(&pg_dir)?;
        let cfg = AuthConfig {
            backend: Some(url.clone()),
            backend_password_file: cli.postgres_password_file.clone(),
            ..base("postgres")
        };
        bench_backend(&cli, "PostgreSQL", cfg, &pg_dir, &mut rows).await?;
    }
    println!(
        "\nAuth API, {} calls in flight on one connection, {} s each, admin identity (RBAC + audit on every call)\n",
        cli.concurrency, cli.secs
    );
    println!("| backend | path | call | calls/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {} |",
            r.backend,
            r.path,
            r.call,
            r.calls as f64 / r.secs,
            r.p50_ms,
            r.p99_ms,
            r.errors
        );
    }
    Ok(())
}
