//! # postern-api: the Auth API contract
//!
//! What a client of the Auth server links, and nothing of the server's storage or CAs (like
//! Teleport's separate `api` module):
//!
//! - [`proto`]: the gRPC service `postern.auth.v1.AuthService` and its messages, generated from
//!   `proto/postern/auth/v1/auth.proto` (the documented contract);
//! - [`resource`]: the YAML/JSON forms of resources (`kind: role`), their parsing with errors that
//!   point at the line and field, validation, and conversion to and from the wire types;
//! - [`access`]: access requests in roles (`request`, `review_requests`) and their decisions;
//! - [`user_resource`]: users in the same YAML/JSON form, and reading roles and users together;
//! - [`rbac`]: verbs, resource names, and the rule evaluation (deny wins, default deny);
//! - [`targets`]: which targets roles reach by label (`node_labels`, alias `target_labels`);
//! - [`duration`]: Go-style durations (`8h`, `1h30m`) as roles write them;
//! - [`identity`]: the identity file `pctl auth sign` writes (key, certificates, CAs, cluster).

pub mod access;
pub mod duration;
pub mod identity;
pub mod rbac;
pub mod resource;
pub mod targets;
pub mod user_resource;

/// Generated gRPC types and stubs for `postern.auth.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("postern.auth.v1");

    /// The encoded `FileDescriptorSet` of `auth.proto`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/auth_descriptor.bin"));
}

/// The TLS server name every client verifies on the Auth server's certificate: `auth.<cluster>`,
/// whichever address (direct or through a tunnel) it was reached by.
pub fn auth_server_name(cluster: &str) -> String {
    format!("auth.{cluster}")
}

/// A second name on every Auth server certificate, verified when the client does not know the
/// cluster's name (key pair and TLS credentials). The trust anchor is still the cluster's TLS CA.
pub const AUTH_SERVER_NAME_ANY: &str = "auth.postern.cluster.local";

/// Largest gRPC message either side accepts (1 MiB); larger requests get `RESOURCE_EXHAUSTED`.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Default certificate lifetime cap of a role without `max_session_ttl` (30 h, as in Teleport).
pub const DEFAULT_MAX_SESSION_TTL_SECS: u64 = 30 * 3600;
