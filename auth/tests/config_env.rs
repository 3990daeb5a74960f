//! `POSTERN_AUTH_*` environment overrides over `auth.toml`, and the documented
//! `POSTERN_AUTH_OPS_LISTEN`, which is one of them.

// `figment::Jail` closures must return figment's own (large) error type.
#![allow(clippy::result_large_err)]

use std::path::Path;

use figment::Jail;
use postern_auth::AuthConfig;

#[test]
fn env_overrides_reach_the_auth_config() {
    Jail::expect_with(|jail| {
        jail.create_file("auth.toml", "cluster = \"example\"\n")?;
        jail.set_env("POSTERN_AUTH_BACKEND", "postgres://postern@db:5432/postern");
        jail.set_env("POSTERN_AUTH_OPS_LISTEN", "127.0.0.1:3026");
        jail.set_env("POSTERN_AUTH_LIMITS__MAX_QUEUED_LOGINS", "8");
        let c = AuthConfig::load(Some(Path::new("auth.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(c.cluster.as_deref(), Some("example"));
        assert_eq!(
            c.backend.as_deref(),
            Some("postgres://postern@db:5432/postern")
        );
        assert_eq!(
            c.ops_listen.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:3026")
        );
        assert_eq!(c.limits.max_queued_logins, 8);
        Ok(())
    });
}

#[test]
fn a_bad_env_value_names_the_variable() {
    Jail::expect_with(|jail| {
        jail.set_env("POSTERN_AUTH_LIMITS__MAX_QUEUED_LOGINS", "many");
        let msg = AuthConfig::load(None).unwrap_err().to_string();
        assert!(
            msg.contains("POSTERN_AUTH_LIMITS__MAX_QUEUED_LOGINS")
                && msg.contains("limits.max_queued_logins"),
            "{msg}"
        );
        Ok(())
    });
}
