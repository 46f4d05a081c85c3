//! Running it like infrastructure (SPEC §5 signals, §6 config): SIGHUP re-reads the config,
//! validates it as `check-config` does, swaps it in or keeps the running one.

mod common;

use std::time::Duration;

use common::*;

const TOKEN: &str = "ops-admin-token";

fn metric(gw: &Gateway, name: &str) -> u64 {
    let text = gw.admin_call("GET", "/metrics", None).text();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn sighup_swaps_in_a_good_config_and_keeps_the_old_one_on_a_bad_one() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(TOKEN).start();
    let key = gw.create_key(&[]);
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    assert_eq!(gw.chat(&key, "gpt-4.1-nano").code(), "model_not_found");

    // A new model and a new alias: live after SIGHUP, with the key's counters kept.
    let original = std::fs::read_to_string(&gw.config).unwrap();
    let added = original.replace(
        "aliases:\n",
        "  - id: gpt-4.1-nano\n    provider: mock\n    input_usd_per_mtok: 0.1\n    output_usd_per_mtok: 0.4\naliases:\n  spideriq/nano: [gpt-4.1-nano]\n",
    );
    assert_ne!(added, original, "the test config has an aliases section");
    std::fs::write(&gw.config, &added).unwrap();
    assert!(gw.cli(&["check-config"]).status.success());
    gw.signal_hup();
    let r = wait_for(Duration::from_secs(10), "the new model", || {
        let r = gw.chat(&key, "gpt-4.1-nano");
        (r.status == 200).then_some(r)
    });
    assert_eq!(r.header("x-spidergate-model"), Some("gpt-4.1-nano"));
    assert_eq!(gw.chat(&key, "spideriq/nano").status, 200);
    assert_eq!(gw.usage(&key)["by_model"]["gpt-4o-mini"]["requests"], 1);
    // Counted once the reload (its audit record included) is done, a moment after the new
    // snapshot serves.
    wait_for(Duration::from_secs(10), "the reload to be counted", || {
        (metric(&gw, "spidergate_config_reloads_total") == 1).then_some(())
    });

    // A bad config: check-config refuses it with the field path, and so does SIGHUP; the
    // running config keeps serving.
    let bad = added.replace("output_usd_per_mtok: 0.4", "output_usd_per_mtok: -3");
    std::fs::write(&gw.config, &bad).unwrap();
    let out = gw.cli(&["check-config"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("output_usd_per_mtok"), "{err}");
    gw.signal_hup();
    wait_for(Duration::from_secs(10), "the refusal to be counted", || {
        (metric(&gw, "spidergate_config_reload_failures_total") == 1).then_some(())
    });
    assert!(
        gw.log_text().contains("output_usd_per_mtok"),
        "the log names the field"
    );
    assert_eq!(
        gw.chat(&key, "gpt-4.1-nano").status,
        200,
        "old config still serves"
    );
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);

    // A listener certificate added to a plain-HTTP gateway serves only after a restart, but
    // SIGHUP checks it as `check-config` does: files it cannot read are refused now, not at
    // the next start.
    for tls in [
        "tls:\n  cert_file: /nonexistent/cert.pem\n  key_file: /nonexistent/key.pem\n",
        "admin:\n  tls:\n    cert_file: /nonexistent/cert.pem\n    key_file: /nonexistent/key.pem\n",
    ] {
        let failures = metric(&gw, "spidergate_config_reload_failures_total");
        let with_tls = if tls.starts_with("admin:") {
            added.replacen("admin:\n", tls, 1)
        } else {
            format!("{added}{tls}")
        };
        assert_ne!(with_tls, added, "the test config has an admin section");
        std::fs::write(&gw.config, &with_tls).unwrap();
        let out = gw.cli(&["check-config"]);
        assert!(!out.status.success(), "check-config refuses {tls}");
        gw.signal_hup();
        wait_for(Duration::from_secs(10), "the refusal to be counted", || {
            (metric(&gw, "spidergate_config_reload_failures_total") == failures + 1).then_some(())
        });
    }
    assert_eq!(metric(&gw, "spidergate_config_reloads_total"), 1);
}

