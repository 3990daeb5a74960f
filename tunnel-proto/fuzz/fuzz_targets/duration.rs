//! Go-style durations of roles. Invariant: a parsed duration formats to text that parses back
//! to the same number of seconds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_api::duration::{format_secs, parse_secs};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(n) = parse_secs(&s) {
        assert_eq!(parse_secs(&format_secs(n)), Ok(n), "{s:?}");
    }
    if data.len() >= 8 {
        let n = u64::from_le_bytes(data[..8].try_into().unwrap());
        assert_eq!(parse_secs(&format_secs(n)), Ok(n));
    }
});
