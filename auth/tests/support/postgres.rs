//! A real PostgreSQL server (Debian's `postgresql` package) in a temp dir on a loopback port,
//! with password (SCRAM) authentication over TCP. Stopped and removed on drop, also on panic.
//! As root, `initdb` and `pg_ctl` run as the `postgres` user (PostgreSQL refuses root).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The superuser the tests connect as.
pub const USER: &str = "postern";

pub struct Postgres {
    pub dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    pub password: String,
    as_postgres: bool,
}

/// The newest `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server not installed (no /usr/lib/postgresql/*/bin/pg_ctl): \
             apt-get install postgresql (scripts/test and .ci/run install it)"
        )
    })
}

impl Postgres {
    /// initdb + start on a free loopback port.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let as_postgres = postern_dial::mint::running_as_root();
        let dir = std::env::temp_dir().join(format!(
            "postern-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let password = format!("pw-{:016x}", rand::random::<u64>());
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let pg = Postgres {
            dir,
            bin,
            port,
            password,
            as_postgres,
        };
        if as_postgres {
            pg.run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&pg.dir),
            );
        }
        let data = pg.dir.join("data");
        pg.pg("initdb", |c| {
            c.arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    USER,
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .args(["--no-sync", "-E", "UTF8"]);
        });
        pg.start_again();
        pg
    }

    /// Like [`Postgres::start`], with TLS on: a server certificate for `127.0.0.1` from a CA
    /// minted here. Returns the server and the CA's PEM file.
    pub fn start_tls() -> (Postgres, PathBuf) {
        let pg = Postgres::start();
        pg.stop();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let data = pg.dir.join("data");
        std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
        std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str("\nssl = on\n");
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        if pg.as_postgres {
            pg.run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&data),
            );
        }
        let ca_file = pg.dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        pg.start_again();
        (pg, ca_file)
    }

    fn run(&self, c: &mut Command) {
        let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert!(
            out.status.success(),
            "{c:?}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg(&self, tool: &str, args: impl FnOnce(&mut Command)) {
        let exe = self.bin.join(tool);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        c.current_dir(&self.dir);
        args(&mut c);
        self.run(&mut c);
    }

    /// Starts the server (again) on its port; returns once it accepts connections.
    pub fn start_again(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=on -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let (data, log) = (self.dir.join("data"), self.dir.join("log"));
        self.pg("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-o", &opts, "-w", "-t", "30", "start"]);
        });
    }

    /// Stops the server (fast shutdown: sessions are ended, committed data is kept).
    pub fn stop(&self) {
        let data = self.dir.join("data");
        self.pg("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .args(["-m", "fast", "-w", "-t", "30", "stop"]);
        });
    }

    /// The `backend` URL (no password).
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// Writes the password to `dir/db-password` (0600) and returns its path.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join("db-password");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .unwrap();
        writeln!(f, "{}", self.password).unwrap();
        p
    }

    /// An Auth server config on this database (data dir under `dir`).
    pub fn auth_config(&self, dir: &Path, cluster: &str) -> postern_auth::AuthConfig {
        postern_auth::AuthConfig {
            backend: Some(self.url()),
            backend_password_file: Some(self.password_file(dir)),
            ..super::config(dir, cluster)
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        let _ = c
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
