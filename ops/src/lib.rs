//! # postern-ops: what every Postern daemon shares for operators
//!
//! - [`LogFormat`] and [`init_logging`]: `--log-format text|json` (or `POSTERN_LOG_FORMAT`), colour
//!   only on a terminal and never with `NO_COLOR` set, the filter from `RUST_LOG`.
//! - [`VERSION`]: the version and the git commit the binary was built from, for `--version`.
//! - [`http`]: the ops listener (`/metrics`, `/healthz`, `/readyz`) of the proxy, the agent and
//!   the Auth server, with its readiness flag.
//! - [`overrides`]: `POSTERN_PROXY_*`, `POSTERN_AGENT_*`, `POSTERN_AUTH_*` environment overrides
//!   layered over each daemon's config file (`figment`).

use std::io::IsTerminal;

pub mod http;
pub mod overrides;

/// `<crate version> (<git commit>)`; `unknown` when built outside a git checkout.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("POSTERN_GIT_COMMIT"),
    ")"
);

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (for journald, Loki, Elasticsearch).
    Json,
}

/// Whether text logs may carry ANSI colour: stderr is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>).
pub fn colour_allowed() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber: `format`, `RUST_LOG` or else `default_filter`, to stderr.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(colour_allowed()).init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_a_commit() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(VERSION.contains('(') && VERSION.ends_with(')'), "{VERSION}");
    }

    #[test]
    fn log_formats_parse_from_flags_and_config() {
        use clap::ValueEnum;
        assert_eq!(LogFormat::from_str("json", false), Ok(LogFormat::Json));
        assert!(LogFormat::from_str("yaml", false).is_err());
        #[derive(serde::Deserialize)]
        struct C {
            f: LogFormat,
        }
        let c: C = toml::from_str("f = \"text\"").unwrap();
        assert_eq!(c.f, LogFormat::Text);
    }
}
