//! `POSTERN_AGENT_*` environment overrides over `agent.toml`, and the documented
//! `POSTERN_AGENT_OPS_LISTEN`, which is one of them.

// `figment::Jail` closures must return figment's own (large) error type.
#![allow(clippy::result_large_err)]

use std::path::Path;

use figment::Jail;
use postern_agent::AgentConfig;

const FILE: &str = "host_id = \"web-1\"\ncluster = \"example\"\nhost_key_file = \"k\"\n[targets]\nweb = \"127.0.0.1:8080\"\n";

#[test]
fn env_overrides_reach_the_agent_config() {
    Jail::expect_with(|jail| {
        jail.create_file("agent.toml", FILE)?;
        jail.set_env("POSTERN_AGENT_OPS_LISTEN", "127.0.0.1:3027");
        jail.set_env("POSTERN_AGENT_PROXY", "proxy.example.com:443");
        jail.set_env("POSTERN_AGENT_RECONNECT__CAP_MS", "9000");
        let c = AgentConfig::load(Path::new("agent.toml")).map_err(|e| e.to_string())?;
        assert_eq!(c.host_id, "web-1");
        assert_eq!(
            c.ops_listen.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:3027")
        );
        assert_eq!(c.proxy.as_deref(), Some("proxy.example.com:443"));
        assert_eq!(c.reconnect.cap_ms, 9000);
        assert_eq!(c.targets.len(), 1);
        Ok(())
    });
}

#[test]
fn a_bad_env_value_names_the_variable() {
    Jail::expect_with(|jail| {
        jail.create_file("agent.toml", FILE)?;
        jail.set_env("POSTERN_AGENT_OPS_LISTEN", "nowhere");
        let msg = AgentConfig::load(Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("POSTERN_AGENT_OPS_LISTEN") && msg.contains("ops_listen"),
            "{msg}"
        );
        Ok(())
    });
}

#[test]
fn text_that_looks_like_a_number_is_quoted() {
    Jail::expect_with(|jail| {
        jail.create_file("agent.toml", FILE)?;
        jail.set_env("POSTERN_AGENT_HOST_ID", "123");
        let msg = AgentConfig::load(Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("POSTERN_AGENT_HOST_ID") && msg.contains("quote it"),
            "{msg}"
        );
        jail.set_env("POSTERN_AGENT_HOST_ID", "\"123\"");
        let c = AgentConfig::load(Path::new("agent.toml")).map_err(|e| e.to_string())?;
        assert_eq!(c.host_id, "123");
        Ok(())
    });
}
