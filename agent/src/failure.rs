//! Failing well: the agent checks its own certificate before it dials, and tells permanent
//! failures (nothing changes until an operator acts: back off to minutes, say what to do, once)
//! from transient ones (the network, a proxy restarting: keep the fast schedule).

use postern_dial::DialError;
use russh::keys::ssh_key::Certificate;

/// What a failed attempt means for the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Retrying soon will fail the same way: wait minutes, and tell the operator what to do.
    Permanent(String),
    /// The network or a restarting proxy: retry on the fast schedule.
    Transient(String),
}

impl Failure {
    /// The message, whichever kind.
    pub fn message(&self) -> &str {
        match self {
            Failure::Permanent(m) | Failure::Transient(m) => m,
        }
    }
}

/// A unix time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Checks the agent's own certificate at `now` (unix seconds): an expired or not-yet-valid
/// certificate is a permanent failure naming its dates and what to do.
pub fn check_own_cert(cert: &Certificate, cert_path: &str, now: u64) -> Result<(), Failure> {
    let (after, before) = (cert.valid_after(), cert.valid_before());
    let window = format!("valid from {} until {}", utc(after), utc(before));
    if now >= before {
        return Err(Failure::Permanent(format!(
            "this agent's certificate {cert_path} expired at {} ({window}; now {}): get a new one \
             (a fresh join token in join_token_file with the certificate removed, or pctl auth \
             sign --host) and restart the agent",
            utc(before),
            utc(now)
        )));
    }
    if now < after {
        return Err(Failure::Permanent(format!(
            "this agent's certificate {cert_path} is not valid yet ({window}; now {}): check this \
             machine's clock (or the Auth server's)",
            utc(now)
        )));
    }
    Ok(())
}

/// Classifies a failed attempt. A refused certificate, an untrusted proxy, an unknown cluster
/// or a refusal in words (a lock, a revoked agent) is permanent; a connection, TLS or SSH
/// failure or a timeout is transient.
pub fn classify(e: &DialError, cluster: &str) -> Failure {
    match e {
        DialError::AuthRefused { addr, login } => Failure::Permanent(format!(
            "proxy {addr} refused this agent's certificate for login '{login}'. The certificate \
             is within its validity window, so: is cluster '{cluster}' served by this proxy with \
             the host CA that signed it (pctl auth export --type=host), and is the certificate \
             not revoked? Fix the proxy's [[clusters]] host_ca or get a new certificate"
        )),
        DialError::Refused { addr, reason } => {
            Failure::Permanent(format!("proxy {addr} refused this agent: {reason}"))
        }
        DialError::HostVerification { .. } => Failure::Permanent(format!(
            "{e}: check proxy_host_ca (pctl auth export --type=host) or proxy_host_keys"
        )),
        DialError::Config(_) => Failure::Permanent(e.to_string()),
        DialError::NotAPostern { .. }
        | DialError::Connect { .. }
        | DialError::Tls { .. }
        | DialError::Ssh { .. }
        | DialError::Quic { .. }
        | DialError::Timeout { .. } => Failure::Transient(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_767_225_599), "2025-12-31 23:59:59 UTC");
    }

    fn cert(after: u64, before: u64) -> Certificate {
        let ca = postern_dial::mint::generate_key();
        let key = postern_dial::mint::generate_key();
        let spec = postern_dial::mint::CertSpec::ServiceAgent {
            host_id: "web".into(),
            cluster: "c".into(),
        };
        postern_dial::mint::issue(&ca, key.public_key(), &spec, after, before).unwrap()
    }

    #[test]
    fn an_expired_or_future_certificate_is_permanent_with_its_dates() {
        let now = 1_767_225_600; // 2026-01-01 00:00:00 UTC
        let expired = cert(now - 7200, now - 3600);
        let Err(Failure::Permanent(m)) = check_own_cert(&expired, "k-cert.pub", now) else {
            panic!("an expired certificate is a permanent failure");
        };
        assert!(m.contains("expired at 2025-12-31 23:00:00 UTC"), "{m}");
        assert!(m.contains("valid from 2025-12-31 22:00:00 UTC"), "{m}");
        assert!(
            m.contains("k-cert.pub") && m.contains("join_token_file"),
            "{m}"
        );
        let future = cert(now + 3600, now + 7200);
        let Err(Failure::Permanent(m)) = check_own_cert(&future, "k-cert.pub", now) else {
            panic!("a not-yet-valid certificate is a permanent failure");
        };
        assert!(m.contains("not valid yet") && m.contains("clock"), "{m}");
        assert!(check_own_cert(&cert(now - 10, now + 10), "k", now).is_ok());
    }

    #[test]
    fn refusals_are_permanent_and_network_errors_transient() {
        let refused = DialError::AuthRefused {
            addr: "p:3024".into(),
            login: "@agent/a.c".into(),
        };
        assert!(matches!(classify(&refused, "c"), Failure::Permanent(_)));
        let net = DialError::Connect {
            addr: "p:3024".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert!(matches!(classify(&net, "c"), Failure::Transient(_)));
    }
}
