//! `psh`: the Postern user CLI (like tsh). `psh login` gets certificates through a proxy's web
//! address and keeps them in a profile (`$POSTERN_HOME` or `~/.postern`); `psh status` shows it;
//! `psh logout` removes it; `psh proxy tcp` forwards a local port to a target; `psh config`
//! prints an OpenSSH block that reaches targets with plain `ssh`, `scp` and `rsync`. Secrets and
//! passwords come from files or a prompt, never from arguments.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use postern_api::identity::IdentityFile;
use postern_client::profile::{OpenSshFiles, Profile};
use postern_client::{ProxyAddr, ProxySession};
use postern_dial::mint;
use postern_dial::web::WebTrust;
use russh::keys::ssh_key::LineEnding;
use tokio::io::AsyncWriteExt;
use tunnel_proto::login::LoginRequest;

#[derive(Parser)]
#[command(name = "psh", version, about = "Log in to a Postern cluster")]
struct Cli {
    /// Profile directory [default: $POSTERN_HOME or ~/.postern].
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Log in through a proxy and write the profile.
    Login {
        /// The proxy's web address (host:port).
        #[arg(long, required_unless_present = "request_id")]
        proxy: Option<String>,
        /// User name.
        #[arg(long, required_unless_present = "request_id")]
        user: Option<String>,
        /// Use your approved access request ID: new certificates for the profile whose roles
        /// include the approved ones, until the elevation ends (needs a current profile).
        #[arg(long, conflicts_with_all = ["proxy", "user", "secret_file", "password_file"])]
        request_id: Option<String>,
        /// Cluster (when the proxy serves several).
        #[arg(long)]
        cluster: Option<String>,
        /// SHA-256 pin of the proxy's web certificate.
        #[arg(long)]
        web_pin: Option<String>,
        /// PEM CA file for the proxy's web certificate.
        #[arg(long)]
        web_ca: Option<PathBuf>,
        /// Trust any web certificate (local experiments only).
        #[arg(long)]
        insecure: bool,
        /// First login: file holding the signup secret from `pctl users add`.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// File holding the password (else a prompt).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Certificate lifetime (e.g. 8h; capped by your roles).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Show the profile: user, roles, cluster, proxy, expiry.
    Status,
    /// Remove the profile.
    Logout,
    /// Print an OpenSSH `Host` block for the cluster's targets (append it to ~/.ssh/config).
    Config,
    /// Check the path to the cluster through the profile's proxy, step by step, and say how to
    /// fix the first step that fails.
    Doctor,
    /// Reach a target through the proxy with the profile's certificate.
    Proxy {
        #[command(subcommand)]
        what: ProxyCommand,
    },
    /// Ask for roles for a while (access requests), or see a request.
    Request {
        #[command(subcommand)]
        what: RequestCommand,
    },
    /// Machine ID: keep an identity file renewed for programs (the SDK's dynamic identity
    /// file loader).
    Bot {
        #[command(subcommand)]
        what: BotCommand,
    },
}

#[derive(Subcommand)]
enum BotCommand {
    /// Join with a bot token (first start), write the identity file, renew it every
    /// --interval until stopped (SIGINT/SIGTERM). Logs with RUST_LOG=info.
    Start {
        /// The proxy's web address (host:port).
        #[arg(long)]
        proxy: String,
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// The bot's name (in the audit log).
        #[arg(long, default_value = "bot")]
        name: String,
        /// File holding the bot token (`pctl tokens add --type=bot --user=NAME`).
        #[arg(long)]
        token_file: PathBuf,
        /// The cluster's CA pin (`pctl status` prints it).
        #[arg(long)]
        ca_pin: String,
        /// The identity file to write and keep renewed.
        #[arg(long)]
        out: PathBuf,
        /// How often to renew (e.g. 20m).
        #[arg(long, default_value = "20m")]
        interval: String,
        /// The identity's lifetime [default: twice the interval; capped by the user's roles].
        #[arg(long)]
        ttl: Option<String>,
        /// SHA-256 pin of the proxy's web certificate.
        #[arg(long)]
        web_pin: Option<String>,
        /// PEM CA file for the proxy's web certificate.
        #[arg(long)]
        web_ca: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum RequestCommand {
    /// Ask for roles; prints the request id and waits for a review unless --nowait.
    Create {
        /// Roles to request, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Why (shown to reviewers).
        #[arg(long, default_value = "")]
        reason: String,
        /// How long the elevation lasts once approved (e.g. 1h; capped by max_duration).
        #[arg(long)]
        duration: Option<String>,
        /// Print the id and return without waiting.
        #[arg(long)]
        nowait: bool,
    },
    /// Show a request: its state, reviewer and the elevation's end.
    Show {
        /// The request id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ProxyCommand {
    /// Listen on a local port and forward each connection to TARGET (like `tsh proxy app`).
    Tcp {
        /// The target: its name (`db`) or `db.<cluster>`.
        target: String,
        /// Local port on 127.0.0.1 [default: any free port, printed].
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// The port passed on to the agent with each stream.
        #[arg(long, default_value_t = 0)]
        target_port: u32,
    },
    /// Splice standard input and output to HOST:PORT (`<target>.<cluster>:<port>`): an OpenSSH
    /// `ProxyCommand`.
    Ssh {
        /// `<target>.<cluster>:<port>`.
        dest: String,
    },
}

fn read_secret(path: &Option<PathBuf>, prompt: &str) -> anyhow::Result<String> {
    match path {
        Some(p) => Ok(std::fs::read_to_string(p)
            .with_context(|| format!("{}", p.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_string()),
        None => rpassword::prompt_password(prompt).context("reading from the terminal"),
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("psh: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = cli.home.clone().unwrap_or_else(Profile::default_dir);
    match cli.command {
        Command::Login {
            request_id: Some(id),
            ..
        } => login_with_request(&home, &id).await?,
        Command::Request { what } => request(&home, what).await?,
        Command::Bot { what } => bot(what).await?,
        Command::Login {
            proxy,
            user,
            request_id: None,
            cluster,
            web_pin,
            web_ca,
            insecure,
            secret_file,
            password_file,
            ttl,
        } => {
            let (proxy, user) = (
                proxy.context("--proxy is required")?,
                user.context("--user is required")?,
            );
            let trust = match (&web_pin, &web_ca, insecure) {
                (Some(p), None, false) => WebTrust::Pin(p.clone()),
                (None, Some(f), false) => WebTrust::roots_from_pem_file(f)?,
                (None, None, true) => WebTrust::Insecure,
                (None, None, false) => {
                    postern_client::credentials::system_roots().map_err(anyhow::Error::msg)?
                }
                _ => bail!("give at most one of --web-pin, --web-ca and --insecure"),
            };
            let ping = postern_dial::web::ping(&proxy, &trust).await?;
            let cluster = match (cluster, ping.cluster_names.as_slice()) {
                (Some(c), names) if names.contains(&c) => c,
                (Some(c), names) => bail!(
                    "proxy {proxy} does not serve cluster '{c}' (it serves: {})",
                    names.join(", ")
                ),
                (None, [one]) => one.clone(),
                (None, names) => bail!(
                    "proxy {proxy} serves several clusters ({}): choose one with --cluster",
                    names.join(", ")
                ),
            };
            let ttl_secs = match &ttl {
                Some(t) => postern_api::duration::parse_secs(t).map_err(anyhow::Error::msg)?,
                None => 0,
            };
            // The key is made here; only its public half leaves this machine.
            let key = mint::generate_key();
            let mut req = LoginRequest {
                cluster: cluster.clone(),
                user: user.clone(),
                secret: None,
                new_password: None,
                password: None,
                public_key: key.public_key().to_openssh()?,
                ttl_secs,
                source: None,
            };
            if secret_file.is_some() {
                req.secret = Some(read_secret(&secret_file, "signup secret: ")?);
                let pw = read_secret(&password_file, "choose a password (12+ characters): ")?;
                if password_file.is_none() {
                    let again = read_secret(&None, "again: ")?;
                    if again != pw {
                        bail!("the passwords differ");
                    }
                }
                req.new_password = Some(pw);
            } else {
                req.password = Some(read_secret(
                    &password_file,
                    &format!("password for {user}: "),
                )?);
            }
            let resp = postern_dial::web::login(&proxy, &trust, &req).await?;
            if !resp.error.is_empty() {
                bail!("{}", resp.error);
            }
            let id = IdentityFile {
                version: postern_api::identity::IDENTITY_VERSION,
                cluster: resp.cluster.clone(),
                user: user.clone(),
                expires: resp.expires,
                private_key: key.to_openssh(LineEnding::LF)?.to_string(),
                ssh_cert: resp.ssh_cert,
                tls_cert: resp.tls_cert,
                tls_cas: resp.tls_cas,
                ssh_host_cas: resp.ssh_host_cas,
            };
            let profile = Profile {
                proxy: proxy.clone(),
                web_cert_sha256: web_pin,
                web_ca_file: web_ca,
                insecure,
                user: user.clone(),
                cluster: resp.cluster,
                roles: resp.roles,
            };
            profile
                .save(&home, &id)
                .with_context(|| format!("writing the profile to {}", home.display()))?;
            println!(
                "logged in to {proxy} as {user} (cluster {}), certificates valid until {}",
                profile.cluster,
                postern_client::times::human_time(id.expires)
            );
        }
        Command::Status => match Profile::load(&home) {
            Ok((p, id)) => {
                let left = id.expires.saturating_sub(mint::now_unix());
                println!(
                    "> Profile: {}\n  Proxy:    {}\n  User:     {}\n  Roles:    {}\n  Cluster:  {}\n  Valid:    until {} ({} left)",
                    home.display(),
                    p.proxy,
                    p.user,
                    p.roles.join(", "),
                    p.cluster,
                    postern_client::times::rfc3339(id.expires),
                    postern_api::duration::format_secs(left)
                );
            }
            Err(e) => bail!("{e}"),
        },
        Command::Config => {
            let (p, id) = Profile::load(&home)?;
            print!("{}", openssh_config(&home, &p, &id).await?);
        }
        Command::Proxy { what } => proxy(&home, what).await?,
        Command::Doctor => {
            // Read without Profile::load, which refuses an expired identity: the doctor reports it.
            let path = home.join("profile.toml");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{}: not logged in? run psh login", path.display()))?;
            let p: Profile =
                toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            let trust = p.web_trust().map_err(anyhow::Error::msg)?;
            postern_client::doctor::run(&p.proxy, trust, &home.join("identity"), &mut |step| {
                println!("{step}")
            })
            .await?;
        }
        Command::Logout => {
            if Profile::remove(&home)? {
                println!("logged out: profile removed from {}", home.display());
            } else {
                println!("not logged in (no profile in {})", home.display());
            }
        }
    }
    Ok(())
}

/// The Auth API through the profile's proxy, as the profile's user.
async fn auth_client(
    home: &std::path::Path,
) -> anyhow::Result<(Profile, postern_client::auth::AuthClient)> {
    let (p, s) = session(home).await?;
    let (_, id) = Profile::load(home)?;
    let client =
        postern_client::auth::AuthClient::connect_via_proxy(std::sync::Arc::new(s), &id).await?;
    Ok((p, client))
}

/// `psh login --request-id=ID`: the profile's certificates again, with the approved roles.
async fn login_with_request(home: &std::path::Path, id: &str) -> anyhow::Result<()> {
    let (mut p, client) = auth_client(home)
        .await
        .context("psh login --request-id needs a current profile: run psh login first")?;
    let identity = client.reissue_with_request(id).await?;
    let certs = identity.ssh_cert.clone();
    let parsed = russh::keys::ssh_key::Certificate::from_openssh(certs.trim())?;
    if let Some(roles) = parsed.extensions().get(tunnel_proto::names::EXT_ROLES) {
        p.roles = roles.split(',').map(str::to_owned).collect();
    }
    p.save(home, &identity)
        .with_context(|| format!("writing the profile to {}", home.display()))?;
    println!(
        "logged in as {} with access request {id}: roles {}, certificates valid until {} (the elevation's end at the latest)",
        p.user,
        p.roles.join(", "),
        postern_client::times::human_time(identity.expires)
    );
    Ok(())
}

/// `psh request create|show`.
async fn request(home: &std::path::Path, what: RequestCommand) -> anyhow::Result<()> {
    use postern_client::requests::describe;
    let (_, client) = auth_client(home).await?;
    match what {
        RequestCommand::Create {
            roles,
            reason,
            duration,
            nowait,
        } => {
            let secs = match &duration {
                Some(d) => postern_api::duration::parse_secs(d).map_err(anyhow::Error::msg)?,
                None => 0,
            };
            let r = client.create_access_request(&roles, &reason, secs).await?;
            println!("request {} created: {}", r.id, describe(&r));
            if nowait {
                println!("see it with: psh request show {}", r.id);
                return Ok(());
            }
            println!("waiting for a reviewer (Ctrl-C stops waiting; the request stays)...");
            let every = std::time::Duration::from_secs(1);
            let timeout = std::time::Duration::from_secs(r.expires.saturating_sub(r.created));
            let r = tokio::select! {
                r = client.wait_for_review(&r.id, every, timeout) => r?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            print_review(&r, &describe(&r));
        }
        RequestCommand::Show { id } => {
            let r = client.get_access_request(&id).await?;
            print_review(&r, &describe(&r));
        }
    }
    Ok(())
}

fn print_review(r: &postern_api::proto::AccessRequest, line: &str) {
    println!("{line}");
    if r.state == "approved" && r.expires > mint::now_unix() {
        println!("use it with: psh login --request-id={}", r.id);
    }
}

/// A logged-in session with the profile's proxy.
async fn session(home: &std::path::Path) -> anyhow::Result<(Profile, ProxySession)> {
    let (p, id) = Profile::load(home)?;
    let trust = p.web_trust().map_err(anyhow::Error::msg)?;
    let opts = postern_client::auth::proxy_options(
        &id,
        ProxyAddr::Web {
            addr: p.proxy.clone(),
            trust,
        },
    )?;
    let dial = postern_client::DialOptions::from_env().map_err(anyhow::Error::msg)?;
    let s = ProxySession::connect_with(&opts, dial)
        .await
        .with_context(|| format!("logging in to proxy {}", p.proxy))?;
    Ok((p, s))
}

async fn proxy(home: &std::path::Path, what: ProxyCommand) -> anyhow::Result<()> {
    match what {
        ProxyCommand::Ssh { dest } => {
            let (host, port) = dest
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u32>().ok()?)))
                .with_context(|| format!("'{dest}' is not <target>.<cluster>:<port>"))?;
            let (_, s) = session(home).await?;
            let stream = s.open_host(host, port).await?;
            let (mut rd, mut wr) = tokio::io::split(stream);
            let up = async {
                let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut wr).await;
                let _ = wr.shutdown().await;
            };
            let down = async {
                let r = tokio::io::copy(&mut rd, &mut tokio::io::stdout()).await;
                let _ = tokio::io::stdout().flush().await;
                r
            };
            let (_, down) = tokio::join!(up, down);
            down.with_context(|| format!("stream to {dest}"))?;
        }
        ProxyCommand::Tcp {
            target,
            port,
            target_port,
        } => {
            let (p, s) = session(home).await?;
            let host = if target.contains('.') {
                target.clone()
            } else {
                format!("{target}.{}", p.cluster)
            };
            // Fail now, with the proxy's reason, if the target cannot be reached at all.
            drop(s.open_host(&host, target_port).await?);
            let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .with_context(|| format!("listening on 127.0.0.1:{port}"))?;
            println!(
                "forwarding 127.0.0.1:{} -> {host} through {} (Ctrl-C to stop)",
                l.local_addr()?.port(),
                p.proxy
            );
            let s = std::sync::Arc::new(s);
            loop {
                let (mut conn, peer) = tokio::select! {
                    r = l.accept() => r?,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let (s, host) = (s.clone(), host.clone());
                tokio::spawn(async move {
                    match s.open_host(&host, target_port).await {
                        Ok(mut stream) => {
                            let _ = tokio::io::copy_bidirectional(&mut conn, &mut stream).await;
                        }
                        Err(e) => eprintln!("psh: {peer}: {e}"),
                    }
                });
            }
        }
    }
    Ok(())
}

/// The OpenSSH block `psh config` prints: targets of the profile's cluster through the proxy,
/// with the key and certificate `psh login` wrote in OpenSSH's formats.
async fn openssh_config(
    home: &std::path::Path,
    p: &Profile,
    id: &IdentityFile,
) -> anyhow::Result<String> {
    let trust = p.web_trust().map_err(anyhow::Error::msg)?;
    let tunnel = postern_dial::web::discover_tunnel_addr(&p.proxy, &trust)
        .await
        .with_context(|| format!("finding the tunnel address of {}", p.proxy))?;
    let (host, port) = tunnel
        .rsplit_once(':')
        .with_context(|| format!("tunnel address '{tunnel}' has no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let f = OpenSshFiles::in_dir(home);
    let q = |path: &std::path::Path| format!("\"{}\"", path.display());
    Ok(format!(
        "# Postern: targets of cluster {cluster} through {proxy}, as {user} (psh config).\n\
         # The certificate is renewed by psh login; it is valid until {expires}.\n\
         Host *.{cluster}\n\
         \x20   IdentityFile {key}\n\
         \x20   CertificateFile {cert}\n\
         \x20   IdentitiesOnly yes\n\
         \x20   ProxyCommand ssh -F none -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityAgent=none \
         -i {key} -o CertificateFile={cert} -o UserKnownHostsFile={known} \
         -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes \
         -l {user} -p {port} -W %h:%p {host}\n",
        cluster = p.cluster,
        proxy = p.proxy,
        user = p.user,
        expires = postern_client::times::rfc3339(id.expires),
        key = q(&f.key),
        cert = q(&f.cert),
        known = q(&f.known_hosts),
    ))
}

/// `psh bot start`: parses the flags and runs [`postern_client::bot::run`] until a signal.
async fn bot(what: BotCommand) -> anyhow::Result<()> {
    let BotCommand::Start {
        proxy,
        cluster,
        name,
        token_file,
        ca_pin,
        out,
        interval,
        ttl,
        web_pin,
        web_ca,
    } = what;
    let secs = |s: &str| postern_api::duration::parse_secs(s).map_err(anyhow::Error::msg);
    let interval = std::time::Duration::from_secs(secs(&interval)?);
    let ttl = match ttl {
        Some(t) => std::time::Duration::from_secs(secs(&t)?),
        None => interval * 2,
    };
    let trust = match (web_pin, web_ca) {
        (Some(p), None) => WebTrust::Pin(p),
        (None, Some(f)) => WebTrust::roots_from_pem_file(&f)?,
        (None, None) => postern_client::credentials::system_roots().map_err(anyhow::Error::msg)?,
        _ => bail!("give at most one of --web-pin and --web-ca"),
    };
    let cfg = postern_client::bot::BotConfig {
        proxy,
        trust,
        cluster,
        name,
        token_file,
        ca_pin,
        out,
        interval,
        ttl,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        on_signal.cancel();
    });
    postern_client::bot::run(cfg, stop).await?;
    Ok(())
}
