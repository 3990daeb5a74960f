//! `postern-demo`: run the local demo, then keep it up for `ssh -W` until Ctrl-C (or exit at once
//! with `--once`).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "postern-demo",
    about = "Proxy + agent + echo service + a client call through the tunnel, on loopback"
)]
struct Cli {
    /// Exit after the client call instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Directory for keys, certificates and configs [default: a new temp dir].
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let dir = match cli.dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => postern_demo::default_dir()?,
    };
    let (demo, _report) = postern_demo::run(&dir).await?;
    if !cli.once {
        println!(
            "\nRunning. Ctrl-C to stop (files stay in {}).",
            dir.display()
        );
        tokio::signal::ctrl_c().await?;
    }
    demo.stop().await?;
    println!("stopped");
    Ok(())
}
