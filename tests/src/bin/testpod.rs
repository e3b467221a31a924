//! `testpod`: the workload run inside simulated pods.
//!
//! - `serve --port P [--port P2 ..]`: per connection, write `HELLO local=<ip:port> peer=<ip:port>`
//!   then echo until EOF.
//! - `dial --to IP:PORT [..] --conns N --concurrency C [--hold-ms MS]`: N echo round trips,
//!   C at a time, one JSON report line.
//! - `session --to IP:PORT`: one connection driven by stdin lines.
//! - `idle-serve --port P`: greets each connection with the `serve` HELLO line, then reads
//!   until EOF (no echo); one task per connection, not a thread, so it holds tens of
//!   thousands.
//! - `idle --to IP:PORT --conns N [--parallel P]`: opens N connections (P connecting at once),
//!   reading each one's HELLO; prints one JSON line (`open`, `failed`, `first_error`,
//!   `elapsed_ms`), then holds them all idle until stdin closes.
//! - `rr --to IP:PORT --count N --size B [--warmup W]`: one kept-open connection to a `serve`
//!   echo; N timed round trips of B bytes; one JSON line of latency percentiles (µs).
//! - `transfer --to IP:PORT --bytes N [--conns C]`: C connections at once to a `serve` echo,
//!   each sending N bytes of a seeded pseudo-random stream and half-closing, while reading the
//!   echo back to EOF; one JSON line: per connection the bytes and FNV-1a checksum sent and
//!   received, and whether they match.
//! - `connlat --to IP:PORT --count N [--warmup W] [--size B] [--fin] [--samples]`: N times
//!   connect, read the HELLO line (then, with `--size`, one B-byte echo round trip) and close
//!   with a reset (SO_LINGER 0, so no TIME_WAIT piles up) or, with `--fin`, an ordinary close
//!   (timed up to the return of `close`; it leaves a TIME_WAIT socket); one JSON line of the
//!   latency percentiles (µs), with `--samples` also every timed sample (`samples_us`).
//! - `http-serve --port P --name NAME [--fail-first N --fail-status S] [--delay-ms D]`: an
//!   HTTP/1.1 server (keep-alive) answering every request with the body `NAME` (`NAME fail`
//!   for the first N requests, with status S), the peer in `x-testpod-peer`, the request's
//!   `traceparent` (when it has one) in `x-testpod-traceparent`, its `x-forwarded-for`,
//!   `x-forwarded-proto`, `x-request-id` and `host` in `x-testpod-xff`, `-xfp`, `-request-id`,
//!   `-host`, after D ms.
//! - `h2-serve --port P --name NAME [--delay-ms D]`: an HTTP/2-only server (h2c, prior
//!   knowledge) answering every request with the body `NAME <version>` (`NAME HTTP/2.0`) and
//!   the trailer `grpc-status: 0`, after D ms.
//! - `http-get --url http://IP:PORT[/PATH] --count N [--header K:V ..] [--method M]
//!   [--path P]`: N requests on one keep-alive connection; one JSON line with histograms of
//!   statuses, bodies, peers and `x-testpod-traceparent` values (`traceparents`, only when
//!   some answer had one), and latencies (ms).
//! - `hbone-client --cert C --key K --ca CA --server-id SPIFFE --tunnel IP:15008 --target
//!   IP:PORT --source IP:PORT [--payload P] [--method M]`: one HBONE tunnel as Istio ztunnel
//!   opens it (`sidenode_tests::hbone_wire`), `P` echoed through a `serve` echo; one JSON line
//!   (`status`, `alert_received`, `alert_sent`, `hello`, `echo_ok`, `sent` headers, `error`).
//! - `hbone-server --listen IP:15008 --cert C --key K --ca CA [--client-id SPIFFE] --log FILE`:
//!   an HBONE server answering as ztunnel's inbound (prints `serving` once listening); one JSON
//!   line per `CONNECT` in FILE.
//! - `soak-serve --port P [..]`: `serve` on an asynchronous runtime (tens of thousands of
//!   connections), for `cargo xtask soak`.
//! - `soak-load --seconds S [--conn-to A --rate R] [--stream-to A --streams N --stream-bps B]
//!   [--idle-to A --idle N] [--http-to A --http-rate R]`: the soak's mixed load
//!   (`sidenode_tests::soak`); one JSON report line.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// (`TESTPOD_READ_TIMEOUT_MS` in tests/tests/common tells a hang by it.)
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
    /// Greet each connection, then read until EOF (for many idle connections).
    IdleServe {
        #[arg(long)]
        port: u16,
    },
    /// Open many connections and hold them idle until stdin closes.
    Idle {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long, default_value_t = 32)]
        parallel: usize,
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
    /// Request/response latency on one kept-open connection to a `serve` echo.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Bytes written, and read back, per round trip.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Untimed round trips before the timed ones.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
    },
    /// HTTP/1.1 server naming the pod in each answer.
    HttpServe {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
        /// The first N requests (of the process) fail with `--fail-status`.
        #[arg(long, default_value_t = 0)]
        fail_first: usize,
        #[arg(long, default_value_t = 503)]
        fail_status: u16,
        /// Wait this long before answering.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// HTTP/2-only (h2c) server naming the pod and the request's version, with a trailer.
    H2Serve {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
        /// Wait this long before answering.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// N HTTP/1.1 requests on one keep-alive connection; a JSON report.
    HttpGet {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// `Name:value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Overrides the URL's path.
        #[arg(long)]
        path: Option<String>,
    },
    /// C concurrent connections each sending N checksummed bytes to an echo, half-closing,
    /// and checking the echo.
    Transfer {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        conns: usize,
    },
    /// New-connection latency: connect, read HELLO, close with a reset; N times.
    Connlat {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1_000)]
        count: usize,
        /// Untimed connections before the timed ones.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// After HELLO, one echo round trip of this many bytes (0: none).
        #[arg(long, default_value_t = 0)]
        size: usize,
        /// Close with a FIN (timed until `close` returns) instead of a reset.
        #[arg(long)]
        fin: bool,
        /// Also print every timed sample (`samples_us`).
        #[arg(long)]
        samples: bool,
    },
    /// `serve` on an asynchronous runtime (holds tens of thousands of connections).
    SoakServe {
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
    },
    /// The soak's mixed load for `--seconds`; one JSON report line (`sidenode_tests::soak`).
    SoakLoad {
        #[arg(long)]
        seconds: u64,
        /// Targets of new connections (round robin).
        #[arg(long = "conn-to")]
        conn_to: Vec<SocketAddr>,
        /// New connections per second.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long = "stream-to")]
        stream_to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 0)]
        streams: usize,
        /// Bytes per second each stream writes and reads back.
        #[arg(long, default_value_t = 256 * 1024)]
        stream_bps: u64,
        #[arg(long = "idle-to")]
        idle_to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 0)]
        idle: usize,
        /// The HTTP service (HTTP/1.1 and h2c requests).
        #[arg(long)]
        http_to: Option<SocketAddr>,
        /// Requests per second of each protocol.
        #[arg(long, default_value_t = 20)]
        http_rate: u64,
    },
    /// An HBONE client as Istio ztunnel sends (tests/src/hbone_wire.rs): mutual TLS to
    /// `--tunnel`, `CONNECT --target` with ztunnel's headers, then `--payload` through the
    /// tunnel to a `serve` echo. Prints one JSON line: status, TLS alert, echo.
    HboneClient {
        #[arg(long)]
        cert: std::path::PathBuf,
        #[arg(long)]
        key: std::path::PathBuf,
        #[arg(long)]
        ca: std::path::PathBuf,
        /// SPIFFE id the server must present.
        #[arg(long)]
        server_id: String,
        /// `podIP:15008`.
        #[arg(long)]
        tunnel: SocketAddr,
        /// The destination `ip:port` (`:authority`).
        #[arg(long)]
        target: SocketAddr,
        /// `ip:port` written in `forwarded: for="…"`.
        #[arg(long)]
        source: SocketAddr,
        #[arg(
            long,
            default_value = "k8s.cluster.name=Kubernetes,k8s.namespace.name=ambient,k8s.deployment.name=client,service.name=client,service.version=v1"
        )]
        baggage: String,
        #[arg(long, default_value = "ztunnel-wire payload")]
        payload: String,
        #[arg(long, default_value = "CONNECT")]
        method: String,
    },
    /// An HBONE server as Istio ztunnel's inbound answers (tests/src/hbone_wire.rs): mutual TLS
    /// on `--listen` (run it in a pod's netns), `CONNECT` to the `:authority` (`503` when
    /// unreachable, `400` for another address than the one reached, `401` when the client is
    /// not `--client-id`); one JSON line per `CONNECT` appended to `--log`.
    HboneServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        cert: std::path::PathBuf,
        #[arg(long)]
        key: std::path::PathBuf,
        #[arg(long)]
        ca: std::path::PathBuf,
        #[arg(long)]
        client_id: Option<String>,
        #[arg(long)]
        log: std::path::PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Serve { ports } => serve(&ports),
        Cmd::SoakServe { ports } => sidenode_tests::soak::serve(&ports),
        Cmd::SoakLoad {
            seconds,
            conn_to,
            rate,
            stream_to,
            streams,
            stream_bps,
            idle_to,
            idle,
            http_to,
            http_rate,
        } => sidenode_tests::soak::load(sidenode_tests::soak::LoadArgs {
            seconds,
            conn_to,
            rate,
            stream_to,
            streams,
            stream_bps,
            idle_to,
            idle,
            http_to,
            http_rate,
        })
        .and_then(|r| {
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }),
        Cmd::IdleServe { port } => idle_serve(port),
        Cmd::Idle {
            to,
            conns,
            parallel,
        } => idle(to, conns, parallel),
        Cmd::HboneClient {
            cert,
            key,
            ca,
            server_id,
            tunnel,
            target,
            source,
            baggage,
            payload,
            method,
        } => sidenode_tests::hbone_wire::client(sidenode_tests::hbone_wire::ClientArgs {
            cert,
            key,
            ca,
            server_id,
            tunnel,
            target,
            source,
            baggage,
            payload,
            method,
        })
        .and_then(|r| {
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }),
        Cmd::HboneServer {
            listen,
            cert,
            key,
            ca,
            client_id,
            log,
        } => sidenode_tests::hbone_wire::server(sidenode_tests::hbone_wire::ServerArgs {
            listen,
            cert,
            key,
            ca,
            client_id,
            log,
        }),
        Cmd::Dial {
            to,
            conns,
            concurrency,
            hold_ms,
        } => dial(&to, conns, concurrency, hold_ms),
        Cmd::Session { to } => session(to),
        Cmd::Rr {
            to,
            count,
            size,
            warmup,
        } => rr(to, count, size, warmup),
        Cmd::Transfer { to, bytes, conns } => transfer(to, bytes, conns),
        Cmd::Connlat {
            to,
            count,
            warmup,
            size,
            fin,
            samples,
        } => connlat(to, count, warmup, ConnlatOpts { size, fin, samples }),
        Cmd::HttpServe {
            port,
            name,
            fail_first,
            fail_status,
            delay_ms,
        } => http_serve(port, name, fail_first, fail_status, delay_ms),
        Cmd::H2Serve {
            port,
            name,
            delay_ms,
        } => h2_serve(port, name, delay_ms),
        Cmd::HttpGet {
            url,
            count,
            headers,
            method,
            path,
        } => http_get(&url, count, &headers, &method, path.as_deref()),
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
        // And IPv6, when the pod has it (IPv6-only socket beside the IPv4 one).
        if let Ok(l6) = bind_v6_only(*p) {
            listeners.push(l6);
        }
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

