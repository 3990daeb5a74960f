//! Agents join with a token: the first start makes a key, reaches the Auth server through the
//! proxy's web listener (`POST /webapi/join`, relayed over the cluster's tunnel), checks the
//! certificate against its CA pin, saves key and certificate 0600, and serves. A used, expired
//! or wrong-pin join stops the agent with one message (no retry loop).

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use cluster::{ALL_TARGETS, Cluster};
use postern_agent::AgentConfig;
use support::*;

/// Runs an agent that must stop by itself (a refused join) and returns its error text.
async fn refused(cfg: AgentConfig) -> String {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let r = tokio::time::timeout(Duration::from_secs(30), postern_agent::run(cfg, shutdown))
        .await
        .expect("a refused join stops the agent instead of retrying");
    r.expect_err("the join is refused").to_string()
}

#[tokio::test]
async fn an_agent_joins_with_a_token_through_the_proxy_and_serves() {
    let c = Cluster::start("joinok", 1, 60).await;
    c.role(ALL_TARGETS).await;
    let echo = echo_server().await;
    let session = c.user_session("alice", &["all-targets"], 0).await;
    let pin = c.ca_pin();
    let mut times = Vec::new();
    for n in 0..5 {
        let host_id = format!("web-{n}");
        let t = c.agent_token(600).await;
        let cfg = c.joining_agent(&host_id, &t, &pin, echo);
        let (key, cert) = (cfg.host_key_file.clone(), cfg.host_cert_path());
        let started = Instant::now();
        let agent = start_agent(cfg.clone());
        // The first stream through the new tunnel (a target only this agent serves).
        let mut stream = wait_stream(&session, &host_id, "joinok", Duration::from_secs(20)).await;
        times.push(started.elapsed());
        assert_eq!(echo_once(&mut stream, b"joined").await, b"joined");
        for f in [&key, &cert] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is written 0600", f.display());
        }
        let text = std::fs::read_to_string(&cert).unwrap();
        let parsed = russh::keys::ssh_key::Certificate::from_openssh(text.trim()).unwrap();
        assert_eq!(parsed.valid_principals(), [format!("{host_id}.joinok")]);
        assert_eq!(
            parsed
                .extensions()
                .get(tunnel_proto::names::EXT_ROLE)
                .map(String::as_str),
            Some("service")
        );
        agent.stop().await;
        // A restart reuses the saved identity: the spent token is not needed again.
        if n == 0 {
            let again = start_agent(cfg.clone());
            let mut s = wait_stream(&session, &host_id, "joinok", Duration::from_secs(20)).await;
            assert_eq!(echo_once(&mut s, b"again").await, b"again");
            again.stop().await;
            // The same token on a fresh agent: spent.
            let e = refused(c.joining_agent("web-reuse", &t, &pin, echo)).await;
            assert!(e.contains("has already been used"), "{e}");
        }
    }
    times.sort();
    eprintln!(
        "join time (token to first stream through the new tunnel), 5 agents: median {:?}, min {:?}, max {:?}",
        times[2], times[0], times[4]
    );
    c.stop().await;
}

#[tokio::test]
async fn bad_joins_stop_the_agent_with_one_message() {
    let c = Cluster::start("joinbad", 1, 60).await;
    let echo = echo_server().await;
    let pin = c.ca_pin();
    // A wrong CA pin: refused by the Auth server before the token is spent.
    let t = c.agent_token(600).await;
    let zeros = format!("sha256:{}", "0".repeat(64));
    let e = refused(c.joining_agent("pinned", &t, &zeros, echo)).await;
    assert!(e.contains("CA pin mismatch"), "{e}");
    assert!(e.contains(&pin), "the message names the cluster's pin: {e}");
    assert!(e.contains("not spent"), "{e}");
    // ... so the same token still works with the right pin.
    let ok = start_agent(c.joining_agent("pinned", &t, &pin, echo));
    let cert = c.dir.path().join("join-pinned/agent_key-cert.pub");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cert.exists() {
        assert!(
            Instant::now() < deadline,
            "the join with the right pin did not complete"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ok.stop().await;
    // An expired token.
    let t = c.agent_token(1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = refused(c.joining_agent("late", &t, &pin, echo)).await;
    assert!(e.contains("unknown, expired or deleted"), "{e}");
    // A token that was never issued.
    let e = refused(c.joining_agent("forged", "0123456789abcdef", &pin, echo)).await;
    assert!(e.contains("unknown, expired or deleted"), "{e}");
    // No key or certificate is left behind by a refused join.
    assert!(!c.dir.path().join("join-late/agent_key").exists());
    c.stop().await;
}
