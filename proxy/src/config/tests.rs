//! Unit tests of `proxy.toml` parsing and validation.

use super::*;

#[test]
fn empty_file_gives_defaults() {
    let c = ProxyConfig::from_toml("").unwrap();
    c.validate().unwrap();
    assert_eq!(c.listen.tunnel.port(), 3024);
    assert_eq!(c.listen.ops.to_string(), "127.0.0.1:3081");
}

#[test]
fn errors_name_the_field() {
    let e = ProxyConfig::from_toml("nonsense = 1").unwrap_err();
    assert!(e.contains("nonsense"), "{e}");
    let mut c = ProxyConfig::default();
    c.ssh.keepalive_interval_secs = 0;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("ssh.keepalive_interval_secs")
    );
    let c =
        ProxyConfig::from_toml("[[clusters]]\nname = \"Bad Name\"\nhost_ca = []\nuser_ca = []\n")
            .unwrap();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("clusters[0].name")
    );
    let mut c = ProxyConfig::default();
    c.quic.connection_window_bytes = Some(c.quic.stream_window_bytes);
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("quic.connection_window_bytes"), "{e}");
    c.limits.max_streams_per_tunnel = 1;
    c.validate().unwrap();
    // Above 6500 every UDP GSO batch would exceed 64 KiB and fail; below 1200 is not QUIC.
    for bad in [1199, 6501, 9000] {
        let mut c = ProxyConfig::default();
        c.quic.mtu_upper_bound = bad;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("quic.mtu_upper_bound"), "{bad}: {e}");
    }
    let mut c = ProxyConfig::default();
    c.quic.mtu_upper_bound = 6500;
    c.validate().unwrap();
    let c = ProxyConfig::from_toml(
        "[[clusters]]\nname = \"ok\"\nhost_ca = [\"ssh-ed25519 garbage\"]\nuser_ca = []\n",
    )
    .unwrap();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("clusters[0].host_ca")
    );
}

/// An RSA CA line is refused at load with a message saying RSA is not supported (not a
/// later "signature invalid" at every login).
#[test]
fn an_rsa_ca_line_is_refused_at_load() {
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCheqBUjDYcdWKbElfhC3kIJPs2bEPIjLfo1wENvyz0z5R2rPiTKVQayTeBiQSQxdBMbLjV7uSWTvYfamdPJZQANc79DTzpQZpzYRoZuwByhQ8P3OxnjTcQn5rwZSUvYF2ug8/DIOtU66VMeEv8D9n5J++3+TXkpFRTC8K2ZZUB2w== rsa-ca";
    let c = ProxyConfig::from_toml(&format!(
        "[[clusters]]\nname = \"ok\"\nhost_ca = [\"{RSA}\"]\nuser_ca = [\"{RSA}\"]\n"
    ))
    .unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("clusters[0].host_ca") && e.contains("RSA is not supported"),
        "{e}"
    );
    let e = postern_dial::ssh::parse_ca_lines(&[RSA.to_string()]).unwrap_err();
    assert!(e.contains("RSA is not supported"), "{e}");
}