fn bind_v6_only(port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    s.set_only_v6(true)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn handle(mut s: TcpStream) -> Result<()> {
    let local = s.local_addr().context("local_addr")?;
    let peer = s.peer_addr().context("peer_addr")?;
    s.write_all(format!("HELLO local={local} peer={peer}\n").as_bytes())
        .context("writing HELLO")?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            // This socket has no read timeout, so EAGAIN from a blocking read is the kernel's
            // spurious wake-up of a socket spliced by sockmap (tcp_bpf_recvmsg returns EAGAIN
            // when woken without data, e.g. by write space freed for the echo): read again,
            // as `transfer_one` does. docs/performance.md lists this kernel behaviour.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e).context("reading"),
        };
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
    /// From the start of `connect` to the end (echo done, or the error), in milliseconds:
    /// measured in the pod, so a test can tell a prompt reset from a wait for a timeout
    /// without counting the time to start `testpod`.
    elapsed_ms: u64,
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
                    let started = Instant::now();
                    if let Err(e) = one_conn(target, i, hold_ms, &mut r) {
                        r.echo_ok = false;
                        r.error = Some(format!("{e:#}"));
                    }
                    r.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
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
    let client = s.local_addr().context("local_addr")?;
    let mut w = s.try_clone().context("clone")?;
    let mut rd = BufReader::new(s);
    let mut out = std::io::stdout();
    let mut hello = String::new();
    rd.read_line(&mut hello).context("reading HELLO")?;
    if hello.is_empty() {
        bail!("connection closed before HELLO");
    }
    // The server's line, and this end's own address (`client=`).
    out.write_all(format!("{} client={client}\n", hello.trim_end()).as_bytes())
        .context("stdout")?;
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

/// Latency summary printed by `rr` and `connlat` (microseconds).
#[derive(Serialize)]
struct LatencyReport {
    count: usize,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    min_us: f64,
    max_us: f64,
    mean_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    samples_us: Option<Vec<f64>>,
}

fn micros(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

fn latency_report(mut samples: Vec<Duration>) -> LatencyReport {
    samples.sort_unstable();
    let total: Duration = samples.iter().sum();
    let n = samples.len();
    LatencyReport {
        count: n,
        p50_us: micros(percentile(&samples, 50)),
        p90_us: micros(percentile(&samples, 90)),
        p99_us: micros(percentile(&samples, 99)),
        min_us: micros(samples.first().copied().unwrap_or_default()),
        max_us: micros(samples.last().copied().unwrap_or_default()),
        mean_us: if n == 0 {
            0.0
        } else {
            micros(total) / n as f64
        },
        errors: None,
        first_error: None,
        samples_us: None,
    }
}

/// Read the server's greeting byte by byte (so nothing after it is consumed); returns it.
fn read_hello(s: &mut TcpStream) -> Result<String> {
    let mut line = Vec::with_capacity(96);
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).context("reading HELLO")?;
        if n == 0 {
            bail!(
                "connection closed before HELLO (got {:?})",
                String::from_utf8_lossy(&line)
            );
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 4096 {
            bail!("greeting longer than 4096 bytes");
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if !line.starts_with("HELLO ") {
        bail!("unexpected greeting {line:?}");
    }
    Ok(line)
}

fn rr(to: SocketAddr, count: usize, size: usize, warmup: usize) -> Result<()> {
    if size == 0 {
        bail!("--size must be at least 1");
    }
    let mut s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).context("connect")?;
    s.set_nodelay(true).context("set_nodelay")?;
    s.set_read_timeout(Some(READ_TIMEOUT))
        .context("set_read_timeout")?;
    read_hello(&mut s)?;
    let req: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut resp = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t0 = Instant::now();
        s.write_all(&req).context("sending request")?;
        s.read_exact(&mut resp).context("reading response")?;
        let dt = t0.elapsed();
        if resp != req {
            bail!("round trip {i}: echo mismatch");
        }
        if i >= warmup {
            samples.push(dt);
        }
    }
    s.shutdown(Shutdown::Write).context("shutdown")?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).context("reading to EOF")?;
    println!("{}", serde_json::to_string(&latency_report(samples))?);
    Ok(())
}

