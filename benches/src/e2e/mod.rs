//! The end-to-end comparison behind `postern-e2e` (`benches/compare.sh`): one run, one table.
//!
//! The job: a client reaches a TCP service behind NAT, every leg encrypted and
//! certificate-authenticated. Compared on this machine, in the same run:
//! - **direct** loopback TCP (the ceiling);
//! - **Postern**: client → `postern-proxy` → `postern-agent` → service (real binaries, the Rust
//!   client, and `ssh -W` through the proxy), the agent on SSH, and once more on QUIC;
//! - **OpenSSH**: the service side runs `ssh -N -R` into a loopback `sshd`, the client side
//!   `ssh -N -L` into the same `sshd` (two encrypted legs, like Postern's).
//!
//! Each cipher runs in a child process of its own (`--phase`), with `POSTERN_SSH_CIPHERS` set
//! for Postern and `-o Ciphers=` for OpenSSH. QUIC's TLS does not depend on the SSH cipher, so
//! the QUIC rows, the isolation figure and the stalled-stream figure run in one phase only
//! (`--quic-phase`, aes128-gcm by default).
//!
//! ## Layout
//! - [`support`]: child-process guards, ports, statistics.
//! - [`services`]: the sink, echo and hose services.
//! - [`postern`]: the proxy and agent (on SSH or QUIC) and the check that the agent is on the
//!   transport it was told.
//! - [`openssh`]: the `sshd` and `-R`/`-L` chain.
//! - [`measure`]: throughput, latency, RSS per idle stream, CPU per GiB.
//! - [`logins`]: `ssh -W` through the proxy; agent log-ins per second and RSS per idle tunnel.
//! - [`knobs`]: the windows and QUIC settings in effect.
//! - [`table`]: the Markdown output.
//! - The isolation and stalled-stream figures are [`crate::isolation`]'s, shared with the load
//!   tool.

pub mod knobs;
pub mod logins;
pub mod measure;
pub mod openssh;
pub mod postern;
pub mod services;
pub mod support;
pub mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::isolation::{self, IsolationReport, StallReport};
use crate::proc_stats::tree;
use measure::{Dialer, idle_streams, measure};
use postern::{AgentTransport, PosternSetup, Targets, start_postern};
use support::median;

/// The command line of `postern-e2e`.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "postern-e2e",
    about = "Postern (agent on SSH and on QUIC) vs OpenSSH vs direct loopback, in one run"
)]
pub struct Cli {
    /// Ciphers to compare (OpenSSH names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"
    )]
    pub ciphers: Vec<String>,
    /// Repetitions of each throughput figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// MiB sent per throughput run.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// Concurrent streams for the aggregate figure.
    #[arg(long, default_value_t = 64)]
    pub streams: usize,
    /// Idle streams held open for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    pub idle_streams: usize,
    /// Agents logged in for the idle-tunnel and set-up figures.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Seconds of 64-byte request/response at 1,000 req/s.
    #[arg(long, default_value_t = 5)]
    pub latency_secs: u64,
    /// The cipher phase that also runs the agent-on-QUIC rows, the isolation figure and the
    /// stalled-stream figure (the first cipher when this one is not compared).
    #[arg(long, default_value = "aes128-gcm@openssh.com")]
    pub quic_phase: String,
    /// Skip the agent-on-QUIC rows and figures.
    #[arg(long)]
    pub no_quic: bool,
    /// Also measure QUIC with path MTU discovery allowed up to this many bytes on both ends
    /// (1200..=6500; the default bound, 1452, skips the extra row).
    #[arg(long, default_value_t = 6500, value_parser = clap::value_parser!(u16).range(1200..=6500))]
    pub quic_mtu: u16,
    /// Seconds per phase of the isolation figure (B alone, B while A reads slowly); 0 skips it.
    #[arg(long, default_value_t = 20)]
    pub isolation_secs: u64,
    /// How fast the slow client A reads in the isolation figure, KiB/s.
    #[arg(long, default_value_t = 128)]
    pub slow_kib_per_s: u64,
    /// Where postern-proxy and postern-agent are [default: next to this binary].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Write the table as Markdown here too.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Internal: run one cipher and print JSON.
    #[arg(long, hide = true)]
    pub phase: Option<String>,
    /// Internal: serve the sink and echo services (a process of their own, so that the driver's
    /// descriptors go to client sockets only), print their addresses, run until stdin closes.
    #[arg(long, hide = true)]
    pub services: bool,
}

