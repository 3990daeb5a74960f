//! Dialling a target: its name resolved at each dial (so a DNS name or a Kubernetes service that
//! moves is followed), each address tried in turn under one deadline, and a failure said in words
//! that reach the client (the proxy passes the reason on).

use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::TargetAddr;

/// Why a target could not be dialled.
#[derive(Debug, thiserror::Error)]
pub enum TargetDialError {
    /// The host name did not resolve (or resolved to no address).
    #[error("name '{host}' did not resolve: {message}")]
    Resolve {
        /// The name.
        host: String,
        /// What the resolver said.
        message: String,
    },
    /// Every address refused the connection or failed.
    #[error("{0}")]
    Connect(std::io::Error),
    /// No address answered within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl TargetDialError {
    /// The `reason` label of `postern_agent_dial_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            TargetDialError::Resolve { .. } => "resolve",
            TargetDialError::Connect(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                "refused"
            }
            TargetDialError::Connect(_) => "error",
            TargetDialError::Timeout(_) => "timeout",
        }
    }
}

/// Resolves `addr` now and connects to the first address that answers, within `timeout`.
pub async fn dial(addr: &TargetAddr, timeout: Duration) -> Result<TcpStream, TargetDialError> {
    let attempt = async {
        let resolved: Vec<_> = tokio::net::lookup_host((addr.host.as_str(), addr.port))
            .await
            .map_err(|e| TargetDialError::Resolve {
                host: addr.host.clone(),
                message: e.to_string(),
            })?
            .collect();
        if resolved.is_empty() {
            return Err(TargetDialError::Resolve {
                host: addr.host.clone(),
                message: "no address".into(),
            });
        }
        let mut last = None;
        for a in resolved {
            match TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(TargetDialError::Connect(
            last.expect("at least one address was tried"),
        ))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(TargetDialError::Timeout(timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_resolve_at_dial_and_failures_say_why() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let by_name: TargetAddr = format!("localhost:{port}").parse().unwrap();
        // localhost may resolve to ::1 first; a listener on 127.0.0.1 is still reached.
        dial(&by_name, Duration::from_secs(5)).await.unwrap();
        let bad: TargetAddr = "no-such-host.invalid:5432".parse().unwrap();
        let e = dial(&bad, Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(e.reason(), "resolve", "{e}");
        assert!(e.to_string().contains("no-such-host.invalid"), "{e}");
        drop(l);
        let gone: TargetAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let e = dial(&gone, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(e.reason(), "refused", "{e}");
    }
}