/// Close with a reset instead of a FIN: SO_LINGER {on, 0}. Keeps thousands of short
/// connections from leaving TIME_WAIT sockets behind in the client (or a proxy).
fn set_linger_zero(s: &TcpStream) -> Result<()> {
    use std::os::fd::AsRawFd;
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized, initialised `linger` value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const lg).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt SO_LINGER");
    }
    Ok(())
}

/// What `connlat` does on each connection besides connect and HELLO.
struct ConnlatOpts {
    /// One echo round trip of this many bytes after HELLO (0: none).
    size: usize,
    /// Ordinary close (FIN, timed) instead of a reset (untimed).
    fin: bool,
    /// Print every timed sample too.
    samples: bool,
}

fn connlat(to: SocketAddr, count: usize, warmup: usize, o: ConnlatOpts) -> Result<()> {
    let req: Vec<u8> = (0..o.size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut resp = vec![0u8; o.size];
    let mut samples = Vec::with_capacity(count);
    let mut errors = 0usize;
    let mut first_error = None;
    for i in 0..warmup + count {
        let t0 = Instant::now();
        let res = (|| -> Result<TcpStream> {
            let mut s = TcpStream::connect(to).context("connect")?;
            s.set_read_timeout(Some(READ_TIMEOUT))
                .context("set_read_timeout")?;
            read_hello(&mut s)?;
            if !req.is_empty() {
                s.set_nodelay(true).context("set_nodelay")?;
                s.write_all(&req).context("sending request")?;
                s.read_exact(&mut resp).context("reading response")?;
                if resp != req {
                    bail!("echo mismatch");
                }
            }
            Ok(s)
        })();
        let mut dt = t0.elapsed();
        match res {
            Ok(s) => {
                if o.fin {
                    drop(s);
                    dt = t0.elapsed();
                } else {
                    set_linger_zero(&s)?;
                    drop(s);
                }
                if i >= warmup {
                    samples.push(dt);
                }
            }
            Err(e) => {
                errors += 1;
                if first_error.is_none() {
                    first_error = Some(format!("connection {i}: {e:#}"));
                }
                if errors > 10 && errors * 10 > i + 1 {
                    bail!(
                        "{errors} of {} connections failed; first: {first_error:?}",
                        i + 1
                    );
                }
            }
        }
    }
    let raw = o
        .samples
        .then(|| samples.iter().map(|d| micros(*d)).collect::<Vec<f64>>());
    let mut report = latency_report(samples);
    report.errors = Some(errors);
    report.first_error = first_error;
    report.samples_us = raw;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

// ------------------------------------------------------------------------------------- HTTP

/// One parsed HTTP/1.1 message head: the first line and the headers (names lowercased).
struct HttpHead {
    first: String,
    headers: Vec<(String, String)>,
}

impl HttpHead {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a message head; `None` at a clean EOF before any byte.
fn read_head(rd: &mut impl BufRead) -> Result<Option<HttpHead>> {
    let mut first = String::new();
    if rd.read_line(&mut first).context("reading the first line")? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if rd.read_line(&mut line).context("reading a header")? == 0 {
            bail!("EOF inside the headers");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok(Some(HttpHead {
        first: first.trim_end().to_string(),
        headers,
    }))
}

/// Reads a body framed by `content-length` or chunked encoding.
fn read_body(rd: &mut impl BufRead, head: &HttpHead) -> Result<Vec<u8>> {
    if head
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            rd.read_line(&mut size).context("reading a chunk size")?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("bad chunk size {size:?}"))?;
            if n == 0 {
                // Trailers until the empty line.
                loop {
                    let mut l = String::new();
                    if rd.read_line(&mut l)? == 0 || l.trim().is_empty() {
                        break;
                    }
                }
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + n, 0);
            rd.read_exact(&mut body[start..])
                .context("reading a chunk")?;
            let mut crlf = [0u8; 2];
            rd.read_exact(&mut crlf).context("reading a chunk end")?;
        }
    }
    let n: usize = head
        .header("content-length")
        .map(|v| v.parse().context("bad content-length"))
        .transpose()?
        .unwrap_or(0);
    let mut body = vec![0u8; n];
    rd.read_exact(&mut body).context("reading the body")?;
    Ok(body)
}

fn http_serve(
    port: u16,
    name: String,
    fail_first: usize,
    fail_status: u16,
    delay_ms: u64,
) -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding :{port}"))?;
    println!("serving");
    std::io::stdout().flush().context("flushing stdout")?;
    let served = Arc::new(AtomicUsize::new(0));
    let name = Arc::new(name);
    for conn in l.incoming() {
        let Ok(s) = conn else { continue };
        let (served, name) = (served.clone(), name.clone());
        std::thread::spawn(move || {
            let run = || -> Result<()> {
                let peer = s.peer_addr().context("peer_addr")?;
                let mut w = s.try_clone().context("clone")?;
                let mut rd = BufReader::new(s);
                while let Some(head) = read_head(&mut rd)? {
                    let _ = read_body(&mut rd, &head)?;
                    let n = served.fetch_add(1, Ordering::SeqCst);
                    if delay_ms > 0 {
                        std::thread::sleep(Duration::from_millis(delay_ms));
                    }
                    let (status, body) = if n < fail_first {
                        (fail_status, format!("{name} fail"))
                    } else {
                        (200, name.to_string())
                    };
                    let close = head
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                    let mut traceparent = head
                        .header("traceparent")
                        .map(|v| format!("x-testpod-traceparent: {v}\r\n"))
                        .unwrap_or_default();
                    // What a proxy in front set (the gateway's edge headers, a rewrite).
                    for (h, echo) in [
                        ("x-forwarded-for", "x-testpod-xff"),
                        ("x-forwarded-proto", "x-testpod-xfp"),
                        ("x-request-id", "x-testpod-request-id"),
                        ("host", "x-testpod-host"),
                    ] {
                        if let Some(v) = head.header(h) {
                            traceparent.push_str(&format!("{echo}: {v}\r\n"));
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nx-testpod-peer: {peer}\r\nx-testpod-request: {}\r\n{traceparent}{}\r\n{body}",
                        body.len(),
                        head.first,
                        if close { "connection: close\r\n" } else { "" },
                    );
                    w.write_all(resp.as_bytes())
                        .context("writing the response")?;
                    if close {
                        break;
                    }
                }
                Ok(())
            };
            if let Err(e) = run() {
                eprintln!("testpod http-serve: {e:#}");
            }
        });
    }
    Ok(())
}

/// A body of one data frame then trailers, of unknown length (no `content-length`).
struct DataThenTrailers {
    data: Option<bytes::Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl hyper::body::Body for DataThenTrailers {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let frame = match self.data.take() {
            Some(d) => Some(hyper::body::Frame::data(d)),
            None => self.trailers.take().map(hyper::body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

fn h2_serve(port: u16, name: String, delay_ms: u64) -> Result<()> {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("binding :{port}"))?;
        println!("serving");
        std::io::stdout().flush().context("flushing stdout")?;
        let name = Arc::new(name);
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let name = name.clone();
                        async move {
                            let version = req.version();
                            // Read the request to its end.
                            let _ = req.into_body().collect().await;
                            if delay_ms > 0 {
                                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            }
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let body = DataThenTrailers {
                                data: Some(bytes::Bytes::from(format!("{name} {version:?}"))),
                                trailers: Some(trailers),
                            };
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                        }
                    },
                );
                let builder =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                if let Err(e) = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await
                {
                    eprintln!("testpod h2-serve: {e}");
                }
            });
        }
    })
}

