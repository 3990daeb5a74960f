//! The doctor behind `pctl doctor` and `psh doctor`: walks the path a client takes to the Auth API
//! through a proxy and reports each step as passed, or failed with the fix: DNS, TCP to the web
//! address, TLS and the pin, discovery, the tunnel address it resolves to, the identity's expiry,
//! then the SSH login with the proxy's host certificate checked against the cluster's host CA, the
//! tunnel for the cluster and the Auth API through it. It stops at the first step that fails.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use postern_api::identity::IdentityFile;
use postern_api::proto::PingRequest;
use postern_dial::web::{WebTrust, cert_fingerprint, host_of, normalize_fingerprint, tls_config};

use crate::auth::AuthClient;
use crate::connect::Config;
use crate::credentials::Credentials;

/// How long each network step may take.
const STEP: Duration = Duration::from_secs(10);

/// One step's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Its name (`DNS`, `TCP`, `TLS`, `discovery`, `tunnel address`, `certificate`, `SSH`,
    /// `tunnel`, `login`, `Auth API`).
    pub name: &'static str,
    /// What was found.
    pub detail: String,
    /// How to fix it; `None` when the step passed.
    pub fix: Option<String>,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.fix {
            None => write!(f, "✓ {}: {}", self.name, self.detail),
            Some(fix) => write!(f, "✗ {}: {}\n  fix: {fix}", self.name, self.detail),
        }
    }
}

/// The doctor found a step that fails (already reported).
#[derive(Debug, thiserror::Error)]
#[error("{0} failed")]
pub struct DoctorFailed(pub &'static str);

/// The SHA-256 (hex) of the certificate the web listener at `web` presents, whatever it is, and
/// the proxy's clock (the `Date` of its answer to `GET /webapi/ping`, Unix seconds) if it says.
async fn presented_fingerprint(
    web: &str,
    addr: std::net::SocketAddr,
) -> Result<(String, Option<u64>), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let config = tls_config(&WebTrust::Insecure).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(host_of(web).to_string())
        .map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let fp = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|der| cert_fingerprint(der))
        .ok_or_else(|| "no certificate presented".to_string())?;
    // The proxy's clock, from the Date header of a discovery answer (best effort).
    let req = format!("GET /webapi/ping HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n");
    let mut head = Vec::new();
    if tls.write_all(req.as_bytes()).await.is_ok() {
        let mut buf = [0u8; 4096];
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    }
    let date = String::from_utf8_lossy(&head)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("date").then(|| v.trim().to_string())
        })
        .and_then(|d| httpdate::parse_http_date(&d).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    Ok((fp, date))
}

/// How far this clock may be from the proxy's: certificates are valid from 60 s before issue.
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;

/// The clock step: `local` and `proxy` clocks (Unix seconds); Err(detail, fix) beyond
/// [`MAX_CLOCK_SKEW_SECS`].
pub fn clock_skew(local: u64, proxy: u64) -> Result<String, (String, String)> {
    let (skew, ahead) = if local >= proxy {
        (local - proxy, "ahead of")
    } else {
        (proxy - local, "behind")
    };
    if skew <= MAX_CLOCK_SKEW_SECS {
        return Ok(format!("within {skew}s of the proxy's"));
    }
    Err((
        format!(
            "this clock is {} {ahead} the proxy's",
            postern_api::duration::format_secs(skew)
        ),
        format!(
            "certificates are backdated only {MAX_CLOCK_SKEW_SECS}s: synchronise the clocks (NTP, e.g. systemd-timesyncd or chrony)"
        ),
    ))
}

/// Reports steps as they are known.
struct Out<'a>(&'a mut dyn FnMut(&Step));

impl Out<'_> {
    fn ok(&mut self, name: &'static str, detail: impl std::fmt::Display) {
        (self.0)(&Step {
            name,
            detail: detail.to_string(),
            fix: None,
        });
    }

    fn fail(
        &mut self,
        name: &'static str,
        detail: impl std::fmt::Display,
        fix: impl std::fmt::Display,
    ) -> DoctorFailed {
        (self.0)(&Step {
            name,
            detail: detail.to_string(),
            fix: Some(fix.to_string()),
        });
        DoctorFailed(name)
    }
}

