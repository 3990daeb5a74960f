//! The OpenSSH chain: the service side runs `ssh -N -R` into a loopback `sshd`, the client side
//! `ssh -N -L` into the same `sshd` (two encrypted legs, like Postern's).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use tokio::process::Command;

use super::support::{Guard, free_port, wait_port};

/// A running chain: `sshd`, the `-R` client and the `-L` client.
pub struct OpenSshSetup {
    _sshd: Guard,
    _r: Guard,
    _l: Guard,
    /// The three processes' pids (their children count too: see `proc_stats::tree`).
    pub pids: Vec<u32>,
    /// The `-L` port that reaches the sink.
    pub sink: SocketAddr,
    /// The `-L` port that reaches the echo.
    pub echo: SocketAddr,
}

/// Starts `sshd` with only `cipher`, and the two forwarding clients, in `dir`.
pub async fn start_openssh(
    dir: &Path,
    cipher: &str,
    sink: SocketAddr,
    echo: SocketAddr,
) -> anyhow::Result<OpenSshSetup> {
    let sshd_bin = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("sshd not found (apt-get install openssh-server)")?;
    let _ = std::fs::create_dir_all("/run/sshd");
    let keygen = |path: &Path| {
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
    };
    let (hk, uk) = (dir.join("sshd_host_key"), dir.join("ssh_user_key"));
    keygen(&hk)?;
    keygen(&uk)?;
    std::fs::copy(dir.join("ssh_user_key.pub"), dir.join("authorized_keys"))?;
    let port = free_port()?;
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nStrictModes no\nUsePAM no\n\
             PermitRootLogin yes\nPubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\nCiphers {cipher}\nMaxStartups 1000\nLogLevel ERROR\n",
            hk.display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    let sshd = Guard(
        Command::new(sshd_bin)
            .arg("-D")
            .arg("-f")
            .arg(&cfg)
            .arg("-E")
            .arg(dir.join("sshd.log"))
            .kill_on_drop(true)
            .spawn()?,
    );
    wait_port(port).await?;
    let (r_sink, r_echo, l_sink, l_echo) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let ssh = |fwd: Vec<String>| {
        let mut c = Command::new("ssh");
        c.args([
            "-F",
            "/dev/null",
            "-N",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(["-o", &format!("Ciphers={cipher}"), "-i"])
        .arg(&uk)
        .args(["-p", &port.to_string()])
        .args(fwd)
        .arg("127.0.0.1")
        .kill_on_drop(true);
        c
    };
    let r = Guard(
        ssh(vec![
            "-R".into(),
            format!("{r_sink}:{sink}"),
            "-R".into(),
            format!("{r_echo}:{echo}"),
        ])
        .spawn()?,
    );
    wait_port(r_echo).await?;
    let l = Guard(
        ssh(vec![
            "-L".into(),
            format!("{l_sink}:127.0.0.1:{r_sink}"),
            "-L".into(),
            format!("{l_echo}:127.0.0.1:{r_echo}"),
        ])
        .spawn()?,
    );
    wait_port(l_echo).await?;
    let pids = vec![sshd.pid(), r.pid(), l.pid()];
    Ok(OpenSshSetup {
        _sshd: sshd,
        _r: r,
        _l: l,
        pids,
        sink: format!("127.0.0.1:{l_sink}").parse()?,
        echo: format!("127.0.0.1:{l_echo}").parse()?,
    })
}
