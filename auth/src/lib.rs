//! # postern-auth: the isolated Auth server
//!
//! The server the whole product exists to reach. It owns the cluster's CAs, its users, roles and
//! join tokens, and serves the gRPC Auth API over mutual TLS (TLS 1.3, client certificates issued
//! by the cluster's TLS CA). Every call is authenticated by its certificate, authorized by the
//! caller's roles and written to the audit log. With `[tunnel]` set it runs the agent in-process
//! and serves the API through a reverse tunnel to a proxy, with no inbound port.
//!
//! Layout:
//! - [`config`]: `auth.toml`, validated in one place;
//! - [`storage`]: the `Backend` trait, SQLite (embedded default) and PostgreSQL (several Auth
//!   servers on one database), versioned migrations;
//! - [`authority`]: the SSH user and host CAs and the TLS CA, and what they issue;
//! - `tls_ca`: the TLS CA (ECDSA P-256) and the migration of an Ed25519 one;
//! - [`service`]: the gRPC service: authentication, RBAC, audit, operations;
//! - [`audit`]: the audit log (database table and JSON lines);
//! - [`changes`]: the policy change feed (roles, users, locks) with its revisions;
//! - [`watch`]: `WatchPolicy`, the feed as a gRPC stream with resume from a revision;
//! - [`locks`]: locks on a user, a role or an agent;
//! - [`requests`]: access requests (temporary elevation on approval) and their RPCs;
//! - [`proxies`]: the proxy set, from each proxy's `ProxyHeartbeat`, with expiry;
//! - [`stream_events`]: stream access events shipped by proxies;
//! - [`tokens`]: join tokens as stored, and spending one use atomically;
//! - [`login`]: `psh login` behind the proxy's login relay (signup secret, then password);
//! - [`join`]: agents joining with a token behind the proxy's join relay;
//! - [`bot`]: Machine ID bots joining with a bot token and renewing their user identity;
//! - [`password`]: Argon2id verification on reused memory;
//! - [`throttle`]: the password-hashing gate and failed logins per source and user;
//! - [`listener`]: the API listener's caps and deadlines;
//! - [`admin`]: the admin identity, at most one valid;
//! - [`metrics`]: every `postern_auth_*` metric, and `GET /metrics`;
//! - [`rotation`]: CA rotation, one phase machine for the host, user and TLS CAs, stored and
//!   resumed;
//! - [`proxy_renew`]: a proxy's host certificate renewal (same key and names);
//! - [`renewal`]: the embedded agent's certificate, re-issued at two-thirds of its life;
//! - [`server_tls`]: the API's TLS config, rebuilt when a TLS CA rotation moves;
//! - [`server`]: data dir checks, the embedded agent, `run`.

pub mod admin;
pub mod audit;
pub mod authority;
pub mod bot;
pub mod changes;
pub mod config;
pub mod join;
pub mod listener;
pub mod locks;
pub mod login;
pub mod metrics;
pub mod password;
pub mod proxies;
pub mod proxy_renew;
pub mod renewal;
pub mod requests;
pub mod rotation;
pub mod server;
pub mod server_tls;
pub mod service;
pub mod storage;
pub mod stream_events;
pub mod throttle;
mod tls_ca;
pub mod tokens;
pub mod watch;

pub use config::AuthConfig;
pub use server::{AuthError, run};
