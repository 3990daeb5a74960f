//! The stable-Rust counterpart of the `role_yaml`, `duration` and `identity_file` fuzz targets
//! (`tunnel-proto/fuzz`, nightly only): property tests over arbitrary text and over inputs built
//! from fragments, with the same invariants.

use std::path::Path;

use postern_api::duration::{format_secs, parse_secs};
use postern_api::identity::IdentityFile;
use postern_api::resource::{parse_roles, roles_to_json, roles_to_yaml, validate_role};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn any_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(|v| v.into_iter().collect())
}

/// Text of characters a YAML stream may hold (YAML refuses other control characters, even
/// inside a JSON string, so no role can carry them; it reads NEL, LS and PS as line breaks).
fn yaml_text(max: usize) -> impl Strategy<Value = String> {
    let printable = |c: &char| {
        matches!(*c, '\t' | '\n' | '\r' | ' '..='~' | '\u{a0}'..='\u{2027}' | '\u{202a}'..='\u{d7ff}'
            | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
            && *c != '\u{feff}'
    };
    proptest::collection::vec(
        any::<char>().prop_filter("YAML-printable", printable),
        0..max,
    )
    .prop_map(|v| v.into_iter().collect())
}

// ---------------------------------------------------------------- roles

const FRAGMENTS: &[&str] = &[
    "kind: role",
    "kind: user",
    "version: v5",
    "version: v7",
    "version: v2",
    "metadata:",
    "  name: r1",
    "  name: 'a b'",
    "  name: \"x@y.z\"",
    "  description: free text",
    "  revision: 3",
    "spec:",
    "spec: {}",
    "  allow:",
    "  deny:",
    "    rules:",
    "      - resources: [role]",
    "        verbs: [read, list]",
    "      - resources: ['*']",
    "        verbs: ['*']",
    "        verbs: []",
    "    logins: [root, '{{internal.logins}}']",
    "    node_labels:",
    "      env: prod",
    "      '*': '*'",
    "      tier: [a, b]",
    "      empty: []",
    "      n: 1",
    "  options:",
    "    max_session_ttl: 8h",
    "    max_session_ttl: 1h30m",
    "    max_session_ttl: 0s",
    "    max_session_ttl: 99999999999999999999h",
    "---",
    "...",
    "# comment",
    "{kind: role, metadata: {name: j}, spec: {allow: {logins: [x]}}, version: v6}",
    "x: &a [1]",
    "y: *a",
    "- item",
    "[]",
    "\t",
    "'",
];

/// A valid role, so that fragment mutations start from something that parses.
const VALID: &str = "kind: role\nmetadata:\n  name: r1\nspec:\n  allow:\n    logins: [root]\n    node_labels:\n      env: [a, b]\n  deny:\n    rules:\n      - resources: [role]\n        verbs: [read]\n  options:\n    max_session_ttl: 1h30m\nversion: v7\n";

/// The role invariants (the same as the `role_yaml` fuzz target); true if the text parsed.
fn check_roles(text: &str) -> bool {
    let Ok(roles) = parse_roles(text) else {
        return false;
    };
    assert!(!roles.is_empty());
    for r in &roles {
        validate_role(r).expect("parse_roles returned an invalid role");
    }
    let yaml = roles_to_yaml(&roles);
    assert_eq!(parse_roles(&yaml).as_ref(), Ok(&roles), "YAML:\n{yaml}");
    let json = roles_to_json(&roles);
    assert_eq!(parse_roles(&json).as_ref(), Ok(&roles), "JSON:\n{json}");
    true
}

fn fragments() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(FRAGMENTS), 0..24).prop_map(|v| {
        let mut s = v.join("\n");
        s.push('\n');
        s
    })
}

