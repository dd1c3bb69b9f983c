//! `airlock completions SHELL`: prints a completion script for the shell.

use std::io::Write;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes the completion script for `shell` to stdout.
pub fn run(shell: Shell) -> anyhow::Result<()> {
    let mut command = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut command, "airlock", &mut out);
    out.flush()?;
    Ok(())
}
