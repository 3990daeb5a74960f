//! Interoperability with Debian's real OpenSSH: `ssh -W` through the proxy with Postern-minted and
//! `ssh-keygen`-signed user certificates, refusal reasons as `ssh` prints them, refused logins,
//! and a proxy host certificate signed by `ssh-keygen` as the russh client sees it.

#[path = "support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use postern_client::{ClientError, ProxySession};
use postern_dial::DialError;
use postern_proxy::mint::{self, CertSpec};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

const SSH: &str = "/usr/bin/ssh";
const SSH_KEYGEN: &str = "/usr/bin/ssh-keygen";
/// Bound on any one `ssh` or `ssh-keygen` run.
const RUN_LIMIT: Duration = Duration::from_secs(20);
/// Bound on a whole test.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Fails (never skips) when OpenSSH is not installed.
fn require_openssh() {
    for bin in [SSH, SSH_KEYGEN] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: these tests drive the real OpenSSH client; run `apt-get install openssh-client`"
        );
    }
}

/// Runs a test body within [`TEST_LIMIT`].
async fn within<T>(body: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {TEST_LIMIT:?}"))
}

/// Runs a command to completion within [`RUN_LIMIT`], stdin closed.
async fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not finish within {RUN_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `ssh-keygen` with `args` and asserts it succeeded.
async fn ssh_keygen(args: &[&str]) {
    let mut cmd = Command::new(SSH_KEYGEN);
    cmd.args(args);
    let out = run(cmd).await;
    assert!(
        out.status.success(),
        "ssh-keygen {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ssh-keygen -t ed25519` into `path` (no passphrase); returns `path`.
async fn keygen_ed25519(path: &Path) -> PathBuf {
    ssh_keygen(&["-q", "-t", "ed25519", "-N", "", "-f", s(path)]).await;
    path.to_owned()
}

/// `ssh-keygen -s ca` signs `key.pub` into `key-cert.pub` for `principals`, valid -5m..+1h.
/// `host` makes a host certificate.
async fn keygen_sign(ca: &Path, key: &Path, id: &str, principals: &str, host: bool) -> PathBuf {
    let public = mint::pub_path(key);
    let mut args = vec!["-q", "-s", s(ca), "-I", id, "-n", principals];
    if host {
        args.push("-h");
    }
    args.extend(["-V", "-5m:+1h", s(&public)]);
    ssh_keygen(&args).await;
    mint::cert_path(key)
}

/// `ssh-keygen -s ca` signs a user certificate for `principal` with extra `-O` options.
async fn keygen_sign_user_with(ca: &Path, key: &Path, principal: &str, opts: &[&str]) {
    let public = mint::pub_path(key);
    let mut args = vec!["-q", "-s", s(ca), "-I", "restricted", "-n", principal];
    for o in opts {
        args.extend(["-O", o]);
    }
    args.extend(["-V", "-5m:+1h", s(&public)]);
    ssh_keygen(&args).await;
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// A known_hosts file trusting the cluster's host CA for every host.
fn known_hosts(pki: &Pki) -> PathBuf {
    let ca = pki.host_ca.public_key().to_openssh().unwrap();
    let path = pki.path("known_hosts");
    std::fs::write(&path, format!("@cert-authority * {ca}\n")).unwrap();
    path
}

/// Writes a Postern-minted user key and certificate for `user`; returns the key path.
fn minted_user_key(pki: &Pki, user: &str) -> PathBuf {
    let (key, cert) = pki.cert(&pki.user_ca, &CertSpec::User { user: user.into() });
    let path = pki.path(&format!("id_{user}"));
    mint::write_key_pair(&path, &key).unwrap();
    mint::write_cert(&mint::cert_path(&path), &cert).unwrap();
    path
}

/// `ssh -W <dest> 127.0.0.1` to the proxy's tunnel listener as `user`, verifying its host
/// certificate through `known_hosts`. Offers `key` and, if present, its certificate.
fn ssh_w(known_hosts: &Path, key: &Path, proxy: &Proxy, user: &str, dest: &str) -> Command {
    let mut cmd = Command::new(SSH);
    cmd.args(["-F", "/dev/null", "-o", "IdentitiesOnly=yes"])
        .args(["-o", "IdentityAgent=none", "-o", "BatchMode=yes"])
        .args([
            "-o",
            "ConnectTimeout=10",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()));
    let cert = mint::cert_path(key);
    if cert.exists() {
        cmd.arg("-o")
            .arg(format!("CertificateFile={}", cert.display()));
    }
    cmd.arg("-i")
        .arg(key)
        .arg("-p")
        .arg(proxy.tunnel.port().to_string())
        .args(["-l", user, "-W", dest, "127.0.0.1"])
        .kill_on_drop(true);
    cmd
}

/// Spawns `cmd` with piped stdio.
fn spawn_piped(mut cmd: Command) -> Child {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Reads a child's pipe to its end in the background, so a chatty child never blocks on it.
fn drain(pipe: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf).await;
        }
        buf
    })
}

/// Waits for `child` to exit within [`RUN_LIMIT`]; otherwise kills it and panics with `what` and
/// its stderr.
async fn wait_or_kill(mut child: Child, what: &str) -> Output {
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = tokio::time::timeout(RUN_LIMIT, child.wait()).await;
    if !matches!(status, Ok(Ok(_))) {
        let _ = child.kill().await;
    }
    let stderr = stderr.await.unwrap();
    let Ok(Ok(status)) = status else {
        let err = String::from_utf8_lossy(&stderr);
        panic!("{what}: ssh did not exit within {RUN_LIMIT:?} ({status:?}); its stderr: {err}");
    };
    Output {
        status,
        stdout: stdout.await.unwrap(),
        stderr,
    }
}

/// Round-trips `msg` through a running `ssh -W` to an echo service, closes its stdin and returns
/// its exit status and stderr.
async fn echo_through(mut child: Child, msg: &[u8]) -> (std::process::ExitStatus, String) {
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(msg).await.unwrap();
    stdin.flush().await.unwrap();
    let mut back = vec![0u8; msg.len()];
    let read = tokio::time::timeout(RUN_LIMIT, stdout.read_exact(&mut back)).await;
    if !matches!(read, Ok(Ok(_))) {
        child.stdout = Some(stdout);
        let _ = child.start_kill();
        let out = wait_or_kill(child, "ssh -W after kill").await;
        panic!(
            "no echo through ssh -W ({read:?}); its stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(back, msg, "echo through ssh -W");
    drop(stdin);
    let out = wait_or_kill(child, "ssh exits once its stdin is closed").await;
    let rest = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(rest.is_empty(), "unexpected extra output: {rest:?}");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A proxy for `pki`'s cluster with an agent serving the echo service as `auth`, tunnel up.
async fn proxy_with_echo_agent(pki: &Pki) -> (Proxy, Agent) {
    let proxy = start_proxy(&[pki], |_| {}).await;
    let echo = echo_server().await;
    let agent = start_agent(agent_config(pki, "h1", &proxy, &[("auth", echo)]));
    let session = ProxySession::connect(&client_opts(pki, &proxy, "alice"))
        .await
        .unwrap();
    wait_stream(&session, "auth", &pki.cluster, Duration::from_secs(5)).await;
    (proxy, agent)
}

/// Runs `ssh -W` to the echo service and checks bytes come back and ssh exits cleanly.
async fn assert_ssh_echo(pki: &Pki, proxy: &Proxy, key: &Path, msg: &[u8]) {
    let dest = format!("auth.{}:3025", pki.cluster);
    let cmd = ssh_w(&known_hosts(pki), key, proxy, "alice", &dest);
    let (status, stderr) = echo_through(spawn_piped(cmd), msg).await;
    assert!(status.success(), "ssh -W exited {status}: {stderr}");
}

/// Runs an `ssh -W` that must fail; returns its stderr.
async fn ssh_must_fail(cmd: Command) -> String {
    let out = run(cmd).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "ssh should have failed: {stderr}");
    stderr
}

/// A user key for `alice` with a certificate `ssh-keygen` signed with a CA the proxy does not
/// trust; returns the key path.
async fn rogue_user_key(pki: &Pki) -> PathBuf {
    let rogue_ca = keygen_ed25519(&pki.path("rogue_ca")).await;
    let key = keygen_ed25519(&pki.path("id_rogue")).await;
    keygen_sign(&rogue_ca, &key, "alice-id", "alice", false).await;
    key
}

fn auth_failures(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        "postern_auth_failures_total",
        &[("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_dash_w_reaches_target_with_postern_minted_cert() {
    require_openssh();
    init_tracing();
    within(async {
        let pki = Pki::new("ossh1");
        let (proxy, agent) = proxy_with_echo_agent(&pki).await;
        let key = minted_user_key(&pki, "alice");
        assert_ssh_echo(&pki, &proxy, &key, b"hello from OpenSSH").await;
        agent.stop().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_keygen_signed_user_cert_is_accepted() {
    require_openssh();
    init_tracing();
    within(async {
        let pki = Pki::new("ossh2");
        let (proxy, agent) = proxy_with_echo_agent(&pki).await;
        let key = keygen_ed25519(&pki.path("id_keygen")).await;
        keygen_sign(&pki.path("user_ca"), &key, "alice-id", "alice", false).await;
        assert_ssh_echo(&pki, &proxy, &key, b"signed by ssh-keygen").await;
        agent.stop().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_prints_the_proxys_refusal_reason() {
    require_openssh();
    init_tracing();
    within(async {
        let pki = Pki::new("ossh3");
        let (proxy, agent) = proxy_with_echo_agent(&pki).await;
        let key = minted_user_key(&pki, "alice");
        let hosts = known_hosts(&pki);
        // `<target>.<cluster>`: cluster `nosuch` is not configured on this proxy.
        let cmd = ssh_w(&hosts, &key, &proxy, "alice", "auth.nosuch:3025");
        let err = ssh_must_fail(cmd).await;
        assert!(err.contains("open failed"), "{err}");
        assert!(
            err.contains("unknown cluster nosuch: this proxy does not route to it"),
            "{err}"
        );
        let dest = format!("db.{}:3025", pki.cluster);
        let err = ssh_must_fail(ssh_w(&hosts, &key, &proxy, "alice", &dest)).await;
        assert!(err.contains("no target named 'db'"), "{err}");
        agent.stop().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_with_wrong_ca_or_plain_key_is_refused() {
    require_openssh();
    init_tracing();
    within(async {
        let pki = Pki::new("ossh4");
        let proxy = start_proxy(&[&pki], |_| {}).await;
        let hosts = known_hosts(&pki);
        let dest = format!("auth.{}:3025", pki.cluster);
        let before = scrape(proxy.ops).await;

        let key = rogue_user_key(&pki).await;
        let err = ssh_must_fail(ssh_w(&hosts, &key, &proxy, "alice", &dest)).await;
        let after = scrape(proxy.ops).await;
        assert!(
            auth_failures(&after, "untrusted_ca") > auth_failures(&before, "untrusted_ca"),
            "untrusted_ca not counted; ssh said: {err}\n{after}"
        );

        let plain = keygen_ed25519(&pki.path("id_plain")).await;
        let err = ssh_must_fail(ssh_w(&hosts, &plain, &proxy, "alice", &dest)).await;
        assert!(err.contains("Permission denied"), "{err}");
        let last = scrape(proxy.ops).await;
        assert!(
            auth_failures(&last, "no_certificate") > auth_failures(&after, "no_certificate"),
            "no_certificate not counted; ssh said: {err}\n{last}"
        );
        proxy.stop().await;
    })
    .await;
}

/// OpenSSH learns why its certificate was refused ("Permission denied" from the empty
/// USERAUTH_FAILURE, or the "certificate refused" disconnect), not just "Connection closed": the
/// proxy waits for russh's auth-rejection delay before it cuts the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_is_told_why_its_certificate_was_refused() {
    require_openssh();
    init_tracing();
    within(async {
        let pki = Pki::new("ossh6");
        let proxy = start_proxy(&[&pki], |_| {}).await;
        let key = rogue_user_key(&pki).await;
        let dest = format!("auth.{}:3025", pki.cluster);
        let cmd = ssh_w(&known_hosts(&pki), &key, &proxy, "alice", &dest);
        let err = ssh_must_fail(cmd).await;
        assert!(
            err.contains("certificate refused") || err.contains("Permission denied"),
            "ssh was not told why: {err}"
        );
        proxy.stop().await;
    })
    .await;
}

/// A proxy config whose host key is written here and whose host certificate `ssh-keygen -h`
/// signs with the cluster's host CA.
async fn config_with_keygen_host_cert(
    pki: &Pki,
    data_dir: &Path,
) -> postern_proxy::config::ProxyConfig {
    let config = proxy_config(&[pki], data_dir);
    let key_path = config.host_key_path();
    mint::write_key_pair(&key_path, &mint::generate_key()).unwrap();
    let host_ca = pki.path("host_ca");
    let cert = keygen_sign(&host_ca, &key_path, "proxy", "127.0.0.1,localhost", true).await;
    assert_eq!(
        cert,
        config.host_cert_path(),
        "ssh-keygen's certificate path"
    );
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn russh_client_verifies_ssh_keygen_host_cert() {
    require_openssh();
    init_tracing();
    within(async {
        let pki = Pki::new("ossh5");
        let data_dir = tempfile::tempdir().unwrap();
        let config = config_with_keygen_host_cert(&pki, data_dir.path()).await;
        let proxy = start_proxy_with(config, data_dir).await;
        ProxySession::connect(&client_opts(&pki, &proxy, "alice"))
            .await
            .expect("russh client accepts the ssh-keygen host certificate");

        let other = Pki::new("ossh5");
        let mut opts = client_opts(&pki, &proxy, "alice");
        opts.proxy_host_cas = vec![tunnel_proto::certs::ca_fingerprint(
            other.host_ca.public_key(),
        )];
        match ProxySession::connect(&opts).await {
            Err(ClientError::Dial(DialError::HostVerification { detail, .. })) => {
                assert!(detail.contains("untrusted CA"), "{detail}")
            }
            Err(e) => panic!("expected a host verification failure, got: {e}"),
            Ok(_) => panic!("a proxy signed by another host CA must not be trusted"),
        }
        proxy.stop().await;
    })
    .await;
}

/// A certificate made with `ssh-keygen -O no-port-forwarding` or `-O clear` lacks
/// `permit-port-forwarding`: OpenSSH's sshd refuses its `-W`, and so does the proxy, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_permit_port_forwarding_is_refused_streams() {
    require_openssh();
    init_tracing();
    within(async {
        let pki = Pki::new("ossh7");
        let (proxy, agent) = proxy_with_echo_agent(&pki).await;
        let hosts = known_hosts(&pki);
        let dest = format!("auth.{}:3025", pki.cluster);
        for (i, opt) in ["no-port-forwarding", "clear"].iter().enumerate() {
            let key = keygen_ed25519(&pki.path(&format!("id_nopf{i}"))).await;
            keygen_sign_user_with(&pki.path("user_ca"), &key, "alice", &[opt]).await;
            let err = ssh_must_fail(ssh_w(&hosts, &key, &proxy, "alice", &dest)).await;
            assert!(
                err.contains("open failed") && err.contains("does not permit port forwarding"),
                "-O {opt}: {err}"
            );
        }
        agent.stop().await;
        proxy.stop().await;
    })
    .await;
}

/// A critical option the proxy cannot enforce is refused, and `ssh` is told which one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_is_told_the_critical_option_it_was_refused_for() {
    require_openssh();
    init_tracing();
    within(async {
        let pki = Pki::new("ossh8");
        let (proxy, agent) = proxy_with_echo_agent(&pki).await;
        let hosts = known_hosts(&pki);
        let dest = format!("auth.{}:3025", pki.cluster);
        let key = keygen_ed25519(&pki.path("id_forced")).await;
        keygen_sign_user_with(
            &pki.path("user_ca"),
            &key,
            "alice",
            &["force-command=/bin/true"],
        )
        .await;
        let err = ssh_must_fail(ssh_w(&hosts, &key, &proxy, "alice", &dest)).await;
        assert!(
            err.contains("critical option 'force-command'"),
            "ssh was not told the option: {err}"
        );
        let m = scrape(proxy.ops).await;
        assert!(auth_failures(&m, "critical_option") >= 1.0, "{m}");
        agent.stop().await;
        proxy.stop().await;
    })
    .await;
}

/// An RSA user key (certificate signed by the cluster's Ed25519 CA) is refused as "RSA is not
/// supported" in the proxy's log and metric, not as a bad signature. (`ssh` itself prints only
/// "Permission denied": an SSH auth failure carries no text.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_user_key_is_refused_as_rsa_not_supported() {
    require_openssh();
    init_tracing();
    within(async {
        let pki = Pki::new("ossh9");
        let proxy = start_proxy(&[&pki], |_| {}).await;
        let hosts = known_hosts(&pki);
        let key = pki.path("id_rsa");
        ssh_keygen(&["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", s(&key)]).await;
        keygen_sign_user_with(&pki.path("user_ca"), &key, "alice", &[]).await;
        let dest = format!("auth.{}:3025", pki.cluster);
        let err = ssh_must_fail(ssh_w(&hosts, &key, &proxy, "alice", &dest)).await;
        assert!(err.contains("Permission denied"), "{err}");
        let m = scrape(proxy.ops).await;
        assert!(auth_failures(&m, "rsa_not_supported") >= 1.0, "{m}");
        // The Rust client says so before it dials: an RSA key, or a certificate from an RSA CA.
        let e = postern_dial::ssh::Identity::load(&key, &mint::cert_path(&key)).unwrap_err();
        assert!(e.to_string().contains("RSA is not supported"), "{e}");
        let rsa_ca = pki.path("rsa_ca");
        ssh_keygen(&["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", s(&rsa_ca)]).await;
        let ed = keygen_ed25519(&pki.path("id_ed_rsa_ca")).await;
        keygen_sign_user_with(&rsa_ca, &ed, "alice", &[]).await;
        let e = postern_dial::ssh::Identity::load(&ed, &mint::cert_path(&ed)).unwrap_err();
        assert!(e.to_string().contains("RSA is not supported"), "{e}");
        proxy.stop().await;
    })
    .await;
}

/// `pctl lock --user`: an `ssh -W` stream already open is closed, and `ssh` prints the lock's
/// message (the disconnect description).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_prints_the_lock_message_when_its_stream_is_closed() {
    require_openssh();
    within(async {
        let c = cluster::Cluster::start("ossh10", 1, 60).await;
        c.role("kind: role\nmetadata: {name: web-prod}\nspec:\n  allow:\n    target_labels: {env: prod}\nversion: v7\n")
            .await;
        let echo = echo_server().await;
        let agent = c
            .service_agent("web-1", 0, &[("web", echo, &[("env", "prod")])])
            .await;
        let probe = c.user_session("wendy", &["web-prod"], 0).await;
        wait_stream(&probe, "web", "ossh10", Duration::from_secs(20)).await;
        let id = c.identity("wendy").await;
        let key = c.dir.path().join("id_wendy");
        postern_api::identity::write_private_atomic(&key, id.private_key.as_bytes()).unwrap();
        std::fs::write(mint::cert_path(&key), format!("{}\n", id.ssh_cert)).unwrap();
        let hosts = c.dir.path().join("known_hosts");
        std::fs::write(&hosts, format!("@cert-authority * {}\n", c.host_ca)).unwrap();
        let mut child = spawn_piped(ssh_w(&hosts, &key, &c.proxies[0], "wendy", "web.ossh10:80"));
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        stdin.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(RUN_LIMIT, stdout.read_exact(&mut back))
            .await
            .expect("echo through ssh -W")
            .unwrap();
        c.admin
            .create_lock(postern_api::proto::Lock {
                user: "wendy".into(),
                message: "incident 7: wendy suspended".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        child.stdout = Some(stdout);
        let out = wait_or_kill(child, "ssh -W after the lock").await;
        drop(stdin);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("incident 7: wendy suspended"), "ssh said: {err}");
        agent.stop().await;
        c.stop().await;
    })
    .await;
}
