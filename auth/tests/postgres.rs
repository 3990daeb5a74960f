//! The PostgreSQL backend against a real PostgreSQL server (Debian's package, started here in a
//! temp dir on a loopback port): two Auth servers on one database, conditional writes with one
//! winner across both, the policy watch on either server seeing both servers' writes, the shared
//! CAs, a database restart under load, and a database that is down when the Auth server starts.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_api::proto::*;
use postern_auth::server::{Prepared, prepare};
use postern_auth::storage::{Backend, Condition, PostgresBackend, PostgresOptions, StorageError};
use postern_client::auth::{AuthClient, AuthClientError};
use support::postgres::Postgres;
use support::*;
use tokio_util::sync::CancellationToken;

async fn serve(p: Prepared) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let data_dir = p.config.data_dir.clone();
    let cluster = p.cluster().to_string();
    let task = tokio::spawn(postern_auth::server::start(listener, p, shutdown.clone()).unwrap());
    Running {
        addr,
        data_dir,
        cluster,
        shutdown,
        task,
    }
}

async fn prepare_async(cfg: postern_auth::AuthConfig) -> Prepared {
    tokio::task::spawn_blocking(move || prepare(&cfg))
        .await
        .unwrap()
        .unwrap()
}

fn role(name: &str, verb: &str) -> Role {
    let mut r = seed_role();
    r.name = name.into();
    r.spec.as_mut().unwrap().allow.as_mut().unwrap().rules[0].verbs = vec![verb.into()];
    r
}

