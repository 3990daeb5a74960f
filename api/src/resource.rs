//! Resources in their YAML/JSON form (`kind`, `metadata`, `spec`, `version`), as `pctl create -f`
//! reads them and `pctl get` prints them, and their conversion to the wire types.
//!
//! Parsing is strict: an unknown field, kind, version, verb or resource is an error that names the
//! document, the line and the field, so a typo never silently grants or drops a permission.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::proto::{LabelValues, Role, RoleConditions, RoleOptions, RoleSpec, Rule};
use crate::{access, duration, rbac};

/// Role versions accepted (Teleport's current ones; the rules mean the same in each).
pub const ROLE_VERSIONS: &[&str] = &["v5", "v6", "v7"];

/// A resource file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// The YAML does not parse or does not fit the resource's shape (the message carries the
    /// field path, line and column).
    #[error("document {doc}: {message}")]
    Yaml {
        /// 1-based document number in a multi-document file.
        doc: usize,
        /// What the parser said.
        message: String,
    },
    /// `kind` is missing or not one this tool handles.
    #[error("document {doc}: unknown kind '{kind}' (supported: role, user)")]
    UnknownKind {
        /// 1-based document number.
        doc: usize,
        /// The kind found.
        kind: String,
    },
    /// `version` is not a supported role version.
    #[error(
        "document {doc}: role '{name}': unsupported version '{version}' (supported: v5, v6, v7)"
    )]
    UnsupportedVersion {
        /// 1-based document number.
        doc: usize,
        /// The role's name.
        name: String,
        /// The version found.
        version: String,
    },
    /// A field holds a value the resource cannot have.
    #[error("document {doc}: role '{name}': {field}: {problem}")]
    Invalid {
        /// 1-based document number (0 when the role did not come from a file).
        doc: usize,
        /// The role's name.
        name: String,
        /// Path of the offending field (`spec.allow.rules[0].verbs`).
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A user document holds a value a user cannot have.
    #[error("document {doc}: user '{name}': {field}: {problem}")]
    InvalidUser {
        /// 1-based document number.
        doc: usize,
        /// The user's name.
        name: String,
        /// Path of the offending field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The input holds no document at all.
    #[error("no resource found in the input")]
    Empty,
}

/// A role as written in YAML or JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleDoc {
    /// Always `role`.
    pub kind: String,
    /// Name and description.
    pub metadata: Metadata,
    /// What the role allows and denies.
    #[serde(default)]
    pub spec: SpecDoc,
    /// `v5`, `v6` or `v7`.
    pub version: String,
}

/// Resource metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Unique name within its kind.
    pub name: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Storage revision (printed by `pctl get`, ignored on create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

/// A role's spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpecDoc {
    /// Granted.
    #[serde(skip_serializing_if = "ConditionsDoc::is_empty")]
    pub allow: ConditionsDoc,
    /// Refused, whatever another role grants.
    #[serde(skip_serializing_if = "ConditionsDoc::is_empty")]
    pub deny: ConditionsDoc,
    /// Session options.
    #[serde(skip_serializing_if = "OptionsDoc::is_empty")]
    pub options: OptionsDoc,
}

/// Allow or deny conditions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConditionsDoc {
    /// Resources × verbs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleDoc>,
    /// SSH logins.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logins: Vec<String>,
    /// Target label selectors (Teleport's name; `target_labels` is accepted as an alias): a
    /// target matches when every key's value is among the listed ones; `'*': '*'` matches all.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", alias = "target_labels")]
    pub node_labels: BTreeMap<String, LabelValue>,
    /// Roles that may be requested through an access request (see [`crate::access`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<access::RequestDoc>,
    /// Roles whose access requests a holder may review.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review_requests: Option<access::ReviewDoc>,
}

impl ConditionsDoc {
    fn is_empty(&self) -> bool {
        self.rules.is_empty()
            && self.logins.is_empty()
            && self.node_labels.is_empty()
            && self.request.is_none()
            && self.review_requests.is_none()
    }
}

