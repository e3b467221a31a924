//! `testpod`: the workload run inside simulated pods.
//!
//! - `serve --port P [--port P2 ..]`: per connection, write `HELLO local=<ip:port> peer=<ip:port>`
//!   then echo until EOF.
//! - `dial --to IP:PORT [..] --conns N --concurrency C [--hold-ms MS]`: N echo round trips,
//!   C at a time, one JSON report line.
//! - `session --to IP:PORT`: one connection driven by stdin lines.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(name = "testpod", about = "sidenode test workload")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Listen on 0.0.0.0:PORT for each port; greet and echo.
    Serve {
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
    },
    /// Open many echo connections and report what each side saw.
    Dial {
        #[arg(long = "to", required = true)]
        to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// One connection: print HELLO, then echo each stdin line.
    Session {
        #[arg(long)]
        to: SocketAddr,
    },
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Serve { ports } => serve(&ports),
        Cmd::Dial {
            to,
            conns,
            concurrency,
            hold_ms,
        } => dial(&to, conns, concurrency, hold_ms),
        Cmd::Session { to } => session(to),
    };
    if let Err(e) = res {
        eprintln!("testpod: {e:#}");
        std::process::exit(1);
    }
}

fn serve(ports: &[u16]) -> Result<()> {
    let mut listeners = Vec::new();
    for p in ports {
        let l = TcpListener::bind(("0.0.0.0", *p)).with_context(|| format!("binding :{p}"))?;
        listeners.push(l);
    }
    println!("serving");
    std::io::stdout().flush().context("flushing stdout")?;
    let mut handles = Vec::new();
    for l in listeners {
        handles.push(std::thread::spawn(move || {
            for conn in l.incoming() {
                match conn {
                    Ok(s) => {
                        std::thread::spawn(move || {
                            if let Err(e) = handle(s) {
                                eprintln!("testpod serve: connection: {e:#}");
                            }
                        });
                    }
                    Err(e) => eprintln!("testpod serve: accept: {e}"),
                }
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn handle(mut s: TcpStream) -> Result<()> {
    let local = s.local_addr().context("local_addr")?;
    let peer = s.peer_addr().context("peer_addr")?;
    s.write_all(format!("HELLO local={local} peer={peer}\n").as_bytes())
        .context("writing HELLO")?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).context("reading")?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).context("echoing")?;
    }
    s.shutdown(Shutdown::Write).context("shutdown")?;
    Ok(())
}

#[derive(Serialize, Clone, Default)]
struct ConnResult {
    target: String,
    local: Option<String>,
    server_local: Option<String>,
    server_peer: Option<String>,
    echo_ok: bool,
    error: Option<String>,
}

fn hello_fields(line: &str) -> (Option<String>, Option<String>) {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k).map(str::to_string))
    };
    (field("local="), field("peer="))
}

fn one_conn(target: SocketAddr, id: usize, hold_ms: u64, r: &mut ConnResult) -> Result<()> {
    let s = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).context("connect")?;
    r.local = Some(s.local_addr().context("local_addr")?.to_string());
    s.set_read_timeout(Some(READ_TIMEOUT))
        .context("set_read_timeout")?;
    let mut w = s.try_clone().context("clone")?;
    let mut rd = BufReader::new(s);
    let mut hello = String::new();
    rd.read_line(&mut hello).context("reading HELLO")?;
    if !hello.starts_with("HELLO ") {
        bail!("unexpected greeting {hello:?}");
    }
    let (l, p) = hello_fields(&hello);
    r.server_local = l;
    r.server_peer = p;
    let payload = format!("payload-{}-{id}-{}\n", std::process::id(), target);
    w.write_all(payload.as_bytes()).context("sending payload")?;
    let mut echo = String::new();
    rd.read_line(&mut echo).context("reading echo")?;
    if echo != payload {
        bail!("echo mismatch: sent {payload:?}, got {echo:?}");
    }
    if hold_ms > 0 {
        std::thread::sleep(Duration::from_millis(hold_ms));
    }
    w.shutdown(Shutdown::Write).context("shutdown")?;
    let mut rest = Vec::new();
    rd.read_to_end(&mut rest).context("reading to EOF")?;
    if !rest.is_empty() {
        bail!("unexpected {} trailing bytes", rest.len());
    }
    r.echo_ok = true;
    Ok(())
}

fn dial(to: &[SocketAddr], conns: usize, concurrency: usize, hold_ms: u64) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(vec![ConnResult::default(); conns]));
    let to = Arc::new(to.to_vec());
    let workers: Vec<_> = (0..concurrency.clamp(1, conns.max(1)))
        .map(|_| {
            let (next, results, to) = (next.clone(), results.clone(), to.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= conns {
                        break;
                    }
                    let target = to[i % to.len()];
                    let mut r = ConnResult {
                        target: target.to_string(),
                        ..Default::default()
                    };
                    if let Err(e) = one_conn(target, i, hold_ms, &mut r) {
                        r.echo_ok = false;
                        r.error = Some(format!("{e:#}"));
                    }
                    if let Ok(mut all) = results.lock() {
                        all[i] = r;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let results = results
        .lock()
        .map_err(|_| anyhow::anyhow!("results lock poisoned"))?
        .clone();
    let line = serde_json::json!({ "results": results });
    println!("{line}");
    Ok(())
}

fn session(to: SocketAddr) -> Result<()> {
    let s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).context("connect")?;
    let mut w = s.try_clone().context("clone")?;
    let mut rd = BufReader::new(s);
    let mut out = std::io::stdout();
    let mut hello = String::new();
    rd.read_line(&mut hello).context("reading HELLO")?;
    if hello.is_empty() {
        bail!("connection closed before HELLO");
    }
    out.write_all(hello.as_bytes()).context("stdout")?;
    out.flush().context("stdout")?;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        w.write_all(format!("{line}\n").as_bytes())
            .context("sending line")?;
        let mut echo = String::new();
        rd.read_line(&mut echo).context("reading echo")?;
        if echo.is_empty() {
            bail!("connection closed by peer");
        }
        out.write_all(echo.as_bytes()).context("stdout")?;
        out.flush().context("stdout")?;
    }
    w.shutdown(Shutdown::Write).context("shutdown")?;
    let mut rest = String::new();
    rd.read_to_string(&mut rest).context("reading to EOF")?;
    out.write_all(rest.as_bytes()).context("stdout")?;
    out.flush().context("stdout")?;
    Ok(())
}