async fn next_change(s: &mut tonic::Streaming<PolicyEvent>) -> PolicyEvent {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .expect("stream open");
        if !e.kind.is_empty() && !e.snapshot {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_auth_servers_share_one_database() {
    let pg = Postgres::start();
    let (da, db) = (TempDir::new("pg-a"), TempDir::new("pg-b"));
    // Two first starts at once: one stores its CAs, both end up serving the same ones.
    let (pa, pb) = tokio::join!(
        prepare_async(pg.auth_config(&da.0, "ha")),
        prepare_async(pg.auth_config(&db.0, "ha"))
    );
    assert_eq!(
        pa.state.authorities.tls_ca_pems(),
        pb.state.authorities.tls_ca_pems(),
        "one TLS CA for the cluster"
    );
    // Started one after the other; B's admin identity (issued by B) is used on both servers.
    let a = serve(pa).await;
    let b = serve(pb).await;
    let id = b.admin_identity();
    let on_a = AuthClient::connect_direct(&a.addr.to_string(), &id)
        .await
        .unwrap();
    let on_b = AuthClient::connect_direct(&b.addr.to_string(), &id)
        .await
        .unwrap();

    // A write on one is read on the other.
    on_a.create_role(role("from-a", "read")).await.unwrap();
    assert_eq!(on_b.get_role("from-a").await.unwrap().name, "from-a");
    let user = identity_for(&on_b, "u1", &["from-a"], 0).await;
    let u_on_a = AuthClient::connect_direct(&a.addr.to_string(), &user)
        .await
        .unwrap();
    assert_eq!(
        u_on_a.ping(PingRequest {}).await.unwrap().user,
        "u1",
        "a certificate issued by B works on A"
    );

    // The policy watch on each server sees both servers' writes, in one order.
    let proxy = identity_for(&on_a, "proxy-1", &["proxy"], 0).await;
    let mut streams = Vec::new();
    for srv in [&a, &b] {
        let c = AuthClient::connect_direct(&srv.addr.to_string(), &proxy)
            .await
            .unwrap();
        let mut s = c
            .rpc()
            .watch_policy(WatchPolicyRequest { from_revision: 0 })
            .await
            .unwrap()
            .into_inner();
        // Writes start once both snapshots are taken.
        loop {
            let e = tokio::time::timeout(Duration::from_secs(5), s.message())
                .await
                .expect("snapshot within 5 s")
                .unwrap()
                .unwrap();
            if e.snapshot_end {
                break;
            }
        }
        streams.push((c, s));
    }
    on_a.create_role(role("w-a", "read")).await.unwrap();
    on_b.create_role(role("w-b", "read")).await.unwrap();
    on_b.delete_role("w-a").await.unwrap();
    let mut seen = Vec::new();
    for (_, s) in &mut streams {
        let mut got = Vec::new();
        for _ in 0..3 {
            let e = next_change(s).await;
            got.push((e.revision, e.name, e.deleted));
        }
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1], "both watches carry the same feed");
    let names: Vec<_> = seen[0].iter().map(|(_, n, d)| (n.as_str(), *d)).collect();
    assert_eq!(names, [("w-a", false), ("w-b", false), ("w-a", true)]);

    // The proxy set is shared: a proxy heartbeating on A and one on B each see both.
    let beat = |id: &str| ProxyHeartbeatRequest {
        proxy: Some(ProxyRecord {
            id: id.into(),
            ..Default::default()
        }),
        ttl_secs: 60,
        leaving: false,
    };
    streams[0]
        .0
        .proxy_heartbeat(beat("proxy-on-a"))
        .await
        .unwrap();
    let set = streams[1]
        .0
        .proxy_heartbeat(beat("proxy-on-b"))
        .await
        .unwrap();
    let ids: Vec<_> = set.proxies.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(
        ids,
        ["proxy-on-a", "proxy-on-b"],
        "one proxy set across both servers"
    );

    // Conditional updates at one revision, half through each server: exactly one wins.
    let r = on_a.get_role("from-a").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = if i % 2 == 0 {
            on_a.clone()
        } else {
            on_b.clone()
        };
        let mut next = role("from-a", if i % 2 == 0 { "list" } else { "read" });
        next.revision = r.revision;
        tasks.push(tokio::spawn(async move { c.update_role(next).await }));
    }
    let (mut won, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(AuthClientError::Api {
                code: tonic::Code::FailedPrecondition,
                ..
            }) => refused += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!((won, refused), (1, 15));
    drop(streams);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_auth_server_keeps_its_own_admin_identity() {
    let pg = Postgres::start();
    let (da, db) = (TempDir::new("pg-adm-a"), TempDir::new("pg-adm-b"));
    let a = serve(prepare_async(pg.auth_config(&da.0, "adm")).await).await;
    let first_a = a.admin_identity();
    // B's start issues B's admin identity: it must not revoke A's.
    let b = serve(prepare_async(pg.auth_config(&db.0, "adm")).await).await;
    let (id_a, id_b) = (a.admin_identity(), b.admin_identity());
    assert_eq!(id_a.tls_cert, first_a.tls_cert, "A's file untouched");
    assert_ne!(
        id_a.tls_cert, id_b.tls_cert,
        "one admin identity per data dir"
    );
    for (who, id) in [("A's", &id_a), ("B's", &id_b)] {
        for srv in [&a, &b] {
            let c = AuthClient::connect_direct(&srv.addr.to_string(), id)
                .await
                .unwrap_or_else(|e| panic!("{who} admin identity refused: {e}"));
            assert_eq!(c.ping(PingRequest {}).await.unwrap().user, "@admin");
            c.list_roles(ListRolesRequest::default())
                .await
                .unwrap_or_else(|e| panic!("{who} admin identity: {e}"));
        }
    }
    // A replaced identity still revokes what its own data dir held: A restarts on the same data
    // dir with a shorter admin lifetime, so its identity is not reusable and is replaced.
    a.stop().await;
    let mut cfg = pg.auth_config(&da.0, "adm");
    cfg.admin_identity_ttl_secs = 3600;
    let a = serve(prepare_async(cfg).await).await;
    let new_a = a.admin_identity();
    assert_ne!(
        new_a.tls_cert, id_a.tls_cert,
        "A issued a new admin identity"
    );
    let old = AuthClient::connect_direct(&b.addr.to_string(), &id_a).await;
    let refused = match old {
        Err(_) => true,
        Ok(c) => c.list_roles(ListRolesRequest::default()).await.is_err(),
    };
    assert!(
        refused,
        "A's previous admin certificate is revoked on B too"
    );
    let c = AuthClient::connect_direct(&a.addr.to_string(), &id_b)
        .await
        .unwrap();
    c.list_roles(ListRolesRequest::default())
        .await
        .expect("B's admin identity survives A's restart");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_loses_no_acknowledged_write() {
    let pg = Arc::new(Postgres::start());
    let dir = TempDir::new("pg-restart");
    let srv = serve(prepare_async(pg.auth_config(&dir.0, "restart")).await).await;
    let admin = srv.admin().await;
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let errors = Arc::new(Mutex::new(Vec::<(tonic::Code, String)>::new()));
    let stop = CancellationToken::new();
    let mut writers = Vec::new();
    for w in 0..4 {
        let (c, acked, errors, stop) = (admin.clone(), acked.clone(), errors.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                let name = format!("w{w}-{i}");
                i += 1;
                let call = tokio::time::timeout(
                    Duration::from_secs(20),
                    c.upsert_role(role(&name, "read")),
                );
                match call.await.expect("every call answers within 20 s") {
                    Ok(_) => acked.lock().unwrap().push(name),
                    Err(AuthClientError::Api { code, message }) => {
                        errors.lock().unwrap().push((code, message));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("transport failure: {e}"),
                }
            }
        }));
    }
    let count = |v: &Arc<Mutex<Vec<String>>>| v.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&acked) < 100 {
        assert!(Instant::now() < deadline, "100 writes within 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.stop()).await.unwrap();
    let before_outage = count(&acked);
    // The outage lasts two seconds: calls fail meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = count(&acked) - before_outage;
    let outage_errors = errors.lock().unwrap().len();
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.start_again())
        .await
        .unwrap();
    let restarted = Instant::now();
    let at_restart = count(&acked);
    while count(&acked) < at_restart + 50 {
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "writes succeed again within 20 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered = restarted.elapsed();
    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }
    eprintln!(
        "acked {} writes; {during} acked while the database was down; {outage_errors} errors; \
         50 more writes {recovered:?} after the restart",
        count(&acked)
    );
    assert_eq!(
        during, 0,
        "no write is acknowledged while the database is down"
    );
    let errors = errors.lock().unwrap().clone();
    assert!(!errors.is_empty(), "calls failed during the outage");
    let addr = format!("database postgres://postern@127.0.0.1:{}/postgres", pg.port);
    for (code, message) in &errors {
        assert_eq!(*code, tonic::Code::Unavailable, "{message}");
        assert!(message.contains(&addr), "names the database: {message}");
        assert!(!message.contains(&pg.password), "no password: {message}");
    }

    // Every acknowledged write is there.
    let stored: BTreeSet<String> = admin
        .list_roles(ListRolesRequest {})
        .await
        .unwrap()
        .roles
        .into_iter()
        .map(|r| r.name)
        .collect();
    let acked = acked.lock().unwrap().clone();
    let lost: Vec<_> = acked.iter().filter(|n| !stored.contains(*n)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    srv.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_at_start_is_a_clear_error_and_a_non_zero_exit() {
    let dir = TempDir::new("pg-down");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = dir.0.join("auth.toml");
    std::fs::write(
        &cfg,
        format!(
            "cluster = \"down\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nallow_root = true\n\
             backend = \"postgres://postern@127.0.0.1:{port}/postern\"\n",
            dir.0.join("data").display()
        ),
    )
    .unwrap();
    let secret = "s3cret-not-in-logs";
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_postern-auth"))
        .args(["start", "--config"])
        .arg(&cfg)
        .env("POSTERN_BACKEND_PASSWORD", secret)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("exits within 30 s")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("exited in {:?}: {text}", started.elapsed());
    assert!(!out.status.success(), "non-zero exit: {text}");
    assert!(
        text.contains(&format!("postgres://postern@127.0.0.1:{port}/postern")),
        "names the database: {text}"
    );
    assert!(text.contains("unavailable"), "{text}");
    assert!(text.contains("Connection refused"), "says why: {text}");
    assert!(!text.contains(secret), "no password in the output: {text}");
}

#[test]
fn bad_backend_settings_are_refused_naming_the_field() {
    let dir = TempDir::new("pg-config");
    let base = config(&dir.0, "cfg");
    for (backend, ca, want) in [
        (
            "postgres://u:hunter2@127.0.0.1:5432/db",
            None,
            "backend: the URL holds a password",
        ),
        (
            "postgres://u@127.0.0.1:5432/db?sslmode=require",
            None,
            "backend_ca_file: sslmode=require needs",
        ),
        (
            "postgres://u@127.0.0.1:notaport/db",
            None,
            "backend: not a PostgreSQL URL",
        ),
        (
            "mysql://u@127.0.0.1/db",
            None,
            "backend: 'mysql:…' is neither",
        ),
        ("sqlite", Some("/ca.pem"), "backend_password_file"),
    ] {
        let cfg = postern_auth::AuthConfig {
            backend: Some(backend.into()),
            backend_ca_file: ca.map(Into::into),
            ..base.clone()
        };
        let e = cfg.validate().expect_err(backend).to_string();
        assert!(e.contains(want), "{backend}: {e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
    // A password file others can read is refused before any connection.
    let mut cfg = base;
    cfg.backend = Some("postgres://u@127.0.0.1:1/db".into());
    let pw = dir.0.join("pw");
    std::fs::write(&pw, "x\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    cfg.backend_password_file = Some(pw);
    let e = prepare(&cfg).err().expect("refused").to_string();
    assert!(e.contains("readable by other users"), "{e}");
}

/// Storage level: two backends (two Auth servers) on one database.
#[test]
fn the_feed_is_global_and_gapless_and_one_init_and_one_conditional_write_win() {
    let pg = Postgres::start();
    let dir = TempDir::new("pg-storage");
    let opts = PostgresOptions {
        url: pg.url(),
        password: Some(pg.password.clone()),
        ca_file: None,
    };
    let _ = &dir;
    let backends: Vec<Arc<PostgresBackend>> = (0..2)
        .map(|_| Arc::new(PostgresBackend::open(&opts).unwrap()))
        .collect();

    // init_meta: of many racing first starts, one writes.
    let wins: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let b = backends[i % 2].clone();
                s.spawn(move || {
                    b.init_meta("cluster", &[("cluster", format!("c{i}").into_bytes())])
                        .unwrap() as usize
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(wins, 1);

    // Conditional writes at one revision through both: one winner.
    backends[0]
        .put("role", "r", "{}", Condition::Absent)
        .unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let b = backends[i % 2].clone();
                s.spawn(move || {
                    b.put(
                        "role",
                        "r",
                        &format!("{{\"i\":{i}}}"),
                        Condition::Revision(1),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(results.iter().all(|r| matches!(
        r,
        Ok(_)
            | Err(StorageError::Conflict {
                expected: 1,
                actual: 2,
                ..
            })
    )));
    assert!(matches!(
        backends[1].put("role", "r", "{}", Condition::Absent),
        Err(StorageError::Exists { .. })
    ));
    assert!(matches!(
        backends[1].put("role", "nope", "{}", Condition::Present),
        Err(StorageError::NotFound { .. })
    ));

    // Writers on both backends while a reader follows the feed: the reader misses nothing.
    let start = backends[0].changes_since(0, 10).unwrap().newest;
    let writes = 2 * 4 * 100;
    let followed = std::thread::scope(|s| {
        for w in 0..8 {
            let b = backends[w % 2].clone();
            s.spawn(move || {
                for i in 0..100 {
                    b.put("user", &format!("u{w}-{i}"), "{}", Condition::Any)
                        .unwrap();
                }
            });
        }
        let reader = backends[1].clone();
        s.spawn(move || {
            let mut cursor = start;
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while seen.len() < writes {
                assert!(
                    Instant::now() < deadline,
                    "the feed delivered {}",
                    seen.len()
                );
                let page = reader.changes_since(cursor, 50).unwrap();
                for c in page.changes {
                    assert!(c.revision > cursor);
                    cursor = c.revision;
                    seen.push(c.name);
                }
            }
            seen
        })
        .join()
        .unwrap()
    });
    let distinct: BTreeSet<_> = followed.iter().collect();
    assert_eq!(
        distinct.len(),
        writes,
        "every write seen once, none skipped"
    );
    let (rev, snap) = backends[0].policy_snapshot().unwrap();
    assert_eq!(rev, backends[1].changes_since(0, 1).unwrap().newest);
    assert_eq!(snap.iter().filter(|c| c.kind == "user").count(), writes);
}

/// TLS to the database: with `backend_ca_file` the connection is TLS and verified (a wrong CA
/// is refused, naming the database); `sslmode=require` then works.
#[test]
fn tls_to_the_database_is_verified_against_backend_ca_file() {
    let (pg, ca) = Postgres::start_tls();
    let opts = PostgresOptions {
        url: format!("{}?sslmode=require", pg.url()),
        password: Some(pg.password.clone()),
        ca_file: Some(ca),
    };
    let b = PostgresBackend::open(&opts).unwrap();
    b.put("role", "over-tls", "{}", Condition::Any).unwrap();
    assert!(b.get("role", "over-tls").unwrap().is_some());
    drop(b);

    // A CA that did not sign the server's certificate: refused.
    let dir = TempDir::new("pg-wrong-ca");
    let other = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let wrong = dir.0.join("wrong-ca.pem");
    std::fs::write(&wrong, p.self_signed(&other).unwrap().pem()).unwrap();
    let e = PostgresBackend::open(&PostgresOptions {
        ca_file: Some(wrong),
        ..opts
    })
    .expect_err("an unknown CA is refused")
    .to_string();
    assert!(e.contains(&format!("127.0.0.1:{}", pg.port)), "{e}");
    assert!(e.contains("certificate"), "{e}");
}