/// One label value or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelValue {
    /// `env: prod`
    One(String),
    /// `env: [prod, staging]`
    Many(Vec<String>),
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    /// Resource names, or `*`.
    pub resources: Vec<String>,
    /// Verbs, or `*`.
    pub verbs: Vec<String>,
}

/// Role options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptionsDoc {
    /// Longest certificate a holder can get (`8h`, `30h`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_session_ttl: Option<String>,
}

impl OptionsDoc {
    fn is_empty(&self) -> bool {
        self.max_session_ttl.is_none()
    }
}

/// `text` without a leading UTF-8 byte-order mark, with CRLF line ends as LF.
fn normalize(text: &str) -> String {
    text.strip_prefix('\u{feff}')
        .unwrap_or(text)
        .replace("\r\n", "\n")
}

/// Parses one or more `kind: role` YAML (or JSON) documents into validated roles.
///
/// A document may also be a list of roles: that is how [`roles_to_json`] prints several (a JSON
/// array), so what `pctl get` prints in either format reads back. A byte-order mark and CRLF line
/// ends are accepted.
pub fn parse_roles(text: &str) -> Result<Vec<Role>, ResourceError> {
    // Editors on Windows save a byte-order mark and CRLF line ends: both are the same file.
    let text = &normalize(text);
    let blank = |l: &str| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    };
    if text.lines().all(blank) {
        return Err(ResourceError::Empty);
    }
    let kind_of = |v: &serde_norway::Value, doc: usize| match v.get("kind") {
        None => Ok(None),
        Some(serde_norway::Value::String(k)) => Ok(Some(k.clone())),
        Some(_) => Err(ResourceError::Yaml {
            doc,
            message: "kind: expected a string".into(),
        }),
    };
    let unknown = |doc: usize, kind: Option<String>| ResourceError::UnknownKind {
        doc,
        kind: kind.unwrap_or_else(|| "(missing)".into()),
    };
    // First pass: every document parses, and each is a role or a list of roles.
    let mut docs = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let v = serde_norway::Value::deserialize(doc).map_err(|e| ResourceError::Yaml {
            doc: n,
            message: e.to_string(),
        })?;
        if let serde_norway::Value::Sequence(items) = v {
            for item in &items {
                let kind = kind_of(item, n)?;
                if kind.as_deref() != Some("role") {
                    return Err(unknown(n, kind));
                }
            }
            docs.push(Some(items));
        } else {
            let kind = kind_of(&v, n)?;
            if kind.as_deref() != Some("role") {
                return Err(unknown(n, kind));
            }
            docs.push(None);
        }
    }
    if docs.is_empty() {
        return Err(ResourceError::Empty);
    }
    // Second pass: a role document is read from the text again, so errors carry its line.
    let mut roles = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        if let Some(items) = docs[i].take() {
            for (j, item) in items.into_iter().enumerate() {
                let d: RoleDoc =
                    serde_norway::from_value(item).map_err(|e| ResourceError::Yaml {
                        doc: n,
                        message: format!("item {j}: {e}"),
                    })?;
                roles.push(from_doc(d, n)?);
            }
            continue;
        }
        let d = RoleDoc::deserialize(doc).map_err(|e| ResourceError::Yaml {
            doc: n,
            message: e.to_string(),
        })?;
        roles.push(from_doc(d, n)?);
    }
    if roles.is_empty() {
        // Only empty lists (`[]`).
        return Err(ResourceError::Empty);
    }
    Ok(roles)
}

fn conditions(c: ConditionsDoc, side: &str) -> Result<RoleConditions, (String, String)> {
    let request = access::request_from_doc(c.request.as_ref())
        .map_err(|e| (format!("spec.{side}.request.max_duration"), e))?;
    Ok(RoleConditions {
        request,
        review_requests: access::review_from_doc(c.review_requests.as_ref()),
        rules: c
            .rules
            .into_iter()
            .map(|r| Rule {
                resources: r.resources,
                verbs: r.verbs,
            })
            .collect(),
        logins: c.logins,
        node_labels: c
            .node_labels
            .into_iter()
            .map(|(k, v)| {
                let values = match v {
                    LabelValue::One(s) => vec![s],
                    LabelValue::Many(v) => v,
                };
                (k, LabelValues { values })
            })
            .collect(),
    })
}

