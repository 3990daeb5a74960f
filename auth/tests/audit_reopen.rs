//! The audit log file is reopened on SIGHUP (logrotate moves it away, then signals): records go
//! to the new file at the same path, none to the moved one. And an allowed `Ping` (which every
//! client makes on connect) is not recorded, while other calls are.

mod support;

use std::time::Duration;

use postern_api::proto::{ListRolesRequest, PingRequest};
use support::*;

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_audit_log_and_pings_are_not_recorded() {
    let dir = TempDir::new("hup");
    let srv = start(&dir.0, "hup").await;
    let log = srv.data_dir.join("audit.log");
    let admin = srv.admin().await;
    admin.ping(PingRequest {}).await.unwrap();
    admin.list_roles(ListRolesRequest {}).await.unwrap();
    let before = lines(&log);
    assert!(
        before.iter().any(|l| l.contains("\"ListRoles\"")),
        "{before:?}"
    );
    assert!(
        !before.iter().any(|l| l.contains("\"Ping\"")),
        "an allowed Ping is not recorded: {before:?}"
    );

    let rotated = srv.data_dir.join("audit.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let st = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !log.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reopen audit.log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin.get_role("editor").await.ok();
    let after = lines(&log);
    assert!(after.iter().any(|l| l.contains("\"GetRole\"")), "{after:?}");
    assert_eq!(
        lines(&rotated),
        before,
        "nothing more went to the moved file"
    );
    srv.stop().await;
}
