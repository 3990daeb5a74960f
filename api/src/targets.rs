//! Which targets a user's roles reach: `node_labels` (alias `target_labels`) in `allow` and
//! `deny`, with Teleport's meaning. A selector matches a target when, for every key it lists, the
//! target has that label with one of the listed values (`*` as a value: any value; `'*': '*'`:
//! every target, labelled or not). A matching deny in any role wins, then a matching allow in any
//! role grants, and otherwise the target is refused (default deny).
//!
//! The Auth server's own API target (`auth`) is not decided here: every authenticated user of the
//! cluster reaches it, and the Auth server's RBAC then decides each call.

use std::collections::{BTreeMap, HashMap};

use crate::proto::{LabelValues, Role};

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetDenied {
    /// A deny selector of `role` matched the target.
    #[error(
        "access to target '{target}' denied by role '{role}' (its deny node_labels match the target's labels {labels})"
    )]
    Explicit {
        /// The role whose deny matched.
        role: String,
        /// The target asked for.
        target: String,
        /// The target's labels, as `{k=v, ...}`.
        labels: String,
    },
    /// No allow selector matched.
    #[error(
        "access to target '{target}' denied: no role allows its labels {labels} (roles held: {})",
        if roles.is_empty() { "none".to_string() } else { roles.join(", ") }
    )]
    NotGranted {
        /// The target asked for.
        target: String,
        /// The target's labels.
        labels: String,
        /// The roles held.
        roles: Vec<String>,
    },
}

/// Whether `selector` matches a target with `labels`. An empty selector matches nothing.
pub fn selector_matches(
    selector: &HashMap<String, LabelValues>,
    labels: &BTreeMap<String, String>,
) -> bool {
    if selector.is_empty() {
        return false;
    }
    selector.iter().all(|(key, values)| {
        let value_ok = |v: &str| values.values.iter().any(|x| x == "*" || x == v);
        if key == "*" {
            // `'*': '*'` matches every target; `'*': x` matches a target with any label = x.
            values.values.iter().any(|x| x == "*") || labels.values().any(|v| value_ok(v))
        } else {
            labels.get(key).is_some_and(|v| value_ok(v))
        }
    })
}

fn show(labels: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", inner.join(", "))
}

/// Decides whether holders of `roles` may open streams to `target` with `labels`.
pub fn check_target(
    roles: &[Role],
    target: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), TargetDenied> {
    let conditions = |r: &Role, deny: bool| {
        r.spec
            .as_ref()
            .and_then(|s| {
                if deny {
                    s.deny.as_ref()
                } else {
                    s.allow.as_ref()
                }
            })
            .map(|c| selector_matches(&c.node_labels, labels))
            .unwrap_or(false)
    };
    if let Some(role) = roles.iter().find(|r| conditions(r, true)) {
        return Err(TargetDenied::Explicit {
            role: role.name.clone(),
            target: target.into(),
            labels: show(labels),
        });
    }
    if roles.iter().any(|r| conditions(r, false)) {
        return Ok(());
    }
    Err(TargetDenied::NotGranted {
        target: target.into(),
        labels: show(labels),
        roles: roles.iter().map(|r| r.name.clone()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_roles;

    fn role(yaml: &str) -> Role {
        parse_roles(yaml).unwrap().remove(0)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const SEED: &str = "kind: role\nmetadata:\n  name: api-role\nspec:\n  allow:\n    rules:\n      - resources: ['role']\n        verbs: ['read']\n  deny:\n    node_labels:\n      '*': '*'\nversion: v5\n";

    #[test]
    fn the_seed_role_is_refused_every_target_naming_itself() {
        let r = [role(SEED)];
        for l in [labels(&[]), labels(&[("env", "prod")])] {
            let e = check_target(&r, "web", &l).unwrap_err();
            assert!(matches!(&e, TargetDenied::Explicit { role, .. } if role == "api-role"));
            assert!(e.to_string().contains("role 'api-role'"), "{e}");
        }
    }

    #[test]
    fn allow_by_labels_deny_wins_default_deny() {
        let prod = role(
            "kind: role\nmetadata: {name: prod}\nspec:\n  allow:\n    target_labels: {env: [prod, staging]}\nversion: v7\n",
        );
        let no_db = role(
            "kind: role\nmetadata: {name: no-db}\nspec:\n  deny:\n    node_labels: {kind: db}\nversion: v7\n",
        );
        let any = role(
            "kind: role\nmetadata: {name: any}\nspec:\n  allow:\n    node_labels: {'*': '*'}\nversion: v7\n",
        );
        let p = std::slice::from_ref(&prod);
        check_target(p, "web", &labels(&[("env", "prod")])).unwrap();
        check_target(p, "web", &labels(&[("env", "staging"), ("x", "y")])).unwrap();
        let e = check_target(p, "web", &labels(&[("env", "dev")])).unwrap_err();
        assert!(matches!(e, TargetDenied::NotGranted { .. }), "{e}");
        assert!(e.to_string().contains("roles held: prod"), "{e}");
        check_target(p, "web", &labels(&[])).unwrap_err();
        let both = [prod, no_db];
        let e = check_target(&both, "db", &labels(&[("env", "prod"), ("kind", "db")])).unwrap_err();
        assert!(e.to_string().contains("role 'no-db'"), "{e}");
        check_target(std::slice::from_ref(&any), "bare", &labels(&[])).unwrap();
        check_target(&[], "web", &labels(&[("env", "prod")])).unwrap_err();
        // A key with value '*' needs the key present.
        let has_env = role(
            "kind: role\nmetadata: {name: e}\nspec:\n  allow:\n    node_labels: {env: '*'}\nversion: v7\n",
        );
        check_target(
            std::slice::from_ref(&has_env),
            "w",
            &labels(&[("env", "x")]),
        )
        .unwrap();
        check_target(&[has_env], "w", &labels(&[("team", "x")])).unwrap_err();
    }
}
