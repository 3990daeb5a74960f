//! Role YAML (`parse_roles`, multi-document), on raw text and on documents built from line
//! fragments. Invariants: every role returned validates, and printing the roles as YAML or JSON
//! and parsing that again gives the same roles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_api::resource::{parse_roles, roles_to_json, roles_to_yaml, validate_role};

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
    "  ",
    "\t",
    "'",
];

fn check(text: &str) {
    let Ok(roles) = parse_roles(text) else { return };
    assert!(!roles.is_empty());
    for r in &roles {
        validate_role(r).expect("parse_roles returned an invalid role");
    }
    let yaml = roles_to_yaml(&roles);
    assert_eq!(parse_roles(&yaml).as_ref(), Ok(&roles), "YAML:\n{yaml}");
    let json = roles_to_json(&roles);
    assert_eq!(parse_roles(&json).as_ref(), Ok(&roles), "JSON:\n{json}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check(&String::from_utf8_lossy(rest));
        return;
    }
    // Structure-aware: one fragment per byte; a byte with the high bit set is a raw character.
    let mut text = String::new();
    for &b in rest {
        if b & 0x80 == 0 {
            text.push_str(FRAGMENTS[usize::from(b) % FRAGMENTS.len()]);
            text.push('\n');
        } else {
            text.push(char::from(b & 0x7f));
        }
    }
    check(&text);
});
