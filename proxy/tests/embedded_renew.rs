//! The Auth server's embedded agent renews its own certificate at two-thirds of its life
//! (`agent_cert_ttl_secs`), while API calls flow through it: none fails, a connection held open
//! across every renewal still works, and after the first certificate has expired the agent
//! reconnects (its proxy killed and restarted) with the renewed one.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use cluster::Cluster;
use postern_api::proto::CreateUserRequest;
use postern_client::auth::AuthClient;
use postern_client::connect::Config;
use postern_client::credentials::Credentials;
use postern_dial::web::WebTrust;
use russh::keys::ssh_key::Certificate;

const READER: &str = "kind: role
metadata: {name: reader}
spec:
  allow:
    rules:
      - resources: ['role']
        verbs: ['read']
version: v7
";

/// Lifetime of the embedded agent's certificates in this test, seconds.
const TTL: u64 = 6;

fn valid_before(path: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    Certificate::from_openssh(text.trim())
        .unwrap()
        .valid_before()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_agent_renews_three_times_while_calls_flow_and_none_fails() {
    let mut c =
        Cluster::start_tweaked("embrenew", 1, 60, true, |a| a.agent_cert_ttl_secs = TTL).await;
    c.role(READER).await;
    c.admin
        .create_user(CreateUserRequest {
            name: "reader".into(),
            roles: vec!["reader".into()],
            secret_ttl_secs: 0,
        })
        .await
        .unwrap();
    let path = c.dir.path().join("reader.identity");
    c.identity("reader").await.save(&path).unwrap();
    let cert_path = c.auth_cfg.data_dir.join("agent_key-cert.pub");
    let first = valid_before(&cert_path);
    assert!(
        first <= postern_dial::mint::now_unix() + TTL,
        "issued with agent_cert_ttl_secs"
    );
    let cfg = |c: &Cluster| Config {
        addrs: vec![c.proxies[0].web.to_string()],
        credentials: vec![Credentials::identity_file(&path)],
        web_trust: Some(WebTrust::Pin(c.proxies[0].web_fp.clone())),
        ..Default::default()
    };
    // Every call is a new stream through the proxy and the embedded agent's tunnel.
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        match AuthClient::connect(cfg(&c)).await {
            Ok(client) if client.get_role("reader").await.is_ok() => break client,
            other => assert!(
                Instant::now() < deadline,
                "the proxy never served the API: {:?}",
                other.err()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut seen = vec![first];
    let (mut ok, mut failed) = (0u32, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(40);
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 renewals in 40 s (expiries seen: {seen:?})"
        );
        let r = match AuthClient::connect(cfg(&c)).await {
            Ok(client) => client.get_role("reader").await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(_) => ok += 1,
            Err(e) => failed.push(e),
        }
        let now = valid_before(&cert_path);
        if now != *seen.last().unwrap() {
            assert!(
                now > *seen.last().unwrap(),
                "a renewal extends the certificate"
            );
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "embedded agent: 3 renewals (expiries {seen:?}): {ok} calls, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(ok > 10, "{ok} calls");
    // The connection opened before the first renewal still works.
    assert_eq!(held.get_role("reader").await.unwrap().name, "reader");
    assert!(
        postern_dial::mint::now_unix() >= first,
        "the first certificate has expired"
    );
    // The tunnel is cut (proxy killed): the agent reconnects with the renewed certificate.
    c.kill_and_restart_proxy(0).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match AuthClient::connect(cfg(&c)).await {
            Ok(client) if client.get_role("reader").await.is_ok() => break,
            other => assert!(
                Instant::now() < deadline,
                "the embedded agent did not reconnect with its renewed certificate: {:?}",
                other.err()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.stop().await;
}
