//! arcgate-load: the load generator bundled with arcgate (scenarios: connect, steady,
//! flood, fanout, storm, commands; see `arcgate-load --help`).

mod cli;
mod coord;
mod engine;
mod gateway;
mod msg;
mod net;
mod plan;
mod report;
mod stats;
mod tls;
mod util;
mod ws;

use std::io::BufRead;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let planned = match cli.command.plan() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match planned {
        Some((plan, output)) => coord::run(plan, output),
        None => worker(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A worker process: its plan is the first line on stdin, ticks and the result go to stdout.
fn worker() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let plan: plan::Plan = serde_json::from_str(line.trim())?;
    net::raise_nofile();
    let engine = engine::Engine::new(plan)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    engine.run(0, &mut out)
}
