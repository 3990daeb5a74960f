//! The Kubernetes manifests in `deploy/kubernetes/`: `validate.sh` checks every document against
//! the Kubernetes schemas offline (the `kubernetes-validate` package, installed by the script when
//! missing) and what a schema cannot see (non-root, read-only, probes, grace periods, references,
//! network policies). This test runs it and fails, never skips, when Python is missing. It also
//! reads the proxy's ConfigMap with the proxy's own config parser, and the agent's with the
//! agent's.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postern_proxy::ProxyConfig;
use serde::Deserialize;
use serde_norway::Value as Yaml;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read(rel: &str) -> String {
    let path = repo(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file.
fn documents(rel: &str) -> Vec<Yaml> {
    let text = read(rel);
    serde_norway::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| {
            Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{rel} document {}: {e}", i + 1))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The one document of `kind` in a file.
fn the(rel: &str, kind: &str) -> Yaml {
    let mut found: Vec<Yaml> = documents(rel)
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "{rel}: one {kind}");
    found.remove(0)
}

/// A ConfigMap's data entry.
fn config_file(rel: &str, key: &str) -> String {
    the(rel, "ConfigMap")["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{rel}: no data key {key}"))
        .to_owned()
}

/// `python3 --version` succeeds.
fn have_python3() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn manifests_validate_offline() {
    assert!(
        have_python3(),
        "python3 is not installed: deploy/kubernetes/validate.sh needs it (Debian: apt-get install \
         python3 python3-pip; the script installs kubernetes-validate itself)"
    );
    // Output goes to files, not pipes: pip's output alone can fill a pipe while we wait.
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let grace = ProxyConfig::default().shutdown.grace_secs;
    let mut child = Command::new("bash")
        .arg(repo("deploy/kubernetes/validate.sh"))
        .env("POSTERN_PROXY_DEFAULT_GRACE_SECS", grace.to_string())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run bash deploy/kubernetes/validate.sh: {e}"));
    // A first run may install python3-pip and kubernetes-validate.
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "deploy/kubernetes/validate.sh did not finish within 600 s\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.success(),
        "deploy/kubernetes/validate.sh: {status}\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("valid against the Kubernetes") && stdout.contains("checks passed"),
        "validate.sh succeeded without its summary line:\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
}

/// The proxy's ConfigMap is a proxy.toml the proxy accepts, and the Deployment's termination
/// grace outlasts the preStop wait plus the drain it configures.
#[test]
fn proxy_configmap_is_a_valid_proxy_config() {
    let toml = config_file("deploy/kubernetes/proxy/configmap.yaml", "proxy.toml");
    let config = ProxyConfig::from_toml(&toml).unwrap_or_else(|e| panic!("proxy.toml: {e}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("proxy.toml: {e}"));
    assert!(
        !config.listen.ops.ip().is_loopback(),
        "listen.ops {}: the kubelet's probes come from outside the pod",
        config.listen.ops
    );
    for (field, path) in [
        ("ssh.host_key_file", config.ssh.host_key_file.as_ref()),
        ("web_tls.key_file", config.web_tls.key_file.as_ref()),
    ] {
        let path = path.unwrap_or_else(|| panic!("{field} must be set: one key for every replica"));
        assert!(
            path.starts_with(&config.data_dir),
            "{field} {} is outside data_dir",
            path.display()
        );
    }

    let deployment = the("deploy/kubernetes/proxy/deployment.yaml", "Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    let tgps = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let proxy = spec["containers"]
        .as_sequence()
        .expect("containers")
        .iter()
        .find(|c| c["args"][0].as_str() == Some("postern-proxy"))
        .expect("a postern-proxy container");
    let pre_stop = &proxy["lifecycle"]["preStop"]["exec"]["command"];
    assert_eq!(pre_stop[0].as_str(), Some("sleep"), "preStop: {pre_stop:?}");
    let pre_stop: u64 = pre_stop[1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("preStop: sleep SECONDS");
    // After the grace the proxy gives connections up to 5 s to close.
    let need = pre_stop + config.shutdown.grace_secs + 5;
    assert!(
        tgps > need,
        "terminationGracePeriodSeconds {tgps} must exceed preStop {pre_stop} + grace_secs {} + 5",
        config.shutdown.grace_secs
    );
    let mounts = proxy["volumeMounts"].as_sequence().expect("volumeMounts");
    assert!(
        mounts
            .iter()
            .any(|m| m["mountPath"].as_str().map(PathBuf::from) == Some(config.data_dir.clone())),
        "data_dir {} is not a volume of the proxy container (the root filesystem is read-only)",
        config.data_dir.display()
    );
}

/// The agent's ConfigMap is a valid agent config, and joins with a token (`join_token_file`,
/// `ca_pin`): the pod's first start enrolls it.
#[test]
fn agent_configmap_matches_the_agent_config() {
    let toml = config_file("deploy/kubernetes/agent/configmap.yaml", "agent.toml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    let config =
        postern_agent::AgentConfig::from_file(&path).unwrap_or_else(|e| panic!("agent.toml: {e}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("agent.toml: {e}"));
    assert!(
        config.join_token_file.is_some() && config.ca_pin.is_some(),
        "agent.toml joins with a token and a CA pin"
    );
}
