//! The gateway's own listeners (SPEC §2, §6 `tls`, `admin.tls`): what `check-config` says of
//! a certificate pair, the warning for plain HTTP on a reachable address, and the per-address
//! auth-failure limit behind a TLS-terminating load balancer (`server.trusted_proxies`),
//! and early refusals over HTTP/2 reaching a client that sends its body after the answer
//! began. The rest of the HTTPS and HTTP/2 traffic is driven by real clients in
//! `tests/e2e/test_tls_listener.py`.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{CertificateParams, KeyPair};

/// A self-signed pair for localhost valid from `not_before` to `not_after` (days from now).
fn pair(dir: &Path, name: &str, from_days: i64, to_days: i64) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let day = |d: i64| {
        let t = now + d * 86_400;
        let (y, m, dd) = civil(t.div_euclid(86_400));
        rcgen::date_time_ymd(y, m, dd)
    };
    params.not_before = day(from_days);
    params.not_after = day(to_days);
    let cert = params.self_signed(&key).unwrap();
    let c = dir.join(format!("{name}.crt"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

fn check_config(dir: &Path, listen: &str, tls: &str) -> Output {
    let config = dir.join("spidergate.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"{listen}\"\ndatabase: \"{}\"\n{tls}providers:\n  - name: p\n    kind: openai\n    base_url: \"http://127.0.0.1:9/v1\"\nmodels:\n  - id: m\n    provider: p\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 1\n",
            dir.join("db.sqlite").display()
        ),
    )
    .unwrap();
    Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .output()
        .unwrap()
}

fn tls_yaml(field: &str, (cert, key): &(String, String)) -> String {
    match field {
        "tls" => format!("tls:\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n"),
        _ => format!(
            "admin:\n  listen: \"127.0.0.1:1\"\n  tls:\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\n"
        ),
    }
}

#[test]
fn check_config_validates_the_listener_certificate_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let good = pair(dir.path(), "good", -1, 90);
    let soon = pair(dir.path(), "soon", -1, 5);
    let expired = pair(dir.path(), "expired", -30, -1);
    let other = pair(dir.path(), "other", -1, 90);
    for field in ["tls", "admin.tls"] {
        let ok = check_config(dir.path(), "127.0.0.1:8080", &tls_yaml(field, &good));
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert!(!String::from_utf8_lossy(&ok.stderr).contains("expires in"));

        let warned = check_config(dir.path(), "127.0.0.1:8080", &tls_yaml(field, &soon));
        let err = String::from_utf8_lossy(&warned.stderr);
        assert!(warned.status.success(), "{err}");
        assert!(
            err.contains(&format!(
                "warning: {field}.cert_file: the certificate expires in"
            )),
            "{err}"
        );

        let out = check_config(dir.path(), "127.0.0.1:8080", &tls_yaml(field, &expired));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!("{field}.cert_file: the certificate expired")),
            "{err}"
        );

        let mismatched = (good.0.clone(), other.1.clone());
        let out = check_config(dir.path(), "127.0.0.1:8080", &tls_yaml(field, &mismatched));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!("{field}.key_file: does not match")),
            "{err}"
        );

        let missing = ("/nonexistent/cert.pem".to_string(), good.1.clone());
        let out = check_config(dir.path(), "127.0.0.1:8080", &tls_yaml(field, &missing));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!("{field}.cert_file: cannot read")),
            "{err}"
        );

        let swapped = (good.1.clone(), good.0.clone());
        let out = check_config(dir.path(), "127.0.0.1:8080", &tls_yaml(field, &swapped));
        assert!(!out.status.success());
    }
}

#[test]
fn plain_http_on_a_reachable_address_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let out = check_config(dir.path(), "0.0.0.0:8080", "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("listen: 0.0.0.0:8080 is plain HTTP on a non-loopback address"),
        "{err}"
    );
    let quiet = check_config(dir.path(), "127.0.0.1:8080", "");
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("plain HTTP"));
    let good = pair(dir.path(), "good", -1, 90);
    let tls = check_config(dir.path(), "0.0.0.0:8080", &tls_yaml("tls", &good));
    assert!(!String::from_utf8_lossy(&tls.stderr).contains("plain HTTP"));
}

#[test]
fn behind_a_trusted_balancer_the_auth_limit_counts_the_forwarded_client() {
    let mock = mock();
    let bad = "Bearer spideriq_pat_ffffffffffffffffffffffffffffffff";
    let call = |gw: &Gateway, client: &str| {
        gw.post(
            "/v1/chat/completions",
            bad,
            b"{}",
            &[("X-Forwarded-For", client)],
        )
        .status
    };
    let trusted = GatewayBuilder::new(&mock)
        .server("auth_failures_per_minute: 3")
        .server("trusted_proxies: [\"127.0.0.0/8\"]")
        .start();
    let first: Vec<u16> = (0..4).map(|_| call(&trusted, "203.0.113.7")).collect();
    assert_eq!(first, vec![401, 401, 401, 429]);
    // Another client behind the same balancer is not refused for the first one's failures.
    assert_eq!(call(&trusted, "203.0.113.8"), 401);
    // The client cannot pick its address by prepending to the header.
    assert_eq!(call(&trusted, "198.51.100.1, 203.0.113.7"), 429);

    // Without trusted proxies the header is ignored: every call is the peer's own.
    let untrusted = GatewayBuilder::new(&mock)
        .server("auth_failures_per_minute: 3")
        .start();
    let statuses: Vec<u16> = ["a", "b", "c", "d"]
        .iter()
        .enumerate()
        .map(|(i, _)| call(&untrusted, &format!("203.0.113.{}", 10 + i)))
        .collect();
    assert_eq!(statuses, vec![401, 401, 401, 429]);

    let dir = tempfile::tempdir().unwrap();
    let out = check_config(
        dir.path(),
        "127.0.0.1:8080",
        "server:\n  trusted_proxies: [\"10.0.0.0/40\"]\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.trusted_proxies[0]"));
}

