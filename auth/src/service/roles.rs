//! The Auth API's roles: read, list, create, update, upsert, delete. Each call runs in the bracket
//! of `calls` (authenticate, authorize, audit); the `AuthService` trait in `mod.rs` hands it here.

use postern_api::proto::*;
use postern_api::rbac::Verb;
use tonic::{Request, Response, Status};

use crate::storage::Condition;

use super::*;

impl Service {
    pub(super) async fn get_role_rpc(
        &self,
        req: Request<GetRoleRequest>,
    ) -> Result<Response<Role>, Status> {
        let name = req.get_ref().name.clone();
        let caller = self
            .authorize(&req, "GetRole", "role", &name, &[Verb::Read])
            .await?;
        let n = name.clone();
        let result = async {
            let item = self
                .blocking(move |s| s.backend.get("role", &n))
                .await?
                .map_err(storage_status)?;
            let item = item.ok_or_else(|| Status::not_found(format!("role '{name}' not found")))?;
            role_from_item(&item)
        }
        .await;
        self.finish(
            &caller,
            "GetRole",
            format!("role/{}", req.get_ref().name),
            result,
        )
        .await
    }

    pub(super) async fn list_roles_rpc(
        &self,
        req: Request<ListRolesRequest>,
    ) -> Result<Response<ListRolesResponse>, Status> {
        let caller = self
            .authorize(&req, "ListRoles", "role", "", &[Verb::List])
            .await?;
        let result = async {
            let items = self
                .blocking(|s| s.backend.list("role"))
                .await?
                .map_err(storage_status)?;
            let roles = items
                .iter()
                .map(role_from_item)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ListRolesResponse { roles })
        }
        .await;
        self.finish(&caller, "ListRoles", "role".into(), result)
            .await
    }

    pub(super) async fn create_role_rpc(
        &self,
        req: Request<Role>,
    ) -> Result<Response<Role>, Status> {
        self.write_role(req, "CreateRole", &[Verb::Create], |_| Condition::Absent)
            .await
    }

    pub(super) async fn update_role_rpc(
        &self,
        req: Request<Role>,
    ) -> Result<Response<Role>, Status> {
        self.write_role(req, "UpdateRole", &[Verb::Update], |r| {
            if r.revision > 0 {
                Condition::Revision(r.revision)
            } else {
                Condition::Present
            }
        })
        .await
    }

    pub(super) async fn upsert_role_rpc(
        &self,
        req: Request<Role>,
    ) -> Result<Response<Role>, Status> {
        self.write_role(req, "UpsertRole", &[Verb::Create, Verb::Update], |_| {
            Condition::Any
        })
        .await
    }

    pub(super) async fn delete_role_rpc(
        &self,
        req: Request<DeleteRoleRequest>,
    ) -> Result<Response<Empty>, Status> {
        let name = req.get_ref().name.clone();
        self.delete_named(&req, "DeleteRole", "role", name).await
    }
}
