//! `tcpdump` on a node's link, for tests that check what goes over the wire.

use anyhow::{Context, Result, bail};
use sidenode_tests::cluster::Cluster;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `tcpdump -i eth0 -w FILE` in a node's network namespace.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts `tcpdump` on `node`'s eth0 writing to `file`, `snap` bytes of each packet (0: all
    /// of it); returns once it is listening.
    pub fn start(c: &Cluster, node: &str, file: &Path, snap: u32) -> Result<Capture> {
        let mut child = c
            .node_command(node, "tcpdump")?
            // Immediate mode: without it, packets still in the capture ring's current block when
            // SIGINT arrives are never written.
            .args(["-i", "eth0", "-n", "-U", "--immediate-mode", "-s"])
            .arg(snap.to_string())
            .arg("-w")
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        let err = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => break,
                Ok(_) => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("tcpdump in {node} did not start listening: {e}");
                }
            }
        }
        Ok(Capture {
            child,
            file: file.to_path_buf(),
        })
    }

    /// SIGINT (SIGTERM after 5 s), wait, and return the pcap bytes.
    pub fn stop(mut self) -> Result<Vec<u8>> {
        // SAFETY: plain syscall on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let start = Instant::now();
        let mut termed = false;
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(5) && !termed {
                // SAFETY: as above.
                unsafe {
                    libc::kill(self.child.id() as i32, libc::SIGTERM);
                }
                termed = true;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("tcpdump did not exit after SIGINT and SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `needle` occurs in `hay` (a secret in a capture's bytes).
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
