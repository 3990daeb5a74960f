//! A proxy's renewals. Its Auth identity (the mTLS identity file of `clusters[].policy`, a user
//! holding the preset role `proxy`) is renewed over the API it already uses: `GenerateUserCerts`
//! for its own user, which such a caller may ask without `user_cert: create` (see
//! [`may_renew_own`]).
//!
//! Its host certificate renewal (`POST /webapi/renew` with a proxy certificate, relayed
//! like an agent's): the certificate presented must be a proxy host certificate (key id
//! `proxy <names>`, no agent role), valid now and signed by a trusted host CA key (during a
//! rotation, either); the answer is a certificate for the same key and the same names, from the
//! current signing key, valid `ttl` seconds. Like an agent's renewal it carries no secret: the
//! certificate is useless without its private key.

use postern_dial::mint::now_unix;
use russh::keys::ssh_key::{Certificate, PublicKey};
use tunnel_proto::certs::check_proxy_cert;
use tunnel_proto::login::LoginResponse;
use tunnel_proto::names::EXT_ROLE;

use crate::rotation::CaKind;
use crate::service::State;

/// The preset role a proxy's Auth identity holds.
pub const PROXY_ROLE: &str = "proxy";

/// Whether a caller authenticated as `caller` with `roles` may have `GenerateUserCerts` issue
/// certificates for `user` without `user_cert: create`: a proxy's Auth identity renewing itself.
/// Authenticated by its client certificate (the TLS handshake proves its key); the lifetime is
/// still capped by its roles' `max_session_ttl`, and a locked or deleted user is refused at
/// authentication.
pub fn may_renew_own(caller: &str, roles: &[postern_api::proto::Role], user: &str) -> bool {
    caller == user && roles.iter().any(|r| r.name == PROXY_ROLE)
}

/// Whether `cert` is a proxy's host certificate (what [`renew`] answers).
pub fn is_proxy_cert(cert: &Certificate) -> bool {
    cert.cert_type().is_host()
        && cert.key_id().starts_with("proxy ")
        && !cert.extensions().contains_key(EXT_ROLE)
}

/// Renews a proxy's host certificate for the same key and names.
pub fn renew(state: &State, cert: &Certificate, ttl: u64) -> LoginResponse {
    let a = &state.authorities;
    let names: Vec<String> = cert.valid_principals().to_vec();
    let Some(first) = names.first() else {
        return LoginResponse::failed(403, "renewal refused: the proxy certificate names no host");
    };
    let trusted = a.trusted_fingerprints(CaKind::Host);
    if let Err(e) = check_proxy_cert(cert, first, now_unix(), &trusted) {
        return LoginResponse::failed(
            403,
            format!(
                "renewal refused: {e}; issue the proxy a new certificate (pctl auth sign --proxy-names=…)"
            ),
        );
    }
    let key = PublicKey::from(cert.public_key().clone());
    let issued = match a.issue_host(&key, "", &names, ttl) {
        Ok(i) => i,
        Err(e) => return LoginResponse::failed(500, e.to_string()),
    };
    LoginResponse {
        status: 200,
        cluster: a.cluster.clone(),
        ssh_cert: issued.ssh_cert,
        ssh_host_cas: a.host_ca_lines(),
        expires: issued.expires,
        ..Default::default()
    }
}