/// Converts a parsed document into a validated wire role (`doc` numbers errors; 0 if none).
pub fn from_doc(d: RoleDoc, doc: usize) -> Result<Role, ResourceError> {
    if !ROLE_VERSIONS.contains(&d.version.as_str()) {
        return Err(ResourceError::UnsupportedVersion {
            doc,
            name: d.metadata.name,
            version: d.version,
        });
    }
    let invalid = |field: &str, problem: String| ResourceError::Invalid {
        doc,
        name: d.metadata.name.clone(),
        field: field.into(),
        problem,
    };
    let ttl = match &d.spec.options.max_session_ttl {
        Some(t) => {
            duration::parse_secs(t).map_err(|e| invalid("spec.options.max_session_ttl", e))?
        }
        None => 0,
    };
    let allow = conditions(d.spec.allow.clone(), "allow").map_err(|(f, p)| invalid(&f, p))?;
    let deny = conditions(d.spec.deny.clone(), "deny").map_err(|(f, p)| invalid(&f, p))?;
    let role = Role {
        name: d.metadata.name.clone(),
        version: d.version.clone(),
        spec: Some(RoleSpec {
            allow: Some(allow),
            deny: Some(deny),
            options: Some(RoleOptions {
                max_session_ttl_secs: ttl,
            }),
        }),
        revision: d.metadata.revision.unwrap_or(0),
    };
    validate_role(&role).map_err(|(field, problem)| invalid(&field, problem))?;
    Ok(role)
}

/// Checks a resource name: 1–64 characters of letters, digits, `-`, `_`, `.`, `@`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')))
    {
        return Err(format!(
            "'{name}' holds '{c}' (use letters, digits, '-', '_', '.')"
        ));
    }
    Ok(())
}

/// Checks a wire role; on failure returns the field path and the problem.
pub fn validate_role(role: &Role) -> Result<(), (String, String)> {
    validate_name(&role.name).map_err(|e| ("metadata.name".to_string(), e))?;
    if !ROLE_VERSIONS.contains(&role.version.as_str()) {
        return Err((
            "version".into(),
            format!(
                "unsupported version '{}' (supported: v5, v6, v7)",
                role.version
            ),
        ));
    }
    let spec = role.spec.clone().unwrap_or_default();
    let mut grants_anything = false;
    for (side, c) in [("allow", &spec.allow), ("deny", &spec.deny)] {
        let Some(c) = c else { continue };
        grants_anything |= !c.rules.is_empty()
            || !c.logins.is_empty()
            || !c.node_labels.is_empty()
            || access::conditions_grant(c);
        access::validate(side, c)?;
        for (i, rule) in c.rules.iter().enumerate() {
            let at = |f: &str| format!("spec.{side}.rules[{i}].{f}");
            if rule.resources.is_empty() {
                return Err((
                    at("resources"),
                    "empty: name at least one resource or '*'".into(),
                ));
            }
            if rule.verbs.is_empty() {
                return Err((at("verbs"), "empty: name at least one verb or '*'".into()));
            }
            for r in &rule.resources {
                if r != "*" && !rbac::RESOURCES.contains(&r.as_str()) {
                    return Err((
                        at("resources"),
                        format!(
                            "unknown resource '{r}' (known: {}, *)",
                            rbac::RESOURCES.join(", ")
                        ),
                    ));
                }
            }
            for v in &rule.verbs {
                if v != "*" && !rbac::VERBS.contains(&v.as_str()) {
                    return Err((
                        at("verbs"),
                        format!("unknown verb '{v}' (known: {}, *)", rbac::VERBS.join(", ")),
                    ));
                }
            }
        }
    }
    if !grants_anything {
        return Err((
            "spec".into(),
            "the role has no rules, logins, labels, request or review_requests in allow or deny: it would do nothing".into(),
        ));
    }
    Ok(())
}

