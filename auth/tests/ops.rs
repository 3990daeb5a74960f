//! The Auth server's ops listener (`ops_listen`): `/healthz`, `/readyz`, and `/metrics` with API
//! calls by method and code, call latency, audit write latency and login results; every Auth
//! metric the shipped dashboard and alert rules query is exported. Its own test binary: the
//! metrics recorder is process-global.

mod support;

#[path = "../../proxy/tests/support/deploy_metrics.rs"]
mod deploy_metrics;

use deploy_metrics::http_get;
use postern_api::proto::PingRequest;
use support::*;

/// Sum of a metric's samples whose label set contains every `labels` pair.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_listener_serves_api_audit_and_login_metrics() {
    let dir = TempDir::new("ops");
    let mut cfg = config(&dir.0, "authops");
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ops = free.local_addr().unwrap();
    drop(free);
    cfg.ops_listen = Some(ops);
    let srv = start_with(cfg).await;
    let admin = srv.admin().await;
    admin.ping(PingRequest {}).await.unwrap();
    admin.create_role(seed_role()).await.unwrap();
    // A call the caller's roles do not allow: counted with its code.
    let reader = identity_for(&admin, "reader", &["api-role"], 3600).await;
    let reader = postern_client::auth::AuthClient::connect_direct(&srv.addr.to_string(), &reader)
        .await
        .unwrap();
    assert_eq!(reader.get_role("api-role").await.unwrap().name, "api-role");
    assert!(reader.upsert_role(seed_role()).await.is_err());

    assert_eq!(http_get(ops, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(
        http_get(ops, "/readyz").await.0,
        200,
        "ready while the API serves"
    );
    let (status, m) = http_get(ops, "/metrics").await;
    assert_eq!(status, 200);
    let calls = "postern_auth_api_calls_total";
    assert!(
        metric(&m, calls, &[("method", "Ping"), ("code", "Ok")]) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, calls, &[("method", "GetRole"), ("code", "Ok")]) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            calls,
            &[("method", "UpsertRole"), ("code", "PermissionDenied")]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "postern_auth_api_call_duration_seconds_count",
            &[("method", "GetRole")]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "postern_auth_audit_write_duration_seconds_count", &[]) >= 3.0,
        "{m}"
    );
    assert!(
        m.contains("postern_auth_logins_total{result=\"ok\"}"),
        "{m}"
    );

    // The dashboard's Auth panels and the Auth alert rules query only what the server exports,
    // and every Auth metric has a panel.
    let dash = deploy_metrics::dashboard_names("auth_job");
    let alerts = deploy_metrics::alert_names("postern-auth");
    let all: std::collections::BTreeSet<String> = dash.union(&alerts).cloned().collect();
    let missing = deploy_metrics::missing(&all, &m);
    assert!(
        missing.is_empty(),
        "not exported by the Auth server: {missing:?}\n{m}"
    );
    for family in m
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|f| f.starts_with("postern_auth_"))
    {
        assert!(
            dash.iter().any(|d| d.starts_with(family)),
            "no dashboard panel for {family}"
        );
    }
    srv.stop().await;
}
