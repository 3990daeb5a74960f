//! A cluster created with an Ed25519 TLS CA (as Postern made them before ECDSA P-256) keeps
//! working after the Auth server migrates it at start: the admin identity issued by the old CA
//! (its client certificate, and the old CA as its only trust anchor) still calls the API; new
//! certificates come from a P-256 CA; a second start does not migrate again.

mod support;

use postern_api::identity::IdentityFile;
use postern_auth::storage::{Backend, SqliteBackend};
use postern_dial::mint::{self, CertSpec};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519,
};
use russh::keys::ssh_key::LineEnding;
use support::*;

fn ca_params(cluster: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Postern TLS CA of {cluster}"));
    dn.push(DnType::OrganizationName, cluster);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// An Ed25519 subject key as rcgen signs for.
struct Ed25519Spki(Vec<u8>);

impl rcgen::PublicKeyData for Ed25519Spki {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ED25519
    }
}

fn time(secs: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap()
}

/// Writes the state the earlier Auth server created (an Ed25519 TLS CA) and an admin identity
/// that CA issued; returns the old CA's PEM.
fn old_cluster(data: &std::path::Path, cluster: &str, ttl: u64) -> String {
    std::fs::create_dir_all(data).unwrap();
    std::fs::set_permissions(data, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let backend = SqliteBackend::open(&data.join("auth.db")).unwrap();
    let now = mint::now_unix();
    let ssh = |k: &russh::keys::PrivateKey| k.to_openssh(LineEnding::LF).unwrap().to_string();
    let (user_ca, host_ca) = (mint::generate_key(), mint::generate_key());
    let tls_key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut p = ca_params(cluster);
    p.not_before = time(now - 60);
    p.not_after = time(now + 10 * 365 * 86400);
    let ca_pem = p.self_signed(&tls_key).unwrap().pem();
    assert!(
        backend
            .init_meta(
                "cluster_name",
                &[
                    ("cluster_name", cluster.as_bytes().to_vec()),
                    ("ssh_user_ca", ssh(&user_ca).into_bytes()),
                    ("ssh_host_ca", ssh(&host_ca).into_bytes()),
                    ("tls_ca_key", tls_key.serialize_pem().into_bytes()),
                    ("tls_ca_cert", ca_pem.clone().into_bytes()),
                ],
            )
            .unwrap()
    );

    // The admin identity the old server wrote: both certificates over one Ed25519 key.
    let key = mint::generate_key();
    let expires = now + ttl;
    let ssh_cert = mint::issue(
        &user_ca,
        key.public_key(),
        &CertSpec::UserWithRoles {
            user: postern_auth::service::ADMIN_USER.into(),
            roles: vec![],
            request: None,
        },
        now - 60,
        expires,
    )
    .unwrap();
    let mut c = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, postern_auth::service::ADMIN_USER);
    dn.push(DnType::OrganizationName, cluster);
    c.distinguished_name = dn;
    c.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    c.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    c.not_before = time(now - 60);
    c.not_after = time(expires);
    c.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        postern_auth::authority::ROLES_OID,
        vec![0x0c, 0],
    )];
    let spki = Ed25519Spki(key.public_key().key_data().ed25519().unwrap().0.to_vec());
    let tls = c
        .signed_by(&spki, &Issuer::new(ca_params(cluster), &tls_key))
        .unwrap();
    backend
        .add_cert(
            &postern_auth::authority::fingerprint(tls.der()),
            postern_auth::service::ADMIN_USER,
            expires,
        )
        .unwrap();
    IdentityFile {
        version: postern_api::identity::IDENTITY_VERSION,
        cluster: cluster.into(),
        user: postern_auth::service::ADMIN_USER.into(),
        expires,
        private_key: ssh(&key),
        ssh_cert: ssh_cert.to_openssh().unwrap(),
        tls_cert: tls.pem(),
        tls_cas: vec![ca_pem.clone()],
        ssh_host_cas: vec![host_ca.public_key().to_openssh().unwrap()],
    }
    .save(&data.join("admin.identity"))
    .unwrap();
    ca_pem
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ed25519_tls_ca_is_migrated_and_old_identities_keep_working() {
    let d = TempDir::new("tlsmig");
    let cfg = config(&d.0, "oldtls");
    let old_ca = old_cluster(&cfg.data_dir, "oldtls", cfg.admin_identity_ttl_secs);
    let old_admin = IdentityFile::load(&cfg.data_dir.join("admin.identity")).unwrap();

    let running = start_with(cfg.clone()).await;
    // The old admin identity is reused (still valid) and calls the API: its client certificate
    // chains to the old CA, and it verifies the server through the cross certificate.
    let admin_now = running.admin_identity();
    assert_eq!(
        admin_now.tls_cert, old_admin.tls_cert,
        "old admin identity kept"
    );
    let old_client = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        postern_client::auth::AuthClient::connect_direct(&running.addr.to_string(), &old_admin),
    )
    .await
    .unwrap()
    .expect("an identity of the old CA connects after the migration");
    old_client.ping(Default::default()).await.unwrap();
    old_client.create_role(seed_role()).await.unwrap();

    // New certificates come from the new P-256 CA and trust only it.
    let new = identity_for(&old_client, "bob", &["api-role"], 3600).await;
    assert_eq!(new.tls_cas.len(), 1);
    assert_ne!(new.tls_cas[0], old_ca, "a new TLS CA was made");
    let new_ca = rustls_pki_types::pem::PemObject::from_pem_slice(new.tls_cas[0].as_bytes())
        .map(|d: rustls_pki_types::CertificateDer<'static>| d.to_vec())
        .unwrap();
    // id-ecPublicKey and prime256v1 in the CA's key.
    let has = |needle: &[u8]| new_ca.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01])
            && has(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
        "the new TLS CA is ECDSA P-256"
    );
    let bob = postern_client::auth::AuthClient::connect_direct(&running.addr.to_string(), &new)
        .await
        .unwrap();
    assert_eq!(bob.get_role("api-role").await.unwrap().name, "api-role");
    running.stop().await;

    // A second start keeps the migrated CA.
    let again = start_with(cfg).await;
    let bob = postern_client::auth::AuthClient::connect_direct(&again.addr.to_string(), &new)
        .await
        .unwrap();
    assert_eq!(bob.get_role("api-role").await.unwrap().name, "api-role");
    let old_client =
        postern_client::auth::AuthClient::connect_direct(&again.addr.to_string(), &old_admin)
            .await
            .unwrap();
    old_client.ping(Default::default()).await.unwrap();
    again.stop().await;
}