fn conditions_doc(c: Option<&RoleConditions>) -> ConditionsDoc {
    let Some(c) = c else {
        return ConditionsDoc::default();
    };
    ConditionsDoc {
        rules: c
            .rules
            .iter()
            .map(|r| RuleDoc {
                resources: r.resources.clone(),
                verbs: r.verbs.clone(),
            })
            .collect(),
        logins: c.logins.clone(),
        node_labels: c
            .node_labels
            .iter()
            .map(|(k, v)| {
                let value = match v.values.as_slice() {
                    [one] => LabelValue::One(one.clone()),
                    many => LabelValue::Many(many.to_vec()),
                };
                (k.clone(), value)
            })
            .collect(),
        request: access::request_to_doc(c.request.as_ref()),
        review_requests: access::review_to_doc(c.review_requests.as_ref()),
    }
}

/// The document form of a wire role (for printing).
pub fn to_doc(role: &Role) -> RoleDoc {
    let spec = role.spec.clone().unwrap_or_default();
    let ttl = spec
        .options
        .as_ref()
        .map(|o| o.max_session_ttl_secs)
        .filter(|&t| t > 0);
    RoleDoc {
        kind: "role".into(),
        metadata: Metadata {
            name: role.name.clone(),
            description: None,
            revision: (role.revision > 0).then_some(role.revision),
        },
        spec: SpecDoc {
            allow: conditions_doc(spec.allow.as_ref()),
            deny: conditions_doc(spec.deny.as_ref()),
            options: OptionsDoc {
                max_session_ttl: ttl.map(duration::format_secs),
            },
        },
        version: role.version.clone(),
    }
}

/// Roles as a multi-document YAML stream.
pub fn roles_to_yaml(roles: &[Role]) -> String {
    let docs: Vec<String> = roles
        .iter()
        .map(|r| serde_norway::to_string(&to_doc(r)).unwrap_or_default())
        .collect();
    docs.join("---\n")
}

