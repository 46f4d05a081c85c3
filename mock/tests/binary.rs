//! The `spidergate-mock` binary serves on `--listen`. (Running it here also makes `cargo
//! nextest run --workspace` build `target/debug/spidergate-mock` for the Python e2e tests.)

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn binary_serves_on_listen_address() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_spidergate-mock"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn spidergate-mock");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(e) => {
                assert!(Instant::now() < deadline, "mock never listened: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n\r\n")
        .expect("write");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    let _ = child.kill();
    let _ = child.wait();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.ends_with(r#"{"status":"ok"}"#), "{reply}");
}