proptest! {
    #![proptest_config(config(384))]

    #[test]
    fn roles_from_arbitrary_text(text in any_text(64)) {
        check_roles(&text);
    }

    #[test]
    fn roles_from_fragments(text in fragments()) {
        check_roles(&text);
    }

    #[test]
    fn roles_from_a_valid_role_with_lines_dropped_or_repeated(
        ops in proptest::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 0..4),
        second in any::<bool>(),
    ) {
        let mut lines: Vec<&str> = VALID.lines().collect();
        for (at, repeat) in ops {
            let i = at.index(lines.len());
            if repeat { lines.insert(i, lines[i]) } else { lines.remove(i); }
            if lines.is_empty() { break }
        }
        let mut text = lines.join("\n");
        if second {
            text = format!("{text}\n---\n{VALID}");
        }
        check_roles(&text);
    }

    #[test]
    fn role_fields_of_any_text_print_and_parse_back(
        name in proptest::collection::vec(
            proptest::sample::select(&['a', 'z', '0', '@', '.', '_', '-'][..]), 1..10)
            .prop_map(String::from_iter),
        login in yaml_text(10),
        label in (yaml_text(6), yaml_text(6)),
        ttl in any::<u32>(),
    ) {
        let role = serde_json::json!({
            "kind": "role",
            "metadata": {"name": name},
            "spec": {
                "allow": {"logins": [login], "node_labels": {label.0: label.1}},
                "options": {"max_session_ttl": format_secs(u64::from(ttl))},
            },
            "version": "v6",
        });
        let text = role.to_string();
        prop_assert!(check_roles(&text), "{}", text);
    }
}

#[test]
fn the_valid_role_parses() {
    assert!(check_roles(VALID));
}

// ---------------------------------------------------------------- durations

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn durations_format_and_parse_back(n in any::<u64>()) {
        prop_assert_eq!(parse_secs(&format_secs(n)), Ok(n));
    }

    #[test]
    fn durations_from_text(
        text in proptest::collection::vec(proptest::sample::select(
            &['0', '1', '9', 'h', 'm', 's', 'd', ' ', '-', '٣'][..]), 0..24)
            .prop_map(String::from_iter),
    ) {
        if let Ok(n) = parse_secs(&text) {
            prop_assert_eq!(parse_secs(&format_secs(n)), Ok(n));
        }
    }
}

// ---------------------------------------------------------------- identity files

const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
const PEM: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

fn identity(cluster: String, user: String, expires: u64) -> IdentityFile {
    IdentityFile {
        version: 1,
        cluster,
        user,
        expires,
        private_key: KEY.into(),
        ssh_cert: "ssh-ed25519-cert-v01@openssh.com AAAA".into(),
        tls_cert: PEM.into(),
        tls_cas: vec![PEM.into()],
        ssh_host_cas: vec![],
    }
}

/// The identity invariant (the same as the `identity_file` fuzz target).
fn check_identity(text: &str) {
    let path = Path::new("test.identity");
    if let Ok(id) = IdentityFile::parse(path, text) {
        let again = id.to_toml();
        match IdentityFile::parse(path, &again) {
            Ok(back) => assert_eq!(back, id),
            Err(e) => panic!("to_toml output does not parse back: {e}\n{again}"),
        }
    }
}

proptest! {
    #![proptest_config(config(384))]

    #[test]
    fn identity_files_with_any_names_write_and_read_back(
        cluster in any_text(12).prop_filter("cluster must be set", |c| !c.is_empty()),
        user in any_text(12),
        expires in any::<u64>(),
    ) {
        let id = identity(cluster, user, expires);
        prop_assert_eq!(IdentityFile::parse(Path::new("t"), &id.to_toml()).unwrap(), id);
    }

    #[test]
    fn identity_files_from_arbitrary_text(text in any_text(64)) {
        check_identity(&text);
    }

    #[test]
    fn identity_files_with_a_line_dropped(at in any::<prop::sample::Index>()) {
        let text = identity("example".into(), "alice".into(), 1).to_toml();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.remove(at.index(lines.len()));
        check_identity(&lines.join("\n"));
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn identity_files_with_names_of_awkward_characters_write_and_read_back(
        cluster in proptest::collection::vec(proptest::sample::select(
            &['a', '\n', '\r', '\'', '"', '#', '\\', '=', '[', '\u{85}', '\u{2028}'][..]), 1..8)
            .prop_map(String::from_iter),
        user in proptest::collection::vec(proptest::sample::select(
            &['b', '\n', '\r', '\'', '"', '#', '\\', '=', '[', '\u{85}', '\u{2028}'][..]), 0..8)
            .prop_map(String::from_iter),
    ) {
        let id = identity(cluster, user, 0);
        prop_assert_eq!(IdentityFile::parse(Path::new("t"), &id.to_toml()).unwrap(), id);
    }
}