/// Runs every step against the proxy `web` with `trust` and the identity file `identity`,
/// handing each outcome to `report` as it is known; stops at the first failure.
pub async fn run(
    web: &str,
    trust: WebTrust,
    identity: &Path,
    report: &mut dyn FnMut(&Step),
) -> Result<(), DoctorFailed> {
    let mut out = Out(report);
    // DNS.
    let addrs: Vec<std::net::SocketAddr> = match tokio::net::lookup_host(web).await {
        Ok(a) => a.collect(),
        Err(e) => {
            return Err(out.fail(
                "DNS",
                format!("'{web}' does not resolve: {e}"),
                "check the proxy's name (host:port), or give its IP address",
            ));
        }
    };
    let Some(&addr) = addrs.first() else {
        return Err(out.fail(
            "DNS",
            format!("'{web}' resolves to nothing"),
            "check the name",
        ));
    };
    out.ok("DNS", format!("{web} is {addr}"));

    // TCP to the web address.
    match tokio::time::timeout(STEP, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => out.ok("TCP", format!("{addr} answers")),
        Ok(Err(e)) => {
            return Err(out.fail(
                "TCP",
                format!("nothing answers on {addr}: {e}"),
                "is the proxy running, and is this its web listener's port (listen.web in proxy.toml, 3080 by default)?",
            ));
        }
        Err(_) => {
            return Err(out.fail(
                "TCP",
                format!("{addr} does not answer within {STEP:?}"),
                "a firewall drops the connection, or the address is wrong",
            ));
        }
    }

    // TLS and the pin.
    let (presented, proxy_clock) = match tokio::time::timeout(
        STEP,
        presented_fingerprint(web, addr),
    )
    .await
    {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            return Err(out.fail(
                "TLS",
                format!("no TLS handshake with {web}: {e}"),
                "this port is not the proxy's web listener (the tunnel listener is SSH, the ops listener plain HTTP)",
            ));
        }
        Err(_) => return Err(out.fail("TLS", "handshake timed out", "check the port")),
    };
    match &trust {
        WebTrust::Pin(pin) if normalize_fingerprint(pin) != presented => {
            return Err(out.fail(
                "TLS",
                format!(
                    "the proxy's web certificate is SHA-256 {presented}, not the pin given ({pin})"
                ),
                format!(
                    "if this is your proxy (its log says its fingerprint at start), use --web-pin {presented}"
                ),
            ));
        }
        WebTrust::Pin(_) => out.ok("TLS", format!("certificate matches the pin {presented}")),
        WebTrust::Insecure => out.ok(
            "TLS",
            format!("certificate SHA-256 {presented} (not checked: --insecure)"),
        ),
        _ => out.ok("TLS", format!("certificate SHA-256 {presented}")),
    }

    // Discovery.
    let id = match IdentityFile::load(identity) {
        Ok(id) => id,
        Err(e) => {
            return Err(out.fail(
                "identity",
                e,
                "give the identity file from `pctl auth sign` or `psh login` with -i",
            ));
        }
    };
    let pong = match postern_dial::web::ping(web, &trust).await {
        Ok(p) => p,
        Err(e) => {
            return Err(out.fail(
                "discovery",
                e,
                "check --web-pin / --web-ca; the address must be the proxy's web listener",
            ));
        }
    };
    if !pong.cluster_names.contains(&id.cluster) {
        return Err(out.fail(
            "discovery",
            format!(
                "the proxy routes clusters {:?}, not '{}' (your identity's)",
                pong.cluster_names, id.cluster
            ),
            "add the cluster's CAs to the proxy's [[clusters]], or use this cluster's proxy",
        ));
    }
    out.ok(
        "discovery",
        format!(
            "proxy {} routes cluster '{}'",
            pong.server_version, id.cluster
        ),
    );

    // The tunnel address.
    let env = std::env::var(tunnel_proto::discovery::TUNNEL_ADDR_ENV).ok();
    let tunnel = pong.proxy.tunnel_addr(env.as_deref(), host_of(web));
    match tokio::time::timeout(STEP, tokio::net::TcpStream::connect(&tunnel)).await {
        Ok(Ok(_)) => out.ok("tunnel address", format!("{tunnel} answers")),
        Ok(Err(e)) => {
            return Err(out.fail(
                "tunnel address",
                format!("the proxy advertises {tunnel} for SSH, but it does not answer: {e}"),
                "set tunnel_public_addr in proxy.toml to an address clients reach (or POSTERN_TUNNEL_ADDR here)",
            ));
        }
        Err(_) => {
            return Err(out.fail(
                "tunnel address",
                format!("{tunnel} does not answer within {STEP:?}"),
                "a firewall drops it: open the tunnel port (3024 by default)",
            ));
        }
    }

    // The clock against the proxy's.
    match proxy_clock.map(|p| clock_skew(crate::times::now(), p)) {
        Some(Ok(detail)) => out.ok("clock", detail),
        Some(Err((detail, fix))) => return Err(out.fail("clock", detail, fix)),
        None => out.ok("clock", "not checked: the proxy's answer had no Date"),
    }

    // The identity's certificate.
    let now = crate::times::now();
    if id.expires <= now {
        return Err(out.fail(
            "certificate",
            format!(
                "the identity of '{}' expired {}",
                id.user,
                crate::times::human_time(id.expires)
            ),
            "run psh login, or pctl auth sign, again",
        ));
    }
    out.ok(
        "certificate",
        format!(
            "'{}' of cluster '{}', expires {}",
            id.user,
            id.cluster,
            crate::times::human_time(id.expires)
        ),
    );

    // SSH login (the proxy's host certificate against the host CA), the tunnel, the API.
    let config = Config {
        addrs: vec![web.to_string()],
        credentials: vec![Credentials::identity_file(identity.to_path_buf())],
        web_trust: Some(trust),
        ..Default::default()
    };
    let client = match tokio::time::timeout(STEP * 3, AuthClient::connect(config)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let text = format!("{e:#}");
            let (step, fix) = if text.contains("host verification") {
                (
                    "SSH",
                    "the proxy's host certificate is not signed by your cluster's host CA: sign it with `pctl auth sign --proxy-names=…`, or log in again to get the right CA".to_string(),
                )
            } else if text.contains("no tunnel") {
                (
                    "tunnel",
                    format!(
                        "no agent of cluster '{}' is connected to this proxy: start the Auth server with [tunnel] proxy = \"{web}\" (and check its log)",
                        id.cluster
                    ),
                )
            } else if text.contains("refused") || text.contains("auth") {
                (
                    "login",
                    "the proxy refused the certificate: it may be revoked, for another cluster, or the proxy may not trust this cluster's user CA".to_string(),
                )
            } else {
                ("Auth API", "see the error above".to_string())
            };
            return Err(out.fail(step, text, fix));
        }
        Err(_) => {
            return Err(out.fail(
                "Auth API",
                format!("no answer within {:?}", STEP * 3),
                "check the proxy's and the Auth server's logs",
            ));
        }
    };
    out.ok(
        "SSH",
        "the proxy's host certificate is signed by the cluster's host CA; logged in",
    );
    match client.ping(PingRequest {}).await {
        Ok(p) => out.ok(
            "Auth API",
            format!(
                "through the tunnel: cluster '{}', server {}, you are '{}'",
                p.cluster, p.server_version, p.user
            ),
        ),
        Err(e) => {
            return Err(out.fail(
                "Auth API",
                e,
                "the Auth server answered with an error: see its log",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_beyond_the_backdating_is_a_failure_with_the_fix() {
        assert!(clock_skew(1_000, 1_000).is_ok());
        assert!(clock_skew(1_060, 1_000).is_ok());
        let (detail, fix) = clock_skew(1_000, 1_000 + 3600).unwrap_err();
        assert!(detail.contains("1h behind"), "{detail}");
        assert!(fix.contains("NTP"), "{fix}");
        let (detail, _) = clock_skew(1_000 + 61, 1_000).unwrap_err();
        assert!(detail.contains("1m1s ahead of"), "{detail}");
    }
}