impl Cli {
    /// The cipher whose phase runs the QUIC rows and the isolation and stalled-stream figures.
    pub fn extras_cipher(&self) -> &str {
        if self.ciphers.contains(&self.quic_phase) {
            &self.quic_phase
        } else {
            self.ciphers.first().map(String::as_str).unwrap_or("")
        }
    }
}

/// One system's figures for one cipher.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    /// The system's name, as printed.
    pub system: String,
    /// The SSH cipher (or a note for rows that do not depend on it).
    pub cipher: String,
    /// MiB/s of each single-stream run.
    pub single_mib_s: Vec<f64>,
    /// MiB/s of each many-stream run.
    pub multi_mib_s: Vec<f64>,
    /// 64-byte round trip, median, µs.
    pub p50_us: f64,
    /// 64-byte round trip, 99th percentile, µs.
    pub p99_us: f64,
    /// RSS growth per idle stream over the system's processes, KiB.
    pub rss_per_stream_kib: Option<f64>,
    /// CPU seconds of the system's processes per GiB moved (single-stream runs).
    pub cpu_s_per_gib: Option<f64>,
}

/// The name of the QUIC rows.
pub const QUIC_ROW: &str = "Postern (Rust client, agent on QUIC)";
/// The system column of the row where the client logs in over QUIC as well.
pub const QUIC_CLIENT_ROW: &str = "Postern (Rust client on QUIC, agent on QUIC)";

/// A figure measured for one agent transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ByTransport<T> {
    /// The agent's transport.
    pub transport: AgentTransport,
    /// What was measured.
    pub report: T,
}

/// What one phase (cipher) measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Phase {
    /// The cipher.
    pub cipher: String,
    /// The table's rows.
    pub rows: Vec<Row>,
    /// The proxy's RSS per idle agent tunnel, KiB.
    pub tunnel_rss_kib: f64,
    /// Agent tunnel set-ups per second.
    pub setups_per_s: f64,
    /// The isolation figure, per agent transport (the extras phase only).
    pub isolation: Vec<ByTransport<IsolationReport>>,
    /// The stalled-stream figure, per agent transport (the extras phase only).
    pub stalls: Vec<ByTransport<StallReport>>,
    /// The knobs of the QUIC setup (the extras phase only).
    pub knobs: Option<knobs::Knobs>,
}

/// Starts the sink and echo services process: it and their addresses.
async fn start_services() -> anyhow::Result<(tokio::process::Child, SocketAddr, SocketAddr)> {
    let mut services = Command::new(std::env::current_exe()?)
        .arg("--services")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    {
        use tokio::io::AsyncBufReadExt;
        let mut out = tokio::io::BufReader::new(services.stdout.take().context("services stdout")?);
        out.read_line(&mut line).await?;
    }
    let mut addrs = line.split_whitespace().map(|a| a.parse::<SocketAddr>());
    match (addrs.next(), addrs.next()) {
        (Some(Ok(s)), Some(Ok(e))) => Ok((services, s, e)),
        _ => bail!("the services process said {line:?}"),
    }
}

/// The isolation and stalled-stream targets of a Postern setup.
fn iso_targets() -> isolation::Targets {
    isolation::Targets {
        cluster: "bench".into(),
        echo: "echo".into(),
        hose: "hose".into(),
    }
}

/// The stalled-stream figure for `transport`, on a proxy and agent of its own: RSS growth is
/// only meaningful on a heap that nothing has grown and freed before (freed memory would be
/// reused unseen), and the stream's own freed memory would in turn hide the next figure's.
async fn stall_figure(
    dir: &Path,
    bin: &Path,
    targets: Targets,
    hose: &services::Hose,
    transport: AgentTransport,
) -> anyhow::Result<ByTransport<StallReport>> {
    let p = start_postern(dir, bin, targets, transport, None).await?;
    let sent0 = p.bytes_to_clients().await?;
    let mut s =
        isolation::stalled(&p.session, &iso_targets(), p.proxy_pid, || hose.written()).await?;
    s.passed_on_bytes = Some(p.bytes_to_clients().await?.saturating_sub(sent0));
    p.check_transport().await?;
    eprintln!(
        "  agent on {transport}: one stalled stream: proxy RSS +{} KiB ({} pushed before it stalled)",
        s.growth_bytes() / 1024,
        support::bytes(s.pushed_bytes)
    );
    Ok(ByTransport {
        transport,
        report: s,
    })
}

