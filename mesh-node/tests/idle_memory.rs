//! What an idle HBONE tunnel costs in heap: many tunnels through `proxy::hbone::stream::copy`
//! (the copy both node proxies run for every tunnelled connection), each carrying one
//! exchange and then left idle, under an allocator that counts the bytes in use.
//!
//! An idle tunnel must not hold a read buffer: before this was fixed, each waiting direction
//! kept `MIN_BUF` (16 KiB) allocated, 160 MB of heap for the 10,000 idle connections of the
//! soak, whose pages became resident once the allocator handed them out a second time.
//! Memory *figures* belong to `cargo xtask bench --idle`; this checks the behaviour.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use mesh_node::proxy::hbone::stream::{H2Stream, MIN_BUF, copy};
use mesh_node::telemetry::conn::{ConnMeta, Tracked};
use mesh_node::telemetry::istio::{Labels, MUTUAL_TLS, Reporter, Side};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The system allocator, counting the bytes in use.
struct Counting;

static IN_USE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to `System` unchanged; only a counter is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        IN_USE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        IN_USE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        IN_USE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        IN_USE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const TUNNELS: usize = 200;

fn meta() -> ConnMeta {
    ConnMeta {
        labels: Labels {
            reporter: Reporter::Destination,
            source: Side::named("idle-memory", "client"),
            destination: Side::named("idle-memory", "server"),
            service: None,
            protocol: "tcp".into(),
            security: MUTUAL_TLS,
        },
        src_addr: "127.0.0.1:1000".parse().expect("addr"),
        dst_addr: "127.0.0.1:2000".parse().expect("addr"),
        hbone_addr: None,
        transport: Some("h2"),
    }
}

#[test]
fn an_idle_tunnel_holds_no_read_buffer() {
    // One thread: everything the tunnels allocate is counted, nothing else runs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // One in-memory HTTP/2 connection carrying every tunnel, as a pooled one does.
        let (c_io, s_io) = tokio::io::duplex(1 << 20);
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(s_io).await.expect("server handshake");
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let send = respond
                    .send_response(http::Response::new(()), false)
                    .expect("respond");
                let _ = accepted_tx.send(H2Stream::new(send, req.into_body()));
            }
        });
        let (client, conn) = h2::client::handshake(c_io).await.expect("handshake");
        tokio::spawn(conn);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Warm-up tunnel: the metric families, the open-connection list and the runtime's
        // first allocations are made once, not per tunnel.
        let mut held = Vec::new();
        for round in 0..2 {
            let n = if round == 0 { 1 } else { TUNNELS };
            let before = IN_USE.load(Ordering::Relaxed);
            for i in 0..n {
                let req = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri("127.0.0.1:1")
                    .body(())
                    .expect("request");
                let (resp, send) = client
                    .clone()
                    .ready()
                    .await
                    .expect("ready")
                    .send_request(req, false)
                    .expect("send");
                let resp = resp.await.expect("response");
                let server_end = accepted.recv().await.expect("a tunnel");
                let mut app = TcpStream::connect(addr).await.expect("connect");
                let (mut proxy_side, _) = listener.accept().await.expect("accept");
                let tracked = Tracked::open(meta());
                let (mut received, mut sent) = tracked.meters();
                let task = tokio::spawn(async move {
                    let r = copy(&mut proxy_side, server_end, &mut received, &mut sent).await;
                    drop((received, sent, tracked));
                    r
                });
                // Then idle: every other tunnel after one exchange each way, the others after
                // only a greeting from the far end (the app has sent nothing yet; a fresh
                // socket starts out "readable" to tokio, so this once held a buffer).
                let mut far = H2Stream::new(send, resp.into_body()).into_io();
                let mut got = [0u8; 5];
                if i % 2 == 0 {
                    app.write_all(b"hello").await.expect("app write");
                    far.read_exact(&mut got).await.expect("far read");
                    assert_eq!(&got, b"hello");
                }
                far.write_all(b"world").await.expect("far write");
                app.read_exact(&mut got).await.expect("app read");
                assert_eq!(&got, b"world");
                held.push((app, far, task));
            }
            // Let every copy reach its wait.
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            let per_tunnel = (IN_USE.load(Ordering::Relaxed) - before) / n as isize;
            eprintln!("round {round}: {n} idle tunnels, {per_tunnel} bytes of heap each");
            if round == 1 {
                assert!(
                    per_tunnel < (MIN_BUF / 2) as isize,
                    "an idle tunnel holds {per_tunnel} bytes of heap: a read buffer \
                     ({MIN_BUF} bytes) is kept while the socket has nothing to read"
                );
            }
        }
        // The tunnels still work after idling: the buffer is taken again when data comes.
        for (app, far, _) in held.iter_mut().take(10) {
            app.write_all(b"again").await.expect("app write");
            let mut got = [0u8; 5];
            far.read_exact(&mut got).await.expect("far read");
            assert_eq!(&got, b"again");
        }
        for (app, far, task) in held {
            drop((app, far));
            let _ = task.await.expect("copy task");
        }
    });
}
