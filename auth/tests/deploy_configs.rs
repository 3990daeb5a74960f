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
    let dir = std::env::temp_dir().join(format!("postern-authcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("auth.toml");
    std::fs::write(&p, "cluster = \"x\"\nlisten_addr = \"127.0.0.1:1\"\n").unwrap();
    let e = AuthConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("listen_addr"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
