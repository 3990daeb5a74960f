//! Environment overrides for the daemons' config files, for containers: every field of
//! `proxy.toml`, `agent.toml` and `auth.toml` can be set by a variable `POSTERN_PROXY_*`,
//! `POSTERN_AGENT_*` or `POSTERN_AUTH_*`, `__` separating nested keys
//! (`POSTERN_PROXY_LISTEN__WEB=0.0.0.0:443`, `POSTERN_AUTH_BACKEND=postgres://…`,
//! `POSTERN_AGENT_RECONNECT__MAX_MS=60000`). Variables win over the file; command-line flags win
//! over both. Values are read as TOML-like scalars (`true`, `30`, `[1, 2]`, `"quoted text"`)
//! and as strings otherwise, so text that looks like a number is quoted (`'"123"'`).
//!
//! `figment` does the layering: the file, already parsed by our `toml` (figment's own TOML
//! support would bring a second `toml` major version), goes in as `Serialized` defaults and
//! `figment::providers::Env` is merged over it. The caller still validates the result in its one
//! `validate()`.
//!
//! Variables a container platform sets by itself for a service of the same name
//! (`POSTERN_PROXY_PORT`, `POSTERN_PROXY_PORT_3080_TCP…`, `POSTERN_PROXY_SERVICE_HOST`, from
//! Kubernetes service links or Docker links) are not config and are skipped.

use figment::Figment;
use figment::providers::{Env, Serialized};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// An environment variable held a bad value or named no config field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {var}: {message}")]
pub struct EnvError {
    /// The variable (or variables, comma-separated, when the culprit cannot be told apart).
    pub var: String,
    /// What is wrong, naming the config key.
    pub message: String,
}

/// Whether a key (after the prefix, lower case) is a service-link variable, not config.
fn is_service_link(key: &str) -> bool {
    key == "port" || key.starts_with("port_") || key.starts_with("service_")
}

/// The override variables set now under `prefix` (e.g. `POSTERN_PROXY_`), sorted.
pub fn override_vars(prefix: &str) -> Vec<String> {
    let mut vars: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            k.len() > prefix.len()
                && k[..prefix.len()].eq_ignore_ascii_case(prefix)
                && !is_service_link(&k[prefix.len()..].to_ascii_lowercase())
        })
        .collect();
    vars.sort();
    vars
}

/// `base` (the parsed config file, or an empty table when there is none) with the environment's
/// `prefix` variables layered over it, deserialized as `T`; `None` when no such variable is
/// set, so a caller without overrides keeps the file's own parse and its line-numbered errors.
pub fn apply<T: DeserializeOwned>(
    base: &impl Serialize,
    prefix: &str,
) -> Result<Option<T>, EnvError> {
    let vars = override_vars(prefix);
    if vars.is_empty() {
        return Ok(None);
    }
    let env = Env::prefixed(prefix)
        .split("__")
        .filter(|k| !is_service_link(&k.as_str().to_ascii_lowercase()));
    Figment::from(Serialized::defaults(base))
        .merge(env)
        .extract::<T>()
        .map(Some)
        .map_err(|e| env_error(e, prefix, &vars))
}

/// Names the variable behind a figment error: the one whose key is the error's path (or a
/// parent or child of it), else every override variable set.
fn env_error(e: figment::Error, prefix: &str, vars: &[String]) -> EnvError {
    let mut path = e.path.clone();
    if let figment::error::Kind::UnknownField(field, _) = &e.kind {
        path.push(field.clone());
    }
    let var_key = |v: &str| -> Vec<String> {
        v[prefix.len()..]
            .to_ascii_lowercase()
            .split("__")
            .map(str::to_owned)
            .collect()
    };
    let mut hits: Vec<&String> = vars
        .iter()
        .filter(|v| {
            let k = var_key(v);
            !path.is_empty() && (k.starts_with(&path) || path.starts_with(&k))
        })
        .collect();
    if hits.is_empty() {
        hits = vars.iter().collect();
    }
    // `123` or `true` in a variable is read as a number or a boolean, not as text.
    let hint = match &e.kind {
        figment::error::Kind::InvalidType(_, expected) if expected.contains("string") => {
            ": to pass text that looks like a number or boolean, quote it (VAR='\"123\"')"
        }
        _ => "",
    };
    let key = if path.is_empty() {
        String::new()
    } else {
        format!(" (config key `{}`)", path.join("."))
    };
    EnvError {
        var: hits
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        message: format!("{}{key}{hint}", e.kind),
    }
}
