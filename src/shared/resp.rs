//! A lean RESP2 connection for the request path's script calls (admissions and settlements,
//! one at a time or batched), to a single Redis server over TCP or a Unix socket.
//!
//! Why not the client's own connection: counted under callgrind
//! (`benches/instr.py --redis`), redis-rs' multiplexed connection spent about 11k
//! instructions a request around each call: the command handed through a channel to the
//! connection's task, a `Sink`/`Stream` pipeline, and a parser-combinator decode of the
//! reply into `Value`s. A batch driver (`redis::Driver`) sends one call at a time and waits
//! for its reply, so it needs none of that: it takes a connection of its own from a small
//! pool, writes the command, reads the one reply into a buffer and parses it in place.
//!
//! Only what the scripts answer is read (integers, bulk strings, arrays of them, nil, status
//! and error lines); anything else fails the call and closes the connection. A connection
//! that failed or timed out in the middle of a call is never reused: its next reply would
//! belong to the abandoned call.

use std::io;

use redis::{ConnectionAddr, ConnectionInfo, ProtocolVersion, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Where and how to connect: the single server of a `redis://` or `redis+unix://` URL that
/// speaks RESP2 (a TLS or RESP3 URL uses the client's own connection only).
#[derive(Clone, Debug)]
pub(super) struct Address {
    addr: ConnectionAddr,
    db: i64,
    username: Option<String>,
    password: Option<String>,
}

impl Address {
    pub(super) fn of(info: &ConnectionInfo) -> Option<Address> {
        if !matches!(info.addr, ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(_))
            || info.redis.protocol != ProtocolVersion::RESP2
        {
            return None;
        }
        Some(Address {
            addr: info.addr.clone(),
            db: info.redis.db,
            username: info.redis.username.clone(),
            password: info.redis.password.clone(),
        })
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// What a call got back.
pub(super) enum Reply {
    Value(Value),
    /// An error line: its code (the first word) and the whole text.
    Error(String),
}

impl Reply {
    pub(super) fn error_code(text: &str) -> &str {
        text.split(' ').next().unwrap_or("")
    }
}

/// One connection; its buffers are kept from call to call.
pub(super) struct Connection {
    stream: Stream,
    out: Vec<u8>,
    input: Vec<u8>,
}

/// A reply this large is not one of the scripts'.
const MAX_REPLY: usize = 16 << 20;

impl Connection {
    /// Connects, then authenticates and selects the database as the URL says.
    pub(super) async fn open(address: &Address) -> io::Result<Connection> {
        let stream = match &address.addr {
            ConnectionAddr::Tcp(host, port) => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            ConnectionAddr::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
            ConnectionAddr::TcpTls { .. } => return Err(io::ErrorKind::Unsupported.into()),
        };
        let mut c = Connection {
            stream,
            out: Vec::with_capacity(4096),
            input: Vec::with_capacity(4096),
        };
        if let Some(password) = &address.password {
            let password = password.as_bytes();
            match &address.username {
                Some(user) => {
                    let with_user = c.expect_ok(&[b"AUTH", user.as_bytes(), password]).await;
                    // Before Redis 6 `AUTH` takes the password alone (redis-rs does the same).
                    match with_user {
                        Err(e) if e.to_string().contains("wrong number of arguments") => {
                            c.expect_ok(&[b"AUTH", password]).await?;
                        }
                        other => other?,
                    }
                }
                None => c.expect_ok(&[b"AUTH", password]).await?,
            }
        }
        if address.db != 0 {
            let db = address.db.to_string();
            c.expect_ok(&[b"SELECT", db.as_bytes()]).await?;
        }
        Ok(c)
    }

    /// Whether the server closed this idle connection as far as the runtime has already
    /// seen (its readiness, no system call): a connection left in the pool while Redis
    /// restarted is then replaced before a call is lost on it. A close the runtime has not
    /// seen yet still fails that call. (Plain readability says nothing here: it stays set
    /// after a call's reply, which is read to its end, not until the socket would block.)
    pub(super) fn looks_closed(&self) -> bool {
        let ready = match &self.stream {
            Stream::Tcp(s) => poll_once(s.ready(tokio::io::Interest::READABLE)),
            Stream::Unix(s) => poll_once(s.ready(tokio::io::Interest::READABLE)),
        };
        match ready {
            Some(Ok(r)) => r.is_read_closed() || r.is_error(),
            Some(Err(_)) => true,
            None => false,
        }
    }

    async fn expect_ok(&mut self, args: &[&[u8]]) -> io::Result<()> {
        match self.call(args.len(), args.iter().copied()).await? {
            Reply::Value(Value::Okay) => Ok(()),
            Reply::Error(e) => Err(io::Error::other(e)),
            Reply::Value(v) => Err(io::Error::other(format!("unexpected reply {v:?}"))),
        }
    }

    /// Sends one command (its `n` arguments in order) and reads its reply.
    pub(super) async fn call<'a>(
        &mut self,
        n: usize,
        args: impl Iterator<Item = &'a [u8]>,
    ) -> io::Result<Reply> {
        self.out.clear();
        encode(&mut self.out, n, args);
        self.exchange().await
    }

    /// [`Connection::call`] for arguments already written as RESP (a batch's).
    pub(super) async fn call_args(&mut self, args: &Args) -> io::Result<Reply> {
        self.out.clear();
        array_head(&mut self.out, args.len());
        self.out.extend_from_slice(&args.bytes);
        self.exchange().await
    }

    /// Writes the command in `out` and reads its one reply.
    async fn exchange(&mut self) -> io::Result<Reply> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write_all(&self.out).await?,
            Stream::Unix(s) => s.write_all(&self.out).await?,
        }
        self.input.clear();
        loop {
            if let Some((reply, used)) = parse(&self.input)? {
                // One call, one reply: anything after it is a protocol error.
                if used != self.input.len() {
                    return Err(bad("bytes after the reply"));
                }
                return Ok(reply);
            }
            if self.input.len() > MAX_REPLY {
                return Err(bad("reply too large"));
            }
            self.input.reserve(4096);
            let n = match &mut self.stream {
                Stream::Tcp(s) => s.read_buf(&mut self.input).await?,
                Stream::Unix(s) => s.read_buf(&mut self.input).await?,
            };
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// Polls `f` once with a waker that does nothing: its answer if it has one now.
fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// A command of `count` arguments as RESP: an array of bulk strings.
fn encode<'a>(out: &mut Vec<u8>, count: usize, args: impl Iterator<Item = &'a [u8]>) {
    array_head(out, count);
    for a in args {
        bulk(out, a);
    }
}

/// `*<count>\r\n`: an array of `count` elements follows.
fn array_head(out: &mut Vec<u8>, count: usize) {
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(count).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `$<len>\r\n<bytes>\r\n`: one bulk string. The scripts' arguments are short: their
/// heads are written as one fixed-size store each, not through `itoa` and a copy.
fn bulk(out: &mut Vec<u8>, a: &[u8]) {
    out.reserve(a.len() + 8);
    match a.len() {
        n @ 0..10 => out.extend_from_slice(&[b'$', b'0' + n as u8, b'\r', b'\n']),
        n @ 10..100 => {
            let (tens, ones) = (b'0' + (n / 10) as u8, b'0' + (n % 10) as u8);
            out.extend_from_slice(&[b'$', tens, ones, b'\r', b'\n']);
        }
        n => {
            out.push(b'$');
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(a);
    out.extend_from_slice(b"\r\n");
}

/// The arguments of a command, each written as a RESP bulk string as it is added: what the
/// request path's script calls are built of. Built with `arg` as a redis-rs `Cmd` is (it
/// takes the same `ToRedisArgs`), but each argument is encoded once: a batch copies runs of
/// an operation's bytes as they are, and the connection sends the whole after its array
/// head. With a `Cmd` an operation's arguments were pushed one by one into its own `Cmd`,
/// then one by one into the batch's, then encoded by [`encode`] with their lengths
/// (`benches/instr.py --redis`).
#[derive(Clone, Debug, Default)]
pub(super) struct Args {
    count: usize,
    bytes: Vec<u8>,
    /// Where each of the first `marked` arguments starts in `bytes` (a `u32`: a command is
    /// far below 4 GiB): a batch sends some of an operation's arguments by these.
    starts: [u32; MARKED],
    /// How many leading arguments `starts` gives: those added with `arg`, up to
    /// [`MARKED`], and appended ones as far as their source had them.
    marked: usize,
}

/// Arguments whose start [`Args`] keeps: more than an operation's short form spans.
const MARKED: usize = 16;

impl Args {
    pub(super) fn with_capacity(bytes: usize) -> Args {
        Args {
            bytes: Vec::with_capacity(bytes),
            ..Args::default()
        }
    }

    /// Adds one value's arguments (one for a number or a string).
    pub(super) fn arg<T: redis::ToRedisArgs>(&mut self, value: T) -> &mut Args {
        value.write_redis_args(self);
        self
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// Appends arguments `which` of `from`: a run that starts and ends at marked
    /// arguments or at its end (panics otherwise: a builder's mistake).
    pub(super) fn append(&mut self, from: &Args, which: std::ops::Range<usize>) {
        let at = |i: usize| {
            if i == from.count {
                from.bytes.len()
            } else {
                assert!(i < from.marked, "argument {i} is not marked");
                from.starts[i] as usize
            }
        };
        let (start, end) = (at(which.start), at(which.end));
        for i in which.clone() {
            let to = self.count + i - which.start;
            if to >= MARKED || to != self.marked || i >= from.marked {
                break;
            }
            let Ok(at) = u32::try_from(from.starts[i] as usize - start + self.bytes.len()) else {
                break;
            };
            self.starts[to] = at;
            self.marked += 1;
        }
        self.count += which.len();
        self.bytes.extend_from_slice(&from.bytes[start..end]);
    }

    /// Appends all of `from`'s arguments.
    pub(super) fn append_all(&mut self, from: &Args) {
        self.append(from, 0..from.count);
    }

    /// Each argument's bytes, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.bytes[..];
        std::iter::from_fn(move || {
            // Written by `bulk`: `$`, the length, CRLF, the bytes, CRLF.
            let digits = rest.get(1..)?;
            let end = digits.iter().position(|&b| b == b'\r')?;
            let len: usize = std::str::from_utf8(&digits[..end]).ok()?.parse().ok()?;
            let body = 1 + end + 2;
            let arg = &rest[body..body + len];
            rest = &rest[body + len + 2..];
            Some(arg)
        })
    }

    /// The same command as a redis-rs `Cmd`, for the client's own connection.
    pub(super) fn to_cmd(&self) -> redis::Cmd {
        let mut cmd = redis::Cmd::with_capacity(self.count, self.bytes.len());
        for a in self.iter() {
            cmd.arg(a);
        }
        cmd
    }
}

impl redis::RedisWrite for Args {
    fn write_arg(&mut self, arg: &[u8]) {
        // (A start past 4 GiB is left unmarked: never, for a script call.)
        if let (true, Ok(at)) = (
            self.marked == self.count && self.count < MARKED,
            u32::try_from(self.bytes.len()),
        ) {
            self.starts[self.count] = at;
            self.marked += 1;
        }
        self.count += 1;
        bulk(&mut self.bytes, arg);
    }
}

/// Arrays nested deeper than this are not the scripts' replies.
const MAX_DEPTH: u32 = 4;

/// The reply at the start of `b` and the bytes it took, `None` if it is not complete yet.
fn parse(b: &[u8]) -> io::Result<Option<(Reply, usize)>> {
    value(b, 0, 0)
}

/// One line's content from `at` (after its type byte) and where the next starts, `None` if
/// the line is not complete yet.
fn line(b: &[u8], at: usize) -> io::Result<Option<(&[u8], usize)>> {
    let Some(end) = b.get(at..).and_then(|rest| memchr::memchr(b'\n', rest)) else {
        return Ok(None);
    };
    let end = at + end;
    if end == at || b[end - 1] != b'\r' {
        return Err(bad("a line not ended by CRLF"));
    }
    Ok(Some((&b[at..end - 1], end + 1)))
}

fn integer(text: &[u8]) -> io::Result<i64> {
    decimal(text).ok_or_else(|| bad("not an integer"))
}

/// A decimal integer: an optional `-`, then digits, within i64 (a reply's few short numbers
/// are read without `str::parse`'s UTF-8 check and set-up).
pub(super) fn decimal(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    // Accumulated negative, so i64::MIN fits.
    let mut n: i64 = 0;
    for &d in digits {
        let d = d.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n.checked_mul(10)?.checked_sub(i64::from(d))?;
    }
    if negative {
        Some(n)
    } else {
        n.checked_neg()
    }
}

fn value(b: &[u8], at: usize, depth: u32) -> io::Result<Option<(Reply, usize)>> {
    let Some(&kind) = b.get(at) else {
        return Ok(None);
    };
    let Some((text, next)) = line(b, at + 1)? else {
        return Ok(None);
    };
    let v = match kind {
        b':' => Value::Int(integer(text)?),
        b'+' if text == b"OK" => Value::Okay,
        b'+' => Value::SimpleString(String::from_utf8_lossy(text).into_owned()),
        b'-' => {
            return Ok(Some((
                Reply::Error(String::from_utf8_lossy(text).into_owned()),
                next,
            )))
        }
        b'$' => {
            let len = integer(text)?;
            if len < 0 {
                return Ok(Some((Reply::Value(Value::Nil), next)));
            }
            let len = usize::try_from(len).map_err(|_| bad("bulk length"))?;
            if len > MAX_REPLY {
                return Err(bad("bulk string too large"));
            }
            let end = next + len;
            let Some(tail) = b.get(end..end + 2) else {
                return Ok(None);
            };
            if tail != b"\r\n" {
                return Err(bad("bulk string not ended by CRLF"));
            }
            return Ok(Some((
                Reply::Value(Value::BulkString(b[next..end].to_vec())),
                end + 2,
            )));
        }
        b'*' => {
            let n = integer(text)?;
            if n < 0 {
                return Ok(Some((Reply::Value(Value::Nil), next)));
            }
            if depth == MAX_DEPTH {
                return Err(bad("arrays nested too deep"));
            }
            let mut items = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(64));
            let mut at = next;
            for _ in 0..n {
                match value(b, at, depth + 1)? {
                    None => return Ok(None),
                    Some((Reply::Value(v), used)) => {
                        items.push(v);
                        at = used;
                    }
                    // An error inside an array (never from a script's reply): refused.
                    Some((Reply::Error(e), _)) => return Err(io::Error::other(e)),
                }
            }
            return Ok(Some((Reply::Value(Value::Array(items)), at)));
        }
        _ => return Err(bad("an unknown reply type")),
    };
    Ok(Some((Reply::Value(v), next)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(b: &[u8]) -> Reply {
        let (r, used) = parse(b).unwrap().expect("complete");
        assert_eq!(used, b.len());
        r
    }

    fn ok(b: &[u8]) -> Value {
        match whole(b) {
            Reply::Value(v) => v,
            Reply::Error(e) => panic!("error {e}"),
        }
    }

    #[test]
    fn the_scripts_replies_are_read() {
        assert_eq!(ok(b":-42\r\n"), Value::Int(-42));
        assert_eq!(ok(b"+OK\r\n"), Value::Okay);
        assert_eq!(ok(b"$-1\r\n"), Value::Nil);
        assert_eq!(
            ok(b"$10\r\n1,2;3\r\n4,5\r\n"),
            Value::BulkString(b"1,2;3\r\n4,5".to_vec())
        );
        assert_eq!(
            ok(b"*3\r\n:1\r\n$0\r\n\r\n*1\r\n:7\r\n"),
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(vec![]),
                Value::Array(vec![Value::Int(7)])
            ])
        );
        match whole(b"-NOSCRIPT No matching script.\r\n") {
            Reply::Error(e) => assert_eq!(Reply::error_code(&e), "NOSCRIPT"),
            Reply::Value(v) => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_reply_cut_anywhere_is_incomplete_not_wrong() {
        let full: &[u8] = b"*2\r\n:1\r\n$5\r\n1;2,3\r\n";
        for cut in 0..full.len() {
            assert!(parse(&full[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        assert!(parse(full).unwrap().is_some());
    }

    #[test]
    fn what_is_not_a_reply_is_an_error() {
        for b in [
            &b"?1\r\n"[..],
            b":x\r\n",
            b":1\n",
            b"$3\r\nabcd\r\n",
            b"*1\r\n-ERR no\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(b).is_err(), "{:?}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn decimals_read_as_str_parse_reads_them() {
        for t in [
            "0",
            "-0",
            "7",
            "-42",
            "1765000000000",
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "-9223372036854775809",
            "",
            "-",
            "+1",
            "1.5",
            "1e3",
            " 1",
            "12a",
            "٣",
        ] {
            assert_eq!(
                decimal(t.as_bytes()),
                t.parse::<i64>().ok().filter(|_| !t.starts_with('+')),
                "{t:?}"
            );
        }
    }

    /// A server that answers `AUTH user password` as Redis 5 does, and OK to the rest; what
    /// it was sent, command by command.
    async fn redis_5(listener: tokio::net::TcpListener) -> Vec<String> {
        let (mut s, _) = listener.accept().await.unwrap();
        let (mut seen, mut buf) = (Vec::new(), Vec::new());
        loop {
            let Some((Reply::Value(Value::Array(args)), used)) = parse(&buf).unwrap() else {
                let mut b = [0u8; 512];
                match s.read(&mut b).await.unwrap() {
                    0 => return seen,
                    n => buf.extend_from_slice(&b[..n]),
                }
                continue;
            };
            buf.drain(..used);
            let args: Vec<String> = args
                .into_iter()
                .map(|v| match v {
                    Value::BulkString(b) => String::from_utf8(b).unwrap(),
                    other => panic!("{other:?}"),
                })
                .collect();
            let reply: &[u8] = if args.len() == 3 && args[0] == "AUTH" {
                b"-ERR wrong number of arguments for 'auth' command\r\n"
            } else {
                b"+OK\r\n"
            };
            seen.push(args.join(" "));
            s.write_all(reply).await.unwrap();
        }
    }

    #[tokio::test]
    async fn before_redis_6_the_password_goes_alone_then_the_database_is_selected() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(redis_5(listener));
        let info: ConnectionInfo = format!("redis://old:pw@127.0.0.1:{port}/2")
            .parse()
            .unwrap();
        let c = Connection::open(&Address::of(&info).unwrap())
            .await
            .unwrap();
        drop(c);
        assert_eq!(
            server.await.unwrap(),
            ["AUTH old pw", "AUTH pw", "SELECT 2"]
        );
    }

    #[test]
    fn a_command_is_an_array_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, 3, [&b"EVALSHA"[..], b"", b"12"].into_iter());
        assert_eq!(out, b"*3\r\n$7\r\nEVALSHA\r\n$0\r\n\r\n$2\r\n12\r\n");
    }

    #[test]
    fn a_bulk_string_of_any_length_says_its_length() {
        for n in [0usize, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 65_536] {
            let a = vec![b'x'; n];
            let mut out = Vec::new();
            bulk(&mut out, &a);
            let mut want = format!("${n}\r\n").into_bytes();
            want.extend_from_slice(&a);
            want.extend_from_slice(b"\r\n");
            assert_eq!(out, want, "length {n}");
        }
    }

    /// `args` as `Args` and as a `Cmd`, added the same way.
    fn both(args: &[Vec<u8>]) -> (Args, redis::Cmd) {
        let (mut a, mut c) = (Args::default(), redis::Cmd::new());
        for x in args {
            a.arg(&x[..]);
            c.arg(&x[..]);
        }
        (a, c)
    }

    fn cmd_args(c: &redis::Cmd) -> Vec<Vec<u8>> {
        c.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                redis::Arg::Cursor => panic!("no cursor"),
            })
            .collect()
    }

    #[test]
    fn args_go_out_as_encode_writes_them_and_numbers_as_a_cmd_writes_them() {
        let mut a = Args::default();
        a.arg("FCALL")
            .arg(-1i64)
            .arg(7u8)
            .arg(u64::MAX)
            .arg("")
            .arg(format!("{:032x}", 5u128));
        let mut c = redis::Cmd::new();
        c.arg("FCALL")
            .arg(-1i64)
            .arg(7u8)
            .arg(u64::MAX)
            .arg("")
            .arg(format!("{:032x}", 5u128));
        let mut want = Vec::new();
        encode(&mut want, 6, cmd_args(&c).iter().map(|v| &v[..]));
        let mut got = Vec::new();
        array_head(&mut got, a.len());
        got.extend_from_slice(&a.bytes);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(want).unwrap()
        );
        assert_eq!(cmd_args(&a.to_cmd()), cmd_args(&c));
    }

    proptest::proptest! {
        /// Any run of arguments appended (a whole command, or a short form's run) is those
        /// arguments, read back or appended again from the copy.
        #[test]
        fn appended_runs_are_those_arguments(
            args in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..130), 1..20),
            head in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..9), 0..4),
            cut in proptest::num::usize::ANY,
            len in proptest::num::usize::ANY,
        ) {
            let (from, cmd) = both(&args);
            proptest::prop_assert_eq!(from.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), cmd_args(&cmd));
            // A run that ends at a marked argument's start, or at the end.
            let last_mark = if args.len() <= MARKED { args.len() } else { MARKED - 1 };
            let start = cut % last_mark;
            let end = if len % 2 == 0 {
                args.len()
            } else {
                start + len / 2 % (last_mark - start + 1)
            };
            let (mut to, _) = both(&head);
            to.append(&from, start..end);
            let mut want: Vec<Vec<u8>> = head.clone();
            want.extend(args[start..end].iter().cloned());
            proptest::prop_assert_eq!(to.len(), want.len());
            proptest::prop_assert_eq!(to.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), want.clone());
            // The copy's marks are right too: appended again, its marked ones read the same.
            // (It has them all, up to MARKED, where the run came from marked ones.)
            if end < args.len().min(MARKED) || args.len() <= MARKED {
                proptest::prop_assert_eq!(to.marked, want.len().min(MARKED));
            }
            // A run ends where a marked argument starts, or at the end.
            let k = if to.marked == to.len() { to.len() } else { to.marked.saturating_sub(1) };
            let mut again = Args::default();
            again.append(&to, 0..k);
            proptest::prop_assert_eq!(again.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), want[..k].to_vec());
            // Runs one after another, as a batch appends an operation's short form, onto a
            // destination already past its marks: each run's arguments, in order.
            let (mut batch, _) = both(&args);
            let mut want = args.clone();
            let mid = start + (end - start) / 2;
            for run in [start..mid, mid..end] {
                if run.start < from.marked && (run.end < from.marked || run.end == args.len()) {
                    batch.append(&from, run.clone());
                    want.extend(args[run].iter().cloned());
                }
            }
            proptest::prop_assert_eq!(batch.len(), want.len());
            proptest::prop_assert_eq!(batch.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), want);
        }
    }
}
