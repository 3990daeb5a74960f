//! `pctl`: the Postern admin CLI (like tctl). On the Auth host it uses the admin identity the
//! server writes into its data dir (`pctl --data-dir DIR`); elsewhere an identity file and the
//! Auth server's address (`--auth-server ADDR -i FILE`) or a proxy (`--proxy WEB -i FILE`).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser};
use postern_api::duration;
use postern_api::identity::{IdentityFile, write_private_atomic};
use postern_api::proto::*;
use postern_client::auth::AuthClient;
use postern_client::connect::Config;
use postern_client::credentials::Credentials;
use postern_client::profile::Profile;
use postern_dial::mint;
use postern_dial::web::WebTrust;
use russh::keys::ssh_key::LineEnding;

mod args;
mod output;
mod rotation;
use rotation::rotation_line;

mod create;
mod events;
mod get;
mod locks;
mod requests;

use args::*;
use output::{human_time, out, outln};

/// How the proxy's web certificate is trusted: --web-pin, --web-ca, --insecure, or none given.
fn web_trust(c: &Conn) -> anyhow::Result<Option<WebTrust>> {
    Ok(match (&c.web_pin, &c.web_ca, c.insecure) {
        (Some(p), None, false) => Some(WebTrust::Pin(p.clone())),
        (None, Some(f), false) => Some(WebTrust::roots_from_pem_file(f)?),
        (None, None, true) => Some(WebTrust::Insecure),
        (None, None, false) => None,
        _ => bail!("give at most one of --web-pin, --web-ca and --insecure"),
    })
}

/// Connects with the same loaders the SDK offers: `-i FILE` (an identity file) with
/// `--auth-server` or `--proxy`; the admin identity with `--data-dir`; else the `psh login`
/// profile if there is one, else the local Auth server's data dir.
async fn connect(c: &Conn) -> anyhow::Result<AuthClient> {
    let trust = web_trust(c)?;
    let with_identity = |addr: &str, flag: &str| -> anyhow::Result<Config> {
        let id = c
            .identity
            .clone()
            .with_context(|| format!("{flag} needs an identity file (-i FILE)"))?;
        Ok(Config {
            addrs: vec![addr.to_string()],
            credentials: vec![Credentials::identity_file(id)],
            web_trust: trust.clone(),
            ..Default::default()
        })
    };
    let config = if let Some(proxy) = &c.proxy {
        with_identity(proxy, "--proxy")?
    } else if let Some(addr) = &c.auth_server {
        with_identity(addr, "--auth-server")?
    } else if c.data_dir.is_none()
        && c.identity.is_none()
        && Profile::default_dir().join("profile.toml").exists()
    {
        Config {
            credentials: vec![Credentials::profile(None, None)],
            ..Default::default()
        }
    } else {
        let dir = c
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/postern-auth"));
        let addr_file = dir.join("auth_addr");
        let addr = std::fs::read_to_string(&addr_file).with_context(|| {
            format!(
                "{}: is the Auth server running with --data-dir {}? (or use --auth-server ADDR -i FILE)",
                addr_file.display(),
                dir.display()
            )
        })?;
        let id = c
            .identity
            .clone()
            .unwrap_or_else(|| dir.join("admin.identity"));
        Config {
            addrs: vec![addr.trim().to_string()],
            credentials: vec![Credentials::identity_file(id)],
            ..Default::default()
        }
    };
    let config = Config {
        dial: postern_client::DialOptions::from_env().map_err(anyhow::Error::msg)?,
        ..config
    };
    Ok(AuthClient::connect(config).await?)
}

fn read_input(file: &Path) -> anyhow::Result<String> {
    if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))
    }
}