/// Roles as a JSON array (one object for a single role).
pub fn roles_to_json(roles: &[Role]) -> String {
    let docs: Vec<RoleDoc> = roles.iter().map(to_doc).collect();
    let out = if docs.len() == 1 {
        serde_json::to_string_pretty(&docs[0])
    } else {
        serde_json::to_string_pretty(&docs)
    };
    out.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_file_with_a_bom_and_crlf_loads() {
        let yaml = "kind: role\nmetadata:\n  name: api-role\nspec:\n  allow:\n    rules:\n    - resources: ['role']\n      verbs: ['read']\n  deny:\n    node_labels:\n      '*': '*'\nversion: v5\n";
        let windows = format!("\u{feff}{}", yaml.replace('\n', "\r\n"));
        let roles = parse_roles(&windows).unwrap();
        assert_eq!(roles.len(), 1);
        assert_eq!(roles, parse_roles(yaml).unwrap());
    }

    /// The seed's role, byte for byte.
    const SEED: &str = r#"kind: role
metadata:
  name: api-role
spec:
  allow:
    rules:
      - resources: ['role']
        verbs: ['read']
  deny:
    node_labels:
      '*': '*'
version: v5
"#;

    #[test]
    fn the_seed_role_loads_verbatim() {
        let roles = parse_roles(SEED).unwrap();
        assert_eq!(roles.len(), 1);
        let r = &roles[0];
        assert_eq!(r.name, "api-role");
        assert_eq!(r.version, "v5");
        let spec = r.spec.as_ref().unwrap();
        let allow = spec.allow.as_ref().unwrap();
        assert_eq!(allow.rules[0].resources, ["role"]);
        assert_eq!(allow.rules[0].verbs, ["read"]);
        assert_eq!(spec.deny.as_ref().unwrap().node_labels["*"].values, ["*"]);
        // Printing and re-reading gives the same role.
        assert_eq!(parse_roles(&roles_to_yaml(&roles)).unwrap(), roles);
        assert_eq!(parse_roles(&roles_to_json(&roles)).unwrap(), roles);
    }

    #[test]
    fn multi_document_files_load_in_order() {
        let two = format!("{SEED}---\n{}", SEED.replace("api-role", "other"));
        let roles = parse_roles(&two).unwrap();
        assert_eq!(
            roles.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["api-role", "other"]
        );
    }

    /// Found by the `role_yaml` fuzz target: several roles printed as JSON (an array) did not
    /// parse back ("invalid type: sequence, expected struct Header").
    #[test]
    fn several_roles_printed_as_json_parse_back() {
        let two = format!("{SEED}---\n{}", SEED.replace("api-role", "other"));
        let roles = parse_roles(&two).unwrap();
        let json = roles_to_json(&roles);
        assert!(json.trim_start().starts_with('['), "{json}");
        assert_eq!(parse_roles(&json).unwrap(), roles);
        // The fuzzer's input: the same flow-style role twice, then read back from JSON.
        let flow = "{kind: role, metadata: {name: j}, spec: {allow: {logins: [x]}}, version: v6}\n";
        let roles = parse_roles(&format!("{flow}---\n{flow}")).unwrap();
        assert_eq!(parse_roles(&roles_to_json(&roles)).unwrap(), roles);
        // A list item of another kind, or a bad field in an item, is still refused.
        let e = parse_roles("[{kind: user}]").unwrap_err();
        assert!(matches!(e, ResourceError::UnknownKind { ref kind, .. } if kind == "user"));
        let e = parse_roles(&json.replace("\"verbs\"", "\"verbz\"")).unwrap_err();
        assert!(e.to_string().contains("verbz"), "{e}");
        // Found by the fuzzer after that change: an empty list gave no role and no error.
        assert_eq!(parse_roles("[]"), Err(ResourceError::Empty));
        assert_eq!(parse_roles("[]\n---\n[]\n"), Err(ResourceError::Empty));
    }

    #[test]
    fn a_misspelt_field_names_the_field_and_line() {
        let bad = SEED.replace("    rules:", "    rulez:");
        let e = parse_roles(&bad).unwrap_err().to_string();
        assert!(e.contains("rulez"), "{e}");
        assert!(e.contains("line 6"), "{e}");
    }

    #[test]
    fn broken_yaml_points_at_the_line() {
        let bad = SEED.replace("verbs: ['read']", "verbs: ['read'");
        let e = parse_roles(&bad).unwrap_err().to_string();
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn unknown_kind_and_version_are_refused() {
        let e = parse_roles(&SEED.replace("kind: role", "kind: rolez")).unwrap_err();
        assert!(matches!(e, ResourceError::UnknownKind { ref kind, .. } if kind == "rolez"));
        let e = parse_roles(&SEED.replace("version: v5", "version: v2")).unwrap_err();
        assert!(e.to_string().contains("unsupported version 'v2'"), "{e}");
        let e = parse_roles(&SEED.replace("kind: role\n", "")).unwrap_err();
        assert!(e.to_string().contains("unknown kind '(missing)'"), "{e}");
    }

    #[test]
    fn a_role_with_no_rules_is_refused() {
        let e = parse_roles("kind: role\nmetadata: {name: empty}\nspec: {}\nversion: v5\n")
            .unwrap_err();
        assert!(e.to_string().contains("would do nothing"), "{e}");
        let e = parse_roles(
            "kind: role\nmetadata: {name: e}\nspec:\n  allow:\n    rules: [{resources: [role], verbs: []}]\nversion: v5\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("spec.allow.rules[0].verbs"), "{e}");
    }

    #[test]
    fn unknown_verbs_and_resources_are_refused() {
        let e = parse_roles(&SEED.replace("['read']", "['raed']")).unwrap_err();
        assert!(e.to_string().contains("unknown verb 'raed'"), "{e}");
        let e = parse_roles(&SEED.replace("['role']", "['roles']")).unwrap_err();
        assert!(e.to_string().contains("unknown resource 'roles'"), "{e}");
    }

    #[test]
    fn bad_names_and_durations_are_refused() {
        let e = parse_roles(&SEED.replace("api-role", "api role")).unwrap_err();
        assert!(e.to_string().contains("metadata.name"), "{e}");
        let e = parse_roles(&SEED.replace("spec:\n", "spec:\n  options: {max_session_ttl: 8}\n"))
            .unwrap_err();
        assert!(e.to_string().contains("max_session_ttl"), "{e}");
        assert_eq!(parse_roles(""), Err(ResourceError::Empty));
    }
}
