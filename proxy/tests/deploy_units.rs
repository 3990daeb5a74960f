//! The systemd units in `deploy/systemd/`: not root, hardened, a real command line for one of this
//! workspace's binaries, a stop timeout above the proxy's drain grace, and the state directory the
//! configs in `deploy/` use. `systemd-analyze verify` runs too where it is installed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postern_proxy::ProxyConfig;

const UNITS: [&str; 3] = [
    "postern-proxy.service",
    "postern-agent.service",
    "postern-auth.service",
];

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read(rel: &str) -> String {
    let path = repo(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A unit file: section -> key -> every assignment, in order (systemd allows repeats; an empty
/// assignment resets list settings).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            unit.entry(section.clone()).or_default();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        assert!(!section.is_empty(), "{k} outside a section");
        unit.entry(section.clone())
            .or_default()
            .entry(k.trim().to_owned())
            .or_default()
            .push(v.trim().to_owned());
    }
    unit
}

/// The effective (last) value of `[Service] key`.
fn service<'a>(unit: &'a Unit, name: &str, key: &str) -> &'a str {
    unit.get("Service")
        .and_then(|s| s.get(key))
        .and_then(|v| v.last())
        .unwrap_or_else(|| panic!("{name}: [Service] {key}= is not set"))
}

/// systemd time spans as these units write them: `45`, `45s`, `2min`, `1min 30s`.
fn seconds(span: &str) -> u64 {
    span.split_whitespace()
        .map(|part| {
            let digits = part
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(part.len());
            let n: u64 = part[..digits]
                .parse()
                .unwrap_or_else(|_| panic!("time span {span}"));
            n * match &part[digits..] {
                "" | "s" | "sec" => 1,
                "m" | "min" => 60,
                "h" => 3600,
                other => panic!("time span {span}: unit {other}"),
            }
        })
        .sum()
}

fn units() -> Vec<(&'static str, Unit)> {
    UNITS
        .iter()
        .map(|n| (*n, parse_unit(&read(&format!("deploy/systemd/{n}")))))
        .collect()
}

#[test]
fn unit_parser_and_spans() {
    let u = parse_unit(
        "[Service]\n# c\nUser=a\nExecStart=/x \\\n  --y z\nUser=b\nCapabilityBoundingSet=\n",
    );
    assert_eq!(service(&u, "t", "User"), "b");
    assert_eq!(service(&u, "t", "ExecStart"), "/x  --y z");
    assert_eq!(service(&u, "t", "CapabilityBoundingSet"), "");
    assert_eq!(seconds("45s"), 45);
    assert_eq!(seconds("1min 30s"), 90);
    assert_eq!(seconds("31"), 31);
}

#[test]
fn units_run_as_a_user_and_are_hardened() {
    for (name, unit) in units() {
        let user = service(&unit, name, "User");
        assert!(
            !user.is_empty() && user != "root" && user != "0",
            "{name}: User={user} must be a non-root user"
        );
        for (key, want) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectKernelLogs", "yes"),
            ("ProtectControlGroups", "yes"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("RestrictNamespaces", "yes"),
            ("LockPersonality", "yes"),
            ("MemoryDenyWriteExecute", "yes"),
            ("SystemCallFilter", "@system-service"),
            ("CapabilityBoundingSet", ""),
            ("AmbientCapabilities", ""),
            ("Restart", "on-failure"),
            ("KillSignal", "SIGTERM"),
        ] {
            assert_eq!(service(&unit, name, key), want, "{name}: {key}");
        }
    }
}

/// Every unit raises the descriptor limit above what a full tunnel needs: systemd's default soft
/// limit (1,024) let one user's streams exhaust the Auth server's embedded agent.
#[test]
fn descriptor_limits_fit_a_full_tunnel() {
    let per_tunnel = ProxyConfig::default().limits.max_streams_per_tunnel as u64;
    for (name, unit) in units() {
        let limit: u64 = service(&unit, name, "LimitNOFILE")
            .parse()
            .unwrap_or_else(|_| panic!("{name}: LimitNOFILE must be a number"));
        // The Auth server holds two sockets per stream (its agent's dial and the API's accept).
        let need = if name.contains("auth") {
            2 * per_tunnel
        } else {
            per_tunnel
        } + 1024;
        assert!(
            limit >= need,
            "{name}: LimitNOFILE={limit} is below the {need} a full tunnel needs"
        );
    }
}

#[test]
fn stop_timeout_outlasts_the_proxy_drain() {
    let grace = ProxyConfig::default().shutdown.grace_secs;
    for (name, unit) in units() {
        let stop = seconds(service(&unit, name, "TimeoutStopSec"));
        assert!(
            stop > grace,
            "{name}: TimeoutStopSec={stop}s must exceed the proxy's {grace}s drain grace"
        );
    }
}

