//! Storage: the [`Backend`] trait and its two implementations.
//!
//! Everything the Auth server knows lives behind `Backend`:
//! - [`sqlite`]: the embedded default, one file in WAL mode with `synchronous=FULL` (a write
//!   acknowledged to a client survives the process being killed);
//! - [`postgres`]: one PostgreSQL database shared by several Auth servers, through a connection
//!   pool;
//! - `migrations`: each backend's schema, versioned (the `schema_version` table) and applied in
//!   one transaction.
//!
//! The trait is synchronous: the Auth server calls it from blocking threads
//! (`spawn_blocking`). The PostgreSQL backend runs its async driver on a small runtime of its own
//! and waits for the answer, so no tokio worker thread waits on the network.

use std::path::PathBuf;

pub(crate) mod migrations;
pub mod postgres;
pub mod sqlite;

pub use postgres::{PostgresBackend, PostgresOptions};
pub use sqlite::SqliteBackend;

/// A stored resource (role, user, token) as JSON, with its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Its name, unique within its kind.
    pub name: String,
    /// Bumped by every write (starts at 1).
    pub revision: u64,
    /// The resource as JSON.
    pub value: String,
}

/// When a write may happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Only if the name is free (create).
    Absent,
    /// Only if it exists (update).
    Present,
    /// Only if it exists at this revision (read-modify-write).
    Revision(u64),
    /// Always (upsert).
    Any,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRecord {
    /// Assigned on append.
    pub id: u64,
    /// Unix milliseconds.
    pub time_ms: u64,
    /// Who called (`@anonymous` without a certificate).
    pub user: String,
    /// The method.
    pub action: String,
    /// `kind/name`.
    pub resource: String,
    /// Whether RBAC allowed it.
    pub allowed: bool,
    /// The error returned, if any.
    pub error: String,
    /// The caller's address.
    pub peer: String,
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The write's condition failed: the name exists.
    #[error("{kind} '{name}' already exists")]
    Exists {
        /// Resource kind.
        kind: String,
        /// Name.
        name: String,
    },
    /// The write's condition failed: no such resource.
    #[error("{kind} '{name}' not found")]
    NotFound {
        /// Resource kind.
        kind: String,
        /// Name.
        name: String,
    },
    /// The write's condition failed: someone else wrote first.
    #[error(
        "{kind} '{name}' changed since it was read (revision {expected}, now {actual}): read it again and retry"
    )]
    Conflict {
        /// Resource kind.
        kind: String,
        /// Name.
        name: String,
        /// The revision the writer expected.
        expected: u64,
        /// The stored revision.
        actual: u64,
    },
    /// The database itself failed (full disk, corruption, I/O).
    #[error("database {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The database file cannot be created.
    #[error("database {path}: {source}")]
    Io {
        /// The database file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// PostgreSQL refused or failed a statement.
    #[error("database {addr}: {source}")]
    Postgres {
        /// The database (`postgres://user@host:port/db`, never with a password).
        addr: String,
        /// What PostgreSQL or the driver said.
        source: tokio_postgres::Error,
    },
    /// The database cannot be reached, the connection was lost, or it did not answer in time.
    #[error("database {addr} is unavailable: {problem}")]
    Unavailable {
        /// The database (`postgres://user@host:port/db`, never with a password).
        addr: String,
        /// What went wrong.
        problem: String,
    },
    /// The database was written by a newer Postern.
    #[error(
        "database {path} has schema version {found}, newer than this build's {supported}: upgrade postern-auth"
    )]
    TooNew {
        /// The database file or address.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// The newest this build knows.
        supported: u32,
    },
}

/// What the Auth server needs from storage.
pub trait Backend: Send + Sync + 'static {
    /// A cluster-wide value (name, CA keys).
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Stores every entry (replacing a stored value of the same key) if `key_guard` is absent,
    /// all in one transaction; returns whether it wrote (false: another start got there first).
    fn init_meta(&self, key_guard: &str, entries: &[(&str, Vec<u8>)])
    -> Result<bool, StorageError>;
    /// One resource.
    fn get(&self, kind: &str, name: &str) -> Result<Option<Item>, StorageError>;
    /// All resources of a kind, by name.
    fn list(&self, kind: &str) -> Result<Vec<Item>, StorageError>;
    /// Writes a resource if `cond` holds, atomically; returns what was stored.
    fn put(
        &self,
        kind: &str,
        name: &str,
        value: &str,
        cond: Condition,
    ) -> Result<Item, StorageError>;
    /// Removes a resource; false if it was absent.
    fn delete(&self, kind: &str, name: &str) -> Result<bool, StorageError>;
    /// Records an issued TLS client certificate (SHA-256 of its DER) for `user`.
    fn add_cert(&self, fingerprint: &str, user: &str, expires: u64) -> Result<(), StorageError>;
    /// The user a TLS client certificate was issued to, and its expiry.
    fn cert_owner(&self, fingerprint: &str) -> Result<Option<(String, u64)>, StorageError>;
    /// Records an issued TLS client certificate that carries the roles of access request
    /// `request_id` (see [`Backend::cert_request`]).
    fn add_elevated_cert(
        &self,
        fingerprint: &str,
        user: &str,
        expires: u64,
        request_id: &str,
    ) -> Result<(), StorageError>;
    /// The access request whose roles a TLS client certificate carries, if any.
    fn cert_request(&self, fingerprint: &str) -> Result<Option<String>, StorageError>;
    /// Forgets every certificate of `user` (on delete) and every expired one; returns how many.
    fn forget_certs(&self, user: Option<&str>, now: u64) -> Result<usize, StorageError>;
    /// Forgets one certificate by fingerprint (revokes it) and every expired one; returns whether
    /// that certificate was recorded.
    fn forget_cert(&self, fingerprint: &str, now: u64) -> Result<bool, StorageError>;
    /// Appends an audit record; returns its id.
    fn append_audit(&self, record: &AuditRecord) -> Result<u64, StorageError>;
    /// The newest `limit` audit records, newest first.
    fn audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StorageError>;
    /// Policy changes (roles, users, locks) after revision `after`, oldest first, at most `limit`.
    fn changes_since(&self, after: u64, limit: u32) -> Result<Changes, StorageError>;
    /// Every role, user and lock, and the revision they are current at, read atomically.
    fn policy_snapshot(&self) -> Result<(u64, Vec<Change>), StorageError>;
    /// Stores stream events (id, time, user, encoded event), skipping ids already stored;
    /// returns how many were new. All or nothing.
    fn append_stream_events(&self, events: &[StreamRow]) -> Result<usize, StorageError>;
    /// Stream events newest first: of `user` if given, at or after `since_ms`, at most `limit`.
    fn stream_events(
        &self,
        user: Option<&str>,
        since_ms: u64,
        limit: u32,
    ) -> Result<Vec<StreamRow>, StorageError>;
}

pub use crate::stream_events::StreamRow;

pub use crate::changes::{Change, Changes};
