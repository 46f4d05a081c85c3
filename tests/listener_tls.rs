//! The gateway's own listeners (SPEC §2, §6 `tls`, `admin.tls`): what `check-config` says of
//! a certificate pair, the warning for plain HTTP on a reachable address, and the per-address
//! auth-failure limit behind a TLS-terminating load balancer (`server.trusted_proxies`).
//! The HTTPS and HTTP/2 traffic itself is driven by real clients in
//! `tests/e2e/test_tls_listener.py`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

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
