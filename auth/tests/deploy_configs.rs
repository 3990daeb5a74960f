//! The example auth config under deploy/ loads and validates; bad values name their field.

use postern_auth::AuthConfig;

fn example() -> AuthConfig {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/auth.toml");
    AuthConfig::from_file(std::path::Path::new(path)).unwrap()
}

#[test]
fn deploy_auth_toml_is_valid() {
    let c = example();
    c.validate().unwrap();
    assert_eq!(c.cluster.as_deref(), Some("example"));
    assert_eq!(c.listen.port(), 3025);
    assert_eq!(c.tunnel.unwrap().host_id, "auth");
}

#[test]
fn bad_values_name_the_field() {
    let mut c = example();
    c.cluster = Some("bad cluster".into());
    assert!(c.validate().unwrap_err().to_string().contains("cluster"));
    let mut c = example();
    c.tunnel.as_mut().unwrap().web.insecure = true;
    assert!(c.validate().unwrap_err().to_string().contains("tunnel.web"));
    let mut c = example();
    c.admin_identity_ttl_secs = 10;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("admin_identity_ttl_secs")
    );
    for (field, set) in [
        (
            "limits.login_queue_timeout_ms",
            (|c: &mut AuthConfig| c.limits.login_queue_timeout_ms = 60_000) as fn(&mut AuthConfig),
        ),
        ("limits.api_idle_timeout_secs", |c| {
            c.limits.api_idle_timeout_secs = 0
        }),
        ("limits.api_max_connections_per_source", |c| {
            c.limits.api_max_connections_per_source = 5000
        }),
        ("limits.login_failures_per_source", |c| {
            c.limits.login_failures_per_source = 0
        }),
    ] {
        let mut c = example();
        set(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    let dir = std::env::temp_dir().join(format!("postern-authcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("auth.toml");
    std::fs::write(&p, "cluster = \"x\"\nlisten_addr = \"127.0.0.1:1\"\n").unwrap();
    let e = AuthConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("listen_addr"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..Default::default()
    })]

    /// The stable counterpart of the `configs` fuzz target: the deploy example with lines
    /// dropped or repeated and characters inserted parses or fails, and validates or fails,
    /// without panicking.
    #[test]
    fn mutated_auth_configs_never_panic(
        ops in proptest::collection::vec(
            (
                0u8..3,
                proptest::prelude::any::<proptest::sample::Index>(),
                proptest::sample::select(&['"', '=', '[', ']', '\n', '0', 'x', '.', ':', ' '][..]),
            ),
            0..6,
        ),
    ) {
        let base = include_str!("../../deploy/auth.toml");
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
        if let Ok(c) = toml::from_str::<AuthConfig>(&lines.join("\n"))
            && c.validate().is_ok()
        {
            proptest::prop_assert!(c.admin_identity_ttl_secs >= 3600);
        }
    }
}

/// The `auth.toml` blocks of the Kubernetes ConfigMaps (SQLite and PostgreSQL variants) load
/// and validate: every field they set is one this build knows.
#[test]
fn kubernetes_auth_configmaps_are_valid() {
    for variant in ["sqlite", "postgres"] {
        let path = format!(
            "{}/../deploy/kubernetes/auth/{variant}/configmap.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let yaml = std::fs::read_to_string(&path).unwrap();
        let toml: String = yaml
            .lines()
            .skip_while(|l| l.trim() != "auth.toml: |")
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        assert!(toml.contains("cluster = "), "{path}: no auth.toml block");
        let c: AuthConfig = toml::from_str(&toml).unwrap_or_else(|e| panic!("{path}: {e}"));
        c.validate().unwrap_or_else(|e| panic!("{path}: {e}"));
        if variant == "postgres" {
            assert!(c.backend.unwrap().starts_with("postgres://"));
            assert!(c.backend_password_file.is_some() && c.backend_ca_file.is_some());
        }
    }
}
