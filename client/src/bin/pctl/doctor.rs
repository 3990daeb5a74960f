//! `pctl doctor`: walks the path a client takes to the Auth API through a proxy and prints each
//! step with ✓, or ✗ and the fix: DNS, TCP to the web address, TLS and the pin, discovery, the
//! tunnel address it resolves to, the identity's expiry, then the SSH login with the proxy's host
//! certificate checked against the cluster's host CA, the tunnel for the cluster and the Auth API
//! through it. It stops at the first step that fails (exit status 1).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use postern_api::identity::IdentityFile;
use postern_api::proto::PingRequest;
use postern_client::auth::AuthClient;
use postern_client::connect::Config;
use postern_client::credentials::Credentials;
use postern_dial::web::{WebTrust, cert_fingerprint, host_of, normalize_fingerprint, tls_config};

use crate::output::{human_time, outln};

/// How long each network step may take.
const STEP: Duration = Duration::from_secs(10);

fn ok(step: &str, detail: impl std::fmt::Display) {
    outln!("✓ {step}: {detail}");
}

fn fail(step: &str, problem: impl std::fmt::Display, fix: impl std::fmt::Display) -> anyhow::Error {
    outln!("✗ {step}: {problem}\n  fix: {fix}");
    anyhow::anyhow!("{step} failed")
}

/// The SHA-256 (hex) of the certificate the web listener at `web` presents, whatever it is.
async fn presented_fingerprint(web: &str, addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&WebTrust::Insecure)?));
    let name = rustls_pki_types::ServerName::try_from(host_of(web).to_string())?;
    let tls = connector.connect(name, tcp).await?;
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow::anyhow!("no certificate presented"))?;
    Ok(cert_fingerprint(der))
}

/// Runs every step against the proxy `web` with `trust` and the identity file `identity`.
pub async fn run(web: &str, trust: WebTrust, identity: &Path) -> anyhow::Result<()> {
    // DNS.
    let addrs: Vec<std::net::SocketAddr> = match tokio::net::lookup_host(web).await {
        Ok(a) => a.collect(),
        Err(e) => {
            return Err(fail(
                "DNS",
                format!("'{web}' does not resolve: {e}"),
                "check the proxy's name (host:port), or give its IP address",
            ));
        }
    };
    let Some(&addr) = addrs.first() else {
        return Err(fail(
            "DNS",
            format!("'{web}' resolves to nothing"),
            "check the name",
        ));
    };
    ok("DNS", format!("{web} is {addr}"));

    // TCP to the web address.
    match tokio::time::timeout(STEP, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => ok("TCP", format!("{addr} answers")),
        Ok(Err(e)) => {
            return Err(fail(
                "TCP",
                format!("nothing answers on {addr}: {e}"),
                "is the proxy running, and is this its web listener's port (listen.web in proxy.toml, 3080 by default)?",
            ));
        }
        Err(_) => {
            return Err(fail(
                "TCP",
                format!("{addr} does not answer within {STEP:?}"),
                "a firewall drops the connection, or the address is wrong",
            ));
        }
    }

    // TLS and the pin.
    let presented = match tokio::time::timeout(STEP, presented_fingerprint(web, addr)).await {
        Ok(Ok(fp)) => fp,
        Ok(Err(e)) => {
            return Err(fail(
                "TLS",
                format!("no TLS handshake with {web}: {e}"),
                "this port is not the proxy's web listener (the tunnel listener is SSH, the ops listener plain HTTP)",
            ));
        }
        Err(_) => return Err(fail("TLS", "handshake timed out", "check the port")),
    };
    match &trust {
        WebTrust::Pin(pin) if normalize_fingerprint(pin) != presented => {
            return Err(fail(
                "TLS",
                format!(
                    "the proxy's web certificate is SHA-256 {presented}, not the pin given ({pin})"
                ),
                format!(
                    "if this is your proxy (its log says its fingerprint at start), use --web-pin {presented}"
                ),
            ));
        }
        WebTrust::Pin(_) => ok("TLS", format!("certificate matches the pin {presented}")),
        WebTrust::Insecure => ok(
            "TLS",
            format!("certificate SHA-256 {presented} (not checked: --insecure)"),
        ),
        _ => ok("TLS", format!("certificate SHA-256 {presented}")),
    }

    // Discovery.
    let id = match IdentityFile::load(identity) {
        Ok(id) => id,
        Err(e) => {
            return Err(fail(
                "identity",
                e,
                "give the identity file from `pctl auth sign` or `psh login` with -i",
            ));
        }
    };
    let pong = match postern_dial::web::ping(web, &trust).await {
        Ok(p) => p,
        Err(e) => {
            return Err(fail(
                "discovery",
                e,
                "check --web-pin / --web-ca; the address must be the proxy's web listener",
            ));
        }
    };
    if !pong.cluster_names.contains(&id.cluster) {
        return Err(fail(
            "discovery",
            format!(
                "the proxy routes clusters {:?}, not '{}' (your identity's)",
                pong.cluster_names, id.cluster
            ),
            "add the cluster's CAs to the proxy's [[clusters]], or use this cluster's proxy",
        ));
    }
    ok(
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
        Ok(Ok(_)) => ok("tunnel address", format!("{tunnel} answers")),
        Ok(Err(e)) => {
            return Err(fail(
                "tunnel address",
                format!("the proxy advertises {tunnel} for SSH, but it does not answer: {e}"),
                "set tunnel_public_addr in proxy.toml to an address clients reach (or POSTERN_TUNNEL_ADDR here)",
            ));
        }
        Err(_) => {
            return Err(fail(
                "tunnel address",
                format!("{tunnel} does not answer within {STEP:?}"),
                "a firewall drops it: open the tunnel port (3024 by default)",
            ));
        }
    }

    // The identity's certificate.
    let now = crate::output::now();
    if id.expires <= now {
        return Err(fail(
            "certificate",
            format!(
                "the identity of '{}' expired {}",
                id.user,
                human_time(id.expires)
            ),
            "run psh login, or pctl auth sign, again",
        ));
    }
    ok(
        "certificate",
        format!(
            "'{}' of cluster '{}', expires {}",
            id.user,
            id.cluster,
            human_time(id.expires)
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
            return Err(fail(step, text, fix));
        }
        Err(_) => bail!("✗ Auth API: no answer within {:?}", STEP * 3),
    };
    ok(
        "SSH",
        "the proxy's host certificate is signed by the cluster's host CA; logged in",
    );
    match client.ping(PingRequest {}).await {
        Ok(p) => ok(
            "Auth API",
            format!(
                "through the tunnel: cluster '{}', server {}, you are '{}'",
                p.cluster, p.server_version, p.user
            ),
        ),
        Err(e) => {
            return Err(fail(
                "Auth API",
                e,
                "the Auth server answered with an error: see its log",
            ));
        }
    }
    Ok(())
}
