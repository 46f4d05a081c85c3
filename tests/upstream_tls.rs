//! Real providers are HTTPS (SPEC §2, §6 `tls_ca_file`): TLS to the upstream with the chain
//! and the host name verified, pooled connections, addresses that follow the provider's
//! DNS, and an egress proxy through HTTP CONNECT. Every upstream here is the mock behind
//! TLS, with certificates from a CA made in the test.

mod common;

use std::io::{BufRead, Read as _, Seek, SeekFrom, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::tls::TestCa;
use common::*;
use serde_json::json;
use spidergate_mock::{MockProvider, TlsIdentity};

const ADMIN: &str = "admin-token-for-tls-tests";

/// gpt-4o-mini: 0.15 / 0.60 USD per Mtok = 150 / 600 nano-dollars per token.
const MINI_DEFAULT_COST: i64 = 10 * 150 + 5 * 600;

const MODELS_TLS: &str = r#"
models:
  - id: gpt-4o-mini
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 1000
  - id: claude-test
    provider: mock-anthropic
    upstream_id: claude-sonnet-4-5-20250929
    input_usd_per_mtok: 3
    output_usd_per_mtok: 15
    max_output_tokens: 1000
"#;

/// claude-test: 3 / 15 USD per Mtok, with 100 input and 20 output tokens reported.
const CLAUDE_COST: i64 = 100 * 3_000 + 20 * 15_000;
const CLAUDE_TOKENS: [(&str, &str); 2] = [
    ("x-mock-prompt-tokens", "100"),
    ("x-mock-completion-tokens", "20"),
];

/// A TLS mock for `localhost` (and 127.0.0.1) with a certificate from `ca`.
fn tls_mock(ca: &TestCa) -> MockProvider {
    let identity = ca.issue(&["localhost", "127.0.0.1"]);
    MockProvider::start_tls_background("127.0.0.1:0", &identity, "localhost").expect("TLS mock")
}

/// The key's spend once the ledger is quiescent (every finished request committed): exactly
/// `nanos`, and nothing more can arrive later.
fn wait_spend(gw: &Gateway, key: &Key, nanos: i64) {
    gw.wait_ledger_quiescent();
    let total: i64 = gw.spend_rows(&key.id).iter().map(|r| r.2).sum();
    assert_eq!(total, nanos, "spend");
}

fn metric(gw: &Gateway, line_prefix: &str) -> u64 {
    let text = gw.admin_call("GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_prefix} in:\n{text}"))
}

fn messages_body(model: &str, stream: bool) -> Vec<u8> {
    json!({"model": model, "max_tokens": 50, "stream": stream,
           "messages": [{"role": "user", "content": "hello"}]})
    .to_string()
    .into_bytes()
}

