//! Audit on a full disk: a call whose audit record no sink can take is failed (UNAVAILABLE,
//! naming the audit log) instead of answered unrecorded, and every call that was answered has
//! its record. The data dir is a 4 MiB tmpfs filled to the last byte (root only: skipped with a
//! message if mounting is not allowed).

mod support;

use std::io::Write;
use std::process::Command;

use postern_client::auth::AuthClientError;
use support::*;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill(dir: &std::path::Path) -> u64 {
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    let mut n = 0u64;
    while f.write_all(&chunk).is_ok() {
        n += 4096;
    }
    // The last partial chunk.
    while f.write_all(&chunk[..1]).is_ok() {
        n += 1;
    }
    let _ = f.sync_all();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_calls_instead_of_losing_their_audit_records() {
    let dir = TempDir::new("fulldisk");
    let mnt = dir.0.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&mnt)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the full-disk audit test did not run"
        );
        return;
    }
    let _mount = Mount(mnt.clone());
    let mut cfg = config(&mnt, "full");
    cfg.data_dir = mnt.join("data");
    let srv = start_with(cfg).await;
    // The login service of a second Auth server on the same disk.
    let logins = support::logins::Bench::new("fulllogin", |c| c.data_dir = mnt.join("logins"));
    logins.add_user("carol", Some("carol's password!"), None);
    let admin = srv.admin().await;
    admin
        .get_role("editor")
        .await
        .expect("works before the disk fills");

    let filled = fill(&mnt);
    println!("filled the tmpfs with {filled} bytes");
    let (mut answered, mut failed) = (Vec::new(), 0);
    for i in 0..40 {
        let name = format!("probe-{i}");
        match admin.get_role(&name).await {
            Err(AuthClientError::Api {
                code: tonic::Code::NotFound,
                ..
            }) => answered.push(name),
            Err(AuthClientError::Api {
                code: tonic::Code::Unavailable,
                message,
            }) => {
                assert!(message.contains("audit log cannot be written"), "{message}");
                failed += 1;
            }
            other => panic!("unexpected: {other:?}"),
        }
    }
    println!(
        "disk full: {} calls answered (recorded), {failed} failed",
        answered.len()
    );
    assert!(failed > 0, "every call was answered on a full disk");
    // Logins: a certificate only with its record.
    let (mut issued, mut refused) = (Vec::new(), 0);
    for i in 0..20 {
        let source = format!("192.0.2.{i}");
        let r = logins
            .from(
                &source,
                logins.req("carol", Some("carol's password!"), None),
            )
            .await;
        match r.status {
            200 => issued.push(source),
            503 => refused += 1,
            _ => panic!("unexpected login answer: {r:?}"),
        }
    }
    println!(
        "disk full: {} logins issued certificates (recorded), {refused} refused",
        issued.len()
    );
    assert!(refused > 0, "every login was answered on a full disk");

    // Space again: calls are answered, and every call answered before has its record.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    admin
        .get_role("editor")
        .await
        .expect("works again once there is space");
    let log = std::fs::read_to_string(srv.data_dir.join("audit.log")).unwrap();
    let events = admin
        .list_audit_events(postern_api::proto::ListAuditEventsRequest { limit: 1000 })
        .await
        .unwrap()
        .events;
    let login_log = std::fs::read_to_string(mnt.join("logins").join("audit.log")).unwrap();
    for source in &issued {
        assert!(
            login_log.contains(&format!("\"{source}:40000\"")),
            "a login from {source} issued certificates but its audit record is lost"
        );
    }
    for name in &answered {
        let res = format!("role/{name}");
        assert!(
            log.contains(&format!("\"{res}\"")) || events.iter().any(|e| e.resource == res),
            "call on {res} was answered but its audit record is lost"
        );
    }
    srv.stop().await;
}
