//! The example agent config under deploy/ loads and validates; bad values name their field.

use postern_agent::AgentConfig;

fn example() -> AgentConfig {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml");
    AgentConfig::from_file(std::path::Path::new(path)).unwrap()
}

#[test]
fn deploy_agent_toml_is_valid() {
    let c = example();
    c.validate().unwrap();
    assert_eq!(c.targets["auth"].addr.port, 3025);
}

#[test]
fn bad_values_name_the_field() {
    let mut c = example();
    c.targets.clear();
    assert!(c.validate().unwrap_err().to_string().contains("`targets`"));
    let mut c = example();
    c.web.insecure = true;
    assert!(c.validate().unwrap_err().to_string().contains("`web`"));
    let mut c = example();
    c.proxy_host_ca = vec!["ssh-ed25519 nonsense".into()];
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("`proxy_host_ca`")
    );
    let mut c = example();
    c.reconnect.cap_ms = 1;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("`reconnect`")
    );
    let mut c = example();
    c.targets.insert(
        "Bad Name".into(),
        "127.0.0.1:1"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    );
    assert!(c.validate().unwrap_err().to_string().contains("`targets`"));
}

/// A target is `name = "addr"` or `name = { addr = ..., labels = { ... } }`; unknown keys in the
/// table and bad labels are refused naming the field.
#[test]
fn targets_take_labels() {
    let base =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml"))
            .unwrap();
    let with = |extra: &str| {
        let text = base.replace(
            "auth = \"127.0.0.1:3025\"",
            &format!("auth = \"127.0.0.1:3025\"\n{extra}"),
        );
        toml::from_str::<AgentConfig>(&text)
    };
    let c = with("web = { addr = \"127.0.0.1:8080\", labels = { env = \"prod\", team = \"a\" } }")
        .unwrap();
    c.validate().unwrap();
    assert_eq!(c.targets["web"].addr.port, 8080);
    assert_eq!(c.targets["web"].labels["env"], "prod");
    assert!(c.targets["auth"].labels.is_empty());
    let e = with("web = { addr = \"127.0.0.1:8080\", lables = {} }").unwrap_err();
    assert!(
        e.to_string().contains("web") || e.to_string().contains("lables"),
        "{e}"
    );
    let c = with("web = { addr = \"127.0.0.1:8080\", labels = { env = \"pr od\" } }").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("`targets`") && e.contains("label 'env'"), "{e}");
}

/// Targets take DNS names as well as IPs (`db.internal:5432`, a Kubernetes service name); a value
/// that is neither, or has no port, is refused naming the value.
#[test]
fn targets_take_dns_names() {
    let base =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml"))
            .unwrap();
    let with = |extra: &str| {
        toml::from_str::<AgentConfig>(&base.replace(
            "auth = \"127.0.0.1:3025\"",
            &format!("auth = \"127.0.0.1:3025\"\n{extra}"),
        ))
    };
    let c = with(
        "db = \"db.internal:5432\"\nk8s = { addr = \"postgres.prod.svc.cluster.local:5432\" }\n\
         v6 = \"[::1]:22\"",
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.targets["db"].addr.host, "db.internal");
    assert_eq!(c.targets["db"].addr.port, 5432);
    assert_eq!(
        c.targets["k8s"].addr.to_string(),
        "postgres.prod.svc.cluster.local:5432"
    );
    assert_eq!(c.targets["v6"].addr.to_string(), "[::1]:22");
    for bad in [
        "db.internal",
        "db.internal:http",
        "db internal:5432",
        ":5432",
        "a..b:1",
    ] {
        let e = with(&format!("db = \"{bad}\"")).unwrap_err().to_string();
        assert!(e.contains("host:port"), "{bad}: {e}");
    }
}

#[test]
fn quic_transport_settings_are_validated() {
    use postern_agent::config::TransportMode;
    let c = example();
    assert_eq!(c.transport.mode, TransportMode::Auto);
    assert_eq!(
        c.transport.connection_window(),
        c.transport.min_connection_window()
    );
    // A connection window below streams × stream window would let stalled streams starve the
    // rest of the tunnel.
    let mut c = example();
    c.transport.quic_connection_window_bytes = Some(c.transport.quic_stream_window_bytes);
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("`transport.quic_connection_window_bytes`"),
        "{e}"
    );
    c.transport.quic_max_streams = 1;
    c.validate().unwrap();
    for bad in [0, 1199, 6501] {
        let mut c = example();
        c.transport.quic_mtu_upper_bound = bad;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`transport.quic_mtu_upper_bound`"), "{bad}: {e}");
    }
    let mut c = example();
    c.transport.quic_addr = Some("no-port".into());
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("`transport.quic_addr`"), "{e}");
    let mut c = example();
    c.transport.quic_handshake_timeout_ms = 0;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("`transport.quic_handshake_timeout_ms`"), "{e}");
}