#[test]
fn plain_streamed_anthropic_and_translated_traffic_over_tls_is_charged_exactly() {
    let ca = TestCa::new("SpiderGate test CA");
    let mock = tls_mock(&ca);
    assert!(mock.base_url().starts_with("https://localhost:"));
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBuilder::new(&mock)
        .admin(ADMIN)
        .provider_ca(&ca.write(dir.path(), "ca.pem"))
        .models(MODELS_TLS)
        .start();
    let key = gw.create_key(&[]);

    let plain = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(plain.json()["usage"]["completion_tokens"], 5);

    let body = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let streamed = gw.post(
        "/v1/chat/completions",
        &key.bearer(),
        body.to_string().as_bytes(),
        &[],
    );
    assert_eq!(streamed.status, 200);
    let text = streamed.text();
    assert!(text.contains("data: [DONE]"), "{text}");

    let native = gw.post(
        "/v1/messages",
        "",
        &messages_body("claude-test", false),
        &[
            &[("x-api-key", key.secret.as_str())][..],
            &CLAUDE_TOKENS[..],
        ]
        .concat(),
    );
    assert_eq!(native.status, 200, "{}", native.text());
    assert_eq!(native.json()["usage"]["output_tokens"], 20);

    let translated = gw.post(
        "/v1/chat/completions",
        &key.bearer(),
        json!({"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]})
            .to_string()
            .as_bytes(),
        &CLAUDE_TOKENS,
    );
    assert_eq!(translated.status, 200, "{}", translated.text());
    assert_eq!(translated.json()["usage"]["completion_tokens"], 20);

    // What the provider received, decrypted on its side: four requests, each with the
    // provider's own key and never the agent's.
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 4);
    for r in &reqs {
        let k = r.provider_key().expect("provider key");
        assert!(k == PROVIDER_KEY || k == ANTHROPIC_PROVIDER_KEY, "{k}");
        assert!(!format!("{:?}", r.headers).contains(&key.secret));
    }
    assert_eq!(reqs[2].path, "/v1/messages");
    assert_eq!(reqs[3].path, "/v1/messages");
    assert!(mock.tls_handshakes() >= 1);
    assert_eq!(mock.tls_failures(), 0);
    wait_spend(&gw, &key, 2 * MINI_DEFAULT_COST + 2 * CLAUDE_COST);
}

/// A provider that fails verification: 502 `upstream_error`, the reason in the log and a
/// metric, and not one byte of the request at the provider.
fn assert_refused_at_handshake(gw: &Gateway, mock: &MockProvider, log_says: &str) {
    let key = gw.create_key(&[]);
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.code(), "upstream_error");
    assert_eq!(r.header("x-spidergate-error-code"), Some("upstream_error"));
    assert!(
        mock.requests().is_empty(),
        "the provider received a request"
    );
    wait_for(
        Duration::from_secs(5),
        "handshake failure at the mock",
        || (mock.tls_failures() >= 1).then_some(()),
    );
    assert_eq!(mock.tls_handshakes(), 0);
    assert!(
        metric(
            gw,
            "spidergate_upstream_connect_failures_total{reason=\"tls\"} "
        ) >= 1
    );
    let log = gw.log_text();
    assert!(log.contains(log_says), "log lacks {log_says:?}:\n{log}");
    // Nothing was charged: the request never reached the provider.
    gw.wait_ledger_quiescent();
    let total: i64 = gw.spend_rows(&key.id).iter().map(|r| r.2).sum();
    assert_eq!(total, 0);
}

#[test]
fn a_certificate_for_another_name_gets_502_and_nothing_reaches_the_provider() {
    let ca = TestCa::new("SpiderGate test CA");
    let identity = ca.issue(&["wrong.example"]);
    let mock =
        MockProvider::start_tls_background("127.0.0.1:0", &identity, "localhost").expect("mock");
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBuilder::new(&mock)
        .provider_ca(&ca.write(dir.path(), "ca.pem"))
        .admin(ADMIN)
        .start();
    assert_refused_at_handshake(&gw, &mock, "not valid for name");
}

#[test]
fn a_certificate_from_an_unknown_ca_gets_502_and_nothing_reaches_the_provider() {
    // No tls_ca_file: the system trust store, which has never heard of this CA.
    let ca = TestCa::new("Nobody's CA");
    let mock = tls_mock(&ca);
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    assert_refused_at_handshake(&gw, &mock, "UnknownIssuer");
}

#[test]
fn a_provider_failing_verification_falls_back_to_the_next_model_of_the_alias() {
    let ca = TestCa::new("SpiderGate test CA");
    let good = tls_mock(&ca);
    let bad = MockProvider::start_tls_background(
        "127.0.0.1:0",
        &ca.issue(&["impostor.example"]),
        "localhost",
    )
    .expect("mock");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "ca.pem");
    let models = format!(
        "{MODELS_TLS}  - id: impostor-model\n    provider: impostor\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 1\naliases:\n  careful: [impostor-model, gpt-4o-mini]\n"
    );
    let gw = GatewayBuilder::new(&good)
        .admin(ADMIN)
        .provider_ca(&ca_file)
        .provider(&format!(
            "- name: impostor\nkind: openai\nbase_url: \"{}\"\ntls_ca_file: \"{}\"",
            bad.base_url(),
            ca_file.display()
        ))
        .models(&models)
        .start();
    let key = gw.create_key(&[]);
    let r = gw.chat(&key, "careful");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-spidergate-fallback-from"),
        Some("impostor-model")
    );
    assert_eq!(r.json()["model"], "gpt-4o-mini");
    assert!(bad.requests().is_empty());
    assert_eq!(good.requests().len(), 1);
    wait_spend(&gw, &key, MINI_DEFAULT_COST);
}

