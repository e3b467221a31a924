//! The CLI reference (`docs/cli.md`), generated from the clap definitions with clap's own help
//! renderer, and shell completions (`mesh-node completions bash|zsh|fish`, clap_complete).
//!
//! The committed `docs/cli.md` is checked against the generator by a unit test, so CI fails
//! when a flag changes and the page does not; `SIDENODE_UPDATE_DOCS=1 cargo test -p mesh-node
//! --lib cli::reference` (or `cargo xtask docs`) rewrites it.

use clap::{Command, CommandFactory};

use super::Cli;

/// Help text width in the reference: fixed, so the page does not depend on the terminal.
const WIDTH: usize = 100;

/// The whole reference page, in Markdown.
pub fn markdown() -> String {
    let mut cmd = without_env_values(Cli::command().term_width(WIDTH).max_term_width(WIDTH));
    cmd.build();
    let mut out = String::from(
        "# `mesh-node` command-line reference\n\n\
         Generated from the program's own definitions (`mesh-node <command> --help` prints the \
         same); do not edit by hand: `cargo xtask docs` rewrites it, and a unit test fails when \
         it is out of date. Shell completions: `mesh-node completions bash|zsh|fish`.\n\n\
         What each command is for, with examples, is in the topic pages: \
         [getting-started.md](getting-started.md), [configuration.md](configuration.md), \
         [observability.md](observability.md), [troubleshooting.md](troubleshooting.md).\n\n",
    );
    out.push_str("## Commands\n\n");
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        out.push_str(&format!(
            "- [`mesh-node {}`](#mesh-node-{}): {}\n",
            sub.get_name(),
            sub.get_name(),
            first_line(sub)
        ));
    }
    out.push('\n');
    section(&mut out, &cmd, "mesh-node", 1);
    out
}

/// The page must not depend on the environment it was generated in: an `env` default's
/// current value is left out (the variable's name stays).
fn without_env_values(cmd: Command) -> Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd.mut_args(|a| a.hide_env_values(true));
    for n in names {
        cmd = cmd.mut_subcommand(n, without_env_values);
    }
    cmd
}

fn first_line(cmd: &Command) -> String {
    cmd.get_about()
        .map(|a| a.to_string())
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// One command's help, then its subcommands'.
fn section(out: &mut String, cmd: &Command, path: &str, level: usize) {
    if level > 1 {
        out.push_str(&format!("{} `{path}`\n\n", "#".repeat(level.min(4))));
    }
    let mut c = cmd.clone();
    let help = c.render_long_help().to_string();
    out.push_str("```text\n");
    for line in help.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str("```\n\n");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        if name == "help" {
            continue;
        }
        section(out, sub, &format!("{path} {name}"), level + 1);
    }
}

/// `mesh-node completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "mesh-node", &mut std::io::stdout());
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    fn page() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md")
    }

    /// CI fails when a flag changed and docs/cli.md did not follow.
    #[test]
    fn cli_reference_is_current() {
        let want = super::markdown();
        if std::env::var_os("SIDENODE_UPDATE_DOCS").is_some() {
            std::fs::write(page(), &want).expect("writing docs/cli.md");
            return;
        }
        let have = std::fs::read_to_string(page()).unwrap_or_default();
        assert!(
            have == want,
            "docs/cli.md is out of date with the CLI's definitions: run `cargo xtask docs` \
             (or SIDENODE_UPDATE_DOCS=1 cargo test -p mesh-node --lib cli::reference) and \
             commit it"
        );
    }

    #[test]
    fn every_command_is_in_the_reference() {
        let page = super::markdown();
        for c in [
            "agent",
            "proxy",
            "controller",
            "gateway",
            "maps",
            "config",
            "log-level",
        ] {
            assert!(
                page.contains(&format!("## `mesh-node {c}`")),
                "{c} missing from the reference"
            );
        }
        assert!(page.contains("--keep-client-address"));
    }
}
