//! Logins driven in-process through `login::answer`, the path a relayed login stream takes
//! after its line is read.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use postern_auth::login::{Logins, hash_password};
use postern_auth::server::prepare;
use postern_auth::service::StoredUser;
use postern_auth::storage::Condition;
use postern_dial::mint;
use tunnel_proto::login::{LoginRequest, LoginResponse};

use super::{TempDir, config};

pub struct Bench {
    pub logins: Arc<Logins>,
    pub cluster: String,
    pub key: String,
    _dir: TempDir,
}

impl Bench {
    pub fn new(tag: &str, tweak: impl FnOnce(&mut postern_auth::AuthConfig)) -> Bench {
        let dir = TempDir::new(tag);
        let mut cfg = config(&dir.0, tag);
        tweak(&mut cfg);
        let prepared = prepare(&cfg).unwrap();
        let logins = Arc::new(Logins::new(prepared.state.clone(), &cfg.limits));
        Bench {
            logins,
            cluster: tag.into(),
            key: mint::generate_key().public_key().to_openssh().unwrap(),
            _dir: dir,
        }
    }

    /// A user with a password (and, if `secret` is given, an unused signup secret).
    pub fn add_user(&self, name: &str, password: Option<&str>, secret: Option<&str>) {
        let u = StoredUser {
            roles: vec!["access".into()],
            created: mint::now_unix(),
            signup_hash: secret.map(postern_auth::service::hash_secret),
            signup_expires: mint::now_unix() + 3600,
            password_hash: password.map(|p| hash_password(p).unwrap()),
        };
        self.logins
            .state
            .backend
            .put(
                "user",
                name,
                &serde_json::to_string(&u).unwrap(),
                Condition::Absent,
            )
            .unwrap();
    }

    pub fn req(&self, user: &str, password: Option<&str>, secret: Option<&str>) -> LoginRequest {
        LoginRequest {
            cluster: self.cluster.clone(),
            user: user.into(),
            secret: secret.map(Into::into),
            new_password: secret.map(|_| "a new password, long enough".into()),
            password: password.map(Into::into),
            public_key: self.key.clone(),
            ttl_secs: 60,
            source: None,
        }
    }

    /// Logs in from `source` (the address the proxy would have put in the request).
    pub async fn from(&self, source: &str, req: LoginRequest) -> LoginResponse {
        let mut req = req;
        req.source = Some(format!("{source}:40000"));
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        postern_auth::login::answer(&self.logins, req, peer).await
    }
}
