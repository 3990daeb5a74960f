//! How pctl prints a CA's rotation state (`pctl status`, `pctl auth rotate`).

use postern_api::proto::{CaRotation, ExportAuthoritiesRequest, ListCaRotationsRequest};
use postern_client::auth::AuthClient;

/// One line of a CA's rotation state, as `pctl status` and `pctl auth rotate` print it.
pub fn rotation_line(r: &CaRotation) -> String {
    let now = postern_dial::mint::now_unix();
    let mode = if r.manual { "manual" } else { "automatic" };
    let mut line = format!("{} CA:  phase {}", r.kind, r.phase);
    if r.phase != "standby" {
        line.push_str(&format!(" ({mode}"));
        if r.next_phase_at > 0 {
            line.push_str(&format!(
                ", next phase in {}s",
                r.next_phase_at.saturating_sub(now)
            ));
        }
        line.push(')');
    }
    line.push_str(&format!(", {} trusted key(s)", r.trusted.len()));
    if r.last_rotated > 0 {
        line.push_str(&format!(
            ", last rotated {}s ago",
            now.saturating_sub(r.last_rotated)
        ));
    }
    line
}

/// Prints the CA pin (the host CA's signing key) and each CA's rotation state.
pub async fn print_ca_status(client: &AuthClient) -> anyhow::Result<()> {
    // The pin agents join with (`ca_pin` in agent.toml): the SHA-256 of the host CA's
    // signing key (listed first by ListCaRotations; during a rotation it changes at
    // update_clients).
    let rotations = client.list_ca_rotations(ListCaRotationsRequest {}).await;
    let signer = match &rotations {
        Ok(r) => r
            .rotations
            .iter()
            .find(|r| r.kind == "host")
            .and_then(|r| r.trusted.first().cloned()),
        Err(_) => None,
    };
    let signer = match signer {
        Some(line) => Ok(line),
        None => client
            .export_authorities(ExportAuthoritiesRequest {
                kind: "host".into(),
            })
            .await
            .map(|r| r.entries.into_iter().next().unwrap_or_default()),
    };
    match signer {
        Ok(line) => {
            let key = russh::keys::ssh_key::PublicKey::from_openssh(line.trim())?;
            let fp = key.fingerprint(russh::keys::HashAlg::Sha256);
            println!("CA pin:   {}", tunnel_proto::join::ca_pin(fp.as_bytes()));
        }
        Err(e) => println!("CA pin:   (not shown: {e})"),
    }
    match rotations {
        Ok(r) => {
            for rot in &r.rotations {
                println!("{}", rotation_line(rot));
            }
        }
        Err(e) => println!("Rotation: (not shown: {e})"),
    }
    Ok(())
}
