//! The Grafana dashboard, the Prometheus alert rules and the scrape config in `deploy/` against a
//! live proxy: every `postern_*` metric they query is exported by a proxy that has seen a tunnel,
//! a stream, refusals, discovery and a login relay, and the scrape config targets the ops port.
//!
//! The metrics recorder is process-global, so this file is its own test binary and its cluster
//! names (`dash*`) are used nowhere else.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postern_client::ProxySession;
use postern_dial::web::tls_config;
use postern_proxy::ProxyConfig;
use serde_norway::Value as Yaml;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn read(rel: &str) -> String {
    let path = deploy(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(rel: &str) -> Yaml {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
}

/// Every `postern_[a-z0-9_]+` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("postern_") {
        let start = i + at;
        let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        let mut end = start + "postern_".len();
        while end < bytes.len() && matches!(bytes[end], b'a'..=b'z' | b'0'..=b'9' | b'_') {
            end += 1;
        }
        // Only whole identifiers: not the tail of `xpostern_...`.
        if start == 0 || !ident(bytes[start - 1]) {
            out.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// The query strings of a Grafana dashboard: every `expr`, and every `query` string (template
/// variables), anywhere in the JSON.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

fn dashboard_exprs() -> Vec<String> {
    let text = read("grafana/postern-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    assert_eq!(dash["schemaVersion"].as_u64(), Some(39), "schemaVersion");
    let panels = dash["panels"].as_array().expect("panels");
    let mut with_targets = 0;
    for p in panels {
        if p["type"] == "row" {
            continue;
        }
        let ds = p["datasource"]["uid"].as_str().unwrap_or_default();
        assert_eq!(
            ds, "${datasource}",
            "panel '{}' must use the datasource variable",
            p["title"]
        );
        let targets = p["targets"].as_array().expect("a panel without targets");
        assert!(!targets.is_empty(), "panel '{}' has no queries", p["title"]);
        with_targets += 1;
    }
    assert!(with_targets >= 10, "{with_targets} panels with queries");
    let mut out = Vec::new();
    dashboard_queries(&dash, &mut out);
    out
}

/// The dashboard queries of the proxy's panels: the agent's and the Auth server's are checked
/// against those daemons (agent/tests/ops.rs, auth/tests/ops.rs).
fn proxy_dashboard_exprs() -> Vec<String> {
    let mut out = dashboard_exprs();
    out.retain(|q| !q.contains("$agent_job") && !q.contains("$auth_job"));
    out
}

/// The `expr` of every alerting rule, each rule checked for a name, severity and summary.
fn alert_exprs() -> Vec<String> {
    let rules = yaml("prometheus/postern-alerts.yml");
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        // The agent's and the Auth server's groups are checked against those daemons.
        if group["name"].as_str() != Some("postern-proxy") {
            continue;
        }
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: expr"));
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name}: labels.severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: annotations.summary"
            );
            assert!(
                rule["annotations"]["runbook_url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with(&format!("#{}", name.to_lowercase()))),
                "{name}: annotations.runbook_url pointing at its docs/runbook.md section"
            );
            out.push(expr.to_owned());
        }
    }
    out
}

/// Sample names in a Prometheus text scrape (histograms appear as `_bucket`, `_sum`, `_count`).
fn sample_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// `# TYPE name kind` lines: metric family -> kind.
fn families(scrape: &str) -> std::collections::BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect()
}

/// Every name must be a metric this scrape exports: a counter or gauge by its own name, a
/// histogram only through its `_bucket`, `_sum` or `_count` series. Returns the problems.
fn missing(names: &BTreeSet<String>, scrape: &str) -> Vec<String> {
    let samples = sample_names(scrape);
    let kinds = families(scrape);
    let mut problems = Vec::new();
    for name in names {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|base| kinds.get(*base).map(String::as_str) == Some("histogram"))
            .unwrap_or(name);
        match kinds.get(family).map(String::as_str) {
            None => problems.push(format!("{name}: the proxy exports no metric {family}")),
            Some("histogram") if family == name => problems.push(format!(
                "{name} is a histogram: query {name}_bucket, _sum or _count"
            )),
            Some(_) if !samples.contains(name.as_str()) => {
                problems.push(format!("{name}: no samples in the scrape"))
            }
            Some(_) => {}
        }
    }
    problems
}

