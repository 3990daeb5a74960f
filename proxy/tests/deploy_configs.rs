//! Every example config under deploy/ loads and validates.

#[test]
fn deploy_proxy_toml_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/proxy.toml");
    let c = postern_proxy::ProxyConfig::from_file(std::path::Path::new(path)).unwrap();
    c.validate().unwrap();
    assert_eq!(c.clusters[0].name, "example");
    assert_eq!(c.listen.tunnel.port(), 3024);
}

/// Config text mutations for the property tests below (the stable counterpart of the `configs`
/// fuzz target): the deploy example with lines dropped or repeated and characters replaced.
mod mutated {
    use proptest::prelude::*;

    pub fn text(base: &'static str) -> impl Strategy<Value = String> {
        let ops = proptest::collection::vec(
            (
                0u8..3,
                any::<prop::sample::Index>(),
                proptest::sample::select(&['"', '=', '[', ']', '\n', '0', 'x', '.', ':', ' '][..]),
            ),
            0..6,
        );
        ops.prop_map(move |ops| {
            let mut lines: Vec<String> = base.lines().map(str::to_owned).collect();
            for (op, at, c) in ops {
                if lines.is_empty() {
                    break;
                }
                let i = at.index(lines.len());
                match op {
                    0 => {
                        lines.remove(i);
                    }
                    1 => lines.insert(i, lines[i].clone()),
                    _ => {
                        let line = &mut lines[i];
                        let cut = at.index(line.len() + 1);
                        let cut = (0..=cut).rev().find(|&k| line.is_char_boundary(k)).unwrap();
                        line.insert(cut, c);
                    }
                }
            }
            lines.join("\n")
        })
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 192,
        failure_persistence: None,
        ..Default::default()
    })]

    #[test]
    fn mutated_proxy_configs_never_panic(
        text in mutated::text(include_str!("../../deploy/proxy.toml")),
    ) {
        if let Ok(c) = postern_proxy::ProxyConfig::from_toml(&text)
            && c.validate().is_ok()
        {
            proptest::prop_assert!(c.ssh.keepalive_interval_secs > 0);
            let _ = (c.host_key_path(), c.host_cert_path(), c.grace());
        }
    }

    #[test]
    fn mutated_agent_configs_never_panic(
        text in mutated::text(include_str!("../../deploy/agent.toml")),
    ) {
        if let Ok(c) = toml::from_str::<postern_agent::AgentConfig>(&text)
            && c.validate().is_ok()
        {
            proptest::prop_assert!(!c.targets.is_empty());
            proptest::prop_assert!(c.reconnect.base_ms <= c.reconnect.cap_ms);
        }
    }
}

/// `scripts/churn` runs 1,000 agents from one address: its proxy.toml must raise the limits that
/// would refuse them, and the script must raise the descriptor limit and say what it set.
#[test]
fn churn_script_sets_the_limits_it_needs() {
    let script = include_str!("../../scripts/churn");
    let agents: u32 = 1000;
    let toml = script
        .split("cat > proxy.toml <<TOML\n")
        .nth(1)
        .and_then(|s| s.split("\nTOML").next())
        .expect("the script writes proxy.toml from a heredoc");
    // The shell's values, as the script computes them for the default run.
    let toml = toml
        .replace("$DIR", "/tmp/churn")
        .replace("$ALLOW_ROOT", "false")
        .replace("$(port)", "1")
        .replace("$TUNNELS", &(agents * 2).to_string())
        .replace("$TUNNEL", "2")
        .replace("$CONNECTS", &(agents * 20).to_string())
        .replace(
            "$(cat ca/host_ca.pub)",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZ8Az1Ab5gU2j+N3XgdF1jhrzrWbxNvH1eS4PsV7ERz",
        )
        .replace(
            "$(cat ca/user_ca.pub)",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZ8Az1Ab5gU2j+N3XgdF1jhrzrWbxNvH1eS4PsV7ERz",
        );
    let c = postern_proxy::ProxyConfig::from_toml(&toml).unwrap();
    c.validate().unwrap();
    assert!(
        c.limits.max_connects_per_source_per_minute >= agents,
        "1,000 agents from one address need more than {} connects a minute",
        c.limits.max_connects_per_source_per_minute
    );
    assert!(c.limits.max_tunnels_per_cluster >= agents as usize);
    assert!(
        script.contains("ulimit -n"),
        "the script raises the descriptor limit"
    );
    assert!(
        script.contains("churn sets:"),
        "the script says what it set"
    );
    assert!(script.contains("CONNECTS=$(( AGENTS * 20"));
    assert!(script.contains("TUNNELS=$(( AGENTS * 2"));
}
