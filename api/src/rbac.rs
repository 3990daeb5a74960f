//! Role-based access control: rules are resources × verbs, in `allow` and `deny` lists. A matching
//! deny rule in any role wins; otherwise a matching allow rule in any role grants; otherwise the
//! request is denied (default deny).

use std::fmt;

use crate::proto::{Role, Rule};

/// Every resource name a rule may name (besides `*`).
pub const RESOURCES: &[&str] = &[
    "role",
    "user",
    "token",
    "user_cert",
    "host_cert",
    "cert_authority",
    "event",
    "lock",
    "access_request",
    "proxy",
];

/// Every verb a rule may name (besides `*`).
pub const VERBS: &[&str] = &["list", "read", "create", "update", "delete"];

/// What a request does to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Enumerate resources of a kind.
    List,
    /// Read one resource.
    Read,
    /// Create one.
    Create,
    /// Change one.
    Update,
    /// Remove one.
    Delete,
}

impl Verb {
    /// The name used in rules.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::List => "list",
            Verb::Read => "read",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Delete => "delete",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// A deny rule of `role` matched.
    #[error("access denied: role '{role}' denies verb '{verb}' on resource '{resource}'")]
    Explicit {
        /// The role whose deny rule matched.
        role: String,
        /// The verb asked for.
        verb: Verb,
        /// The resource asked for.
        resource: String,
    },
    /// No allow rule matched.
    #[error(
        "access denied: no role grants verb '{verb}' on resource '{resource}' (roles held: {})",
        if roles.is_empty() { "none".to_string() } else { roles.join(", ") }
    )]
    NotGranted {
        /// The verb asked for.
        verb: Verb,
        /// The resource asked for.
        resource: String,
        /// The roles the caller holds.
        roles: Vec<String>,
    },
}

fn rule_matches(rule: &Rule, resource: &str, verb: Verb) -> bool {
    let r = rule.resources.iter().any(|x| x == "*" || x == resource);
    let v = rule.verbs.iter().any(|x| x == "*" || x == verb.as_str());
    r && v
}

/// Decides whether holders of `roles` may apply `verb` to `resource`.
pub fn check(roles: &[Role], resource: &str, verb: Verb) -> Result<(), Denied> {
    for role in roles {
        let deny = role.spec.as_ref().and_then(|s| s.deny.as_ref());
        if deny.is_some_and(|d| d.rules.iter().any(|r| rule_matches(r, resource, verb))) {
            return Err(Denied::Explicit {
                role: role.name.clone(),
                verb,
                resource: resource.into(),
            });
        }
    }
    let allowed = roles.iter().any(|role| {
        let allow = role.spec.as_ref().and_then(|s| s.allow.as_ref());
        allow.is_some_and(|a| a.rules.iter().any(|r| rule_matches(r, resource, verb)))
    });
    if allowed {
        Ok(())
    } else {
        Err(Denied::NotGranted {
            verb,
            resource: resource.into(),
            roles: roles.iter().map(|r| r.name.clone()).collect(),
        })
    }
}

/// The shortest `max_session_ttl` among `roles` (seconds), or the default when none sets one.
pub fn max_session_ttl(roles: &[Role]) -> u64 {
    roles
        .iter()
        .filter_map(|r| r.spec.as_ref()?.options.as_ref())
        .map(|o| o.max_session_ttl_secs)
        .filter(|&t| t > 0)
        .min()
        .unwrap_or(crate::DEFAULT_MAX_SESSION_TTL_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_roles;

    fn role(yaml: &str) -> Role {
        parse_roles(yaml).unwrap().remove(0)
    }

    const SEED: &str = "kind: role\nmetadata:\n  name: api-role\nspec:\n  allow:\n    rules:\n      - resources: ['role']\n        verbs: ['read']\n  deny:\n    node_labels:\n      '*': '*'\nversion: v5\n";

    #[test]
    fn seed_role_reads_roles_and_nothing_else() {
        let r = [role(SEED)];
        assert!(check(&r, "role", Verb::Read).is_ok());
        let e = check(&r, "role", Verb::Create).unwrap_err();
        assert_eq!(
            e.to_string(),
            "access denied: no role grants verb 'create' on resource 'role' (roles held: api-role)"
        );
        assert!(check(&r, "role", Verb::List).is_err());
        assert!(check(&r, "user", Verb::Read).is_err());
    }

    #[test]
    fn deny_wins_over_allow_in_another_role() {
        let admin = role(
            "kind: role\nmetadata: {name: admin}\nspec:\n  allow:\n    rules: [{resources: ['*'], verbs: ['*']}]\nversion: v7\n",
        );
        let no_delete = role(
            "kind: role\nmetadata: {name: no-delete}\nspec:\n  deny:\n    rules: [{resources: [role], verbs: [delete]}]\nversion: v7\n",
        );
        let r = [admin, no_delete];
        assert!(check(&r, "role", Verb::Update).is_ok());
        assert!(matches!(
            check(&r, "role", Verb::Delete),
            Err(Denied::Explicit { ref role, .. }) if role == "no-delete"
        ));
        assert!(check(&r, "user", Verb::Delete).is_ok());
    }

    #[test]
    fn no_roles_can_do_nothing() {
        for res in RESOURCES {
            assert!(check(&[], res, Verb::Read).is_err());
        }
    }

    #[test]
    fn session_ttl_is_the_smallest_cap() {
        let a = role(
            "kind: role\nmetadata: {name: a}\nspec:\n  options: {max_session_ttl: 8h}\n  allow:\n    rules: [{resources: [role], verbs: [read]}]\nversion: v5\n",
        );
        let b = role(SEED);
        assert_eq!(max_session_ttl(std::slice::from_ref(&b)), 30 * 3600);
        assert_eq!(max_session_ttl(&[a, b]), 8 * 3600);
    }
}
