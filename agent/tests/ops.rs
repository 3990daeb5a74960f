//! The agent's ops listener and its targets by name, with a real `postern-agent` process: its
//! `/metrics` (tunnel state per proxy, streams per target, dial errors by reason, reconnects),
//! `/healthz` and `/readyz`; a target written `localhost:PORT` is resolved and reached; a target
//! whose name does not resolve is refused at once and counted by reason; every agent metric the
//! shipped dashboard and alert rules query is exported.

#[path = "../../proxy/tests/support/deploy_metrics.rs"]
mod deploy_metrics;
#[path = "../../proxy/tests/support/mod.rs"]
mod support;

use std::process::Stdio;
use std::time::Duration;

use postern_client::ProxySession;
use support::*;
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_listener_metrics_and_targets_by_name() {
    init_tracing();
    let pki = Pki::new("agentops");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let echo = echo_server().await;
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ops = free.local_addr().unwrap();
    drop(free);
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "host_id = \"ops-agent\"\ncluster = \"{}\"\nproxy = \"{}\"\nhost_key_file = {:?}\n\
         proxy_host_ca = [{:?}]\nkeepalive_interval_secs = 5\n\
         [web]\ncert_sha256 = \"{}\"\n\
         [targets]\nbyname = \"localhost:{}\"\nnowhere = \"no-such-host.invalid:5432\"\n",
        pki.cluster,
        proxy.web,
        pki.agent_files("ops-agent"),
        pki.host_ca.public_key().to_openssh().unwrap(),
        proxy.web_fp,
        echo.port(),
    );
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    // The ops address through the environment override (the file leaves it off).
    let _agent = Command::new(env!("CARGO_BIN_EXE_postern-agent"))
        .arg("--config")
        .arg(&path)
        .env("POSTERN_AGENT_OPS_LISTEN", ops.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // A DNS name, resolved at dial time: the stream reaches the echo service.
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let mut s = wait_stream(&session, "byname", "agentops", Duration::from_secs(20)).await;
    assert_eq!(echo_once(&mut s, b"by name").await, b"by name");

    // A name that does not resolve: the stream is refused at once, naming the target. (The
    // resolver's words stay in the agent's log and metrics: russh drops the description of a
    // CHANNEL_OPEN_FAILURE, so the proxy cannot pass it on.)
    let err = session
        .open("nowhere", "agentops", 0)
        .await
        .err()
        .expect("a target whose name does not resolve is refused")
        .to_string();
    assert!(
        err.contains("could not open target nowhere") && err.contains("ConnectFailed"),
        "the client is told which target failed: {err}"
    );

    let (status, body) = http_get(ops, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = http_get(ops, "/readyz").await;
    assert_eq!(status, 200, "ready while a tunnel is up");
    let m = scrape(ops).await;
    assert_eq!(metric(&m, "postern_agent_tunnel_up", &[]), 1.0, "{m}");
    assert!(
        metric(&m, "postern_agent_streams_total", &[("target", "byname")]) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "postern_agent_streams_open", &[("target", "byname")]),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "postern_agent_dial_errors_total",
            &[("target", "nowhere"), ("reason", "resolve")]
        ),
        1.0,
        "{m}"
    );
    for reason in postern_agent::metrics::RECONNECT_REASONS {
        assert!(
            m.contains(&format!(
                "postern_agent_reconnects_total{{reason=\"{reason}\"}}"
            )),
            "reconnects by {reason} exported from the start:\n{m}"
        );
    }
    drop(s);

    // The dashboard's agent panels and the agent alert rules query only what the agent exports,
    // and every agent metric has a panel.
    let dash = deploy_metrics::dashboard_names("agent_job");
    let alerts = deploy_metrics::alert_names("postern-agent");
    assert!(!dash.is_empty() && !alerts.is_empty());
    let all: std::collections::BTreeSet<String> = dash.union(&alerts).cloned().collect();
    let missing = deploy_metrics::missing(&all, &m);
    assert!(
        missing.is_empty(),
        "not exported by the agent: {missing:?}\n{m}"
    );
    for family in m
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|f| f.starts_with("postern_agent_"))
    {
        assert!(dash.contains(family), "no dashboard panel for {family}");
    }

    // A reconnect is counted by its reason: the proxy goes away.
    proxy.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(ops).await;
        if metric(&m, "postern_agent_tunnel_up", &[]) == 0.0
            && metric(
                &m,
                "postern_agent_reconnects_total",
                &[("reason", "closed")],
            ) + metric(
                &m,
                "postern_agent_reconnects_total",
                &[("reason", "drained")],
            ) >= 1.0
        {
            assert_eq!(
                http_get(ops, "/readyz").await.0,
                503,
                "not ready without a tunnel"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not count the lost tunnel:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
