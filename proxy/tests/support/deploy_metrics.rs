//! The metric names that `deploy/`'s Grafana dashboard and alert rules query for one daemon, and
//! a check that a scrape exports them: shared by the agent's and the Auth server's ops tests
//! (`#[path]`-included; self-contained).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::Path;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `postern_[a-z0-9_]+` identifier in `text`.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("postern_") {
        let start = i + at;
        let mut end = start + "postern_".len();
        while end < b.len() && matches!(b[end], b'a'..=b'z' | b'0'..=b'9' | b'_') {
            end += 1;
        }
        if start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => m.iter().for_each(|(k, v)| match (k.as_str(), v) {
            ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
            _ => exprs(v, out),
        }),
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Metric names of the dashboard queries that select `job=~"$<job_var>"`.
pub fn dashboard_names(job_var: &str) -> BTreeSet<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("grafana/postern-dashboard.json")).expect("dashboard JSON");
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    let sel = format!("job=~\"${job_var}\"");
    all.iter()
        .filter(|e| e.contains(&sel))
        .flat_map(|e| metric_names(e))
        .collect()
}

/// Metric names of the alert rules in `group`; each rule has a `runbook_url` whose anchor is a
/// section of docs/runbook.md.
pub fn alert_names(group: &str) -> BTreeSet<String> {
    let rules: serde_norway::Value =
        serde_norway::from_str(&read("prometheus/postern-alerts.yml")).expect("alerts YAML");
    let runbook =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runbook.md"))
            .expect("docs/runbook.md");
    let g = rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .find(|g| g["name"].as_str() == Some(group))
        .unwrap_or_else(|| panic!("no alert group {group}"));
    let mut out = BTreeSet::new();
    for rule in g["rules"].as_sequence().expect("rules") {
        let name = rule["alert"].as_str().expect("alert name");
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: annotations.runbook_url"));
        assert!(
            url.ends_with(&format!("#{}", name.to_lowercase()))
                && runbook.contains(&format!("\n## {name}\n")),
            "{name}: runbook_url {url} must point at its section '## {name}' of docs/runbook.md"
        );
        out.extend(metric_names(rule["expr"].as_str().expect("expr")));
    }
    out
}

/// The names (histograms through `_bucket`, `_sum`, `_count`) that `scrape` does not export.
pub fn missing(names: &BTreeSet<String>, scrape: &str) -> Vec<String> {
    let families: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let samples: BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    names
        .iter()
        .filter(|n| !(families.contains(n.as_str()) && samples.contains(n.as_str())))
        .filter(|n| {
            !["_bucket", "_sum", "_count"].iter().any(|s| {
                n.strip_suffix(s).is_some_and(|b| families.contains(b))
                    && samples.contains(n.as_str())
            })
        })
        .cloned()
        .collect()
}

/// `GET path` on a plain-HTTP listener: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut out),
    )
    .await
    .expect("the ops listener answers")
    .unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
