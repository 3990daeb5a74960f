//! Errors of dialling a proxy.

use std::time::Duration;

/// Why a proxy could not be reached or logged in to.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Address dialled.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS handshake with the web listener failed (wrong pin, unknown CA, not TLS).
    #[error("TLS to web proxy {addr} failed: {detail}")]
    Tls {
        /// Address dialled.
        addr: String,
        /// What rustls said.
        detail: String,
    },
    /// The web listener answered with something that is not Postern discovery JSON.
    #[error("{addr} is not a Postern proxy ({detail})")]
    NotAPostern {
        /// Address dialled.
        addr: String,
        /// Status or parse problem, briefly.
        detail: String,
    },
    /// An address, key or certificate given by the caller is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The proxy's SSH host key or certificate was not trusted.
    #[error("proxy {addr} failed host verification: {detail}")]
    HostVerification {
        /// Address dialled.
        addr: String,
        /// Why (untrusted CA, principal mismatch, no certificate and no pin, ...).
        detail: String,
    },
    /// The proxy refused our certificate.
    #[error(
        "proxy {addr} refused the certificate for login '{login}': check it is signed by the cluster's CA, unexpired and lists this login"
    )]
    AuthRefused {
        /// Address dialled.
        addr: String,
        /// Login tried.
        login: String,
    },
    /// The proxy accepted the certificate, then closed the connection with a reason before
    /// anything was served (a lock, a critical option it cannot honour).
    #[error("proxy {addr} refused the login: {reason}")]
    Refused {
        /// Address dialled.
        addr: String,
        /// The proxy's words (its disconnect message).
        reason: String,
    },
    /// The SSH session failed.
    #[error("SSH with {addr} failed: {source}")]
    Ssh {
        /// Address dialled.
        addr: String,
        /// What russh said.
        source: russh::Error,
    },
    /// The QUIC transport failed: no handshake (UDP blocked?), a refused login, or a proxy that
    /// did not prove its host certificate.
    #[error("QUIC with {addr} failed: {detail}")]
    Quic {
        /// Address dialled.
        addr: String,
        /// What went wrong.
        detail: String,
    },
    /// A step took longer than its deadline.
    #[error("{what} with {addr} timed out after {after:?}")]
    Timeout {
        /// Which step.
        what: &'static str,
        /// Address dialled.
        addr: String,
        /// The deadline.
        after: Duration,
    },
}
