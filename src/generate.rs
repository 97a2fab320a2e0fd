//! `arcgate generate-assets DIR` (hidden): the man pages and shell completions that the
//! Debian package installs, made from the command line's own definition.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use crate::cli::Cli;

#[derive(Debug, Args)]
pub struct AssetArgs {
    /// Where to write man/*.1 and completions/{arcgate.bash,_arcgate,arcgate.fish}
    pub dir: PathBuf,
}

/// Writes every asset under `args.dir`; exit code 1 with a message when a file cannot be written.
pub fn run(args: &AssetArgs) -> ExitCode {
    match write_all(&args.dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot write into {}: {e}", args.dir.display());
            ExitCode::FAILURE
        }
    }
}

fn write_all(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    let mut cmd = Cli::command();
    cmd.build();
    // arcgate.1, then arcgate-serve.1 and the other visible subcommands (once built, their
    // display name is "arcgate-serve", which the page is titled with).
    let mut pages = vec![("arcgate".to_string(), cmd.clone())];
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("arcgate-{}", sub.get_name());
        pages.push((name, sub.clone().version(env!("CARGO_PKG_VERSION"))));
    }
    for (name, page) in pages {
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        let path = man.join(format!("{name}.1"));
        std::fs::write(&path, out)?;
        written.push(path);
    }
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "arcgate", &completions)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_cover_every_visible_subcommand() {
        let dir = std::env::temp_dir().join(format!("arcgate-assets-{}", std::process::id()));
        let files = write_all(&dir).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "arcgate.1",
            "arcgate-serve.1",
            "arcgate-token.1",
            "arcgate-check-config.1",
            "arcgate.bash",
            "_arcgate",
            "arcgate.fish",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("generate")), "{names:?}");
        let serve = std::fs::read_to_string(dir.join("man/arcgate-serve.1")).unwrap();
        assert!(serve.contains("admin\\-listen"), "{serve}");
        let bash = std::fs::read_to_string(dir.join("completions/arcgate.bash")).unwrap();
        assert!(bash.contains("check-config"), "{bash}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
