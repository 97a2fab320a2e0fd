//! The `arcgate` command line: `serve`, `token` and `check-config`.

mod cli;
mod generate;

use std::process::ExitCode;

use arcgate::config::{Config, ServeArgs};
use clap::Parser;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::run(cli::Cli::parse(), run_server)
}

fn run_server(config: Config, args: ServeArgs) -> anyhow::Result<()> {
    arcgate::server::run_reloadable(config, args)
}
