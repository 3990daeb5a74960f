//! # postern-tunnel-proto: the wire contract
//!
//! Everything the proxy, the agent and the client must agree on, and nothing else: no sockets, no
//! tasks, no clock (callers pass `now`). It is the crate we fuzz.
//!
//! ## Layout
//! - [`names`]: reserved names, login conventions, certificate extensions, default ports, and the
//!   parsing of a stream's `<target>.<cluster>` host.
//! - [`discovery`]: the JSON answered by `GET /webapi/ping` and `GET /webapi/find`, and the
//!   tunnel-address resolution order ([`discovery::ProxySettings::tunnel_addr`]).
//! - [`certs`]: which OpenSSH certificate means what (agent host certs, client user certs) and the
//!   checks russh does not do (trusted CA, type, principals, extensions, critical options).
//! - [`control`]: the length-prefixed messages on an agent's `@control` channel.
//! - [`credit`]: per-stream credit between proxy and agent (flow control russh does not give).
//! - [`quic`]: the QUIC transport's frames (agent login bound to the TLS exporter, target
//!   registration, control messages, stream headers) and the exporter signatures.
//! - [`frame_stream`]: the QUIC control stream read and written as frames, over any tokio
//!   `AsyncRead`/`AsyncWrite` pair (the caller brings the stream; still no sockets here).
//! - [`login`], [`join`]: the JSON the web listener relays to the Auth server (logins, agent
//!   joins) and the CA pin.

pub mod certs;
pub mod control;
pub mod credit;
pub mod discovery;
pub mod frame_stream;
pub mod join;
pub mod login;
pub mod names;
pub mod quic;

/// Version of the tunnel protocol spoken on the `@control` channel and advertised by discovery.
/// Version 2 added per-stream credit ([`credit`]); version 3 the host CA's signer on `@control`
/// ([`control::Message::HostCaSigner`]).
pub const PROTOCOL_VERSION: u32 = 3;
