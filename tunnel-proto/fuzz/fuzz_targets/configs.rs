//! The TOML configuration files of the proxy, the agent and the Auth server: parsing and
//! `validate()` must never panic, whatever the text; the derived helpers neither.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_agent::AgentConfig;
use postern_auth::AuthConfig;
use postern_proxy::ProxyConfig;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(c) = ProxyConfig::from_toml(text) {
                let ok = c.validate().is_ok();
                let _ = (c.keepalive(), c.handshake_timeout(), c.grace());
                let _ = (c.host_key_path(), c.host_cert_path());
                if ok {
                    assert!(c.ssh.keepalive_interval_secs > 0 && c.ssh.handshake_timeout_secs > 0);
                }
            }
        }
        1 => {
            if let Ok(c) = toml::from_str::<AgentConfig>(text) {
                let ok = c.validate().is_ok();
                let _ = (c.keepalive(), c.host_cert_path());
                if ok {
                    assert!(!c.targets.is_empty() && c.reconnect.base_ms <= c.reconnect.cap_ms);
                }
            }
        }
        _ => {
            if let Ok(c) = toml::from_str::<AuthConfig>(text) {
                let _ = c.validate();
            }
        }
    }
});
