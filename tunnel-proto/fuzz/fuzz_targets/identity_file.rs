//! Identity files (`IdentityFile::parse`), on raw text and on valid files whose free-text fields
//! come from the input. Invariant: a file that parses, written out again with `to_toml`, parses
//! back equal.
#![no_main]

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use postern_api::identity::IdentityFile;

const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
const PEM: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

fn check(text: &str) {
    let path = Path::new("fuzz.identity");
    if let Ok(id) = IdentityFile::parse(path, text) {
        let again = id.to_toml();
        match IdentityFile::parse(path, &again) {
            Ok(back) => assert_eq!(back, id),
            Err(e) => panic!("to_toml output does not parse back: {e}\n{again}"),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Free {
    cluster: String,
    user: String,
    expires: u64,
    cert_tail: String,
    extra_cas: Vec<String>,
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check(&String::from_utf8_lossy(rest));
        return;
    }
    let Ok(f) = Free::arbitrary(&mut Unstructured::new(rest)) else {
        return;
    };
    let id = IdentityFile {
        version: 1,
        cluster: f.cluster,
        user: f.user,
        expires: f.expires,
        private_key: KEY.into(),
        ssh_cert: format!("ssh-ed25519-cert-v01@openssh.com {}", f.cert_tail),
        tls_cert: PEM.into(),
        tls_cas: std::iter::once(PEM.to_owned())
            .chain(f.extra_cas.into_iter().map(|c| format!("{PEM}{c}")))
            .collect(),
        ssh_host_cas: vec![],
    };
    // A valid identity (the cluster is all `parse` checks of the free fields) reads back.
    if !id.cluster.is_empty() {
        let text = id.to_toml();
        match IdentityFile::parse(Path::new("fuzz.identity"), &text) {
            Ok(back) => assert_eq!(back, id),
            Err(e) => panic!("a valid identity's to_toml does not parse: {e}\n{text}"),
        }
    }
});