#[test]
fn forty_sequential_requests_share_a_few_tls_handshakes() {
    let ca = TestCa::new("SpiderGate test CA");
    let mock = tls_mock(&ca);
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBuilder::new(&mock)
        .provider_ca(&ca.write(dir.path(), "ca.pem"))
        .admin(ADMIN)
        .start();
    let key = gw.create_key(&[]);
    for i in 0..40 {
        let r = gw.chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    assert_eq!(mock.requests().len(), 40);
    let handshakes = mock.tls_handshakes();
    assert!(
        (1..=3).contains(&handshakes),
        "{handshakes} TLS handshakes for 40 sequential requests"
    );
    let opened = metric(&gw, "spidergate_upstream_connections_opened_total ");
    assert!((1..=3).contains(&opened), "gateway opened {opened}");
    wait_spend(&gw, &key, 40 * MINI_DEFAULT_COST);
}

#[test]
fn a_sixteen_mib_body_arrives_byte_exact_over_tls() {
    let ca = TestCa::new("SpiderGate test CA");
    let mock = tls_mock(&ca);
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBuilder::new(&mock)
        .provider_ca(&ca.write(dir.path(), "ca.pem"))
        .start();
    let key = gw.create_key(&[]);
    // Printable, varied content (no run of one byte a broken splice could fake).
    let mut content = String::with_capacity(16 << 20);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while content.len() < 16 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        content.push(char::from(b'a' + (x % 26) as u8));
    }
    let body = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{content}"}}],"max_tokens":5}}"#
    );
    let r = gw.post("/v1/chat/completions", &key.bearer(), body.as_bytes(), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].body.len(), body.len());
    assert!(reqs[0].body == body.as_bytes(), "body differs");
}

#[test]
fn sighup_while_tls_streams_are_open_loses_nothing() {
    let ca = TestCa::new("SpiderGate test CA");
    let mock = tls_mock(&ca);
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBuilder::new(&mock)
        .provider_ca(&ca.write(dir.path(), "ca.pem"))
        .admin(ADMIN)
        .start();
    let key = gw.create_key(&[]);
    let body = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let slow = [("x-mock-chunks", "6"), ("x-mock-chunk-delay-ms", "150")];
    let mut streams: Vec<_> = (0..3)
        .map(|_| {
            let (status, _, mut reader) = gw.open_stream(&key, &body, &slow);
            assert_eq!(status, 200);
            let first = read_first_event(&mut reader);
            assert!(first.contains("data:"), "{first}");
            reader
        })
        .collect();
    gw.signal_hup();
    wait_for(Duration::from_secs(5), "the reload", || {
        (metric(&gw, "spidergate_config_reloads_total ") >= 1).then_some(())
    });
    for reader in &mut streams {
        let mut rest = String::new();
        reader
            .read_to_string(&mut rest)
            .expect("rest of the stream");
        assert!(rest.contains("data: [DONE]"), "{rest}");
    }
    let after = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(after.status, 200, "{}", after.text());
    wait_spend(&gw, &key, 4 * MINI_DEFAULT_COST);
    assert_eq!(mock.tls_failures(), 0);
}

