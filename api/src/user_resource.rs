//! Users in their YAML/JSON form: one schema for `pctl get users`, `pctl get user/NAME` in every
//! format, readable back by `pctl create -f` (as tctl reads back what it prints).
//!
//! ```yaml
//! kind: user
//! metadata:
//!   name: alice
//!   revision: 3                       # printed by pctl get, ignored on create
//!   created: 2026-11-30T20:00:00Z     # printed by pctl get, ignored on create
//! spec:
//!   roles: [api-role]
//! version: v2
//! ```

use serde::{Deserialize, Serialize};

use crate::proto::{Role, User};
use crate::resource::{ResourceError, parse_roles};

/// A user as written in YAML or JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDoc {
    /// Always `user`.
    pub kind: String,
    /// Name, revision and creation time.
    pub metadata: UserMetadata,
    /// The user's roles.
    #[serde(default)]
    pub spec: UserSpec,
    /// Always `v2`.
    pub version: String,
}

/// A user's metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserMetadata {
    /// The user name.
    pub name: String,
    /// Storage revision (printed, ignored on create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// When the user was created, RFC 3339 (printed, ignored on create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// A user's spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// Role names.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// The document of `user`; `created` is its creation time already formatted (RFC 3339).
pub fn user_to_doc(user: &User, created: Option<String>) -> UserDoc {
    UserDoc {
        kind: "user".into(),
        metadata: UserMetadata {
            name: user.name.clone(),
            revision: (user.revision != 0).then_some(user.revision),
            created,
        },
        spec: UserSpec {
            roles: user.roles.clone(),
        },
        version: "v2".into(),
    }
}

/// The wire user a document describes (revision and creation time are the server's).
pub fn user_from_doc(d: UserDoc, doc: usize) -> Result<User, ResourceError> {
    let bad = |field: &str, problem: String| ResourceError::InvalidUser {
        doc,
        name: d.metadata.name.clone(),
        field: field.to_string(),
        problem,
    };
    if d.version != "v2" {
        return Err(bad("version", format!("'{}': users are v2", d.version)));
    }
    crate::resource::validate_name(&d.metadata.name).map_err(|m| bad("metadata.name", m))?;
    Ok(User {
        name: d.metadata.name.clone(),
        roles: d.spec.roles.clone(),
        created: 0,
        revision: 0,
    })
}

/// Parses a stream of `kind: role` and `kind: user` documents (a document may also be a list
/// of them, as `--format json` prints): the roles validated as [`parse_roles`] does, the users
/// as [`user_from_doc`]. A byte-order mark and CRLF line ends are accepted.
pub fn parse_resources(text: &str) -> Result<(Vec<Role>, Vec<User>), ResourceError> {
    let text = text
        .strip_prefix('\u{feff}')
        .unwrap_or(text)
        .replace("\r\n", "\n");
    let mut roles = Vec::new();
    let mut users = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let n = i + 1;
        let v = serde_norway::Value::deserialize(doc).map_err(|e| ResourceError::Yaml {
            doc: n,
            message: e.to_string(),
        })?;
        let items = match v {
            serde_norway::Value::Sequence(items) => items,
            serde_norway::Value::Null => continue,
            v => vec![v],
        };
        for item in items {
            match item.get("kind").and_then(|k| k.as_str()) {
                Some("role") => {
                    let yaml = serde_norway::to_string(&item).map_err(|e| ResourceError::Yaml {
                        doc: n,
                        message: e.to_string(),
                    })?;
                    roles.extend(parse_roles(&yaml).map_err(|e| renumber(e, n))?);
                }
                Some("user") => {
                    let d: UserDoc =
                        serde_norway::from_value(item).map_err(|e| ResourceError::Yaml {
                            doc: n,
                            message: e.to_string(),
                        })?;
                    users.push(user_from_doc(d, n)?);
                }
                other => {
                    return Err(ResourceError::UnknownKind {
                        doc: n,
                        kind: other.unwrap_or("(missing)").to_string(),
                    });
                }
            }
        }
    }
    if roles.is_empty() && users.is_empty() {
        return Err(ResourceError::Empty);
    }
    Ok((roles, users))
}

/// An error of a document parsed alone, numbered as document `n` of the whole stream.
fn renumber(e: ResourceError, n: usize) -> ResourceError {
    match e {
        ResourceError::Yaml { message, .. } => ResourceError::Yaml { doc: n, message },
        ResourceError::Invalid {
            name,
            field,
            problem,
            ..
        } => ResourceError::Invalid {
            doc: n,
            name,
            field,
            problem,
        },
        ResourceError::UnsupportedVersion { name, version, .. } => {
            ResourceError::UnsupportedVersion {
                doc: n,
                name,
                version,
            }
        }
        ResourceError::UnknownKind { kind, .. } => ResourceError::UnknownKind { doc: n, kind },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_round_trip_in_yaml_and_json_and_mix_with_roles() {
        let u = User {
            name: "alice".into(),
            roles: vec!["api-role".into()],
            created: 1,
            revision: 3,
        };
        let doc = user_to_doc(&u, Some("2026-11-30T20:00:00Z".into()));
        let yaml = serde_norway::to_string(&doc).unwrap();
        let json = serde_json::to_string_pretty(&vec![doc.clone()]).unwrap();
        for text in [yaml.clone(), json] {
            let (roles, users) = parse_resources(&text).unwrap();
            assert!(roles.is_empty());
            assert_eq!(users[0].name, "alice");
            assert_eq!(users[0].roles, ["api-role"]);
        }
        let role = "kind: role\nmetadata:\n  name: r\nspec:\n  allow:\n    rules:\n    - resources: ['role']\n      verbs: ['read']\nversion: v5\n";
        let (roles, users) =
            parse_resources(&format!("{role}---\n{yaml}")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((roles.len(), users.len()), (1, 1));
        let e =
            parse_resources("kind: user\nmetadata: {name: a}\nspec: {roles: []}\nversion: v9\n")
                .unwrap_err();
        assert!(e.to_string().contains("v2"), "{e}");
        let e = parse_resources("kind: token\n").unwrap_err();
        assert!(e.to_string().contains("token"), "{e}");
    }
}
