//! # postern-dial: reaching a Postern proxy
//!
//! What an agent and a client both do before their paths part: ask the proxy's web listener where
//! its tunnel is ([`web`]), then log in to the tunnel listener over SSH with an OpenSSH
//! certificate, checking the proxy's own host certificate against the cluster's host CA
//! ([`ssh`]).
//!
//! ## Layout
//! - [`web`]: HTTPS `GET /webapi/ping|find` with certificate pinning, and tunnel-address discovery.
//! - [`ssh`]: client config, proxy host-certificate verification, certificate login.
//! - [`error`]: [`DialError`], what went wrong and what to do about it.

pub mod error;
pub mod mint;
pub mod splice;
pub mod ssh;
pub mod web;
pub mod write_behind;

pub use error::DialError;
