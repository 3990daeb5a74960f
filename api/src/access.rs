//! Access requests in roles: which roles a holder may ask for (`spec.allow.request`), for how
//! long (`max_duration`), and whose requests it may review (`spec.allow.review_requests`), with
//! the decisions the Auth server takes from them (deny wins, default deny, as for rules).

use serde::{Deserialize, Serialize};

use crate::duration;
use crate::proto::{AccessRequestConditions, AccessReviewConditions, Role, RoleConditions};

/// Default elevation when a request names no duration: one hour (or less, see [`grant`]).
pub const DEFAULT_DURATION_SECS: u64 = 3600;

/// `spec.allow.request` (or `deny`) as written in YAML.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestDoc {
    /// Role names that may be requested, or `*`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Longest elevation that may be asked for (`8h`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<String>,
}

/// `spec.allow.review_requests` (or `deny`) as written in YAML.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReviewDoc {
    /// Role names whose requests may be reviewed, or `*`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

/// The wire form of a `request` block; `Err(problem)` when `max_duration` does not parse.
pub fn request_from_doc(d: Option<&RequestDoc>) -> Result<Option<AccessRequestConditions>, String> {
    let Some(d) = d else { return Ok(None) };
    let max = match &d.max_duration {
        Some(t) => duration::parse_secs(t)?,
        None => 0,
    };
    Ok(Some(AccessRequestConditions {
        roles: d.roles.clone(),
        max_duration_secs: max,
    }))
}

/// The document form of a `request` block (`None` when empty).
pub fn request_to_doc(c: Option<&AccessRequestConditions>) -> Option<RequestDoc> {
    let c = c.filter(|c| !c.roles.is_empty() || c.max_duration_secs > 0)?;
    Some(RequestDoc {
        roles: c.roles.clone(),
        max_duration: (c.max_duration_secs > 0).then(|| duration::format_secs(c.max_duration_secs)),
    })
}

/// The wire form of a `review_requests` block.
pub fn review_from_doc(d: Option<&ReviewDoc>) -> Option<AccessReviewConditions> {
    d.map(|d| AccessReviewConditions {
        roles: d.roles.clone(),
    })
}

/// The document form of a `review_requests` block (`None` when empty).
pub fn review_to_doc(c: Option<&AccessReviewConditions>) -> Option<ReviewDoc> {
    let c = c.filter(|c| !c.roles.is_empty())?;
    Some(ReviewDoc {
        roles: c.roles.clone(),
    })
}

/// Whether `c` holds anything (a role with only request or review rules still does something).
pub fn conditions_grant(c: &RoleConditions) -> bool {
    c.request.as_ref().is_some_and(|r| !r.roles.is_empty())
        || c.review_requests
            .as_ref()
            .is_some_and(|r| !r.roles.is_empty())
}

/// Checks the role names in both blocks of `c`; on failure the field (under `side`) and problem.
pub fn validate(side: &str, c: &RoleConditions) -> Result<(), (String, String)> {
    let lists = [
        ("request.roles", c.request.as_ref().map(|r| &r.roles)),
        (
            "review_requests.roles",
            c.review_requests.as_ref().map(|r| &r.roles),
        ),
    ];
    for (field, names) in lists {
        for n in names.into_iter().flatten() {
            if n != "*" {
                crate::resource::validate_name(n)
                    .map_err(|e| (format!("spec.{side}.{field}"), e))?;
            }
        }
    }
    Ok(())
}

fn names(list: &[String], role: &str) -> bool {
    list.iter().any(|n| n == "*" || n == role)
}

fn side(r: &Role, allow: bool) -> Option<&RoleConditions> {
    let s = r.spec.as_ref()?;
    if allow {
        s.allow.as_ref()
    } else {
        s.deny.as_ref()
    }
}

