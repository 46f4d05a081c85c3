//! One webhook POST: a small blocking HTTP/1.1 client (plain TCP, or TLS through the
//! gateway's own rustls with the ring provider, verified against the system trust store).
//!
//! Written here rather than taken from a crate: the `reqwest` in the tree is built without
//! TLS, and its TLS features would pull in a second crypto provider (aws-lc). A webhook
//! needs one request and the response's status line, with one overall deadline.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Largest response head read (status line and headers); the body is never read.
const MAX_HEAD: usize = 16 * 1024;

/// Where a webhook URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `Host` header value (with the port when it is not the scheme's default).
    pub authority: String,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Target {
    /// Parses an `http://` or `https://` URL; the error says what is wrong.
    pub fn parse(url: &str) -> Result<Target, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("\"{url}\" must start with http:// or https://"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() || authority.contains('@') || path.contains(char::is_whitespace) {
            return Err(format!(
                "\"{url}\" must name a host (no user info, no spaces)"
            ));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => match p.parse() {
                Ok(port) => (h.trim_start_matches('[').trim_end_matches(']'), port),
                Err(_) => return Err(format!("\"{url}\" has a bad port \"{p}\"")),
            },
            _ => (authority, default_port),
        };
        if host.is_empty() {
            return Err(format!("\"{url}\" must name a host"));
        }
        Ok(Target {
            tls,
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            path,
        })
    }
}

/// The client config for https webhooks, built once: the system's trust anchors.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let certs = rustls_native_certs::load_native_certs()
                .map_err(|e| format!("cannot read the system trust store: {e}"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err("the system trust store holds no usable certificate".into());
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

/// A byte stream with a deadline: every read and write gets the time left.
struct Deadlined<S> {
    inner: S,
    tcp: TcpStream,
    deadline: Instant,
}

impl<S> Deadlined<S> {
    fn arm(&self) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ));
        }
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.set_write_timeout(Some(left))
    }
}

impl<S: Read> Read for Deadlined<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.inner.read(buf)
    }
}

impl<S: Write> Write for Deadlined<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.arm()?;
        self.inner.flush()
    }
}

fn connect(t: &Target, deadline: Instant) -> Result<TcpStream, String> {
    let addrs = (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", t.host))?;
    let mut last = format!("{} resolves to no address", t.host);
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out connecting".into());
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

/// POSTs `body` as JSON with the given extra headers; returns the response status. The
/// whole exchange (connect, TLS, send, response head) must end within `timeout`.
pub fn post(
    t: &Target,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let tcp = connect(t, deadline)?;
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: spidergate/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        t.path,
        t.authority,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let io = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) {
            "timed out waiting for the webhook".to_string()
        } else {
            e.to_string()
        }
    };
    if t.tls {
        let config = tls_config()?;
        let name = rustls::pki_types::ServerName::try_from(t.host.clone())
            .map_err(|e| format!("bad TLS server name {}: {e}", t.host))?;
        let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
        let sock = tcp.try_clone().map_err(io)?;
        let mut s = Deadlined {
            inner: rustls::StreamOwned::new(conn, sock),
            tcp,
            deadline,
        };
        exchange(&mut s, head.as_bytes(), body).map_err(io)
    } else {
        let sock = tcp.try_clone().map_err(io)?;
        let mut s = Deadlined {
            inner: sock,
            tcp,
            deadline,
        };
        exchange(&mut s, head.as_bytes(), body).map_err(io)
    }
}

/// Sends the request and reads the response head; returns its status.
fn exchange(s: &mut (impl Read + Write), head: &[u8], body: &[u8]) -> std::io::Result<u16> {
    s.write_all(head)?;
    s.write_all(body)?;
    s.flush()?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::other(
                "the webhook closed the connection before its response head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                return resp
                    .code
                    .ok_or_else(|| std::io::Error::other("response without a status"))
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(std::io::Error::other("response head too large"))
            }
            Err(e) => return Err(std::io::Error::other(format!("bad response: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_host_port_and_path() {
        let t = Target::parse("https://hooks.example.com/spidergate?x=1").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (true, "hooks.example.com", 443, "/spidergate?x=1")
        );
        let t = Target::parse("http://127.0.0.1:8099").unwrap();
        assert_eq!(
            (t.port, t.path.as_str(), t.authority.as_str()),
            (8099, "/", "127.0.0.1:8099")
        );
        let t = Target::parse("http://[::1]:81/a").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 81));
        for bad in [
            "ftp://x/",
            "http://",
            "http://u:p@h/",
            "http://h:x/",
            "https://h/a b",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn posts_and_reads_the_status_and_times_out_on_silence() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        // The silent connection stays open until the client has given up (an event, not a
        // guess at how long the client takes on a loaded machine).
        let (gave_up, client_done) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("{\"a\":1}") {
                let n = s.read(&mut b).unwrap();
                got.extend_from_slice(&b[..n]);
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
            let text = String::from_utf8(got).unwrap();
            // Silent: accepts and never answers.
            let (_silent, _) = l.accept().unwrap();
            let _ = client_done.recv();
            text
        });
        let t = Target::parse(&url).unwrap();
        let status = post(&t, &[("X-Test", "1")], b"{\"a\":1}", Duration::from_secs(5)).unwrap();
        assert_eq!(status, 204);
        let e = post(&t, &[], b"{}", Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        gave_up.send(()).unwrap();
        let text = server.join().unwrap();
        assert!(text.starts_with("POST /hook HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.contains("X-Test: 1\r\n"));
        assert!(text.contains("Content-Length: 7\r\n"));
    }
}
