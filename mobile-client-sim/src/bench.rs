//! `mobile-sim bench`: the load generator (SPEC §9). Filled in with the
//! performance work; for now it reports that it needs arguments.

use std::path::Path;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct BenchArgs {}

pub async fn run(
    _args: BenchArgs,
    _state: &Path,
    _ca: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bench is not built yet")
}
