//! Figures of the Postern proxy seen from OpenSSH's client and from many agents: `ssh -W`
//! through the proxy, and agent log-ins per second with the proxy's RSS per idle tunnel.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use postern_dial::mint::{self, CertSpec};
use postern_dial::ssh::{Identity, ProxyVerifier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::measure::ZEROS;
use super::postern::PosternSetup;
use crate::proc_stats::rss_sum;

/// `ssh -W sink.bench` through the Postern proxy: one 1 GiB push through OpenSSH's client.
pub async fn ssh_w_push(p: &PosternSetup, cipher: &str, bytes: u64) -> anyhow::Result<f64> {
    let mut child = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", p.known_hosts.display()))
        .arg("-o")
        .arg(format!(
            "CertificateFile={}",
            mint::cert_path(&p.user_key).display()
        ))
        .arg("-i")
        .arg(&p.user_key)
        .args([
            "-o",
            &format!("Ciphers={cipher}"),
            "-p",
            &p.tunnel.port().to_string(),
            "-l",
            "bench",
            "-W",
            "sink.bench:3025",
            "127.0.0.1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("ssh (apt-get install openssh-client)")?;
    let (mut stdin, mut stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            stdin.write_all(&ZEROS[..n]).await?;
            left -= n as u64;
        }
        drop(stdin);
        anyhow::Ok(())
    });
    let mut count = [0u8; 8];
    stdout
        .read_exact(&mut count)
        .await
        .context("ssh -W: no count back")?;
    writer.await??;
    let secs = start.elapsed().as_secs_f64();
    let _ = child.kill().await;
    if u64::from_be_bytes(count) != bytes {
        bail!(
            "ssh -W: the sink got {} of {bytes} bytes",
            u64::from_be_bytes(count)
        );
    }
    Ok(bytes as f64 / 1048576.0 / secs)
}

/// Checks the proxy's host key as an agent does.
struct AgentHandler(ProxyVerifier);

impl russh::client::Handler for AgentHandler {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(self.0.verify(key))
    }
}

/// Logs in `n` agents (64 at a time): set-ups per second, and the proxy's RSS per idle tunnel.
pub async fn agent_logins(p: &PosternSetup, n: usize) -> anyhow::Result<(f64, f64)> {
    let now = mint::now_unix();
    let mut ids = Vec::new();
    for i in 0..n {
        let k = mint::generate_key();
        let c = mint::issue(
            &p.host_ca,
            k.public_key(),
            &CertSpec::Agent {
                host_id: format!("t{i}"),
                cluster: "bench".into(),
            },
            now - 60,
            now + 3600,
        )?;
        ids.push((
            format!("t{i}"),
            Identity::new(k, c).map_err(anyhow::Error::msg)?,
        ));
    }
    let ca = tunnel_proto::certs::ca_fingerprint(p.host_ca.public_key());
    let config = Arc::new(postern_dial::ssh::client_config(Duration::from_secs(60)));
    let before = rss_sum(&[p.proxy_pid]);
    let start = Instant::now();
    let mut held = Vec::new();
    let mut pending = Vec::new();
    let addr = p.tunnel.to_string();
    let total = ids.len();
    for (i, (host, id)) in ids.into_iter().enumerate() {
        let (config, addr) = (config.clone(), addr.clone());
        pending.push(tokio::spawn(async move {
            let v = ProxyVerifier::new("127.0.0.1", vec![ca], vec![]);
            let login = tunnel_proto::names::agent_login(&host, "bench");
            let h =
                postern_dial::ssh::login(&addr, config, AgentHandler(v.clone()), &v, &login, &id)
                    .await?;
            h.tcpip_forward("echo", 0).await?;
            anyhow::Ok(h)
        }));
        if pending.len() == 64 || i + 1 == total {
            for t in pending.drain(..) {
                held.push(t.await??);
            }
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_sum(&[p.proxy_pid]);
    drop(held);
    Ok((rate, after.saturating_sub(before) as f64 / n as f64))
}
