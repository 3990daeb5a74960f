//! Starting the Auth server: first start and restart, refusals (permissions, root, cluster
//! name), and a SIGKILL in the middle of writes (the real binary).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use postern_api::identity::IdentityFile;
use postern_auth::AuthError;
use postern_auth::server::{files, prepare, running_as_root};
use postern_client::auth::AuthClient;
use support::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn first_start_creates_the_cluster_and_restarts_reuse_it() {
    let dir = TempDir::new("restart");
    let cfg = config(&dir.0, "keep");
    let srv = start_with(cfg.clone()).await;
    let admin = srv.admin().await;
    admin.create_role(seed_role()).await.unwrap();
    let id = identity_for(&admin, "api-user", &["api-role"], 0).await;
    let cas = srv.admin_identity().tls_cas;
    srv.stop().await;

    let data = dir.0.join("data");
    assert_eq!(mode(&data), 0o700);
    for f in [files::DB, files::ADMIN_IDENTITY, files::AUDIT_LOG] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }

    // Restart without naming the cluster: it is read from the database.
    let mut again = cfg.clone();
    again.cluster = None;
    let srv = start_with(again).await;
    assert_eq!(
        srv.admin_identity().tls_cas,
        cas,
        "the TLS CA survives a restart"
    );
    let api = AuthClient::connect_direct(&srv.addr.to_string(), &id)
        .await
        .unwrap();
    assert_eq!(api.get_role("api-role").await.unwrap().name, "api-role");
    srv.stop().await;

    // Renaming is refused.
    let mut renamed = cfg;
    renamed.cluster = Some("other".into());
    let e = prepare(&renamed).err().expect("refused");
    assert!(e.to_string().contains("belongs to cluster 'keep'"), "{e}");
}

#[test]
fn the_first_start_needs_a_cluster_name() {
    let dir = TempDir::new("noname");
    let mut cfg = config(&dir.0, "x");
    cfg.cluster = None;
    let e = prepare(&cfg).err().expect("refused");
    assert!(e.to_string().contains("--cluster"), "{e}");
}

#[tokio::test]
async fn loose_permissions_are_refused_naming_the_file() {
    let dir = TempDir::new("perms");
    let cfg = config(&dir.0, "perms");
    start_with(cfg.clone()).await.stop().await;
    let data = dir.0.join("data");
    for f in [files::DB, files::ADMIN_IDENTITY, files::AUDIT_LOG] {
        let p = data.join(f);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        match prepare(&cfg) {
            Err(AuthError::LoosePermissions { path, mode, .. }) => {
                assert_eq!(path, p);
                assert_eq!(mode, 0o644);
            }
            other => panic!("{f}: expected a refusal, got {:?}", other.err()),
        }
        let e = prepare(&cfg).err().unwrap().to_string();
        assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(matches!(prepare(&cfg), Err(AuthError::LoosePermissions { path, .. }) if path == data));
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(prepare(&cfg).is_ok());
}

#[test]
fn root_is_refused_without_allow_root() {
    let dir = TempDir::new("root");
    let mut cfg = config(&dir.0, "root");
    cfg.allow_root = false;
    let r = prepare(&cfg);
    if running_as_root() {
        let e = r.err().expect("root refused");
        assert!(matches!(e, AuthError::Root));
        assert!(e.to_string().contains("--allow-root"), "{e}");
    } else {
        assert!(r.is_ok());
    }
}

/// SIGKILL while 8 writers upsert roles: after a restart every acknowledged write is there.
#[tokio::test]
async fn killed_mid_write_loses_no_acknowledged_write() {
    let dir = TempDir::new("kill");
    let data = dir.0.join("data");
    let spawn = || {
        let _ = std::fs::remove_file(data.join(files::ADDR));
        std::process::Command::new(env!("CARGO_BIN_EXE_postern-auth"))
            .args([
                "start",
                "--listen",
                "127.0.0.1:0",
                "--cluster",
                "kill",
                "--allow-root",
                "--data-dir",
            ])
            .arg(&data)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let wait_addr = || async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(a) = std::fs::read_to_string(data.join(files::ADDR)) {
                return a.trim().to_string();
            }
            assert!(Instant::now() < deadline, "auth server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut child = spawn();
    let addr = wait_addr().await;
    let admin_id = IdentityFile::load(&data.join(files::ADMIN_IDENTITY)).unwrap();
    let admin = AuthClient::connect_direct(&addr, &admin_id).await.unwrap();

    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (c, acked) = (admin.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for n in 0..100_000 {
                let mut r = seed_role();
                r.name = format!("r{w}-{n}");
                match c.upsert_role(r.clone()).await {
                    Ok(_) => acked.lock().unwrap().push(r.name),
                    Err(_) => return,
                }
            }
        }));
    }
    // Let some writes land, then kill without warning.
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 200 {
        assert!(Instant::now() < deadline, "writes too slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let mut child = spawn();
    let addr = wait_addr().await;
    let admin_id = IdentityFile::load(&data.join(files::ADMIN_IDENTITY)).unwrap();
    let admin = AuthClient::connect_direct(&addr, &admin_id).await.unwrap();
    let stored: std::collections::HashSet<String> = admin
        .list_roles(postern_api::proto::ListRolesRequest {})
        .await
        .unwrap()
        .roles
        .into_iter()
        .map(|r| r.name)
        .collect();
    let lost: Vec<_> = acked.iter().filter(|n| !stored.contains(*n)).collect();
    eprintln!(
        "{} writes acknowledged before SIGKILL, {} stored after restart",
        acked.len(),
        stored.len()
    );
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Whether `id` still opens the API: a call, not just a handshake, since revocation is checked
/// per call.
async fn works(addr: std::net::SocketAddr, id: &IdentityFile) -> bool {
    match AuthClient::connect_direct(&addr.to_string(), id).await {
        Ok(c) => c.get_role("editor").await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn at_most_one_admin_identity_is_valid_and_none_is_issued_before_the_bind() {
    let dir = TempDir::new("admin");
    let mut cfg = config(&dir.0, "admin");
    let path = cfg.data_dir.join(files::ADMIN_IDENTITY);

    // A start that never binds (a busy port: `prepare` ran, the bind failed) issues nothing.
    prepare(&cfg).unwrap();
    assert!(
        !path.exists(),
        "an admin identity was issued before the listener was bound"
    );

    // First start: a 3-hour identity.
    cfg.admin_identity_ttl_secs = 3 * 3600;
    let srv = start_with(cfg.clone()).await;
    let first = srv.admin_identity();
    assert!(works(srv.addr, &first).await);
    srv.stop().await;

    // A restart with the same lifetime keeps it (more than half of it is left).
    let srv = start_with(cfg.clone()).await;
    assert_eq!(srv.admin_identity().tls_cert, first.tls_cert, "reused");
    assert!(works(srv.addr, &first).await);
    srv.stop().await;

    // A restart that wants a 30-day identity replaces it and revokes the old one.
    cfg.admin_identity_ttl_secs = 30 * 24 * 3600;
    let srv = start_with(cfg.clone()).await;
    let second = srv.admin_identity();
    assert_ne!(second.tls_cert, first.tls_cert, "replaced");
    assert!(works(srv.addr, &second).await);
    assert!(
        !works(srv.addr, &first).await,
        "the replaced admin identity still works: two are valid at once"
    );
    srv.stop().await;
}