#[derive(Serialize, Default)]
struct HttpReport {
    count: usize,
    statuses: std::collections::BTreeMap<String, usize>,
    bodies: std::collections::BTreeMap<String, usize>,
    peers: std::collections::BTreeMap<String, usize>,
    /// `x-testpod-traceparent` of the answers (what the server received).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    traceparents: std::collections::BTreeMap<String, usize>,
    errors: usize,
    first_error: Option<String>,
    min_ms: f64,
    max_ms: f64,
    mean_ms: f64,
    connections: usize,
}

/// One answer of `http-get`: status, body, `x-testpod-peer`, `connection: close`,
/// `x-testpod-traceparent`.
type Answer = (String, String, Option<String>, bool, Option<String>);

fn http_get(
    url: &str,
    count: usize,
    headers: &[String],
    method: &str,
    path: Option<&str>,
) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .context("the URL must start with http://")?;
    let (hostport, url_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let to: SocketAddr = hostport
        .parse()
        .with_context(|| format!("{hostport} is not IP:PORT"))?;
    let path = path.unwrap_or(url_path);
    let mut extra = String::new();
    for h in headers {
        let (k, v) = h.split_once(':').context("--header wants K:V")?;
        extra.push_str(&format!("{}: {}\r\n", k.trim(), v.trim()));
    }
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {hostport}\r\nuser-agent: testpod\r\n{extra}content-length: 0\r\n\r\n"
    );
    let mut report = HttpReport {
        count,
        ..Default::default()
    };
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t0 = Instant::now();
        let res = (|| -> Result<Answer> {
            if conn.is_none() {
                let s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).context("connect")?;
                s.set_nodelay(true).context("set_nodelay")?;
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .context("set_read_timeout")?;
                let r = BufReader::new(s.try_clone().context("clone")?);
                conn = Some((s, r));
                report.connections += 1;
            }
            let (w, rd) = conn.as_mut().context("no connection")?;
            w.write_all(req.as_bytes()).context("sending")?;
            let head = read_head(rd)?.context("connection closed before a response")?;
            let body = read_body(rd, &head)?;
            let status = head
                .first
                .split_whitespace()
                .nth(1)
                .unwrap_or("?")
                .to_string();
            let close = head
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let peer = head.header("x-testpod-peer").map(str::to_string);
            let traceparent = head.header("x-testpod-traceparent").map(str::to_string);
            Ok((
                status,
                String::from_utf8_lossy(&body).into_owned(),
                peer,
                close,
                traceparent,
            ))
        })();
        let dt = t0.elapsed();
        match res {
            Ok((status, body, peer, close, traceparent)) => {
                samples.push(dt);
                if let Some(tp) = traceparent {
                    *report.traceparents.entry(tp).or_default() += 1;
                }
                *report.statuses.entry(status).or_default() += 1;
                *report.bodies.entry(body).or_default() += 1;
                if let Some(p) = peer {
                    let ip = p
                        .rsplit_once(':')
                        .map_or(p.as_str(), |(ip, _)| ip)
                        .to_string();
                    *report.peers.entry(ip).or_default() += 1;
                }
                if close {
                    conn = None;
                }
            }
            Err(e) => {
                report.errors += 1;
                report.first_error.get_or_insert(format!("{e:#}"));
                conn = None;
            }
        }
    }
    if !samples.is_empty() {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        report.min_ms = samples.iter().copied().map(ms).fold(f64::MAX, f64::min);
        report.max_ms = samples.iter().copied().map(ms).fold(0.0, f64::max);
        report.mean_ms = samples.iter().copied().map(ms).sum::<f64>() / samples.len() as f64;
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// What one `transfer` connection sent and got back.
#[derive(Serialize, Default)]
struct TransferConn {
    sent: u64,
    sent_fnv: String,
    received: u64,
    received_fnv: String,
    ok: bool,
    /// Blocking reads that returned EAGAIN (see `transfer_one`).
    spurious_eagain: u64,
    error: Option<String>,
}

#[derive(Serialize)]
struct TransferReport {
    conns: usize,
    ok: usize,
    bytes_each: u64,
    secs: f64,
    results: Vec<TransferConn>,
}

/// FNV-1a, 64 bits: enough to tell a reordered, lost or duplicated chunk from the original.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The seeded stream of connection `seed`: xorshift64 words.
fn fill_stream(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let w = state.to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

fn transfer(to: SocketAddr, bytes: u64, conns: usize) -> Result<()> {
    let started = Instant::now();
    let handles: Vec<_> = (0..conns.max(1))
        .map(|i| std::thread::spawn(move || transfer_one(to, bytes, i as u64 + 1)))
        .collect();
    let results: Vec<TransferConn> = handles
        .into_iter()
        .map(|h| {
            h.join().unwrap_or_else(|_| TransferConn {
                error: Some("thread panicked".into()),
                ..TransferConn::default()
            })
        })
        .collect();
    let report = TransferReport {
        conns: results.len(),
        ok: results.iter().filter(|r| r.ok).count(),
        bytes_each: bytes,
        secs: started.elapsed().as_secs_f64(),
        results,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn transfer_one(to: SocketAddr, bytes: u64, seed: u64) -> TransferConn {
    let mut out = TransferConn::default();
    let run = |out: &mut TransferConn| -> Result<()> {
        let s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).context("connecting")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut rd = BufReader::new(s.try_clone().context("cloning the socket")?);
        let mut hello = String::new();
        rd.read_line(&mut hello).context("reading HELLO")?;
        if !hello.starts_with("HELLO ") {
            bail!("unexpected greeting {hello:?}");
        }
        let mut w = s;
        let writer = std::thread::spawn(move || -> Result<(u64, u64)> {
            let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut fnv = Fnv::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                fill_stream(&mut state, &mut buf[..n]);
                fnv.update(&buf[..n]);
                w.write_all(&buf[..n]).context("writing")?;
                left -= n as u64;
            }
            w.shutdown(Shutdown::Write).context("half-closing")?;
            Ok((bytes, fnv.0))
        });
        let mut fnv = Fnv::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut progress = Instant::now();
        loop {
            let n = match rd.read(&mut buf) {
                Ok(n) => n,
                // A blocking read of a socket spliced by sockmap can return EAGAIN when it
                // is woken without data (here: by this connection's own writer thread waiting
                // for buffer space); the kernel's tcp_bpf_recvmsg does not wait again. Counted
                // and retried; docs/performance.md lists this kernel behaviour.
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && progress.elapsed() < Duration::from_secs(30) =>
                {
                    out.spurious_eagain += 1;
                    continue;
                }
                Err(e) => return Err(e).context("reading the echo"),
            };
            if n == 0 {
                break;
            }
            progress = Instant::now();
            fnv.update(&buf[..n]);
            out.received += n as u64;
        }
        out.received_fnv = format!("{:016x}", fnv.0);
        let (sent, sent_fnv) = writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        out.sent = sent;
        out.sent_fnv = format!("{sent_fnv:016x}");
        out.ok = out.sent == out.received && out.sent_fnv == out.received_fnv;
        Ok(())
    };
    if let Err(e) = run(&mut out) {
        out.error = Some(format!("{e:#}"));
    }
    out
}

/// Raises the open-files limit to its hard limit (idle modes hold one descriptor per
/// connection).
fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn idle_serve(port: u16) -> Result<()> {
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("binding :{port}"))?;
        println!("serving");
        std::io::stdout().flush().context("flushing stdout")?;
        loop {
            let (mut s, peer) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("testpod idle-serve: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let local = match s.local_addr() {
                    Ok(a) => a,
                    Err(_) => return,
                };
                if s.write_all(format!("HELLO local={local} peer={peer}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    })
}

#[derive(Serialize)]
struct IdleReport {
    open: usize,
    failed: usize,
    first_error: Option<String>,
    elapsed_ms: u64,
}

fn idle(to: SocketAddr, conns: usize, parallel: usize) -> Result<()> {
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let held = rt.block_on(async move {
        use tokio::io::AsyncBufReadExt;
        let started = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..conns {
            let sem = sem.clone();
            tasks.spawn(async move {
                let _p = sem.acquire().await.map_err(|e| e.to_string())?;
                let s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(to))
                    .await
                    .map_err(|_| "connect timed out".to_string())?
                    .map_err(|e| format!("connect: {e}"))?;
                let mut r = tokio::io::BufReader::new(s);
                let mut hello = String::new();
                tokio::time::timeout(READ_TIMEOUT, r.read_line(&mut hello))
                    .await
                    .map_err(|_| "no HELLO in time".to_string())?
                    .map_err(|e| format!("reading HELLO: {e}"))?;
                if !hello.starts_with("HELLO ") {
                    return Err(format!("unexpected greeting {hello:?}"));
                }
                Ok(r.into_inner())
            });
        }
        let mut held = Vec::with_capacity(conns);
        let mut failed = 0;
        let mut first_error = None;
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        let report = IdleReport {
            open: held.len(),
            failed,
            first_error,
            elapsed_ms: started.elapsed().as_millis() as u64,
        };
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
        let _ = std::io::stdout().flush();
        held
    });
    // Hold until stdin closes.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
    Ok(())
}