#[test]
fn check_config_names_the_field_when_tls_ca_file_is_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let text = dir.path().join("text.pem");
    std::fs::write(&text, "hello\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let good = TestCa::new("ok").write(dir.path(), "good.pem");
    let check = |ca: &std::path::Path, base: &str| {
        let config = dir.path().join("spidergate.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: \"127.0.0.1:1\"\ndatabase: \"{}\"\nproviders:\n  - name: private\n    kind: openai\n    base_url: \"{base}\"\n    tls_ca_file: \"{}\"\nmodels:\n  - id: m\n    provider: private\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 1\n",
                dir.path().join("db.sqlite").display(),
                ca.display()
            ),
        )
        .unwrap();
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("check-config")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .output()
            .expect("check-config")
    };
    for (file, says) in [
        (&missing, "cannot read"),
        (&text, "no PEM certificate"),
        (&garbage, "unusable"),
    ] {
        let out = check(file, "https://127.0.0.1:8443/v1");
        assert!(!out.status.success(), "{file:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("providers[0].tls_ca_file"), "{err}");
        assert!(err.contains(says), "{err}");
    }
    let plain = check(&good, "http://127.0.0.1:8080/v1");
    assert!(!plain.status.success());
    assert!(String::from_utf8_lossy(&plain.stderr).contains("only for an https:// base_url"));
    let ok = check(&good, "https://127.0.0.1:8443/v1");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// One line of `/etc/hosts` owned by a test: appended, changed in place (same length, so a
/// concurrent reader never sees a partial file) and cut off again on drop.
struct HostsLine {
    name: String,
    offset: u64,
    original_len: u64,
}

impl HostsLine {
    const PATH: &'static str = "/etc/hosts";

    fn add(ip: Ipv4Addr, name: &str) -> std::io::Result<HostsLine> {
        let mut f = std::fs::OpenOptions::new().append(true).open(Self::PATH)?;
        let original_len = f.metadata()?.len();
        let needs_newline = original_len > 0 && {
            let mut last = [0u8; 1];
            let mut r = std::fs::File::open(Self::PATH)?;
            r.seek(SeekFrom::Start(original_len - 1))?;
            r.read_exact(&mut last)?;
            last[0] != b'\n'
        };
        let prefix = if needs_newline { "\n" } else { "" };
        f.write_all(format!("{prefix}{} {name}\n", Self::ip_field(ip)).as_bytes())?;
        Ok(HostsLine {
            name: name.into(),
            offset: original_len + prefix.len() as u64,
            original_len,
        })
    }

    /// Fixed width, so that changing the address never changes the line's length.
    fn ip_field(ip: Ipv4Addr) -> String {
        format!("{:<15}", ip.to_string())
    }

    fn set(&self, ip: Ipv4Addr) {
        self.write_at(&format!("{} {}\n", Self::ip_field(ip), self.name));
    }

    /// Comments the line out: the name stops resolving.
    fn disable(&self) {
        self.write_at(&format!(
            "#{} {}\n",
            &Self::ip_field(Ipv4Addr::LOCALHOST)[1..],
            self.name
        ));
    }

    fn write_at(&self, line: &str) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(Self::PATH)
            .expect("open /etc/hosts");
        f.write_all_at(line.as_bytes(), self.offset)
            .expect("write /etc/hosts");
    }
}

impl Drop for HostsLine {
    fn drop(&mut self) {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(Self::PATH) {
            let _ = f.set_len(self.original_len);
        }
    }
}

fn resolves(name: &str) -> Vec<SocketAddr> {
    use std::net::ToSocketAddrs;
    (name, 1)
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default()
}

