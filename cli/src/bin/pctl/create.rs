//! `pctl create -f FILE [--force]`: roles and users from what `pctl get --format yaml|json`
//! prints. A new user's one-time signup secret goes to `./NAME.signup` (0600), never to the
//! terminal; with `--force` an existing role is replaced and an existing user gets the file's
//! roles.

use anyhow::bail;
use postern_api::proto::{CreateUserRequest, Role, User};
use postern_client::auth::{AuthClient, AuthClientError};

use crate::output::{human_time, outln};

fn exists(e: &AuthClientError) -> bool {
    matches!(
        e,
        AuthClientError::Api {
            code: tonic::Code::AlreadyExists,
            ..
        }
    )
}

/// Creates (or with `force` creates or replaces) each role.
pub async fn roles(client: &AuthClient, roles: Vec<Role>, force: bool) -> anyhow::Result<()> {
    for role in roles {
        let name = role.name.clone();
        let r = if force {
            client.upsert_role(role).await
        } else {
            client.create_role(role).await
        };
        match r {
            Ok(_) if force => outln!("role '{name}' has been created or updated"),
            Ok(_) => outln!("role '{name}' has been created"),
            Err(e) if exists(&e) => {
                bail!("role '{name}' already exists: use --force to overwrite it")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Creates each user (its signup secret to `./NAME.signup`), or with `force` sets an existing
/// user's roles to the file's.
pub async fn users(client: &AuthClient, users: Vec<User>, force: bool) -> anyhow::Result<()> {
    for u in users {
        let name = u.name.clone();
        let created = client
            .create_user(CreateUserRequest {
                name: name.clone(),
                roles: u.roles.clone(),
                secret_ttl_secs: 0,
            })
            .await;
        match created {
            Ok(r) => {
                let path = std::path::PathBuf::from(format!("{name}.signup"));
                crate::write_secret(&path, &r.signup_secret)?;
                outln!(
                    "user '{name}' has been created. Its one-time signup secret is in {} (0600, valid until {})",
                    path.display(),
                    human_time(r.secret_expires)
                );
            }
            Err(e) if exists(&e) && force => {
                client.update_user(u).await?;
                outln!("user '{name}' has been updated");
            }
            Err(e) if exists(&e) => {
                bail!("user '{name}' already exists: use --force to set its roles from the file")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
