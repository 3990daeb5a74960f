//! `pctl get`: roles, role/NAME, users, user/NAME, tokens, locks, events, each honouring
//! `--format text|json|yaml` with one schema per resource across formats: a named resource is one
//! object (one YAML document), a listing an array (YAML documents), and what `yaml` or `json`
//! prints of roles and users reads back with `pctl create -f`.

use anyhow::bail;
use postern_api::proto::*;
use postern_api::resource;
use postern_api::user_resource::{UserDoc, user_to_doc};
use postern_client::auth::AuthClient;
use serde::Serialize;

use crate::events::{self, EventFilter};
use crate::locks;
use crate::output::{self, Format, human_time, outln, rfc3339};

/// Runs `pctl get WHAT`.
pub async fn get(
    client: &AuthClient,
    what: &str,
    format: Option<Format>,
    filter: &EventFilter,
) -> anyhow::Result<()> {
    let listing = ["tokens", "token", "locks", "lock", "events", "event"].contains(&what);
    let format = format.unwrap_or(if listing { Format::Text } else { Format::Yaml });
    match what.split_once('/') {
        None if what == "roles" || what == "role" => {
            roles(&client.list_roles(ListRolesRequest {}).await?.roles, format)
        }
        Some(("role" | "roles", name)) => role(&client.get_role(name).await?, format),
        None if what == "users" || what == "user" => {
            users(&client.list_users(ListUsersRequest {}).await?.users, format)
        }
        Some(("user" | "users", name)) => {
            let u = client.get_user(name).await?;
            match format {
                Format::Text => users(&[u], format),
                _ => output::one(&user_doc(&u), format),
            }
        }
        None if what == "tokens" || what == "token" => tokens(
            &client.list_tokens(ListTokensRequest {}).await?.tokens,
            format,
        ),
        None if what == "locks" || what == "lock" => locks::print(client, format).await,
        None if what == "events" || what == "event" => events::print(client, filter, format).await,
        _ => bail!(
            "cannot get '{what}': use roles, role/NAME, users, user/NAME, tokens, locks or events"
        ),
    }
}

fn role(r: &Role, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Text => roles(std::slice::from_ref(r), format),
        _ => output::one(&resource::to_doc(r), format),
    }
}

fn roles(roles: &[Role], format: Format) -> anyhow::Result<()> {
    if format != Format::Text {
        let docs: Vec<_> = roles.iter().map(resource::to_doc).collect();
        return output::list(&docs, format);
    }
    outln!(
        "{:<24} {:<8} {:<10} ALLOW RULES",
        "NAME",
        "VERSION",
        "REVISION"
    );
    for r in roles {
        let rules: Vec<String> = r
            .spec
            .as_ref()
            .and_then(|s| s.allow.as_ref())
            .map(|a| {
                a.rules
                    .iter()
                    .map(|x| format!("{}:{}", x.resources.join("+"), x.verbs.join("+")))
                    .collect()
            })
            .unwrap_or_default();
        outln!(
            "{:<24} {:<8} {:<10} {}",
            r.name,
            r.version,
            r.revision,
            rules.join(" ")
        );
    }
    Ok(())
}

fn user_doc(u: &User) -> UserDoc {
    user_to_doc(u, Some(rfc3339(u.created)).filter(|s| !s.is_empty()))
}

/// Users: `kind: user` documents in YAML and JSON (the same shape), a table in text.
pub fn users(users: &[User], format: Format) -> anyhow::Result<()> {
    if format != Format::Text {
        let docs: Vec<_> = users.iter().map(user_doc).collect();
        return output::list(&docs, format);
    }
    outln!("{:<24} {:<32} CREATED", "USER", "ROLES");
    for u in users {
        outln!(
            "{:<24} {:<32} {}",
            u.name,
            u.roles.join(","),
            human_time(u.created)
        );
    }
    Ok(())
}

/// A join token as `get tokens` prints it in JSON and YAML (never the secret).
#[derive(Serialize)]
struct TokenDoc<'a> {
    id: &'a str,
    kind: &'a str,
    expires: String,
    uses_left: u32,
}

/// Join tokens: ids, kinds, expiry and uses left.
pub fn tokens(tokens: &[Token], format: Format) -> anyhow::Result<()> {
    if format != Format::Text {
        let docs: Vec<_> = tokens
            .iter()
            .map(|t| TokenDoc {
                id: &t.id,
                kind: &t.kind,
                expires: rfc3339(t.expires),
                uses_left: t.uses_left,
            })
            .collect();
        return output::list(&docs, format);
    }
    outln!("{:<14} {:<10} {:<9} EXPIRES", "ID", "KIND", "USES LEFT");
    for t in tokens {
        outln!(
            "{:<14} {:<10} {:<9} {}",
            t.id,
            t.kind,
            t.uses_left,
            human_time(t.expires)
        );
    }
    Ok(())
}
