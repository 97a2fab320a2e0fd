//! (in progress)
use crate::config::Config;
pub fn run(config: Config) -> anyhow::Result<()> { let _ = config; anyhow::bail!("not built yet") }