/// ExecStart runs this workspace's binary, with its subcommand and `--config /etc/postern/X.toml`
/// for a config that `deploy/X.toml` documents.
#[test]
fn exec_start_is_a_real_command_line() {
    for (name, unit) in units() {
        let exec = service(&unit, name, "ExecStart");
        let argv: Vec<&str> = exec.split_whitespace().collect();
        let binary = Path::new(argv[0]);
        assert!(
            binary.is_absolute(),
            "{name}: ExecStart needs an absolute path"
        );
        let bin = binary.file_name().unwrap().to_str().unwrap();
        let short = name.trim_end_matches(".service");
        assert_eq!(bin, short, "{name}: runs {bin}");
        let (expected, config): (&[&str], &str) = match bin {
            "postern-proxy" => (&["--config", "/etc/postern/proxy.toml"], "proxy.toml"),
            "postern-agent" => (&["--config", "/etc/postern/agent.toml"], "agent.toml"),
            "postern-auth" => (
                &["start", "--config", "/etc/postern/auth.toml"],
                "auth.toml",
            ),
            other => panic!("{name}: {other} is not a binary of this workspace"),
        };
        assert_eq!(&argv[1..], expected, "{name}: ExecStart arguments");
        assert!(
            repo(&format!("deploy/{config}")).is_file(),
            "{name}: deploy/{config} documents the config it reads"
        );
    }
}

/// The proxy's command line goes through the real binary: its flags parse (clap would exit 2 with
/// a usage error) and it gets as far as reading the config file.
#[test]
fn proxy_binary_accepts_the_unit_command_line() {
    let (_, unit) = units().remove(0);
    let exec = service(&unit, "postern-proxy.service", "ExecStart");
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.toml");
    let args: Vec<String> = exec
        .split_whitespace()
        .skip(1)
        .map(|a| {
            if a.starts_with("/etc/postern/") {
                missing.display().to_string()
            } else {
                a.to_owned()
            }
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_postern-proxy"))
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read config {}", missing.display())),
        "{stderr}"
    );
}

/// The agent's and the Auth server's binaries are not built by this package's tests, so their
/// flags are checked in their clap definitions: the agent's required `--config`, the Auth
/// server's `start` subcommand with `--config` and an off-by-default `--allow-root`.
#[test]
fn agent_and_auth_declare_the_unit_flags() {
    let agent = read("agent/src/main.rs");
    assert!(
        agent.contains("#[arg(long, short)]\n    config: PathBuf,"),
        "postern-agent no longer declares --config"
    );
    let auth = read("auth/src/main.rs");
    assert!(
        auth.contains("    Start {"),
        "postern-auth no longer has `start`"
    );
    assert!(
        auth.contains("#[arg(long, short)]\n        config: Option<PathBuf>,"),
        "postern-auth start no longer declares --config"
    );
    assert!(auth.contains("allow_root: bool,"));
    let (_, unit) = units().remove(2);
    assert!(!service(&unit, "postern-auth.service", "ExecStart").contains("--allow-root"));
}

/// Each unit's StateDirectory is where the deploy/ configs (and the proxy's defaults) keep data.
#[test]
fn state_directories_match_the_configs() {
    let state = |i: usize| {
        let (name, unit) = units().remove(i);
        let dir = service(&unit, name, "StateDirectory");
        assert_eq!(
            service(&unit, name, "StateDirectoryMode"),
            "0700",
            "{name}: keys live there"
        );
        PathBuf::from("/var/lib").join(dir)
    };
    assert_eq!(state(0), ProxyConfig::default().data_dir);
    let proxy = ProxyConfig::from_file(&repo("deploy/proxy.toml")).unwrap();
    assert_eq!(state(0), proxy.data_dir);
    let agent: toml::Table = read("deploy/agent.toml").parse().unwrap();
    let key = PathBuf::from(agent["host_key_file"].as_str().unwrap());
    assert!(key.starts_with(state(1)), "agent key {}", key.display());
    let auth: toml::Table = read("deploy/auth.toml").parse().unwrap();
    assert_eq!(state(2), PathBuf::from(auth["data_dir"].as_str().unwrap()));
}

/// `systemd-analyze verify` where installed. The binaries are not installed here, so ExecStart's
/// path is pointed at an executable that exists (this test binary); every other line is verified
/// as written, and any complaint naming a unit fails the test.
#[test]
fn systemd_analyze_verify() {
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        println!("note: systemd-analyze is not installed; skipping `systemd-analyze verify`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut paths = Vec::new();
    for name in UNITS {
        let text = read(&format!("deploy/systemd/{name}"));
        let bin = format!("/usr/local/bin/{}", name.trim_end_matches(".service"));
        assert!(text.contains(&bin), "{name}: ExecStart={bin}");
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace(&bin, &exe.display().to_string())).unwrap();
        paths.push(path);
    }
    let mut child = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("systemd-analyze verify did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| UNITS.iter().any(|u| l.contains(u)))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    if !stderr.trim().is_empty() {
        println!("systemd-analyze verify (not about these units):\n{stderr}");
    }
}