/// One Postern setup's rows and figures: (SSH only) the agent log-ins first, on a proxy whose
/// heap stream traffic has not grown yet, then the table's figures, and isolation last.
async fn postern_rows(
    cli: &Cli,
    cipher: &str,
    p: &PosternSetup,
    extras: bool,
    out: &mut Phase,
) -> anyhow::Result<()> {
    let (pp, ap) = (p.proxy_pid, p.agent_pid);
    let t = p.transport;
    if t == AgentTransport::Ssh {
        // Idle tunnels first, on a proxy whose heap stream traffic has not grown yet.
        let (rate, per_tunnel) = logins::agent_logins(p, cli.agents).await?;
        out.setups_per_s = rate;
        out.tunnel_rss_kib = per_tunnel;
        eprintln!("  tunnel set-ups {rate:.0}/s, proxy RSS per idle tunnel {per_tunnel:.1} KiB");
    }
    let d = Dialer::Postern {
        session: p.session.clone(),
    };
    let (name, cipher_cell) = match t {
        AgentTransport::Ssh => ("Postern (Rust client)".to_string(), cipher.to_string()),
        AgentTransport::Quic => (
            QUIC_ROW.to_string(),
            format!("{cipher} (client leg) + QUIC (once)"),
        ),
    };
    let mut row = measure(&name, &cipher_cell, &d, cli, &|| vec![pp, ap]).await?;
    row.rss_per_stream_kib = Some(idle_streams(&d, cli.idle_streams, || vec![pp, ap]).await?);
    out.rows.push(row);
    p.check_transport().await?;
    if t == AgentTransport::Ssh {
        let mut w = Row {
            system: "Postern (ssh -W)".into(),
            cipher: cipher.into(),
            ..Default::default()
        };
        for _ in 0..cli.runs {
            w.single_mib_s
                .push(logins::ssh_w_push(p, cipher, cli.mib * 1048576).await?);
        }
        eprintln!(
            "  {:<36} {cipher:<30} single {:>7.0} MiB/s",
            w.system,
            median(&w.single_mib_s)
        );
        out.rows.push(w);
    }
    if extras && cli.isolation_secs > 0 {
        let a = p.connect_client().await?;
        let r = isolation::isolation(
            a,
            p.session.clone(),
            &iso_targets(),
            cli.isolation_secs,
            cli.slow_kib_per_s,
            Some(pp),
        )
        .await?;
        eprintln!(
            "  agent on {t}: B's p99 alone {:.2} ms, while A reads {} KiB/s {:.2} ms ({:.2}x)",
            r.alone().1,
            cli.slow_kib_per_s,
            r.during().1,
            r.ratio()
        );
        out.isolation.push(ByTransport {
            transport: t,
            report: r,
        });
        p.check_transport().await?;
    }
    Ok(())
}