/// The elevation holders of `held` may ask for, for `wanted` roles: `Ok(duration)` with the
/// duration asked (0: the default) capped by the smallest `max_duration` of the roles that allow
/// them, or `Err(reason)` naming the first role that may not be requested or the cap exceeded.
pub fn grant(held: &[Role], wanted: &[String], asked_secs: u64) -> Result<u64, String> {
    if wanted.is_empty() {
        return Err("roles: name at least one role to request".into());
    }
    let held_names = || {
        let n: Vec<&str> = held.iter().map(|r| r.name.as_str()).collect();
        if n.is_empty() {
            "none".to_string()
        } else {
            n.join(", ")
        }
    };
    let mut cap = u64::MAX;
    for w in wanted {
        if let Some(r) = held.iter().find(|r| {
            side(r, false)
                .and_then(|c| c.request.as_ref())
                .is_some_and(|q| names(&q.roles, w))
        }) {
            return Err(format!(
                "role '{w}' may not be requested: role '{}' denies requesting it",
                r.name
            ));
        }
        let allowing: Vec<&AccessRequestConditions> = held
            .iter()
            .filter_map(|r| side(r, true)?.request.as_ref())
            .filter(|q| names(&q.roles, w))
            .collect();
        if allowing.is_empty() {
            return Err(format!(
                "role '{w}' may not be requested: no role you hold lists it in allow.request.roles (roles held: {})",
                held_names()
            ));
        }
        // The most generous allowing role decides this role's cap (0: no cap of its own).
        let this = allowing
            .iter()
            .map(|q| match q.max_duration_secs {
                0 => u64::MAX,
                m => m,
            })
            .max()
            .unwrap_or(u64::MAX);
        cap = cap.min(this);
    }
    let cap = cap.min(crate::DEFAULT_MAX_SESSION_TTL_SECS);
    match asked_secs {
        0 => Ok(DEFAULT_DURATION_SECS.min(cap)),
        a if a > cap => Err(format!(
            "duration {} is above the longest allowed for these roles ({}, max_duration)",
            duration::format_secs(a),
            duration::format_secs(cap)
        )),
        a => Ok(a),
    }
}

/// Whether holders of `held` may review a request for `wanted`: `Err(reason)` names the first role
/// they may not review.
pub fn may_review(held: &[Role], wanted: &[String]) -> Result<(), String> {
    for w in wanted {
        if let Some(r) = held.iter().find(|r| {
            side(r, false)
                .and_then(|c| c.review_requests.as_ref())
                .is_some_and(|q| names(&q.roles, w))
        }) {
            return Err(format!(
                "requests for role '{w}' may not be reviewed by you: role '{}' denies it",
                r.name
            ));
        }
        let allowed = held.iter().any(|r| {
            side(r, true)
                .and_then(|c| c.review_requests.as_ref())
                .is_some_and(|q| names(&q.roles, w))
        });
        if !allowed {
            return Err(format!(
                "requests for role '{w}' may not be reviewed by you: no role you hold lists it in allow.review_requests.roles"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_roles;

    fn role(yaml: &str) -> Role {
        parse_roles(yaml).unwrap().remove(0)
    }

    const REQUESTER: &str = "kind: role\nmetadata: {name: requester}\nspec:\n  allow:\n    request:\n      roles: [editor]\n      max_duration: 2h\nversion: v7\n";
    const REVIEWER: &str = "kind: role\nmetadata: {name: reviewer}\nspec:\n  allow:\n    review_requests:\n      roles: [editor]\nversion: v7\n";

    #[test]
    fn request_roles_and_max_duration() {
        let r = [role(REQUESTER)];
        assert_eq!(grant(&r, &["editor".into()], 0), Ok(3600));
        assert_eq!(grant(&r, &["editor".into()], 7200), Ok(7200));
        let e = grant(&r, &["editor".into()], 7201).unwrap_err();
        assert!(e.contains("max_duration"), "{e}");
        let e = grant(&r, &["access".into()], 0).unwrap_err();
        assert!(e.contains("allow.request.roles"), "{e}");
        let short = role(&REQUESTER.replace("2h", "30m"));
        assert_eq!(grant(&[short], &["editor".into()], 0), Ok(1800));
        let deny = role(
            "kind: role\nmetadata: {name: no}\nspec:\n  deny:\n    request: {roles: ['*']}\nversion: v7\n",
        );
        let e = grant(&[role(REQUESTER), deny], &["editor".into()], 0).unwrap_err();
        assert!(e.contains("denies"), "{e}");
    }

    #[test]
    fn review_needs_every_role() {
        let r = [role(REVIEWER)];
        assert!(may_review(&r, &["editor".into()]).is_ok());
        assert!(may_review(&r, &["editor".into(), "access".into()]).is_err());
        assert!(may_review(&[role(REQUESTER)], &["editor".into()]).is_err());
    }

    #[test]
    fn request_blocks_round_trip_and_unknown_fields_fail() {
        let roles = vec![role(REQUESTER), role(REVIEWER)];
        let yaml = crate::resource::roles_to_yaml(&roles);
        assert_eq!(parse_roles(&yaml).unwrap(), roles);
        let e = parse_roles(&REQUESTER.replace("max_duration", "max_durationz")).unwrap_err();
        assert!(e.to_string().contains("max_durationz"), "{e}");
        let e = parse_roles(&REQUESTER.replace("2h", "2")).unwrap_err();
        assert!(
            e.to_string().contains("spec.allow.request.max_duration"),
            "{e}"
        );
        let e = parse_roles(&REVIEWER.replace("[editor]", "['bad name']")).unwrap_err();
        assert!(e.to_string().contains("review_requests.roles"), "{e}");
    }
}
