//! `POSTERN_PROXY_*` environment overrides over `proxy.toml` (containers): a variable changes a
//! field, `__` nests, a bad value names its variable. `figment::Jail` serializes the tests and
//! restores the environment.

// `figment::Jail` closures must return figment's own (large) error type.
#![allow(clippy::result_large_err)]

use std::path::Path;

use figment::Jail;
use postern_proxy::config::{ConfigError, ProxyConfig};

const FILE: &str = "data_dir = \"/srv/postern\"\n[listen]\nweb = \"127.0.0.1:3080\"\n";

#[test]
fn an_env_override_changes_a_field_and_the_file_keeps_the_rest() {
    Jail::expect_with(|jail| {
        jail.create_file("proxy.toml", FILE)?;
        let before = ProxyConfig::load(Some(Path::new("proxy.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(before.listen.web.to_string(), "127.0.0.1:3080");
        jail.set_env("POSTERN_PROXY_LISTEN__WEB", "127.0.0.1:4443");
        jail.set_env(
            "POSTERN_PROXY_LIMITS__MAX_CONNECTS_PER_SOURCE_PER_MINUTE",
            "7",
        );
        jail.set_env("POSTERN_PROXY_ALLOW_ROOT", "true");
        // Not config: what a container platform sets for a service named postern-proxy.
        jail.set_env("POSTERN_PROXY_PORT", "tcp://10.0.0.1:3080");
        jail.set_env("POSTERN_PROXY_SERVICE_HOST", "10.0.0.1");
        let c = ProxyConfig::load(Some(Path::new("proxy.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(c.listen.web.to_string(), "127.0.0.1:4443");
        assert_eq!(c.limits.max_connects_per_source_per_minute, 7);
        assert!(c.allow_root);
        assert_eq!(
            c.data_dir,
            Path::new("/srv/postern"),
            "the file's fields stay"
        );
        assert_eq!(c.listen.tunnel, before.listen.tunnel, "defaults stay");
        c.validate().map_err(|e| e.to_string())?;
        // Without a file, the overrides apply over the defaults.
        let d = ProxyConfig::load(None).map_err(|e| e.to_string())?;
        assert_eq!(d.listen.web.to_string(), "127.0.0.1:4443");
        Ok(())
    });
}

#[test]
fn a_bad_env_value_names_the_variable_and_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file("proxy.toml", FILE)?;
        jail.set_env("POSTERN_PROXY_LISTEN__WEB", "not-an-address");
        let e = ProxyConfig::load(Some(Path::new("proxy.toml"))).unwrap_err();
        assert!(matches!(e, ConfigError::Env(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("environment variable POSTERN_PROXY_LISTEN__WEB")
                && msg.contains("listen.web"),
            "{msg}"
        );
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("POSTERN_PROXY_LISTEN__WEBB", "127.0.0.1:1");
        let msg = ProxyConfig::load(None).unwrap_err().to_string();
        assert!(
            msg.contains("POSTERN_PROXY_LISTEN__WEBB") && msg.contains("webb"),
            "an unknown key is named: {msg}"
        );
        Ok(())
    });
}

#[test]
fn file_errors_still_name_the_file_and_line() {
    Jail::expect_with(|jail| {
        jail.create_file("proxy.toml", "[listen]\nwebb = \"127.0.0.1:1\"\n")?;
        jail.set_env("POSTERN_PROXY_ALLOW_ROOT", "true");
        let msg = ProxyConfig::load(Some(Path::new("proxy.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("proxy.toml") && msg.contains("webb") && msg.contains("line 2"),
            "{msg}"
        );
        Ok(())
    });
}