/// One cipher's phase, in this process.
async fn phase(cli: &Cli, cipher: &str) -> anyhow::Result<Phase> {
    let bin = match &cli.bin_dir {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .to_path_buf(),
    };
    let dir = tempfile::tempdir()?;
    let (_services, sink, echo) = start_services().await?;
    let hose = services::Hose::start(1024).await?;
    let targets = Targets {
        sink,
        echo,
        hose: hose.addr,
    };
    let extras = cipher == cli.extras_cipher();
    let mut out = Phase {
        cipher: cipher.into(),
        ..Default::default()
    };

    let direct = Dialer::Tcp { sink, echo };
    out.rows
        .push(measure("direct loopback", "-", &direct, cli, &Vec::new).await?);

    let mut transports = vec![AgentTransport::Ssh];
    if extras && !cli.no_quic {
        transports.push(AgentTransport::Quic);
    }
    if extras {
        for &t in &transports {
            let sub = dir.path().join(format!("stall-{}", t.label()));
            out.stalls
                .push(stall_figure(&sub, &bin, targets, &hose, t).await?);
        }
    }
    // One setup at a time: each is dropped (its processes killed) before the next starts.
    for &t in &transports {
        let p = start_postern(&dir.path().join(t.label()), &bin, targets, t, None).await?;
        if t == AgentTransport::Quic {
            out.knobs = Some(knobs::read(&p.proxy_config, &p.agent_config)?);
        }
        postern_rows(cli, cipher, &p, extras, &mut out).await?;
        if t == AgentTransport::Quic {
            // Both legs QUIC: no SSH, so no cipher of its own (TLS 1.3 on both legs).
            let d = Dialer::Postern {
                session: p
                    .connect_quic_client(tunnel_proto::quic::MTU_UPPER_BOUND_DEFAULT)
                    .await?,
            };
            let (pp, ap) = (p.proxy_pid, p.agent_pid);
            out.rows
                .push(measure(QUIC_CLIENT_ROW, "QUIC (once)", &d, cli, &|| vec![pp, ap]).await?);
            p.check_transport().await?;
        }
    }
    // QUIC again with path MTU discovery allowed up to --quic-mtu on both ends: loopback carries
    // it (an internet path would settle at 1452 again). Throughput and latency only.
    if extras && !cli.no_quic && cli.quic_mtu > tunnel_proto::quic::MTU_UPPER_BOUND_DEFAULT {
        let m = cli.quic_mtu;
        let p = start_postern(
            &dir.path().join("quic-mtu"),
            &bin,
            targets,
            AgentTransport::Quic,
            Some(m),
        )
        .await?;
        let d = Dialer::Postern {
            session: p.session.clone(),
        };
        let (pp, ap) = (p.proxy_pid, p.agent_pid);
        let name = format!("{QUIC_ROW}, MTU ≤ {m}");
        let cell = format!("{cipher} (client leg) + QUIC (once)");
        out.rows
            .push(measure(&name, &cell, &d, cli, &|| vec![pp, ap]).await?);
        // The client on QUIC too, its bound raised as well.
        let d = Dialer::Postern {
            session: p.connect_quic_client(m).await?,
        };
        let name = format!("{QUIC_CLIENT_ROW}, MTU ≤ {m}");
        out.rows
            .push(measure(&name, "QUIC (once)", &d, cli, &|| vec![pp, ap]).await?);
        p.check_transport().await?;
    }

    let o = openssh::start_openssh(dir.path(), cipher, sink, echo).await?;
    let pids = o.pids.clone();
    let all = move || pids.iter().flat_map(|p| tree(*p)).collect::<Vec<u32>>();
    let d = Dialer::Tcp {
        sink: o.sink,
        echo: o.echo,
    };
    let mut row = measure("OpenSSH -R + -L chain", cipher, &d, cli, &all).await?;
    row.rss_per_stream_kib = Some(idle_streams(&d, cli.idle_streams, &all).await?);
    out.rows.push(row);
    drop(o);
    Ok(out)
}

/// Runs every cipher's phase in a child process of its own and prints the table (and writes it
/// to `--markdown`); in the internal modes, serves or runs one phase.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.services {
        return services::serve_until_stdin_closes().await;
    }
    if let Some(cipher) = &cli.phase {
        let out = phase(&cli, cipher).await?;
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut phases = Vec::new();
    for cipher in &cli.ciphers {
        eprintln!("== {cipher}");
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        args.extend(["--phase".into(), cipher.clone()]);
        // Not `output()`: tokio's pipes stderr too, which would hide the phase's progress and
        // the reason it failed.
        let out = Command::new(&exe)
            .args(&args)
            .env("POSTERN_SSH_CIPHERS", cipher)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?
            .wait_with_output()
            .await?;
        if !out.status.success() {
            bail!("phase {cipher} failed");
        }
        phases.push(serde_json::from_slice::<Phase>(&out.stdout).context("phase output")?);
    }
    let t = table::render(&phases, &cli);
    println!("{t}");
    if let Some(m) = &cli.markdown {
        write(m, &t)?;
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
