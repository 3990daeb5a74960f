//! Names on the wire: reserved hosts, logins, certificate extensions, default ports.

use std::net::IpAddr;

/// Default port of the proxy's web (HTTPS discovery) listener.
pub const DEFAULT_WEB_PORT: u16 = 3080;
/// Default port of the proxy's tunnel (SSH) listener.
pub const DEFAULT_TUNNEL_PORT: u16 = 3024;
/// Default port of the Auth API behind an agent.
pub const DEFAULT_AUTH_PORT: u16 = 3025;

/// Reserved `direct-tcpip` host an agent opens to speak the control protocol.
pub const CONTROL_HOST: &str = "@control";

/// Prefix of the SSH login name an agent uses: `@agent/<host-id>.<cluster>`.
///
/// The login says which role the connection claims, so a user certificate presented for an agent
/// login (or a host certificate for a client login) is refused before anything else happens.
pub const AGENT_LOGIN_PREFIX: &str = "@agent/";

/// Host-certificate extension naming the agent's cluster.
pub const EXT_CLUSTER: &str = "postern-cluster@postern";
/// Host-certificate extension naming the agent's role (see [`ROLE_AUTH`], [`ROLE_PROXY`]).
pub const EXT_ROLE: &str = "postern-role@postern";
/// Role of the Auth server's own agent: the only agent that may register [`RESERVED_TARGETS`].
pub const ROLE_AUTH: &str = "auth";
/// Role of an agent enrolled with a join token (`RegisterAgent`) or signed with
/// `pctl auth sign --host`: it serves its own targets, never the reserved ones.
pub const ROLE_SERVICE: &str = "service";
/// Target names only an agent of role [`ROLE_AUTH`] may register: the Auth API and the login
/// relay's back end.
pub const RESERVED_TARGETS: [&str; 2] = ["auth", "login"];

/// Whether `target` is one of [`RESERVED_TARGETS`].
pub fn is_reserved_target(target: &str) -> bool {
    RESERVED_TARGETS.contains(&target)
}
/// User-certificate extension listing the user's roles, comma-separated (what the proxy decides
/// targets by, without a round trip to the Auth server).
pub const EXT_ROLES: &str = "postern-roles@postern";
/// User-certificate extension naming the access request whose approved roles the certificate's
/// roles include (the proxy counts those roles only while the request's elevation lasts).
pub const EXT_REQUEST: &str = "postern-request@postern";
/// Role of a proxy's own host certificate (what agents and clients check when they dial it).
pub const ROLE_PROXY: &str = "proxy";

/// Longest cluster, target or host-id label accepted.
pub const MAX_LABEL_LEN: usize = 63;

/// A name on the wire that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The stream host is an IP address or `host:port`, not a registered target.
    #[error(
        "'{0}' is a raw address: name a registered target as <target>.<cluster> (for example auth.example)"
    )]
    RawAddress(String),
    /// The stream host has no `.` separating target and cluster.
    #[error("'{0}' is not of the form <target>.<cluster> (for example auth.example)")]
    NotTargetDotCluster(String),
    /// A label is empty, too long or has characters outside `[a-z0-9-]`.
    #[error(
        "invalid {what} '{value}': use 1-63 characters of a-z, 0-9 and '-', not starting with '-'"
    )]
    BadLabel {
        /// Which label (target, cluster, host id).
        what: &'static str,
        /// The label as received.
        value: String,
    },
}

/// Checks one label (target, cluster or host id): 1–63 of `[a-z0-9-]`, not starting with `-`.
pub fn validate_label(what: &'static str, value: &str) -> Result<(), NameError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_LABEL_LEN
        && !value.starts_with('-')
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::BadLabel {
            what,
            value: value.chars().take(80).collect(),
        })
    }
}

/// Cluster names may contain dots (`example.com`); each dot-separated part is a label.
pub fn validate_cluster(value: &str) -> Result<(), NameError> {
    if value.is_empty() || value.len() > 253 {
        return Err(NameError::BadLabel {
            what: "cluster",
            value: value.chars().take(80).collect(),
        });
    }
    for part in value.split('.') {
        validate_label("cluster", part).map_err(|_| NameError::BadLabel {
            what: "cluster",
            value: value.chars().take(80).collect(),
        })?;
    }
    Ok(())
}

/// The destination of a client stream: a registered target of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTarget {
    /// Target name the agent registered (`auth`).
    pub target: String,
    /// Cluster whose agents serve it (`example`).
    pub cluster: String,
}

impl StreamTarget {
    /// Parses the host of a `direct-tcpip` request: `<target>.<cluster>`, split at the first dot.
    pub fn parse(host: &str) -> Result<StreamTarget, NameError> {
        let trimmed = host.trim_start_matches('[').trim_end_matches(']');
        if trimmed.parse::<IpAddr>().is_ok() || host.contains(':') {
            return Err(NameError::RawAddress(host.chars().take(80).collect()));
        }
        let Some((target, cluster)) = host.split_once('.') else {
            return Err(NameError::NotTargetDotCluster(
                host.chars().take(80).collect(),
            ));
        };
        validate_label("target", target)?;
        validate_cluster(cluster)?;
        Ok(StreamTarget {
            target: target.to_owned(),
            cluster: cluster.to_owned(),
        })
    }

    /// The host string a client puts in its `direct-tcpip` request.
    pub fn host(&self) -> String {
        format!("{}.{}", self.target, self.cluster)
    }
}

/// The principal of an agent's host certificate: `<host-id>.<cluster>`.
pub fn agent_principal(host_id: &str, cluster: &str) -> String {
    format!("{host_id}.{cluster}")
}

/// The SSH login name an agent uses: [`AGENT_LOGIN_PREFIX`] + its principal.
pub fn agent_login(host_id: &str, cluster: &str) -> String {
    format!("{AGENT_LOGIN_PREFIX}{}", agent_principal(host_id, cluster))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_target_dot_cluster() {
        let t = StreamTarget::parse("auth.example.com").unwrap();
        assert_eq!(t.target, "auth");
        assert_eq!(t.cluster, "example.com");
        assert_eq!(t.host(), "auth.example.com");
    }

    #[test]
    fn refuses_raw_addresses_and_bad_names() {
        for bad in ["127.0.0.1", "::1", "[::1]", "localhost:22", "10.0.0.1"] {
            assert!(
                matches!(StreamTarget::parse(bad), Err(NameError::RawAddress(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            StreamTarget::parse("auth"),
            Err(NameError::NotTargetDotCluster(_))
        ));
        for bad in [
            "AUTH.example",
            ".example",
            "auth.",
            "auth..x",
            "a b.c",
            "-x.c",
            "@control.x",
        ] {
            assert!(
                matches!(StreamTarget::parse(bad), Err(NameError::BadLabel { .. })),
                "{bad}"
            );
        }
        let long = format!("{}.c", "a".repeat(64));
        assert!(StreamTarget::parse(&long).is_err());
    }
}