fn names_in(exprs: &[String]) -> BTreeSet<String> {
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

/// Sends one HTTP/1.1 request over TLS (the proxy's web certificate pinned); returns the status.
async fn https(proxy: &Proxy, request: &str) -> u16 {
    let tcp = tokio::net::TcpStream::connect(proxy.web).await.unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(tls_config(&proxy.web_trust()).unwrap()));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn extraction_finds_whole_metric_names() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(postern_a_bucket{x=\"postern_not\"}[5m]))) \
         / xpostern_b + postern_c_total",
    );
    let want: BTreeSet<String> = ["postern_a_bucket", "postern_c_total", "postern_not"]
        .map(String::from)
        .into();
    assert_eq!(names, want);

    let scrape = "# TYPE postern_h histogram\npostern_h_bucket{le=\"1\"} 1\npostern_h_sum 1\n\
                  postern_h_count 1\n# TYPE postern_c_total counter\npostern_c_total 3\n";
    let ok: BTreeSet<String> = ["postern_h_bucket", "postern_h_count", "postern_c_total"]
        .map(String::from)
        .into();
    assert!(missing(&ok, scrape).is_empty());
    let bad: BTreeSet<String> = ["postern_h", "postern_c", "postern_c_total_bucket"]
        .map(String::from)
        .into();
    assert_eq!(
        missing(&bad, scrape).len(),
        3,
        "{:?}",
        missing(&bad, scrape)
    );
}

#[test]
fn scrape_config_targets_the_ops_listener() {
    let ops = ProxyConfig::default().listen.ops;
    let config = yaml("prometheus/prometheus.yml");
    let rule_files: Vec<&str> = config["rule_files"]
        .as_sequence()
        .expect("rule_files")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(rule_files, ["postern-alerts.yml"]);
    let jobs = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j["job_name"].as_str() == Some("postern-proxy"))
        .expect(
            "a postern-proxy job (the alert rules and the dashboard select job=\"postern-proxy\")",
        );
    assert_eq!(
        job["metrics_path"].as_str().unwrap_or("/metrics"),
        "/metrics"
    );
    assert_eq!(
        job["scheme"].as_str().unwrap_or("http"),
        "http",
        "the ops listener is plain HTTP"
    );
    let mut targets = 0;
    for sc in job["static_configs"].as_sequence().expect("static_configs") {
        for t in sc["targets"].as_sequence().expect("targets") {
            let t = t.as_str().expect("a target string");
            let port: u16 = t
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or_else(|| panic!("target {t} has no port"));
            assert_eq!(
                port,
                ops.port(),
                "target {t}: the ops listener's default port"
            );
            targets += 1;
        }
    }
    assert!(targets > 0, "no targets");
    // The comment that the ops listener is loopback-only until opened.
    let text = read("prometheus/prometheus.yml");
    assert!(
        text.contains(&ops.ip().to_string()),
        "the comment names {}",
        ops.ip()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_metric_is_exported() {
    init_tracing();
    let dash_names = names_in(&proxy_dashboard_exprs());
    let all_dash_names = names_in(&dashboard_exprs());
    let alert_names = names_in(&alert_exprs());
    assert!(!dash_names.is_empty() && !alert_names.is_empty());

    let pki = Pki::new("dash1");
    let idle = Pki::new("dash2");
    let stranger = Pki::new("dash3");
    // One stream per client connection, so that a second one counts a limit refusal.
    let proxy = start_proxy(&[&pki, &idle], |c| c.limits.max_streams_per_client = 1).await;
    let echo = echo_server().await;
    let agent = start_agent(agent_config(&pki, "h1", &proxy, &[("echo", echo)]));

    // Discovery, a client login, a tunnel, a stream with bytes both ways.
    let session = ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
        .await
        .unwrap();
    let mut s = wait_stream(&session, "echo", "dash1", Duration::from_secs(10)).await;
    assert_eq!(echo_once(&mut s, b"dashboard").await, b"dashboard");
    assert!(
        session.open("echo", "dash1", 0).await.is_err(),
        "limit refusal"
    );
    drop(s);

    // A stream refused: a user of dash2, whose agent is not connected.
    let mut opts = client_opts(&idle, &proxy, "bob");
    opts.proxy_host_cas = vec![tunnel_proto::certs::ca_fingerprint(
        pki.host_ca.public_key(),
    )];
    let idle_session = ProxySession::connect(&opts).await.unwrap();
    assert!(idle_session.open("echo", "dash2", 0).await.is_err());

    // A login refused: a user certificate from a CA the proxy does not trust.
    let mut opts = client_opts(&stranger, &proxy, "eve");
    opts.proxy_host_cas = vec![tunnel_proto::certs::ca_fingerprint(
        pki.host_ca.public_key(),
    )];
    assert!(ProxySession::connect(&opts).await.is_err());

    // A connection dropped before login: garbage on the tunnel listener.
    let mut raw = tokio::net::TcpStream::connect(proxy.tunnel).await.unwrap();
    raw.write_all(&[0xffu8; 3000]).await.unwrap();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = raw.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .expect("the proxy closes a garbage connection");

    // A login relay: dash2 has no tunnel to an Auth server.
    let body = r#"{"cluster":"dash2","user":"u","public_key":"x"}"#;
    let status = https(
        &proxy,
        &format!(
            "POST /webapi/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(status, 502, "login relay without a tunnel");

    // A tunnel disconnect: stop the agent and wait (bounded) until the proxy counts it.
    agent.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let m = loop {
        let m = scrape(proxy.ops).await;
        if metric(
            &m,
            "postern_tunnel_disconnects_total",
            &[("cluster", "dash1")],
        ) >= 1.0
        {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy did not count the agent's disconnect:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The activity above reached the label values the alert rules select.
    for (name, labels) in [
        ("postern_stream_opens_total", [("result", "no_tunnel")]),
        ("postern_login_relays_total", [("result", "no_tunnel")]),
        ("postern_tunnels_connected", [("cluster", "dash1")]),
    ] {
        assert!(
            m.lines().any(|l| l.starts_with(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))),
            "{name}{labels:?} missing:\n{m}"
        );
    }

    let dash_missing = missing(&dash_names, &m);
    assert!(
        dash_missing.is_empty(),
        "the dashboard queries metrics the proxy does not export:\n  {}\nscrape:\n{m}",
        dash_missing.join("\n  ")
    );
    let alert_missing = missing(&alert_names, &m);
    assert!(
        alert_missing.is_empty(),
        "the alert rules query metrics the proxy does not export:\n  {}\nscrape:\n{m}",
        alert_missing.join("\n  ")
    );

    // And the other way: the dashboard shows every metric the proxy exports.
    let shown: BTreeSet<&str> = all_dash_names
        .iter()
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
        })
        .collect();
    let exported = families(&m);
    let unshown: Vec<&str> = exported
        .keys()
        .map(String::as_str)
        .filter(|f| f.starts_with("postern_") && !shown.contains(f))
        .collect();
    assert!(unshown.is_empty(), "no dashboard panel for {unshown:?}");

    drop(idle_session);
    drop(session);
    proxy.stop().await;
}
