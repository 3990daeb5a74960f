//! The proxy's Auth identity (`clusters[].policy.identity_file`, here valid 6 s) renews itself at
//! two-thirds of its life over `GenerateUserCerts` for its own user, written atomically in place
//! (same key, mode 0600), at least three times; the policy watch reconnects with each renewed
//! identity, so a lock created after the renewals (when the first identity has long expired)
//! still closes a live stream and refuses the locked user's next stream and login.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_api::identity::IdentityFile;
use postern_api::proto::Lock;
use support::*;
use tokio::io::AsyncReadExt;

/// Waits until opening `target` is refused with a reason containing `needle`.
async fn until_refused(
    s: &postern_client::ProxySession,
    target: &str,
    cluster: &str,
    needle: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.open(target, cluster, 0).await {
            Err(e) if e.to_string().contains(needle) => return,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "not refused with '{needle}' in 10 s: {:?}",
                    other.err().map(|e| e.to_string())
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_auth_identity_renews_itself_and_policy_stays_enforced() {
    let c = Cluster::start_full("pident", 1, 60, false, |_| {}, (86400, 6)).await;
    c.role(cluster::ALL_TARGETS).await;
    let echo = echo_server().await;
    let agent = c.service_agent("web-1", 0, &[("web", echo, &[])]).await;
    let session = c.user_session("alice", &["all-targets"], 0).await;
    let mut held = wait_stream(&session, "web", "pident", Duration::from_secs(20)).await;

    let path = c.dir.path().join("proxy-0.identity");
    let first = IdentityFile::load(&path).unwrap();
    assert!(
        first.expires <= postern_dial::mint::now_unix() + 6,
        "a short identity to start with"
    );
    // Three renewals at two-thirds of a 6 s life: about 12 s.
    let mut seen = vec![first.expires];
    let deadline = Instant::now() + Duration::from_secs(40);
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the proxy renewed its identity {} time(s) in 40 s",
            seen.len() - 1
        );
        if let Ok(id) = IdentityFile::load(&path)
            && id.expires != *seen.last().unwrap()
        {
            assert_eq!(
                id.private_key, first.private_key,
                "renewed for the same key"
            );
            assert_eq!(id.user, "proxy-1");
            assert!(
                id.expires <= postern_dial::mint::now_unix() + 7,
                "the lifetime is kept"
            );
            seen.push(id.expires);
        }
        // Streams keep being decided by the live policy meanwhile.
        let mut s = session.open("web", "pident", 0).await.expect("a stream");
        assert_eq!(echo_once(&mut s, b"renewing").await, b"renewing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "identity file mode");
    assert!(
        first.expires < postern_dial::mint::now_unix(),
        "the first identity has expired by now"
    );
    assert_eq!(echo_once(&mut held, b"still open").await, b"still open");

    // A lock made now reaches the proxy through the watch on the renewed identity.
    let msg = "alice locked after the renewals";
    c.admin
        .create_lock(Lock {
            user: "alice".into(),
            message: msg.into(),
            ttl_secs: 3600,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), held.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the live stream was not closed by the lock: {r:?}"
    );
    until_refused(&session, "web", "pident", msg).await;
    // A new login of the locked user gets no stream either (refused at login or at the open).
    let id = c.identity("alice").await;
    let p = &c.proxies[0];
    let opts = postern_client::auth::proxy_options(
        &id,
        postern_client::ProxyAddr::Web {
            addr: p.web.to_string(),
            trust: p.web_trust(),
        },
    )
    .unwrap();
    let e = match postern_client::ProxySession::connect(&opts).await {
        Err(e) => e.to_string(),
        Ok(s) => match s.open("web", "pident", 0).await {
            Ok(_) => panic!("a locked user's new login opened a stream"),
            Err(e) => e.to_string(),
        },
    };
    assert!(e.contains(msg), "{e}");
    agent.stop().await;
    c.stop().await;
}
