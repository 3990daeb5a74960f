//! `postern-e2e`: the end-to-end comparison, one run, one table. Run it through
//! `benches/compare.sh`, which builds the release binaries, installs OpenSSH and raises the file
//! limit. What it measures and how: [`postern_benches::e2e`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    postern_benches::e2e::run(postern_benches::e2e::Cli::parse()).await
}
