//! Load generator for `benches/p99_timeline.py`: `--connections` keep-alive HTTP/1.1
//! connections to one `127.0.0.1` address, each sending the same POST back to back (a closed
//! loop, like `wrk -c N`) for `--duration-s`, on one thread. Unlike wrk it keeps every
//! request: one line per request on stdout, `<start_unix_us> <latency_us> <status>`, so the
//! latency can be lined up with what the server did at that moment.
//!
//! ```sh
//! target/release/examples/latency_log --addr 127.0.0.1:8080 --path /v1/chat/completions \
//!     --header 'Authorization: Bearer sk-…' --body '{"model":"gpt-4o-mini",…}' \
//!     --connections 32 --duration-s 10 > requests.txt
//! ```
//!
//! Bounded: it stops after `--duration-s` (plus at most `--timeout-s` for a request in
//! flight) and only connects to loopback addresses.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(about = "Closed-loop HTTP/1.1 load with one latency line per request")]
struct Args {
    /// Loopback `IP:port` of the server.
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(long)]
    header: Vec<String>,
    /// JSON request body (sent as application/json).
    #[arg(long)]
    body: String,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// A request slower than this ends its connection's loop (counted as status 0).
    #[arg(long, default_value_t = 10.0)]
    timeout_s: f64,
}

/// One finished request: start (µs since the Unix epoch), latency (µs), HTTP status.
type Sample = (u64, u32, u16);

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    if !args.addr.ip().is_loopback() {
        eprintln!("latency_log only talks to loopback addresses");
        std::process::exit(2);
    }
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        args.path,
        args.addr,
        args.body.len()
    );
    for h in &args.header {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.push_str(&args.body);
    let request: &'static [u8] = Box::leak(head.into_bytes().into_boxed_slice());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let samples = rt.block_on(async {
        // One clock pair: wall time for the output, a monotonic clock for the latencies.
        let epoch_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(args.duration_s);
        let timeout = Duration::from_secs_f64(args.timeout_s);
        let mut tasks = Vec::new();
        for _ in 0..args.connections {
            tasks.push(tokio::spawn(connection(
                args.addr, request, t0, epoch_us, end, timeout,
            )));
        }
        let mut all = Vec::new();
        for t in tasks {
            match t.await {
                Ok(Ok(s)) => all.extend(s),
                Ok(Err(e)) => eprintln!("connection failed: {e}"),
                Err(e) => eprintln!("connection task failed: {e}"),
            }
        }
        all
    });
    let mut samples = samples;
    samples.sort_unstable();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (start, lat, status) in samples {
        writeln!(out, "{start} {lat} {status}")?;
    }
    out.flush()
}

async fn connection(
    addr: SocketAddr,
    request: &'static [u8],
    t0: Instant,
    epoch_us: u64,
    end: Instant,
    timeout: Duration,
) -> std::io::Result<Vec<Sample>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut samples = Vec::with_capacity(1 << 16);
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < end {
        let start = Instant::now();
        let status =
            match tokio::time::timeout(timeout, exchange(&mut stream, request, &mut buf)).await {
                Ok(r) => r?,
                Err(_) => 0,
            };
        let lat = start.elapsed().as_micros().min(u32::MAX as u128) as u32;
        let at = epoch_us + start.duration_since(t0).as_micros() as u64;
        samples.push((at, lat, status));
        if status == 0 {
            break;
        }
    }
    Ok(samples)
}

/// Sends one request and reads its whole response (Content-Length or chunked); the status.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<u16> {
    stream.write_all(request).await?;
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = resp.parse(&buf[..filled]) else {
            continue;
        };
        let status = resp.code.unwrap_or(0);
        let mut length = None;
        let mut chunked = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h.value.eq_ignore_ascii_case(b"chunked");
            }
        }
        if let Some(len) = length {
            while filled < head_len + len {
                if filled == buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
                let n = stream.read(&mut buf[filled..]).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                filled += n;
            }
            return Ok(status);
        }
        if chunked {
            // Enough for a benchmark: the body ends with the zero-length chunk.
            while !buf[head_len..filled].ends_with(b"0\r\n\r\n") {
                if filled == buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
                let n = stream.read(&mut buf[filled..]).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                filled += n;
            }
            return Ok(status);
        }
        return Err(std::io::Error::other("response without a length"));
    }
}
