//! Every example config under deploy/ loads and validates.

#[test]
fn deploy_proxy_toml_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/proxy.toml");
    let c = postern_proxy::ProxyConfig::from_file(std::path::Path::new(path)).unwrap();
    c.validate().unwrap();
    assert_eq!(c.clusters[0].name, "example");
    assert_eq!(c.listen.tunnel.port(), 3024);
}
