//! Discovery JSON (`/webapi/ping`, `/webapi/find`, error bodies) and the tunnel-address
//! resolution on whatever settings a proxy sends. Invariant: what parses re-serializes to JSON
//! that parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tunnel_proto::discovery::{ErrorBody, FindResponse, PingResponse, ProxySettings};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(s: &str) -> Option<T> {
    let v: T = serde_json::from_str(s).ok()?;
    let json = serde_json::to_string(&v).expect("serializes");
    let back: T = serde_json::from_str(&json).expect("its own JSON parses");
    assert_eq!(back, v);
    Some(v)
}

fn resolve(p: &ProxySettings, web_host: &str) {
    let addr = p.tunnel_addr(None, web_host);
    if let Some(public) = p.tunnel_public_addr.as_deref().filter(|a| !a.is_empty()) {
        assert_eq!(addr, public);
    }
    assert_eq!(p.tunnel_addr(Some(" x:1 "), web_host), "x:1");
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let (web_host, json) = s.split_once('\n').unwrap_or(("proxy.example", &s));
    if let Some(p) = round_trip::<PingResponse>(json) {
        resolve(&p.proxy, web_host);
    }
    if let Some(f) = round_trip::<FindResponse>(json) {
        resolve(&f.proxy, web_host);
    }
    if let Some(p) = round_trip::<ProxySettings>(json) {
        resolve(&p, web_host);
    }
    round_trip::<ErrorBody>(json);
});
