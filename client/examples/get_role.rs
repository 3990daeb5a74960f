//! The seed's client example in Rust: connect through the proxy with an identity file (or the
//! `psh login` profile), then GetRole.
//!
//! ```sh
//! cargo run -p postern-client --example get_role -- proxy.example.com:3080 <web-cert-sha256> api-user.identity
//! cargo run -p postern-client --example get_role            # no arguments: starts the demo stack first
//! ```

use postern_client::auth::AuthClient;
use postern_client::connect::Config;
use postern_client::credentials::Credentials;
use postern_dial::web::WebTrust;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _demo;
    let (proxy, pin, identity) = match args.as_slice() {
        [proxy, pin, identity] => (
            proxy.clone(),
            pin.clone(),
            std::path::PathBuf::from(identity),
        ),
        [] => {
            let dir = tempfile::tempdir()?.keep();
            let (demo, report) = postern_demo::auth_flow::run(&dir).await?;
            _demo = demo;
            println!("\n--- the example itself ---");
            (report.web.to_string(), report.web_pin, report.identity)
        }
        _ => anyhow::bail!("usage: get_role [<proxy web addr> <web cert sha256> <identity file>]"),
    };

    // As in Teleport's Go example: try the profile first, then the identity file.
    let client = AuthClient::connect(Config {
        addrs: vec![proxy],
        credentials: vec![
            Credentials::profile(None, None),
            Credentials::identity_file(identity),
        ],
        web_trust: Some(WebTrust::Pin(pin)),
        ..Default::default()
    })
    .await?;
    println!("connected to cluster {} as {}", client.cluster, client.user);
    let role = client.get_role("api-role").await?;
    print!("{}", postern_api::resource::roles_to_yaml(&[role]));
    Ok(())
}
