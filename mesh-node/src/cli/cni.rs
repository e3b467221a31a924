//! `mesh-node cni install|uninstall`: the CNI plugin in a node's CNI configuration
//! (`cni::install`, docs/cni.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use tracing::{error, info};

use crate::cni::install::{self, Change, DEFAULT_BIN_DIR, DEFAULT_CONF_DIR, PluginSettings};
use crate::cni::plugin::{DEFAULT_TIMEOUT_MS, PLUGIN_TYPE};
use crate::cni::protocol::DEFAULT_SOCKET;

#[derive(Subcommand)]
pub enum CniCmd {
    /// Copy `sidenode-cni` into the CNI bin dir and add it to the first CNI configuration.
    Install(InstallArgs),
    /// Remove the plugin's entry from every conflist of the conf dir, and its binary.
    Uninstall(UninstallArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FailPolicyArg {
    Open,
    Closed,
}

#[derive(Args)]
pub struct InstallArgs {
    /// The node's CNI configuration folder (host path as mounted in the container).
    #[arg(long, default_value = DEFAULT_CONF_DIR)]
    conf_dir: PathBuf,
    /// The node's CNI binary folder.
    #[arg(long, default_value = DEFAULT_BIN_DIR)]
    bin_dir: PathBuf,
    /// The plugin binary to copy (default: `sidenode-cni` next to this program).
    #[arg(long)]
    plugin_binary: Option<PathBuf>,
    /// The agent's socket as the plugin sees it on the host (`agent --cni-socket`).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// How long ADD waits for the agent (plugin `timeoutMs`).
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// What ADD does when the agent does not answer in time or fails (plugin `failPolicy`).
    #[arg(long, value_enum, default_value_t = FailPolicyArg::Open)]
    fail_policy: FailPolicyArg,
    /// The plugin appends its decisions to this host file (plugin `logFile`).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Keep running, installing again every `--interval` (the network plugin may rewrite its
    /// configuration and drop the entry). The entry stays when this stops.
    #[arg(long)]
    watch: bool,
    /// How often `--watch` checks (ms, s, m).
    #[arg(long, default_value = "2s", value_parser = super::parse_duration_ms)]
    interval: Duration,
}

#[derive(Args)]
pub struct UninstallArgs {
    #[arg(long, default_value = DEFAULT_CONF_DIR)]
    conf_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_BIN_DIR)]
    bin_dir: PathBuf,
}

pub fn run(cmd: CniCmd) -> Result<()> {
    match cmd {
        CniCmd::Install(a) => install_cmd(a),
        CniCmd::Uninstall(a) => uninstall(&a.conf_dir, Some(&a.bin_dir)),
    }
}

/// Removes the entry from `conf_dir` and, with `bin_dir`, the binary.
pub fn uninstall(conf_dir: &Path, bin_dir: Option<&Path>) -> Result<()> {
    for f in install::uninstall_conf(conf_dir)? {
        info!(file = %f.display(), "CNI plugin entry removed");
        println!("removed the {PLUGIN_TYPE} entry from {}", f.display());
    }
    if let Some(b) = bin_dir
        && install::uninstall_binary(b)?
    {
        println!("removed {}", b.join(PLUGIN_TYPE).display());
    }
    Ok(())
}

fn install_cmd(a: InstallArgs) -> Result<()> {
    let src = match &a.plugin_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("finding this program's folder")?
            .with_file_name(PLUGIN_TYPE),
    };
    let settings = PluginSettings {
        socket: a.socket.clone(),
        timeout_ms: a.timeout_ms,
        fail_policy: match a.fail_policy {
            FailPolicyArg::Open => "open".into(),
            FailPolicyArg::Closed => "closed".into(),
        },
        log_file: a.log_file.clone(),
    };
    let once = || -> Result<()> {
        if install::install_binary(&src, &a.bin_dir)? {
            info!(to = %a.bin_dir.join(PLUGIN_TYPE).display(), "CNI plugin binary installed");
        }
        match install::install_conf(&a.conf_dir, &settings)? {
            Change::Unchanged(_) => {}
            Change::Added(p) => info!(file = %p.display(), "CNI plugin entry added"),
            Change::Converted { from, to } => {
                info!(from = %from.display(), to = %to.display(), "CNI configuration converted to a conflist, plugin entry added")
            }
        }
        Ok(())
    };
    if !a.watch {
        return once();
    }
    let rt = super::runtime(Some(1))?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(a.interval);
        let mut last_err = String::new();
        info!(conf_dir = %a.conf_dir.display(), bin_dir = %a.bin_dir.display(), "CNI installer watching");
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
            match once() {
                Ok(()) => last_err.clear(),
                Err(e) => {
                    let e = format!("{e:#}");
                    if e != last_err {
                        error!(error = %e, "installing the CNI plugin; trying again");
                        last_err = e;
                    }
                }
            }
        }
        info!("CNI installer stopping; the plugin stays installed (`mesh-node cni uninstall` removes it)");
        Ok(())
    })
}
