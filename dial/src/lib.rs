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
//! - [`quic`]: the QUIC endpoint, login binding, proxy proof and stream opening, shared by the
//!   agent, QUIC clients and the proxy's streams to agents.
//! - [`accept`]: server-side accept with connection caps, back-off and a descriptor reserve
//!   (the proxy's listeners and the Auth API).
//! - [`error`]: [`DialError`], what went wrong and what to do about it.
//! - [`renew_due`]: when a certificate renews (two-thirds of its life, or sooner after a host CA
//!   rotation), for agents and proxies.

pub mod accept;
pub mod error;
pub mod mint;
pub mod quic;
pub mod renew_due;
pub mod splice;
pub mod ssh;
pub mod web;
pub mod write_behind;

pub use error::DialError;
