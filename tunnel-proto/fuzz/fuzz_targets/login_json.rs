//! The login relay's JSON lines: `LoginRequest` (strict) and `LoginResponse` (lenient).
//! Invariant: what parses re-serializes to JSON that parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_proto::login::{LoginRequest, LoginResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<LoginRequest>(data) {
        let line = serde_json::to_string(&req).expect("serializes");
        assert!(!line.contains('\n'), "a request must stay one line");
        assert_eq!(serde_json::from_str::<LoginRequest>(&line).unwrap(), req);
    }
    if let Ok(resp) = serde_json::from_slice::<LoginResponse>(data) {
        let line = serde_json::to_string(&resp).expect("serializes");
        assert!(!line.contains('\n'), "a response must stay one line");
        assert_eq!(serde_json::from_str::<LoginResponse>(&line).unwrap(), resp);
    }
});
