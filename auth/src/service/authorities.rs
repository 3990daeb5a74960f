//! The Auth API's certificate authorities and the audit log: CA rotation phases, the exported
//! authorities, audit events. Each call runs in the bracket of `calls` (authenticate, authorize,
//! audit); the `AuthService` trait in `mod.rs` hands it here.

use postern_api::proto::*;
use postern_api::rbac::Verb;
use tonic::{Request, Response, Status};

use super::*;

impl Service {
    pub(super) async fn rotate_cert_authority_rpc(
        &self,
        req: Request<RotateCertAuthorityRequest>,
    ) -> Result<Response<CaRotation>, Status> {
        let r = req.get_ref().clone();
        let caller = self
            .authorize(
                &req,
                "UpdateCertAuthority",
                "cert_authority",
                &r.kind,
                &[Verb::Update],
            )
            .await?;
        let result = self
            .blocking(move |s| crate::rotation::rotate_rpc(s, &r))
            .await
            .and_then(|x| x);
        let kind = req.get_ref().kind.clone();
        self.finish(
            &caller,
            "UpdateCertAuthority",
            format!("cert_authority/{kind}"),
            result,
        )
        .await
    }

    pub(super) async fn list_ca_rotations_rpc(
        &self,
        req: Request<ListCaRotationsRequest>,
    ) -> Result<Response<ListCaRotationsResponse>, Status> {
        let caller = self
            .authorize(&req, "ListCaRotations", "cert_authority", "", &[Verb::Read])
            .await?;
        let result = self
            .blocking(crate::rotation::list_rpc)
            .await
            .and_then(|x| x);
        self.finish(&caller, "ListCaRotations", "cert_authority".into(), result)
            .await
    }

    pub(super) async fn export_authorities_rpc(
        &self,
        req: Request<ExportAuthoritiesRequest>,
    ) -> Result<Response<ExportAuthoritiesResponse>, Status> {
        let kind = req.get_ref().kind.clone();
        let caller = self
            .authorize(
                &req,
                "ExportAuthorities",
                "cert_authority",
                &kind,
                &[Verb::Read],
            )
            .await?;
        let a = &self.state.authorities;
        let result = match kind.as_str() {
            "host" => Ok((a.host_ca_lines(), a.host_ca_line())),
            "user" => Ok((a.user_ca_lines(), a.user_ca_line())),
            "tls" => {
                // The one signing client certificates is listed first.
                let pems = a.tls_ca_pems();
                let signing = pems.first().cloned().unwrap_or_default();
                Ok((pems, signing))
            }
            other => Err(Status::invalid_argument(format!(
                "kind: '{other}' is not a CA kind (host, user, tls)"
            ))),
        }
        .map(|(entries, signing)| ExportAuthoritiesResponse {
            entries,
            signing,
            server_signing: if kind == "host" {
                a.host_ca_server_line()
            } else {
                String::new()
            },
        });
        self.finish(
            &caller,
            "ExportAuthorities",
            format!("cert_authority/{kind}"),
            result,
        )
        .await
    }

    pub(super) async fn list_audit_events_rpc(
        &self,
        req: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        let caller = self
            .authorize(&req, "ListAuditEvents", "event", "", &[Verb::List])
            .await?;
        let limit = match req.get_ref().limit {
            0 => 100,
            n => n.min(10_000),
        };
        let result = async {
            let recs = self
                .blocking(move |s| s.backend.audit(limit))
                .await?
                .map_err(storage_status)?;
            Ok(ListAuditEventsResponse {
                events: recs
                    .into_iter()
                    .map(|r| AuditEvent {
                        id: r.id,
                        time_ms: r.time_ms,
                        user: r.user,
                        action: r.action,
                        resource: r.resource,
                        allowed: r.allowed,
                        error: r.error,
                        peer: r.peer,
                    })
                    .collect(),
            })
        }
        .await;
        self.finish(&caller, "ListAuditEvents", "event".into(), result)
            .await
    }
}