#[test]
fn a_sighup_that_names_another_admin_token_env_takes_effect_for_the_next_call() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .admin(TOKEN)
        .env("SG_OTHER_ADMIN_TOKEN", "the-new-admin-token")
        .start();
    let addr = gw.admin_addr.unwrap();
    let keys_with = |token: &str| {
        http(
            addr,
            "GET",
            "/admin/keys",
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        )
        .unwrap()
        .status
    };
    assert_eq!(keys_with(TOKEN), 200);
    assert_eq!(keys_with("the-new-admin-token"), 401);
    let original = std::fs::read_to_string(&gw.config).unwrap();
    let renamed = original.replace(
        "token_env: SG_TEST_ADMIN_TOKEN",
        "token_env: SG_OTHER_ADMIN_TOKEN",
    );
    assert_ne!(renamed, original);
    std::fs::write(&gw.config, &renamed).unwrap();
    gw.signal_hup();
    wait_for(Duration::from_secs(10), "the new admin token", || {
        (keys_with("the-new-admin-token") == 200).then_some(())
    });
    assert_eq!(
        keys_with(TOKEN),
        401,
        "the old token no longer opens the admin API"
    );
}

#[test]
fn check_config_refuses_what_serve_would_refuse() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let original = std::fs::read_to_string(&gw.config).unwrap();
    // A model id that cannot be sent as a header value.
    let bad = original.replacen("  - id: gpt-4o\n", "  - id: \"gpt\\n4o\"\n", 1);
    assert_ne!(bad, original);
    std::fs::write(&gw.config, &bad).unwrap();
    let out = gw.cli(&["check-config"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("models[1].id"), "{err}");
}

#[test]
fn oversized_heads_get_431_and_a_trickled_body_is_cut_at_its_deadline() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("max_header_bytes: 4096")
        .server("body_timeout_ms: 1500")
        .start();
    let key = gw.create_key(&[]);
    let big = "x".repeat(5_000);
    let r = http(
        gw.addr,
        "GET",
        "/v1/models",
        &[("Authorization", &key.bearer()), ("X-Padding", &big)],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 431);
    assert_eq!(r.code(), "request_header_too_large");
    assert_eq!(
        r.header("x-spidergate-error-code"),
        Some("request_header_too_large")
    );
    // Refused before authentication, yet traced under the key its token names (SPEC §4).
    // (The key's other trace is `create_key`'s wait for it, a `/v1/usage` that answered 200.)
    let traced = wait_for(Duration::from_secs(10), "the 431's trace", || {
        gw.store()
            .traces(Some(&key.id), 10, None)
            .ok()?
            .into_iter()
            .find(|t| t.status == 431)
    });
    assert_eq!(
        traced.error_code.as_deref(),
        Some("request_header_too_large")
    );
    // A normal head still passes.
    let r = http(
        gw.addr,
        "GET",
        "/v1/models",
        &[("Authorization", &key.bearer())],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200);

    // A body promised at 100 bytes that stalls after 10: cut at the deadline with 408, and
    // nothing reaches the upstream.
    mock.set_recording(true);
    mock.clear();
    let mut stream = send_request(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &key.bearer()), ("Content-Length", "100")],
        b"{\"model\":",
    )
    .unwrap();
    let mut reply = String::new();
    use std::io::Read;
    let _ = stream.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("request_timeout"), "{reply}");
    // (A gateway that never cut it would leave the read to the 60 s client timeout, and the
    // reply empty.)
    assert!(mock.requests().is_empty());
}

#[test]
fn a_change_to_one_key_of_a_hundred_thousand_applies_one_change() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(TOKEN).start();
    let config = spidergate::config::Config::load(&gw.config).unwrap();
    let catalog = spidergate::catalog::Catalog::new(&config);
    let now = spidergate::clock::now_ms();
    let records: Vec<_> = (0..100_000)
        .map(|i| {
            let spec = spidergate::manage::KeySpec {
                name: format!("bulk-{i}"),
                ..Default::default()
            };
            spidergate::manage::mint(&catalog, spec, now).unwrap().0
        })
        .collect();
    let one = records[4_242].id.clone();
    gw.store().insert_keys(&records).unwrap();
    wait_for(Duration::from_secs(30), "100,000 keys live", || {
        (metric(&gw, "spidergate_keys_loaded") == 100_000).then_some(())
    });
    let before = metric(&gw, "spidergate_key_changes_applied_total");
    let out = gw.cli(&["keys", "update", &one, "--rpm", "7"]);
    assert!(out.status.success());
    wait_for(Duration::from_secs(5), "the change applied", || {
        (metric(&gw, "spidergate_key_changes_applied_total") > before).then_some(())
    });
    assert_eq!(
        metric(&gw, "spidergate_key_changes_applied_total") - before,
        1
    );
    assert_eq!(metric(&gw, "spidergate_keys_loaded"), 100_000);
}
