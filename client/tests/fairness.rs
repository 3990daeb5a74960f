//! One user cannot starve the Auth API: streams to one target are bounded per user at the proxy,
//! so a user holding slow TLS handshakes open cannot take the Auth server's 256 handshake slots
//! from everyone else (the hardening issue measured `pctl status` going from 35 ms to 9.6 s).

use std::time::{Duration, Instant};

use postern_api::identity::IdentityFile;
use postern_api::proto::GenerateUserCertsRequest;
use postern_client::auth::{AuthClient, proxy_options};
use postern_client::connect::Config;
use postern_client::credentials::Credentials;
use postern_client::{ProxyAddr, ProxySession};
use postern_dial::mint;
use postern_dial::web::WebTrust;
use russh::keys::ssh_key::LineEnding;

/// Streams the slow user tries to hold open to the Auth API.
const SLOW_STREAMS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_holding_slow_streams_leaves_the_auth_api_to_others() {
    let dir = tempfile::tempdir().unwrap();
    let (demo, r) = postern_demo::auth_flow::run(dir.path()).await.unwrap();
    let admin_id = IdentityFile::load(&r.auth_dir.join("admin.identity")).unwrap();
    let admin = AuthClient::connect_direct(&r.auth_addr.to_string(), &admin_id)
        .await
        .unwrap();
    let cluster = admin_id.cluster.clone();

    // api-user opens streams to the Auth API and never starts a TLS handshake on them.
    let slow_id = IdentityFile::load(&r.identity).unwrap();
    let trust = WebTrust::Pin(r.web_pin.clone());
    let slow = ProxySession::connect(
        &proxy_options(
            &slow_id,
            ProxyAddr::Web {
                addr: r.web.to_string(),
                trust: trust.clone(),
            },
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let mut held = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..SLOW_STREAMS {
        match slow.open("auth", &cluster, 0).await {
            Ok(s) => held.push(s),
            Err(e) => refusals.push(e.to_string()),
        }
    }
    let limit = postern_proxy::config::LimitsConfig::default().max_streams_per_user_per_target;
    // The demo's own API client already holds one of api-user's streams.
    assert!(
        held.len() <= limit && held.len() + 2 >= limit,
        "{} streams held: streams beyond the per-user limit ({limit}) must be refused",
        held.len()
    );
    assert!(
        refusals[0].contains("per user and target"),
        "the refusal says which limit: {}",
        refusals[0]
    );

    // Another user, through the same proxy and the same tunnel, is served at once.
    let key = mint::generate_key();
    admin
        .create_user(postern_api::proto::CreateUserRequest {
            name: "bob".into(),
            roles: vec!["api-role".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let certs = admin
        .generate_user_certs(GenerateUserCertsRequest {
            user: "bob".into(),
            public_key: key.public_key().to_openssh().unwrap(),
            ttl_secs: 3600,
        })
        .await
        .unwrap();
    let bob = IdentityFile::from_certs(
        "bob",
        key.to_openssh(LineEnding::LF).unwrap().to_string(),
        certs,
    );
    let bob_path = dir.path().join("bob.identity");
    bob.save(&bob_path).unwrap();
    let started = Instant::now();
    let call = async {
        let c = AuthClient::connect(Config {
            addrs: vec![r.web.to_string()],
            credentials: vec![Credentials::identity_file(&bob_path)],
            web_trust: Some(trust.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
        c.get_role("api-role").await.unwrap()
    };
    // Well under the Auth server's 10 s handshake deadline, which is how long a held slot would
    // keep bob waiting.
    let role = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("another user's API call is not starved by the slow user's streams");
    assert_eq!(role.name, "api-role");
    eprintln!(
        "bob's GetRole through the proxy took {:?} while api-user held {} slow streams",
        started.elapsed(),
        held.len()
    );
    drop(held);
    demo.stop().await.unwrap();
}
