//! The workload of `cargo xtask soak` (run in pods as `testpod soak-serve` / `testpod
//! soak-load`): an asynchronous echo server that holds tens of thousands of connections, and a
//! load generator that runs, at once and for a fixed time, every kind of traffic the soak
//! measures:
//!
//! - new connections at a steady rate (connect, the server's `HELLO` line, a 16-byte echo,
//!   close with a reset so no TIME_WAIT piles up in the pod);
//! - long-lived streams writing a seeded pseudo-random stream and checking every echoed byte
//!   against it (a stream cut by a fault reconnects; a wrong byte counts as corruption);
//! - HTTP/1.1 and HTTP/2 (h2c, prior knowledge) requests on kept-open connections;
//! - idle keep-alive connections, opened at the start, watched for a close, and at the end
//!   each checked with one echo round trip.
//!
//! Every failure is recorded with its wall-clock time (Unix ms), its kind and its target, so
//! the soak can tell the failures a fault or a policy was meant to cause from the others. The
//! report is one JSON line on stdout ([`LoadReport`]).

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections being opened at once before the timed load.
const IDLE_RAMP: usize = 64;
/// The longest the idle connections may take to open before the timed load starts anyway.
const IDLE_RAMP_LIMIT: Duration = Duration::from_secs(180);
/// At most this many failures are listed one by one (the counts go on).
const MAX_LISTED_FAILURES: usize = 200_000;
/// New connections in flight at once; a tick finding this many open is counted as
/// `skipped` (the generator, not the mesh, is saturated).
const MAX_IN_FLIGHT: u64 = 2_000;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `testpod soak-serve`: on every port, per connection, `HELLO local=.. peer=..\n` then echo
/// until EOF. Prints `serving` once listening.
pub fn serve(ports: &[u16]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let mut listeners = Vec::new();
        for p in ports {
            let sock = tokio::net::TcpSocket::new_v4().context("socket")?;
            sock.set_reuseaddr(true).context("SO_REUSEADDR")?;
            sock.bind(SocketAddr::from(([0, 0, 0, 0], *p)))
                .with_context(|| format!("binding :{p}"))?;
            listeners.push(sock.listen(4096).with_context(|| format!("listen :{p}"))?);
        }
        println!("serving");
        let mut tasks = Vec::new();
        for l in listeners {
            tasks.push(tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(async move {
                                let _ = echo(s).await;
                            });
                        }
                        // Out of fds, for example: wait a little, keep serving.
                        Err(e) => {
                            eprintln!("soak-serve: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    let local = s.local_addr()?;
    let peer = s.peer_addr()?;
    s.write_all(format!("HELLO local={local} peer={peer}\n").as_bytes())
        .await?;
    let (mut r, mut w) = s.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

/// What `testpod soak-load` runs.
#[derive(Clone, Debug)]
pub struct LoadArgs {
    pub seconds: u64,
    /// Targets of the new connections (round robin, `weights` not needed: list one twice).
    pub conn_to: Vec<SocketAddr>,
    /// New connections per second (0: none).
    pub rate: u64,
    pub stream_to: Vec<SocketAddr>,
    /// Long-lived streams (spread over `stream_to`).
    pub streams: usize,
    /// Bytes per second each stream writes (and reads back).
    pub stream_bps: u64,
    pub idle_to: Vec<SocketAddr>,
    /// Idle keep-alive connections (spread over `idle_to`).
    pub idle: usize,
    /// `ip:port` of the HTTP service (HTTP/1.1 and h2c requests; none when absent).
    pub http_to: Option<SocketAddr>,
    /// HTTP/1.1 requests per second, and as many h2c requests.
    pub http_rate: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Failure {
    /// Unix ms when it failed.
    pub t_ms: u64,
    /// `conn`, `stream`, `idle`, `http1`, `h2`.
    pub kind: String,
    pub target: String,
    pub error: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Minute {
    pub minute: u64,
    pub conn_count: usize,
    pub conn_p50_ms: f64,
    pub conn_p99_ms: f64,
    pub http_count: usize,
    pub http_p50_ms: f64,
    pub http_p99_ms: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct LoadReport {
    pub started_ms: u64,
    pub ended_ms: u64,
    pub conn_attempted: u64,
    pub conn_completed: u64,
    /// Ticks skipped because `MAX_IN_FLIGHT` connections were still open.
    pub conn_skipped: u64,
    pub stream_connections: u64,
    pub stream_bytes_verified: u64,
    pub stream_bytes_corrupted: u64,
    pub idle_wanted: u64,
    pub idle_opened: u64,
    /// Open at the end and echoing.
    pub idle_held: u64,
    /// Idle connections open when the load stopped (before the final echo).
    pub idle_open_at_end: u64,
    pub http1_attempted: u64,
    pub h2_attempted: u64,
    /// `"http1 200"` → count.
    pub http_status: BTreeMap<String, u64>,
    pub failures: Vec<Failure>,
    /// Failures not listed (past `MAX_LISTED_FAILURES`).
    pub failures_unlisted: u64,
    pub minutes: Vec<Minute>,
}

struct Shared {
    /// Unix ms when the timed load began (0 before).
    started_ms: AtomicU64,
    stop: AtomicBool,
    failures: Mutex<(Vec<Failure>, u64)>,
    /// (minute, kind 0 = conn / 1 = http, latency µs).
    samples: Mutex<Vec<(u64, u8, u32)>>,
    http_status: Mutex<BTreeMap<String, u64>>,
    conn_attempted: AtomicU64,
    conn_completed: AtomicU64,
    conn_skipped: AtomicU64,
    in_flight: AtomicU64,
    stream_connections: AtomicU64,
    stream_verified: AtomicU64,
    stream_corrupted: AtomicU64,
    idle_opened: AtomicU64,
    idle_open: AtomicU64,
    idle_first_done: AtomicU64,
    idle_held: AtomicU64,
    http1_attempted: AtomicU64,
    h2_attempted: AtomicU64,
}

impl Shared {
    fn fail(&self, kind: &str, target: SocketAddr, error: impl std::fmt::Display) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.0.len() < MAX_LISTED_FAILURES {
            f.0.push(Failure {
                t_ms: now_ms(),
                kind: kind.into(),
                target: target.to_string(),
                error: error.to_string(),
            });
        } else {
            f.1 += 1;
        }
    }

    fn sample(&self, kind: u8, d: Duration) {
        let minute = now_ms().saturating_sub(self.started_ms.load(Ordering::Relaxed)) / 60_000;
        let us = d.as_micros().min(u128::from(u32::MAX)) as u32;
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((minute, kind, us));
    }

    fn status(&self, proto: &str, status: &str) {
        *self
            .http_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(format!("{proto} {status}"))
            .or_default() += 1;
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

async fn timed<T>(
    d: Duration,
    what: &str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: timed out after {d:?}"),
    }
}

/// Connect and read the server's `HELLO` line.
async fn open(to: SocketAddr) -> Result<BufReader<TcpStream>> {
    let s = timed(CONNECT_TIMEOUT, "connect", TcpStream::connect(to)).await?;
    let mut rd = BufReader::new(s);
    let mut hello = String::new();
    let n = timed(IO_TIMEOUT, "reading HELLO", rd.read_line(&mut hello)).await?;
    if n == 0 {
        bail!("closed before HELLO");
    }
    if !hello.starts_with("HELLO ") {
        bail!("unexpected greeting {hello:?}");
    }
    Ok(rd)
}

/// One echo round trip of `msg`.
async fn round_trip(rd: &mut BufReader<TcpStream>, msg: &[u8]) -> Result<()> {
    timed(IO_TIMEOUT, "writing", rd.get_mut().write_all(msg)).await?;
    let mut back = vec![0u8; msg.len()];
    timed(IO_TIMEOUT, "reading the echo", rd.read_exact(&mut back)).await?;
    if back != msg {
        bail!("echo differs");
    }
    Ok(())
}

/// SO_LINGER 0: the close sends a reset (and does not block).
fn reset_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

async fn one_conn(sh: Arc<Shared>, to: SocketAddr, n: u64) {
    let t = Instant::now();
    let r = async {
        let mut rd = open(to).await?;
        round_trip(&mut rd, format!("conn {n:011}\n").as_bytes()).await?;
        // A reset: no TIME_WAIT left in the pod at hundreds of connections a second.
        reset_on_close(rd.get_ref());
        Ok::<_, anyhow::Error>(())
    }
    .await;
    match r {
        Ok(()) => {
            sh.conn_completed.fetch_add(1, Ordering::Relaxed);
            sh.sample(0, t.elapsed());
        }
        Err(e) => sh.fail("conn", to, format!("{e:#}")),
    }
    sh.in_flight.fetch_sub(1, Ordering::Relaxed);
}

async fn conn_loop(sh: Arc<Shared>, targets: Vec<SocketAddr>, rate: u64) {
    if rate == 0 || targets.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n = 0u64;
    while !sh.stopped() {
        tick.tick().await;
        if sh.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            sh.conn_skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let to = targets[(n as usize) % targets.len()];
        n += 1;
        sh.conn_attempted.fetch_add(1, Ordering::Relaxed);
        sh.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(one_conn(sh.clone(), to, n));
    }
}

/// xorshift64 words: the stream of a seed.
fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let w = state.to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// One long-lived stream: reconnects after a failure until stopped.
async fn stream_loop(sh: Arc<Shared>, to: SocketAddr, id: u64, bps: u64) {
    let mut generation = 0u64;
    while !sh.stopped() {
        generation += 1;
        sh.stream_connections.fetch_add(1, Ordering::Relaxed);
        let seed = (id << 32 | generation).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        match stream_once(&sh, to, seed, bps).await {
            Ok(()) => return,
            Err(e) => {
                sh.fail("stream", to, format!("{e:#}"));
                if format!("{e:#}").contains("corrupt") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn stream_once(sh: &Shared, to: SocketAddr, seed: u64, bps: u64) -> Result<()> {
    let rd = open(to).await?;
    let (mut r, mut w) = rd.into_inner().into_split();
    const CHUNK: usize = 16 * 1024;
    let chunks_per_s = (bps / CHUNK as u64).max(1);
    let stop = &sh.stop;
    let writer = async move {
        let mut state = seed;
        let mut buf = vec![0u8; CHUNK];
        let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / chunks_per_s));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            fill(&mut state, &mut buf);
            timed(IO_TIMEOUT, "writing the stream", w.write_all(&buf)).await?;
            sent += CHUNK as u64;
        }
        timed(IO_TIMEOUT, "half-closing the stream", w.shutdown()).await?;
        Ok::<u64, anyhow::Error>(sent)
    };
    let reader = async move {
        let mut state = seed;
        let mut want = vec![0u8; CHUNK];
        let mut have = 0usize;
        let mut got = vec![0u8; CHUNK];
        let mut received = 0u64;
        fill(&mut state, &mut want);
        loop {
            let n = timed(IO_TIMEOUT, "reading the stream", r.read(&mut got)).await?;
            if n == 0 {
                return Ok::<u64, anyhow::Error>(received);
            }
            let mut off = 0;
            while off < n {
                let take = (n - off).min(CHUNK - have);
                if got[off..off + take] != want[have..have + take] {
                    sh.stream_corrupted
                        .fetch_add(take as u64, Ordering::Relaxed);
                    bail!("corrupt: echoed bytes differ at offset {}", received);
                }
                have += take;
                off += take;
                received += take as u64;
                sh.stream_verified.fetch_add(take as u64, Ordering::Relaxed);
                if have == CHUNK {
                    fill(&mut state, &mut want);
                    have = 0;
                }
            }
        }
    };
    let (sent, received) = tokio::try_join!(writer, reader)?;
    if sent != received {
        bail!("sent {sent} bytes, {received} came back before EOF");
    }
    Ok(())
}

/// One idle keep-alive connection: opened, watched for a close (then reopened after a second,
/// so the set stays whole across faults that cut it), and at the end checked with one echo.
async fn idle_one(
    sh: Arc<Shared>,
    to: SocketAddr,
    mut done: tokio::sync::watch::Receiver<bool>,
    ramp: Arc<tokio::sync::Semaphore>,
) {
    let mut first = true;
    while !sh.stopped() {
        if !first {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // The first opening, before the timed load, takes turns with the others.
        let permit = if first {
            ramp.acquire().await.ok()
        } else {
            None
        };
        let opened = open(to).await;
        drop(permit);
        if first {
            sh.idle_first_done.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let mut rd = match opened {
            Ok(rd) => rd,
            Err(e) => {
                sh.fail("idle", to, format!("opening: {e:#}"));
                continue;
            }
        };
        sh.idle_opened.fetch_add(1, Ordering::Relaxed);
        sh.idle_open.fetch_add(1, Ordering::Relaxed);
        let mut one = [0u8; 1];
        tokio::select! {
            r = rd.read(&mut one) => {
                let what = match r {
                    Ok(0) => "closed while idle".to_string(),
                    Ok(_) => "unexpected bytes while idle".to_string(),
                    Err(e) => format!("idle: {e}"),
                };
                sh.idle_open.fetch_sub(1, Ordering::Relaxed);
                sh.fail("idle", to, what);
            }
            () = async { let _ = done.wait_for(|d| *d).await; } => {
                match round_trip(&mut rd, b"still there?\n").await {
                    Ok(()) => {
                        sh.idle_held.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => sh.fail("idle", to, format!("final echo: {e:#}")),
                }
                reset_on_close(rd.get_ref());
                return;
            }
        }
    }
}

type Body = http_body_util::Full<bytes::Bytes>;

fn request(to: SocketAddr, n: u64) -> Result<hyper::Request<Body>> {
    hyper::Request::builder()
        .uri(format!("http://{to}/soak/{n}"))
        .header("host", to.to_string())
        .body(Body::new(bytes::Bytes::new()))
        .context("building a request")
}

/// HTTP/1.1 (`h2 == false`) or h2c requests at `rate` per second on one kept-open
/// connection, reopened after a failure.
async fn http_loop(sh: Arc<Shared>, to: SocketAddr, rate: u64, h2: bool) {
    use http_body_util::BodyExt;
    let proto = if h2 { "h2" } else { "http1" };
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    'conn: while !sh.stopped() {
        let s = match timed(CONNECT_TIMEOUT, "connect", TcpStream::connect(to)).await {
            Ok(s) => s,
            Err(e) => {
                // A refused connect is an attempt that failed.
                if h2 {
                    sh.h2_attempted.fetch_add(1, Ordering::Relaxed);
                } else {
                    sh.http1_attempted.fetch_add(1, Ordering::Relaxed);
                }
                sh.fail(proto, to, format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let io = hyper_util::rt::TokioIo::new(s);
        enum Sender {
            H1(hyper::client::conn::http1::SendRequest<Body>),
            H2(hyper::client::conn::http2::SendRequest<Body>),
        }
        let mut sender = if h2 {
            match hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
            {
                Ok((tx, conn)) => {
                    tokio::spawn(conn);
                    Sender::H2(tx)
                }
                Err(e) => {
                    sh.h2_attempted.fetch_add(1, Ordering::Relaxed);
                    sh.fail(proto, to, format!("handshake: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        } else {
            match hyper::client::conn::http1::handshake(io).await {
                Ok((tx, conn)) => {
                    tokio::spawn(conn);
                    Sender::H1(tx)
                }
                Err(e) => {
                    sh.http1_attempted.fetch_add(1, Ordering::Relaxed);
                    sh.fail(proto, to, format!("handshake: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        };
        while !sh.stopped() {
            tick.tick().await;
            n += 1;
            let req = match request(to, n) {
                Ok(r) => r,
                Err(e) => {
                    sh.fail(proto, to, format!("{e:#}"));
                    return;
                }
            };
            if h2 {
                sh.h2_attempted.fetch_add(1, Ordering::Relaxed);
            } else {
                sh.http1_attempted.fetch_add(1, Ordering::Relaxed);
            }
            let t = Instant::now();
            let fut = async {
                let resp = match &mut sender {
                    Sender::H1(tx) => {
                        tx.ready().await?;
                        tx.send_request(req).await?
                    }
                    Sender::H2(tx) => {
                        tx.ready().await?;
                        tx.send_request(req).await?
                    }
                };
                let status = resp.status();
                resp.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            };
            match tokio::time::timeout(IO_TIMEOUT, fut).await {
                Ok(Ok(status)) => {
                    sh.status(proto, status.as_str());
                    sh.sample(1, t.elapsed());
                    // An answer that is not a success is a failed request too.
                    if !status.is_success() {
                        sh.fail(proto, to, format!("status {}", status.as_u16()));
                    }
                }
                Ok(Err(e)) => {
                    sh.fail(proto, to, format!("request: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'conn;
                }
                Err(_) => {
                    sh.fail(proto, to, "request: timed out after 5 s");
                    continue 'conn;
                }
            }
        }
    }
}

fn percentile(sorted: &[u32], pct: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = (sorted.len() * pct).div_ceil(100).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

/// `testpod soak-load`: runs everything of [`LoadArgs`] for `seconds`, then checks the idle
/// connections, closes the streams (their last bytes verified) and prints the report.
/// Prints `started <unix ms>` when the timed load begins (after the idle connections).
pub fn load(a: LoadArgs) -> Result<LoadReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let sh = Arc::new(Shared {
            started_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            failures: Mutex::new((Vec::new(), 0)),
            samples: Mutex::new(Vec::new()),
            http_status: Mutex::new(BTreeMap::new()),
            conn_attempted: AtomicU64::new(0),
            conn_completed: AtomicU64::new(0),
            conn_skipped: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            stream_connections: AtomicU64::new(0),
            stream_verified: AtomicU64::new(0),
            stream_corrupted: AtomicU64::new(0),
            idle_opened: AtomicU64::new(0),
            idle_open: AtomicU64::new(0),
            idle_first_done: AtomicU64::new(0),
            idle_held: AtomicU64::new(0),
            http1_attempted: AtomicU64::new(0),
            h2_attempted: AtomicU64::new(0),
        });
        // Idle connections first, `IDLE_RAMP` opening at a time; the timed load starts once
        // every one has been tried (at most `IDLE_RAMP_LIMIT`).
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let ramp = Arc::new(tokio::sync::Semaphore::new(IDLE_RAMP));
        let mut idle = Vec::new();
        if !a.idle_to.is_empty() {
            for i in 0..a.idle {
                let to = a.idle_to[i % a.idle_to.len()];
                idle.push(tokio::spawn(idle_one(
                    sh.clone(),
                    to,
                    done.clone(),
                    ramp.clone(),
                )));
            }
        }
        let ramp_end = Instant::now() + IDLE_RAMP_LIMIT;
        while sh.idle_first_done.load(Ordering::Relaxed) < idle.len() as u64
            && Instant::now() < ramp_end
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started_ms = now_ms();
        sh.started_ms.store(started_ms, Ordering::Relaxed);
        println!("started {started_ms}");
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(conn_loop(
            sh.clone(),
            a.conn_to.clone(),
            a.rate,
        )));
        if !a.stream_to.is_empty() {
            for i in 0..a.streams {
                let to = a.stream_to[i % a.stream_to.len()];
                tasks.push(tokio::spawn(stream_loop(
                    sh.clone(),
                    to,
                    i as u64 + 1,
                    a.stream_bps,
                )));
            }
        }
        if let Some(to) = a.http_to {
            tasks.push(tokio::spawn(http_loop(sh.clone(), to, a.http_rate, false)));
            tasks.push(tokio::spawn(http_loop(sh.clone(), to, a.http_rate, true)));
        }
        tokio::time::sleep(Duration::from_secs(a.seconds)).await;
        sh.stop.store(true, Ordering::Relaxed);
        let idle_open_at_end = sh.idle_open.load(Ordering::Relaxed);
        let _ = done_tx.send(true);
        for t in tasks.into_iter().chain(idle) {
            let _ = t.await;
        }
        // New connections still in flight finish within their timeouts.
        let end = Instant::now() + Duration::from_secs(10);
        while sh.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut samples =
            std::mem::take(&mut *sh.samples.lock().unwrap_or_else(|p| p.into_inner()));
        samples.sort_unstable();
        let mut minutes: BTreeMap<u64, (Vec<u32>, Vec<u32>)> = BTreeMap::new();
        for (m, kind, us) in samples {
            let e = minutes.entry(m).or_default();
            if kind == 0 {
                e.0.push(us)
            } else {
                e.1.push(us)
            }
        }
        let minutes = minutes
            .into_iter()
            .map(|(minute, (c, h))| Minute {
                minute,
                conn_count: c.len(),
                conn_p50_ms: percentile(&c, 50),
                conn_p99_ms: percentile(&c, 99),
                http_count: h.len(),
                http_p50_ms: percentile(&h, 50),
                http_p99_ms: percentile(&h, 99),
            })
            .collect();
        let (failures, unlisted) =
            std::mem::take(&mut *sh.failures.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(LoadReport {
            started_ms,
            ended_ms: now_ms(),
            conn_attempted: sh.conn_attempted.load(Ordering::Relaxed),
            conn_completed: sh.conn_completed.load(Ordering::Relaxed),
            conn_skipped: sh.conn_skipped.load(Ordering::Relaxed),
            stream_connections: sh.stream_connections.load(Ordering::Relaxed),
            stream_bytes_verified: sh.stream_verified.load(Ordering::Relaxed),
            stream_bytes_corrupted: sh.stream_corrupted.load(Ordering::Relaxed),
            idle_wanted: a.idle as u64,
            idle_opened: sh.idle_opened.load(Ordering::Relaxed),
            idle_open_at_end,
            idle_held: sh.idle_held.load(Ordering::Relaxed),
            http1_attempted: sh.http1_attempted.load(Ordering::Relaxed),
            h2_attempted: sh.h2_attempted.load(Ordering::Relaxed),
            http_status: std::mem::take(
                &mut *sh.http_status.lock().unwrap_or_else(|p| p.into_inner()),
            ),
            failures,
            failures_unlisted: unlisted,
            minutes,
        })
    })
}