fn ttl_secs(text: &Option<String>) -> anyhow::Result<u64> {
    match text {
        None => Ok(0),
        Some(t) => duration::parse_secs(t).map_err(anyhow::Error::msg),
    }
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    write_private_atomic(path, format!("{text}\n").as_bytes())
        .with_context(|| format!("{}", path.display()))
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
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("pctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Completion { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "pctl", &mut buf);
            out!("{}", String::from_utf8_lossy(&buf));
            return Ok(());
        }
        Command::Doctor => {
            let web =
                cli.conn.proxy.as_deref().context(
                    "doctor checks the path through a proxy: give --proxy WEB and -i FILE",
                )?;
            let id = cli
                .conn
                .identity
                .as_deref()
                .context("doctor needs an identity file (-i FILE)")?;
            let trust = web_trust(&cli.conn)?
                .context("doctor needs --web-pin SHA256, --web-ca FILE or --insecure")?;
            postern_client::doctor::run(web, trust, id, &mut |step| outln!("{step}")).await?;
            return Ok(());
        }
        Command::Man { out_dir } => {
            std::fs::create_dir_all(out_dir).with_context(|| format!("{}", out_dir.display()))?;
            clap_mangen::generate_to(Cli::command(), out_dir)
                .with_context(|| format!("writing man pages to {}", out_dir.display()))?;
            outln!("man pages written to {}", out_dir.display());
            return Ok(());
        }
        _ => {}
    }
    let client = connect(&cli.conn).await?;
    match cli.command {
        Command::Status => {
            let p = client.ping(PingRequest {}).await?;
            outln!(
                "Cluster:  {}\nVersion:  {}\nUser:     {}\nRoles:    {}",
                p.cluster,
                p.server_version,
                p.user,
                p.roles.join(", ")
            );
            rotation::print_ca_status(&client).await?;
        }
        Command::Create { file, force } => {
            let text = read_input(&file)?;
            let (roles, users) = postern_api::user_resource::parse_resources(&text)
                .with_context(|| format!("{}", file.display()))?;
            create::roles(&client, roles, force).await?;
            create::users(&client, users, force).await?;
        }
        Command::Get {
            what,
            format,
            filter,
        } => get::get(&client, &what, format, &filter).await?,
        Command::Rm { what } => match what.split_once('/') {
            Some(("role", name)) => {
                client.delete_role(name).await?;
                outln!("role '{name}' has been deleted");
            }
            Some(("user", name)) => {
                client.delete_user(name).await?;
                outln!("user '{name}' has been deleted");
            }
            Some(("token", id)) => {
                client.delete_token(id).await?;
                outln!("token '{id}' has been deleted");
            }
            Some(("lock", id)) => locks::rm(&client, id).await?,
            _ => bail!("cannot remove '{what}': use role/NAME, user/NAME, token/ID or lock/ID"),
        },
        Command::Lock(args) => locks::lock(&client, args).await?,
        Command::Requests { command } => requests::run(&client, command).await?,
        Command::Users { command } => match command {
            UsersCommand::Add {
                name,
                roles,
                secret_out,
                ttl,
            } => {
                let ttl = duration::parse_secs(&ttl).map_err(anyhow::Error::msg)?;
                let r = client
                    .create_user(CreateUserRequest {
                        name: name.clone(),
                        roles,
                        secret_ttl_secs: ttl,
                    })
                    .await?;
                let path = secret_out.unwrap_or_else(|| PathBuf::from(format!("{name}.signup")));
                write_secret(&path, &r.signup_secret)?;
                outln!(
                    "user '{name}' has been created. Its one-time signup secret is in {} (0600, valid until {}): hand it over securely; `psh login` asks for it.",
                    path.display(),
                    human_time(r.secret_expires)
                );
            }
            UsersCommand::Ls { format } => {
                get::users(&client.list_users(ListUsersRequest {}).await?.users, format)?
            }
            UsersCommand::Update { name, set_roles } => {
                let u = client
                    .update_user(User {
                        name: name.clone(),
                        roles: set_roles,
                        created: 0,
                        revision: 0,
                    })
                    .await?;
                outln!("user '{name}' now has roles: {}", u.roles.join(", "));
            }
            UsersCommand::Rm { name } => {
                client.delete_user(&name).await?;
                outln!("user '{name}' has been deleted");
            }
        },
        Command::Auth { command } => match command {
            AuthCommand::Rotate {
                kind,
                grace_period,
                manual,
                phase,
            } => {
                let grace = duration::parse_secs(&grace_period).map_err(anyhow::Error::msg)?;
                let r = client
                    .rotate_cert_authority(RotateCertAuthorityRequest {
                        kind,
                        phase: phase.unwrap_or_default(),
                        manual,
                        grace_period_secs: grace,
                    })
                    .await?;
                outln!("{}", rotation_line(&r));
            }
            AuthCommand::Sign {
                user,
                host,
                proxy_names,
                ttl,
                out,
                format,
            } => {
                let ttl = ttl_secs(&ttl)?;
                let key = mint::generate_key();
                let public_key = key.public_key().to_openssh()?;
                if let Some(user) = user {
                    let certs = client
                        .generate_user_certs(GenerateUserCertsRequest {
                            user: user.clone(),
                            public_key,
                            ttl_secs: ttl,
                        })
                        .await?;
                    match format {
                        SignFormat::File => {
                            let id = IdentityFile::from_certs(
                                &user,
                                key.to_openssh(LineEnding::LF)?.to_string(),
                                certs,
                            );
                            id.save(&out)?;
                            outln!(
                                "identity of '{user}' written to {} (expires {})",
                                out.display(),
                                human_time(id.expires)
                            );
                        }
                        SignFormat::Tls => {
                            let pkcs8 = postern_client::auth::ed25519_pkcs8(&key)
                                .map_err(anyhow::Error::msg)?;
                            let key_pem = pem_encode("PRIVATE KEY", pkcs8.secret_der());
                            let base = out.display().to_string();
                            write_private_atomic(
                                Path::new(&format!("{base}.key")),
                                key_pem.as_bytes(),
                            )?;
                            mint::write_file(
                                Path::new(&format!("{base}.crt")),
                                certs.tls_cert.as_bytes(),
                                0o644,
                            )?;
                            mint::write_file(
                                Path::new(&format!("{base}.cas")),
                                certs.tls_cas.concat().as_bytes(),
                                0o644,
                            )?;
                            outln!(
                                "{base}.key, {base}.crt and {base}.cas written (expires {})",
                                human_time(certs.expires)
                            );
                        }
                        SignFormat::Openssh => {
                            let base = out.display().to_string();
                            write_private_atomic(&out, key.to_openssh(LineEnding::LF)?.as_bytes())?;
                            mint::write_file(
                                Path::new(&format!("{base}-cert.pub")),
                                format!("{}\n", certs.ssh_cert.trim_end()).as_bytes(),
                                0o644,
                            )?;
                            let known = postern_client::profile::known_hosts(&certs.ssh_host_cas);
                            mint::write_file(
                                Path::new(&format!("{base}.known_hosts")),
                                known.as_bytes(),
                                0o644,
                            )?;
                            outln!(
                                "{base} (0600), {base}-cert.pub and {base}.known_hosts written (expires {})",
                                human_time(certs.expires)
                            );
                        }
                    }
                } else if host.is_some() || !proxy_names.is_empty() {
                    let certs = client
                        .generate_host_certs(GenerateHostCertsRequest {
                            host_id: host.clone().unwrap_or_default(),
                            public_key,
                            ttl_secs: ttl,
                            proxy_principals: proxy_names,
                        })
                        .await?;
                    mint::write_key_pair(&out, &key)?;
                    let cert_path = mint::cert_path(&out);
                    mint::write_file(
                        &cert_path,
                        format!("{}\n", certs.ssh_cert).as_bytes(),
                        0o644,
                    )?;
                    outln!(
                        "host key {} and certificate {} written (expires {})",
                        out.display(),
                        cert_path.display(),
                        human_time(certs.expires)
                    );
                } else {
                    bail!("say what to sign for: --user NAME, --host ID or --proxy-names A,B");
                }
            }
            AuthCommand::Export { kind } => {
                for e in client
                    .export_authorities(ExportAuthoritiesRequest { kind })
                    .await?
                    .entries
                {
                    outln!("{}", e.trim_end());
                }
            }
        },
        // Answered above, before connecting.
        Command::Completion { .. } | Command::Man { .. } | Command::Doctor => {}
        Command::Tokens { command } => match command {
            TokensCommand::Add {
                kind,
                user,
                out,
                ttl,
                uses,
            } => {
                let ttl = duration::parse_secs(&ttl).map_err(anyhow::Error::msg)?;
                let r = client
                    .create_token(CreateTokenRequest {
                        kind,
                        ttl_secs: ttl,
                        uses,
                        user: user.unwrap_or_default(),
                    })
                    .await?;
                write_secret(&out, &r.token)?;
                let info = r.info.unwrap_or_default();
                outln!(
                    "join token {} written to {} (expires {}, {} use{})",
                    info.id,
                    out.display(),
                    human_time(info.expires),
                    info.uses_left,
                    if info.uses_left == 1 { "" } else { "s" }
                );
            }
            TokensCommand::Ls { format } => get::tokens(
                &client.list_tokens(ListTokensRequest {}).await?.tokens,
                format,
            )?,
            TokensCommand::Rm { id } => {
                client.delete_token(&id).await?;
                outln!("token '{id}' has been deleted");
            }
        },
    }
    Ok(())
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
