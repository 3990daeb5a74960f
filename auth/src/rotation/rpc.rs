//! The rotation RPCs: `RotateCertAuthority` and `ListCaRotations`.

use super::{Authorities, CaKind, RotateRequest, RotationError, RotationState, rotate, status};

/// `RotateCertAuthority`: parses the request, moves the rotation, answers its new state.
pub fn rotate_rpc(
    state: &crate::service::State,
    r: &postern_api::proto::RotateCertAuthorityRequest,
) -> Result<postern_api::proto::CaRotation, tonic::Status> {
    let kind =
        CaKind::parse(&r.kind).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let req = RotateRequest {
        kind,
        phase: Some(r.phase.trim().to_string()).filter(|p| !p.is_empty()),
        manual: r.manual,
        grace_secs: r.grace_period_secs,
    };
    let now = postern_dial::mint::now_unix();
    match rotate(state.backend.as_ref(), &state.authorities, &req, now) {
        Ok(s) => {
            // Before answering: the next `pctl --data-dir` reads an identity of the new phase.
            if kind == CaKind::Tls
                && let Err(e) = crate::admin::follow(state)
            {
                tracing::warn!(error = %e, "TLS CA rotation moved but the admin identity could not be re-issued");
            }
            Ok(to_proto(kind, &s, &state.authorities))
        }
        Err(RotationError::Refused(m)) => Err(tonic::Status::failed_precondition(m)),
        Err(RotationError::Conflict) => {
            Err(tonic::Status::aborted(RotationError::Conflict.to_string()))
        }
        Err(e) => Err(tonic::Status::internal(e.to_string())),
    }
}

/// `ListCaRotations`: each rotatable CA's state.
pub fn list_rpc(
    state: &crate::service::State,
) -> Result<postern_api::proto::ListCaRotationsResponse, tonic::Status> {
    let mut rotations = Vec::new();
    for kind in CaKind::ALL {
        let s = status(state.backend.as_ref(), &state.authorities, kind)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        rotations.push(to_proto(kind, &s, &state.authorities));
    }
    Ok(postern_api::proto::ListCaRotationsResponse { rotations })
}

fn to_proto(kind: CaKind, s: &RotationState, a: &Authorities) -> postern_api::proto::CaRotation {
    let trusted = match kind {
        CaKind::Tls => a.tls_ca_pems(),
        _ => ssh_lines(a, kind),
    };
    postern_api::proto::CaRotation {
        kind: kind.as_str().into(),
        phase: s.phase.as_str().into(),
        manual: s.manual,
        started: s.started,
        grace_period_secs: s.grace_secs,
        next_phase_at: s.deadline().unwrap_or(0),
        last_rotated: s.last_rotated.unwrap_or(0),
        trusted,
    }
}

/// An SSH CA's trusted key lines, the signing one first.
fn ssh_lines(a: &Authorities, kind: CaKind) -> Vec<String> {
    let keys = a.ca_keys(kind);
    let signer = keys.signer.public_key().clone();
    let mut trusted: Vec<String> = vec![signer.to_openssh().unwrap_or_default()];
    trusted.extend(
        keys.trusted
            .iter()
            .filter(|k| **k != signer)
            .filter_map(|k| k.to_openssh().ok()),
    );
    trusted
}
