//! OpenSSH certificates and Postern's checks on them.
//!
//! Two modes: bytes parsed as an OpenSSH certificate line or as its binary form, then every check
//! run against it (trusting its own signer, so the checks get past the CA test); or a certificate
//! built and signed from fuzzed fields, where each check's verdict must match the rules written
//! out here (trusted CA, window, type, principal, extensions, no critical option).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use russh::keys::ssh_key::PrivateKey;
use russh::keys::ssh_key::certificate::Builder;
use russh::keys::ssh_key::private::Ed25519Keypair;
use tunnel_proto::certs::{
    CertType, Certificate, ca_fingerprint, check_agent_cert, check_proxy_cert, check_user_cert,
    signer_fingerprint,
};
use tunnel_proto::names::{EXT_CLUSTER, EXT_ROLE};

const NOW: u64 = 1_800_000_000;
const NAMES: &[&str] = &[
    "h1",
    "h2",
    "example",
    "other",
    "alice",
    "localhost",
    "::1",
    "",
];
const PRINCIPALS: &[&str] = &[
    "h1.example",
    "h2.example",
    "h1.other",
    "alice",
    "localhost",
    "::1",
];
const EXT_KEYS: &[&str] = &[EXT_CLUSTER, EXT_ROLE, "permit-pty", "force-command"];
const EXT_VALUES: &[&str] = &["example", "other", "auth", "service", "proxy", "", "/bin/true"];

fn key(seed: u8) -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
}

fn run_checks(cert: &Certificate, now: u64) {
    let own = [signer_fingerprint(cert)];
    let first = cert.valid_principals().first().cloned().unwrap_or_default();
    let (host_id, cluster) = first.split_once('.').unwrap_or((&first, ""));
    for trusted in [&own[..], &[]] {
        let _ = check_agent_cert(cert, host_id, cluster, now, trusted);
        let _ = check_user_cert(cert, &first, now, trusted);
        let _ = check_proxy_cert(cert, &first, now, trusted);
        let _ = check_proxy_cert(cert, &format!("[{first}]"), now, trusted);
    }
}

#[derive(Arbitrary, Debug)]
struct Fields {
    host: bool,
    other_ca: bool,
    principals: Vec<(u8, Option<String>)>,
    extensions: Vec<(u8, u8)>,
    critical: Option<(u8, u8)>,
    after: i8,
    before: i8,
    login: (u8, u8),
}

fn pick<'a>(pool: &[&'a str], i: u8) -> &'a str {
    pool[usize::from(i) % pool.len()]
}

fn structured(f: Fields) {
    let ca = key(7);
    let signer = if f.other_ca { key(8) } else { key(7) };
    let valid_after = NOW.wrapping_add_signed(i64::from(f.after));
    let valid_before = NOW.wrapping_add_signed(i64::from(f.before));
    let Ok(mut b) = Builder::new(
        [1u8; 16],
        key(9).public_key().key_data().clone(),
        valid_after,
        valid_before,
    ) else {
        return;
    };
    b.cert_type(if f.host {
        CertType::Host
    } else {
        CertType::User
    })
    .unwrap();
    let mut principals = Vec::new();
    for (i, custom) in f.principals.iter().take(4) {
        let p = custom
            .clone()
            .unwrap_or_else(|| pick(PRINCIPALS, *i).to_owned());
        b.valid_principal(p.clone()).unwrap();
        principals.push(p);
    }
    if principals.is_empty() {
        return; // an unsigned "any principal" certificate: the builder refuses it
    }
    for (k, v) in f.extensions.iter().take(4) {
        let _ = b.extension(pick(EXT_KEYS, *k), pick(EXT_VALUES, *v));
    }
    if let Some((k, v)) = f.critical {
        b.critical_option(pick(EXT_KEYS, k), pick(EXT_VALUES, v))
            .unwrap();
    }
    let Ok(cert) = b.sign(&signer) else { return };
    let trusted = [ca_fingerprint(ca.public_key())];

    let common = |kind: CertType, principal: &str| {
        !f.other_ca
            && valid_after <= NOW
            && NOW < valid_before
            && cert.cert_type() == kind
            && principals.iter().any(|p| p == principal)
            && f.critical.is_none()
    };
    let (host_id, cluster) = (pick(NAMES, f.login.0), pick(NAMES, f.login.1));
    let principal = format!("{host_id}.{cluster}");
    let ext = |k: &str| cert.extensions().get(k).map(String::as_str);
    let agent_ok = common(CertType::Host, &principal)
        && ext(EXT_CLUSTER) == Some(cluster)
        && matches!(ext(EXT_ROLE), Some("auth" | "service"));
    let agent = check_agent_cert(&cert, host_id, cluster, NOW, &trusted);
    assert_eq!(agent.is_ok(), agent_ok, "{agent:?} {f:?}");
    if let Ok(id) = agent {
        assert_eq!(
            (id.host_id.as_str(), id.cluster.as_str(), Some(id.role.as_str())),
            (host_id, cluster, ext(EXT_ROLE))
        );
    }
    let user = pick(NAMES, f.login.0);
    let r = check_user_cert(&cert, user, NOW, &trusted);
    assert_eq!(r.is_ok(), common(CertType::User, user), "{r:?} {f:?}");
    let r = check_proxy_cert(&cert, user, NOW, &trusted);
    assert_eq!(r.is_ok(), common(CertType::Host, user), "{r:?} {f:?}");

    // Its own encodings parse back to the same certificate.
    let line = cert.to_openssh().expect("encodes");
    assert_eq!(Certificate::from_openssh(&line).expect("parses back"), cert);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest)
                && let Ok(cert) = Certificate::from_openssh(text)
            {
                run_checks(&cert, NOW);
            }
        }
        1 => {
            if let Ok(cert) = Certificate::from_bytes(rest) {
                run_checks(&cert, NOW);
            }
        }
        _ => {
            if let Ok(f) = Fields::arbitrary(&mut Unstructured::new(rest)) {
                structured(f);
            }
        }
    }
});