#[test]
fn a_provider_that_moves_to_a_new_address_is_followed_without_a_restart() {
    let name = format!("sg-dns-{}.test", std::process::id());
    let hosts = match HostsLine::add(Ipv4Addr::new(127, 0, 0, 2), &name) {
        Ok(h) => h,
        Err(e) => {
            assert!(
                std::env::var_os("SPIDERGATE_REQUIRE_SERVICES").is_none(),
                "cannot edit /etc/hosts: {e}"
            );
            eprintln!("SKIPPED: cannot edit /etc/hosts: {e}");
            return;
        }
    };
    assert_eq!(resolves(&name), vec![SocketAddr::from(([127, 0, 0, 2], 1))]);
    let ca = TestCa::new("SpiderGate test CA");
    let identity: TlsIdentity = ca.issue(&[name.as_str()]);
    let old = MockProvider::start_tls_background("127.0.0.2:0", &identity, &name).expect("old");
    let port = old.addr().port();
    let new = MockProvider::start_tls_background(&format!("127.0.0.3:{port}"), &identity, &name)
        .expect("new address, same port");
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBuilder::new(&old)
        .provider_ca(&ca.write(dir.path(), "ca.pem"))
        .server("dns_refresh_ms: 200")
        .admin(ADMIN)
        .start();
    let key = gw.create_key(&[]);
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    assert_eq!(old.requests().len(), 1);

    hosts.set(Ipv4Addr::new(127, 0, 0, 3));
    wait_for(
        Duration::from_secs(10),
        "requests at the new address",
        || {
            let r = gw.chat(&key, "gpt-4o-mini");
            assert_eq!(r.status, 200, "{}", r.text());
            (!new.requests().is_empty()).then_some(())
        },
    );
    assert!(metric(&gw, "spidergate_dns_changes_total ") >= 1);
    assert!(gw.log_text().contains("127.0.0.3"));
    // Pooled connections to the old address are not used once it is gone from the list.
    let before = old.requests().len();
    for _ in 0..5 {
        assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    }
    assert_eq!(old.requests().len(), before);

    // The name stops resolving: the gateway keeps the last addresses it had.
    hosts.disable();
    assert!(resolves(&name).is_empty());
    wait_for(Duration::from_secs(10), "a failed lookup", || {
        (metric(&gw, "spidergate_dns_failures_total ") >= 1).then_some(())
    });
    let served = new.requests().len();
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(new.requests().len(), served + 1);
    drop(hosts);
    assert!(resolves(&name).is_empty());
}

