//! The CA rotation phase machine on a real SQLite backend: refusals say why, automatic mode
//! walks the phases by the grace period, rollback signs with the old key again and standby then
//! drops the new one, a fresh load (an Auth
//! restart) resumes the phase, and the user CA rotates through the same code as the host CA.

use postern_auth::authority::Authorities;
use postern_auth::rotation::{self, CaKind, Phase, RotateRequest, RotationError};
use postern_auth::storage::{Backend, SqliteBackend};
use postern_dial::mint;
use russh::keys::ssh_key::Certificate;

/// A fresh SQLite backend in its own directory (removed when the guard drops).
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn backend() -> (Dir, SqliteBackend) {
    let dir = std::env::temp_dir().join(format!("postern-rotation-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let b = SqliteBackend::open(&dir.join("auth.db")).unwrap();
    (Dir(dir), b)
}

fn manual(kind: CaKind, phase: &str) -> RotateRequest {
    RotateRequest {
        kind,
        phase: Some(phase.into()),
        manual: true,
        grace_secs: 0,
    }
}

fn refused(r: Result<rotation::RotationState, RotationError>) -> String {
    match r {
        Err(RotationError::Refused(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn agent_cert_signer(a: &Authorities) -> russh::keys::ssh_key::public::KeyData {
    let key = mint::generate_key();
    let issued = a
        .issue_service_agent(key.public_key(), "web-1", 60)
        .unwrap();
    Certificate::from_openssh(&issued.ssh_cert)
        .unwrap()
        .signature_key()
        .clone()
}

#[test]
fn phases_out_of_order_rollback_from_standby_and_bad_requests_are_refused() {
    let (_d, b) = backend();
    let a = Authorities::load_or_create(&b, Some("rot")).unwrap();
    let m = refused(rotation::rotate(
        &b,
        &a,
        &manual(CaKind::Host, "update_clients"),
        100,
    ));
    assert!(m.contains("the next phase is init"), "{m}");
    let m = refused(rotation::rotate(
        &b,
        &a,
        &manual(CaKind::Host, "rollback"),
        100,
    ));
    assert!(
        m.contains("no host CA rotation to roll back: it is in standby"),
        "{m}"
    );
    let m = refused(rotation::rotate(
        &b,
        &a,
        &RotateRequest {
            kind: CaKind::Host,
            phase: None,
            manual: false,
            grace_secs: 1,
        },
        100,
    ));
    assert!(m.contains("--grace-period must be at least 3s"), "{m}");
    assert_eq!(CaKind::parse("tls").unwrap(), CaKind::Tls);
    let e = CaKind::parse("db").unwrap_err().to_string();
    assert!(e.contains("give host, user or tls"), "{e}");
    rotation::rotate(&b, &a, &manual(CaKind::Host, "init"), 100).unwrap();
    let m = refused(rotation::rotate(&b, &a, &manual(CaKind::Host, "init"), 101));
    assert!(m.contains("already in phase init"), "{m}");
    let m = refused(rotation::rotate(
        &b,
        &a,
        &manual(CaKind::Host, "standby"),
        101,
    ));
    assert!(m.contains("the next phase is update_clients"), "{m}");
}

#[test]
fn automatic_rotation_walks_the_phases_and_drops_the_old_key() {
    let (_d, b) = backend();
    let a = Authorities::load_or_create(&b, Some("rot")).unwrap();
    let old_pin = a.host_ca_pin();
    let old_signer = agent_cert_signer(&a);
    let s = rotation::rotate(
        &b,
        &a,
        &RotateRequest {
            kind: CaKind::Host,
            phase: None,
            manual: false,
            grace_secs: 30,
        },
        1000,
    )
    .unwrap();
    assert_eq!(s.phase, Phase::Init);
    assert_eq!(a.host_ca_lines().len(), 2, "init: both keys trusted");
    assert_eq!(
        agent_cert_signer(&a),
        old_signer,
        "init: the old key still signs"
    );
    let phase = |now| {
        rotation::advance_due(&b, &a, CaKind::Host, now).unwrap();
        rotation::status(&b, &a, CaKind::Host).unwrap().phase
    };
    assert_eq!(phase(1009), Phase::Init);
    assert_eq!(phase(1010), Phase::UpdateClients);
    assert_ne!(
        agent_cert_signer(&a),
        old_signer,
        "update_clients: the new key signs"
    );
    assert_ne!(a.host_ca_pin(), old_pin);
    assert_eq!(phase(1020), Phase::UpdateServers);
    assert_eq!(a.host_ca_lines().len(), 2);
    assert_eq!(phase(1030), Phase::Standby);
    assert_eq!(a.host_ca_lines().len(), 1, "standby: the old key is gone");
    let old_fp = russh::keys::ssh_key::PublicKey::new(old_signer, "")
        .fingerprint(russh::keys::HashAlg::Sha256);
    assert!(
        !a.trusted_fingerprints(CaKind::Host).contains(&old_fp),
        "the old key is no longer trusted"
    );
    assert_eq!(
        rotation::status(&b, &a, CaKind::Host).unwrap().last_rotated,
        Some(1030)
    );
}

#[test]
fn rollback_drops_the_new_key_and_a_restart_resumes_the_phase() {
    let (_d, b) = backend();
    let a = Authorities::load_or_create(&b, Some("rot")).unwrap();
    let old = a.host_ca_line();
    rotation::rotate(&b, &a, &manual(CaKind::Host, "init"), 100).unwrap();
    rotation::rotate(&b, &a, &manual(CaKind::Host, "update_clients"), 101).unwrap();
    let new = a.host_ca_line();
    assert_ne!(new, old);
    // A restart: a fresh load of the same backend resumes update_clients with the same keys.
    let restarted = Authorities::load_or_create(&b, Some("rot")).unwrap();
    assert_eq!(
        restarted.host_ca_line(),
        old,
        "before resume: the stored CA"
    );
    rotation::resume(&b, &restarted).unwrap();
    assert_eq!(restarted.host_ca_line(), new);
    assert_eq!(restarted.host_ca_lines(), a.host_ca_lines());
    // Rollback: the old key signs again; both stay trusted while holders of new-key
    // certificates renew back.
    let s = rotation::rotate(&b, &restarted, &manual(CaKind::Host, "rollback"), 102).unwrap();
    assert_eq!(s.phase, Phase::Rollback);
    assert_eq!(restarted.host_ca_line(), old);
    assert_eq!(restarted.host_ca_lines().len(), 2);
    assert!(restarted.host_ca_lines().contains(&new));
    // Standby drops the new key: the old one is the only one trusted.
    let s = rotation::rotate(&b, &restarted, &manual(CaKind::Host, "standby"), 103).unwrap();
    assert_eq!(s.phase, Phase::Standby);
    assert_eq!(s.last_rotated, None, "a rollback completes nothing");
    assert_eq!(restarted.host_ca_lines(), vec![old.clone()]);
    assert_eq!(restarted.host_ca_line(), old);
    // The other server's ticker applies the stored state.
    rotation::advance_due(&b, &a, CaKind::Host, 104).unwrap();
    assert_eq!(a.host_ca_lines(), vec![old]);
}

#[test]
fn the_user_ca_rotates_through_the_same_phases() {
    let (_d, b) = backend();
    let a = Authorities::load_or_create(&b, Some("rot")).unwrap();
    let host = a.host_ca_lines();
    let old = a.user_ca_line();
    for phase in ["init", "update_clients"] {
        rotation::rotate(&b, &a, &manual(CaKind::User, phase), 100).unwrap();
    }
    assert_eq!(a.user_ca_lines().len(), 2);
    let key = mint::generate_key();
    let issued = a
        .issue_user("alice", key.public_key(), 60, &["access".into()])
        .unwrap();
    let cert = Certificate::from_openssh(&issued.ssh_cert).unwrap();
    let new = russh::keys::ssh_key::PublicKey::from_openssh(&a.user_ca_line()).unwrap();
    assert_eq!(
        cert.signature_key(),
        new.key_data(),
        "signed by the new user CA"
    );
    for phase in ["update_servers", "standby"] {
        rotation::rotate(&b, &a, &manual(CaKind::User, phase), 101).unwrap();
    }
    assert_eq!(a.user_ca_lines().len(), 1);
    assert_ne!(a.user_ca_line(), old);
    assert_eq!(a.host_ca_lines(), host, "the host CA is untouched");
    // The stored row is not in the policy change feed (it holds private keys).
    let (_, changes) = b.policy_snapshot().unwrap();
    assert!(changes.iter().all(|c| c.kind != "ca_rotation"));
    assert!(
        b.changes_since(0, 1000)
            .unwrap()
            .changes
            .iter()
            .all(|c| c.kind != "ca_rotation")
    );
}

/// The TLS CA through the same machine: which CA signs client certificates and which signs the
/// server's changes by phase; a restart resumes the phase with the same CAs; completing keeps
/// only the new CA (the old one as `retired`); a second rotation works from there.
#[test]
fn the_tls_ca_rotates_through_the_same_phases_and_resumes_after_a_restart() {
    let (_d, b) = backend();
    let a = Authorities::load_or_create(&b, Some("rot")).unwrap();
    let old = a.tls_ca_pems();
    assert_eq!(old.len(), 1);
    let s = rotation::rotate(&b, &a, &manual(CaKind::Tls, "init"), 100).unwrap();
    assert_eq!(s.phase, Phase::Init);
    let both = a.tls_ca_pems();
    assert_eq!(
        (both.len(), &both[0]),
        (2, &old[0]),
        "the old CA still signs clients"
    );
    let new = both[1].clone();
    rotation::rotate(&b, &a, &manual(CaKind::Tls, "update_clients"), 101).unwrap();
    assert_eq!(a.tls_ca_pems(), vec![new.clone(), old[0].clone()]);
    assert_eq!(a.tls_client_roots().unwrap().len(), 2);

    // A restart in update_clients resumes it with the same two CAs.
    let restarted = Authorities::load_or_create(&b, Some("rot")).unwrap();
    assert_eq!(restarted.tls_ca_pems(), old, "before resume: the stored CA");
    rotation::resume(&b, &restarted).unwrap();
    assert_eq!(restarted.tls_ca_pems(), vec![new.clone(), old[0].clone()]);
    assert_eq!(restarted.tls_keys().phase, Phase::UpdateClients);

    rotation::rotate(&b, &restarted, &manual(CaKind::Tls, "update_servers"), 102).unwrap();
    let s = rotation::rotate(&b, &restarted, &manual(CaKind::Tls, "standby"), 103).unwrap();
    assert_eq!(s.last_rotated, Some(103));
    assert_eq!(restarted.tls_ca_pems(), vec![new.clone()]);
    assert_eq!(
        restarted.tls_keys().retired.as_deref(),
        Some(old[0].as_str())
    );
    assert!(restarted.tls_retired_root().unwrap().is_some());

    // Another restart loads the new CA as the current one; a second rotation starts from it.
    let again = Authorities::load_or_create(&b, Some("rot")).unwrap();
    rotation::resume(&b, &again).unwrap();
    assert_eq!(again.tls_ca_pems(), vec![new.clone()]);
    rotation::rotate(&b, &again, &manual(CaKind::Tls, "init"), 200).unwrap();
    let r = again.tls_ca_pems();
    assert_eq!((r.len(), &r[0]), (2, &new));
    rotation::rotate(&b, &again, &manual(CaKind::Tls, "rollback"), 201).unwrap();
    assert_eq!(again.tls_ca_pems(), vec![new]);
    assert_eq!(
        again.tls_keys().retired.as_deref(),
        Some(r[1].as_str()),
        "the dropped CA"
    );
}
