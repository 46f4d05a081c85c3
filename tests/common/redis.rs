//! A real `redis-server` on a free loopback port, for the shared-state tests; stoppable and
//! restartable on the same port to drill outages.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = "/usr/bin/redis-server";

/// A throwaway Redis: no persistence, so a restart is also a data loss.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// More `redis-server` arguments, for every start.
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one, or returns `None` (loudly) if `redis-server` is not installed.
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// [`RedisServer::start`] with more `redis-server` arguments (`--rename-command FCALL ""`).
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        if !std::path::Path::new(BIN).exists() {
            eprintln!("SKIPPED: {BIN} is not installed; the shared-state tests did not run");
            super::services_required();
            return None;
        }
        let mut server = RedisServer {
            port: super::free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts it again on the same port (after [`RedisServer::stop`]), empty.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new(BIN)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        super::wait_for(
            Duration::from_secs(10),
            "redis-server to answer PING",
            || self.ping().then_some(()),
        );
    }

    /// Kills it and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open, nothing answers. Like a hung Redis.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