/// A real egress proxy from Debian (tinyproxy) on a free port; its log shows what it
/// tunnelled.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    fn start(allowed_port: u16) -> Option<Tinyproxy> {
        let bin = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("SPIDERGATE_REQUIRE_SERVICES").is_none(),
                "tinyproxy is required here (scripts/install-deps.sh installs it)"
            );
            eprintln!("SKIPPED: tinyproxy is not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("tinyproxy.log");
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\nConnectPort {allowed_port}\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 50\n",
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        wait_for(Duration::from_secs(10), "tinyproxy listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Some(Tinyproxy {
            child,
            port,
            log,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn connects(&self) -> Vec<String> {
        std::fs::File::open(&self.log)
            .map(|f| {
                std::io::BufReader::new(f)
                    .lines()
                    .map_while(Result::ok)
                    .filter(|l| l.contains("): CONNECT "))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn https_proxy_tunnels_upstream_tls_through_a_real_connect_proxy() {
    let ca = TestCa::new("SpiderGate test CA");
    let mock = tls_mock(&ca);
    let Some(proxy) = Tinyproxy::start(mock.addr().port()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBuilder::new(&mock)
        .provider_ca(&ca.write(dir.path(), "ca.pem"))
        .env("HTTPS_PROXY", &proxy.url())
        .env("NO_PROXY", "")
        .admin(ADMIN)
        .start();
    let key = gw.create_key(&[]);
    for _ in 0..3 {
        let r = gw.chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let body = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let streamed = gw.post(
        "/v1/chat/completions",
        &key.bearer(),
        body.to_string().as_bytes(),
        &[],
    );
    assert!(streamed.text().contains("data: [DONE]"));
    assert_eq!(mock.requests().len(), 4);
    let connects = wait_for(Duration::from_secs(5), "CONNECT in the proxy's log", || {
        let c = proxy.connects();
        (!c.is_empty()).then_some(c)
    });
    let target = format!("localhost:{}", mock.addr().port());
    assert!(connects.iter().all(|l| l.contains(&target)), "{connects:?}");
    // Tunnels are pooled like any upstream connection.
    assert!(mock.tls_handshakes() <= 2, "{}", mock.tls_handshakes());
    wait_spend(&gw, &key, 4 * MINI_DEFAULT_COST);
}

#[test]
fn no_proxy_goes_direct_and_a_refusing_proxy_is_a_502() {
    let ca = TestCa::new("SpiderGate test CA");
    let mock = tls_mock(&ca);
    // The proxy allows CONNECT only to another port: it refuses the mock's.
    let Some(proxy) = Tinyproxy::start(1) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "ca.pem");
    let direct = GatewayBuilder::new(&mock)
        .provider_ca(&ca_file)
        .env("HTTPS_PROXY", &proxy.url())
        .env("NO_PROXY", "example.com,localhost")
        .start();
    let key = direct.create_key(&[]);
    assert_eq!(direct.chat(&key, "gpt-4o-mini").status, 200);
    assert!(proxy.connects().is_empty(), "{:?}", proxy.connects());

    let refused = GatewayBuilder::new(&mock)
        .provider_ca(&ca_file)
        .env("HTTPS_PROXY", &proxy.url())
        .env("NO_PROXY", "example.com")
        .admin(ADMIN)
        .start();
    let key = refused.create_key(&[]);
    mock.clear();
    let r = refused.chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.code(), "upstream_error");
    assert!(mock.requests().is_empty());
    assert!(
        metric(
            &refused,
            "spidergate_upstream_connect_failures_total{reason=\"proxy\"} "
        ) >= 1
    );
}

#[test]
fn a_provider_host_that_does_not_resolve_warns_at_start_and_its_alias_falls_back() {
    let ca = TestCa::new("SpiderGate test CA");
    let mock = tls_mock(&ca);
    let dir = tempfile::tempdir().unwrap();
    let models = format!(
        "{MODELS_TLS}  - id: nowhere-model\n    provider: nowhere\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 1\naliases:\n  anywhere: [nowhere-model, gpt-4o-mini]\n"
    );
    let gw = GatewayBuilder::new(&mock)
        .admin(ADMIN)
        .provider_ca(&ca.write(dir.path(), "ca.pem"))
        .provider(
            "- name: nowhere\nkind: openai\nbase_url: \"https://no-such-provider.invalid/v1\"",
        )
        .models(&models)
        .start();
    assert!(gw
        .log_text()
        .contains("cannot resolve no-such-provider.invalid yet"));
    let key = gw.create_key(&[]);
    let direct = gw.chat(&key, "nowhere-model");
    assert_eq!(direct.status, 502, "{}", direct.text());
    assert_eq!(direct.code(), "upstream_error");
    let r = gw.chat(&key, "anywhere");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-spidergate-fallback-from"),
        Some("nowhere-model")
    );
    assert_eq!(mock.requests().len(), 1);
    wait_spend(&gw, &key, MINI_DEFAULT_COST);
}

#[test]
fn the_upstream_watchdogs_fire_over_tls_as_over_plain_http() {
    let ca = TestCa::new("SpiderGate test CA");
    let mock = tls_mock(&ca);
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBuilder::new(&mock)
        .provider_ca(&ca.write(dir.path(), "ca.pem"))
        .server("first_byte_timeout_ms: 300")
        .server("idle_timeout_ms: 5000")
        .start();
    let key = gw.create_key(&[]);
    // A head later than the first-byte timeout: 504, charged at an estimate (the request
    // reached the provider).
    let late = gw.chat_with(&key, "gpt-4o-mini", &[("x-mock-delay-ms", "3000")]);
    assert_eq!(late.status, 504, "{}", late.text());
    assert_eq!(late.code(), "upstream_timeout");
    // The watchdog shut down that TLS connection only: the next request is served.
    let next = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(next.status, 200, "{}", next.text());
    // A stream slower than the first-byte timeout between chunks is not cut.
    let body = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let slow = gw.post(
        "/v1/chat/completions",
        &key.bearer(),
        body.to_string().as_bytes(),
        &[("x-mock-chunks", "3"), ("x-mock-chunk-delay-ms", "500")],
    );
    assert_eq!(slow.status, 200);
    assert!(slow.text().contains("data: [DONE]"), "{}", slow.text());
}
