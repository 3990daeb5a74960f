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