/// What an HTTP/2 client saw of one request: the answer, and whether its stream was reset.
struct H2Exchange {
    status: u16,
    body: serde_json::Value,
    /// The client's whole body went out (the server opened the window for it).
    body_sent: bool,
    /// `RST_STREAM` the client received on the stream, if any.
    reset: Option<h2::Reason>,
}

/// When an HTTP/2 client sends its body, relative to the answer.
#[derive(Clone, Copy)]
enum Order {
    /// All of it first, as the flow-control window allows, then the answer is read (httpx).
    BodyFirst,
    /// After the answer's head arrived: a client whose upload is still under way when an
    /// early answer comes.
    HeadFirst,
}

/// One POST over TLS + HTTP/2 (ALPN `h2`): the head goes out with a `content-length`, the
/// body in the window's pieces in the given order, then the answer's body is read and
/// the stream watched for a reset.
async fn h2_post(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    bearer: Option<&str>,
    body: Vec<u8>,
    order: Order,
) -> H2Exchange {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();

    let mut req = http::Request::post("https://localhost/v1/chat/completions")
        .header("content-type", "application/json")
        .header("content-length", body.len());
    if let Some(b) = bearer {
        req = req.header("authorization", b);
    }
    let (answer, mut send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    let wait = Duration::from_secs(10);
    let mut answer = Some(answer);
    let mut head = None;
    if matches!(order, Order::HeadFirst) {
        let a = answer.take().unwrap();
        head = Some(
            tokio::time::timeout(wait, a)
                .await
                .expect("answer head in time")
                .expect("answer head"),
        );
    }

    // The body, in pieces the window allows.
    let mut rest = bytes::Bytes::from(body);
    let body_sent = tokio::time::timeout(Duration::from_secs(5), async {
        while !rest.is_empty() {
            send.reserve_capacity(rest.len());
            match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let piece = rest.split_to(n.min(rest.len()));
                    if send.send_data(piece, rest.is_empty()).is_err() {
                        return false;
                    }
                }
                _ => return false,
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if let Some(a) = answer {
        head = Some(
            tokio::time::timeout(wait, a)
                .await
                .expect("answer head in time")
                .expect("answer head"),
        );
    }
    let head = head.unwrap();
    let status = head.status().as_u16();
    let mut recv = head.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = tokio::time::timeout(wait, recv.data())
        .await
        .expect("answer body in time")
    {
        let chunk = chunk.expect("answer body");
        let _ = recv.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    // A reset after the answer shows within a moment of it; a cleanly closed stream never
    // reports one.
    let reset = tokio::time::timeout(
        Duration::from_millis(300),
        std::future::poll_fn(|cx| send.poll_reset(cx)),
    )
    .await
    .ok()
    .and_then(Result::ok);
    H2Exchange {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        }),
        body_sent,
        reset,
    }
}

#[test]
fn over_http2_early_refusals_reach_a_client_still_sending_its_body() {
    let mock = mock();
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::TestCa::new("h2 test CA");
    let leaf = ca.issue(&["localhost"]);
    let cert = dir.path().join("gw.crt");
    let key = dir.path().join("gw.key");
    std::fs::write(&cert, &leaf.cert_chain_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    let gw = GatewayBuilder::new(&mock)
        .tls(&cert, &key)
        .top("max_body_bytes: 200000")
        .start();
    let v = gw.cli_json(&["keys", "create", "--name", "h2-agent", "--json"]);
    let bearer = format!("Bearer {}", v["secret"].as_str().unwrap());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let small = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    // The key goes live with the next reload: until then it is refused as unknown.
    wait_for(Duration::from_secs(10), "key live over h2", || {
        let x = rt.block_on(h2_post(
            gw.addr,
            &ca.pem,
            Some(&bearer),
            small.clone(),
            Order::BodyFirst,
        ));
        (x.status == 200).then_some(())
    });

    // No key: 401, and the body sent after the answer began is read, not reset.
    for _ in 0..5 {
        let x = rt.block_on(h2_post(
            gw.addr,
            &ca.pem,
            None,
            small.clone(),
            Order::HeadFirst,
        ));
        assert_eq!(x.status, 401);
        assert_eq!(x.body["error"]["code"], "invalid_api_key", "{}", x.body);
        assert!(x.body_sent, "the body could not be sent after the 401");
        assert_eq!(x.reset, None, "the 401's stream was reset");
    }

    // A 300 KB body over `max_body_bytes`: 413, and the client can send the whole of it
    // (more than the initial 64 KiB window), before or after the answer's head, and read
    // the answer.
    let mut big = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":""#.to_vec();
    big.resize(300_000 - 4, b'a');
    big.extend_from_slice(br#""}]}"#);
    for order in [Order::BodyFirst, Order::HeadFirst, Order::BodyFirst] {
        let x = rt.block_on(h2_post(gw.addr, &ca.pem, Some(&bearer), big.clone(), order));
        assert_eq!(x.status, 413);
        assert_eq!(x.body["error"]["code"], "request_too_large", "{}", x.body);
        assert!(
            x.body_sent,
            "the oversized body could not be sent after the 413"
        );
        assert_eq!(x.reset, None, "the 413's stream was reset");
    }
}
