//! `pctl`'s command line: the global connection flags and every command, as clap reads them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::output::Format;
use crate::{events, locks, requests};

#[derive(Parser)]
#[command(name = "pctl", version, about = "Administer a Postern cluster")]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) conn: Conn,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Args)]
pub(crate) struct Conn {
    /// The Auth server's data dir (local mode: its admin identity and address).
    #[arg(long, global = true)]
    pub(crate) data_dir: Option<PathBuf>,
    /// The Auth server's address (`host:port`), with -i.
    #[arg(long, global = true)]
    pub(crate) auth_server: Option<String>,
    /// A proxy's web address: reach the Auth server through its tunnel, with -i.
    #[arg(long, global = true)]
    pub(crate) proxy: Option<String>,
    /// SHA-256 pin of the proxy's web certificate.
    #[arg(long, global = true)]
    pub(crate) web_pin: Option<String>,
    /// PEM CA file for the proxy's web certificate.
    #[arg(long, global = true)]
    pub(crate) web_ca: Option<PathBuf>,
    /// Trust any proxy web certificate (local experiments only).
    #[arg(long, global = true)]
    pub(crate) insecure: bool,
    /// Identity file (from `pctl auth sign`).
    #[arg(short = 'i', long = "identity", global = true)]
    pub(crate) identity: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Cluster name, server version, and who you are.
    Status,
    /// Create resources from YAML or JSON (`-f -` reads stdin; several documents allowed): roles,
    /// and users (each new user's signup secret goes to ./NAME.signup, 0600).
    Create {
        /// File with `kind: role` and `kind: user` documents (what `pctl get --format yaml|json`
        /// prints).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Overwrite existing resources.
        #[arg(long)]
        force: bool,
    },
    /// Show resources: roles, role/NAME, users, user/NAME, tokens, locks, events.
    Get {
        /// What to show.
        what: String,
        /// Output format [default: yaml for roles and users (what `create -f` reads back),
        /// text for tokens, locks and events].
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Event filters (`get events --type=stream --user=NAME --since=1h`).
        #[command(flatten)]
        filter: events::EventFilter,
    },
    /// Lock a user, a role or an agent: every proxy refuses its new streams and closes its open
    /// ones within seconds, with --message as the reason.
    Lock(locks::LockArgs),
    /// Review access requests: ls, approve ID, deny ID.
    Requests {
        #[command(subcommand)]
        command: requests::RequestsCommand,
    },
    /// Remove a resource: role/NAME, user/NAME, token/ID, lock/ID.
    Rm {
        /// What to remove.
        what: String,
    },
    /// Manage users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Issue certificates and export CAs.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Manage join tokens.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Print a shell completion script: `pctl completion bash > /etc/bash_completion.d/pctl`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Check the path to the Auth API through a proxy, step by step, and say how to fix the first
    /// step that fails: `pctl --proxy WEB --web-pin SHA256 -i FILE doctor`.
    Doctor,
    /// Write man pages (pctl.1 and one per subcommand) into a directory.
    Man {
        /// Where to write them.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum UsersCommand {
    /// Add a user; its one-time signup secret goes to a 0600 file, never to the terminal.
    Add {
        /// User name.
        name: String,
        /// Comma-separated roles.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Where to write the signup secret [default: ./NAME.signup].
        #[arg(long)]
        secret_out: Option<PathBuf>,
        /// How long the secret stays valid (e.g. 1h).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// List users.
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Replace a user's roles.
    Update {
        /// User name.
        name: String,
        /// Comma-separated roles.
        #[arg(long, value_delimiter = ',')]
        set_roles: Vec<String>,
    },
    /// Remove a user (its certificates stop working at once).
    Rm {
        /// User name.
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum SignFormat {
    /// One identity file (key, certificates, CAs, cluster).
    File,
    /// Key pair files: OUT.key, OUT.crt, OUT.cas.
    Tls,
    /// OpenSSH files: OUT (private key), OUT-cert.pub, OUT.known_hosts (the cluster's host CA),
    /// for `ssh -i OUT -o CertificateFile=OUT-cert.pub -o UserKnownHostsFile=OUT.known_hosts`.
    Openssh,
}

#[derive(Subcommand)]
pub(crate) enum AuthCommand {
    /// Rotate a CA: automatic (`--type=host --grace-period=30h`) or phase by phase
    /// (`--manual --phase=init|update_clients|update_servers|standby|rollback`).
    Rotate {
        /// Which CA: host, user or tls.
        #[arg(long = "type")]
        kind: String,
        /// Automatic mode: the whole rotation's length (each phase lasts a third of it).
        #[arg(long = "grace-period", default_value = "30h")]
        grace_period: String,
        /// Manual mode: phases move only with --phase.
        #[arg(long)]
        manual: bool,
        /// The phase to move to: the next one, or rollback.
        #[arg(long)]
        phase: Option<String>,
    },
    /// Issue certificates: for a user (--user), an agent (--host) or a proxy (--proxy).
    Sign {
        /// User to sign for.
        #[arg(long, conflicts_with_all = ["host", "proxy_names"])]
        user: Option<String>,
        /// Agent host id to sign a host certificate for (role `service`: not the reserved targets).
        #[arg(long, conflicts_with = "proxy_names")]
        host: Option<String>,
        /// Comma-separated names a proxy is reached by: sign a proxy host certificate.
        #[arg(long = "proxy-names", value_delimiter = ',')]
        proxy_names: Vec<String>,
        /// Certificate lifetime (e.g. 8h); capped by the user's roles.
        #[arg(long)]
        ttl: Option<String>,
        /// Output file (identity file; or base name for --format=tls and host keys).
        #[arg(long)]
        out: PathBuf,
        /// Output format for user certificates.
        #[arg(long, value_enum, default_value_t = SignFormat::File)]
        format: SignFormat,
    },
    /// Print a CA's public part: `host` and `user` as OpenSSH lines (for proxy.toml), `tls` as PEM.
    Export {
        /// Which CA.
        #[arg(long = "type")]
        kind: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum TokensCommand {
    /// Create a join token; the secret goes to a 0600 file.
    Add {
        /// Token kind: `agent` (enrolls an agent) or `bot` (a Machine ID bot, with --user).
        #[arg(long = "type", default_value = "agent")]
        kind: String,
        /// The user a `bot` token is bound to: the bot's identity is this user's.
        #[arg(long)]
        user: Option<String>,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime (e.g. 30m).
        #[arg(long, default_value = "30m")]
        ttl: String,
        /// How many agents it may enroll (single-use by default).
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// List tokens (ids and expiry; never the secrets).
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Delete a token by id.
    Rm {
        /// Token id (from `pctl tokens ls`).
        id: String,
    },
}
