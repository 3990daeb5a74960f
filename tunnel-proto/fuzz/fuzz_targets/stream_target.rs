//! Names on the wire: `StreamTarget::parse`, `validate_label`, `validate_cluster`, the agent
//! login `@agent/<host-id>.<cluster>` as the proxy splits it, and `split_host_port`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_proto::discovery::{join_host_port, split_host_port};
use tunnel_proto::names::{
    AGENT_LOGIN_PREFIX, MAX_LABEL_LEN, StreamTarget, agent_login, validate_cluster, validate_label,
};

fn label_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    if validate_label("label", s).is_ok() {
        assert!(!s.is_empty() && s.len() <= MAX_LABEL_LEN && !s.starts_with('-'));
        assert!(label_chars(s));
    }
    if validate_cluster(s).is_ok() {
        assert!(s.len() <= 253);
        for part in s.split('.') {
            assert!(validate_label("part", part).is_ok(), "{s:?}");
        }
    }
    match StreamTarget::parse(s) {
        Ok(t) => {
            assert_eq!(t.host(), s);
            assert!(validate_label("target", &t.target).is_ok());
            assert!(validate_cluster(&t.cluster).is_ok());
            assert!(!s.contains(':') && s.parse::<std::net::IpAddr>().is_err());
            assert_eq!(StreamTarget::parse(&t.host()).as_ref(), Ok(&t));
        }
        Err(e) => {
            // The message is bounded whatever the input's size.
            assert!(e.to_string().len() < 600, "{}", e.to_string().len());
        }
    }
    // The proxy's split of an agent login.
    if let Some(principal) = s.strip_prefix(AGENT_LOGIN_PREFIX)
        && let Some((host_id, cluster)) = principal.split_once('.')
        && validate_label("host id", host_id).is_ok()
        && validate_cluster(cluster).is_ok()
    {
        assert_eq!(agent_login(host_id, cluster), s);
    }
    if let Some((host, port)) = split_host_port(s) {
        assert!(!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(join_host_port(host, port), s);
    }
});
