//! Gateway core (SPEC §1, §3, §5, §6; §2 rows 400/401/403-scope/404/413/502/504):
//! what the upstream receives, every rejection, large bodies, hot reload, the CLI.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn upstream_gets_the_rewritten_model_and_the_provider_key_never_the_agent_token() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    mock.clear();
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi spideriq_pat_"}], "temperature": 0.5});
    let r = gw.post(
        "/v1/chat/completions",
        &key.bearer(),
        body.to_string().as_bytes(),
        &[
            ("X-Api-Key", &key.secret),
            // The key again in headers of the client's own: none of them goes upstream.
            ("X-Goog-Api-Key", &key.secret),
            ("X-Custom-Auth", &format!("token={}", key.secret)),
            ("X-Request-Id", "r-1"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["role"], "assistant");

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let up = &reqs[0];
    assert_eq!(up.path, "/v1/chat/completions");
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    let sent = up.json().expect("json body");
    assert_eq!(
        sent["model"], "gpt-4o-2024-08-06",
        "upstream_id written into the body"
    );
    assert_eq!(sent["temperature"], 0.5);
    assert_eq!(sent["messages"], body["messages"]);
    for (name, value) in &up.headers {
        assert!(
            !value.contains(&key.secret),
            "agent token leaked in upstream header {name}"
        );
    }
    assert!(!String::from_utf8_lossy(&up.body).contains(&key.secret));
    assert_eq!(up.header("x-api-key"), None);
    assert_eq!(up.header("x-goog-api-key"), None);
    assert_eq!(up.header("x-custom-auth"), None);
    assert_eq!(up.header("x-request-id"), Some("r-1"), "other headers pass");
}

#[test]
fn streams_pass_through_chunk_by_chunk() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    // The mock sends chunk 1, then holds chunk 2 until the test has read chunk 1: a gateway
    // that buffered the stream would leave the test waiting here (and fail on the read
    // timeout), whatever the machine's speed.
    let (status, headers, mut reader) = gw.open_stream(
        &key,
        &body,
        &[("x-mock-chunks", "5"), ("x-mock-hold", "first-read")],
    );
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")));
    let first = read_first_event(&mut reader);
    assert!(first.contains(r#""delta":{"#), "{first}");
    // The mock reaches its gate right after sending chunk 1 and stays there until released.
    wait_for(Duration::from_secs(10), "the mock holding chunk 2", || {
        (mock.held("first-read") == 1).then_some(())
    });
    mock.release("first-read");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).expect("the rest of the stream");
    let content = |t: &str| t.matches(r#""delta":{"content""#).count();
    assert_eq!(content(&first) + content(&rest), 5, "{first}{rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
}

#[test]
fn embeddings_and_the_api_gate_prefix_are_proxied() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .models(&models_with_embeddings())
        .start();
    let key = gw.create_key(&[]);
    // A chat model (no `endpoint` set) serves only the chat family (SPEC §3).
    let r = gw.post(
        "/v1/embeddings",
        &key.bearer(),
        br#"{"model":"gpt-4o","input":"hello"}"#,
        &[],
    );
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    mock.clear();
    let r = gw.post(
        "/api/gate/v1/embeddings",
        &key.bearer(),
        br#"{"model":"text-embedding-3-small","input":"hello"}"#,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"][0]["object"], "embedding");
    let r = gw.post(
        "/api/gate/v1/chat/completions",
        &key.bearer(),
        br#"{"model":"gpt-4o-mini","messages":[]}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    let paths: Vec<String> = mock.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, vec!["/v1/embeddings", "/v1/chat/completions"]);
    assert_eq!(
        mock.requests()[0].json().unwrap()["model"],
        "text-embedding-3-small-upstream"
    );
}

#[test]
fn bad_tokens_get_401_invalid_api_key_and_never_reach_the_upstream() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let _real = gw.create_key(&[]);
    mock.clear();
    let body = br#"{"model":"gpt-4o-mini","messages":[]}"#;
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("Authorization", "Bearer")],
        vec![("Authorization", "Bearer sk-not-ours")],
        vec![(
            "Authorization",
            "Bearer spideriq_pat_0A1B2C3D4E5F6A7B8C9D0E1F2A3B4C5D",
        )],
        vec![(
            "Authorization",
            "Bearer spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5",
        )],
        vec![(
            "Authorization",
            "Bearer spideriq_pat_' OR '1'='1' --aaaaaaaaaaaaaaa",
        )],
        vec![("Authorization", "Basic dXNlcjpwYXNz")],
        // Well-formed but never issued.
        vec![(
            "Authorization",
            "Bearer spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d",
        )],
    ];
    for headers in cases {
        let r = http(gw.addr, "POST", "/v1/chat/completions", &headers, body).unwrap();
        assert_eq!(r.status, 401, "{headers:?}");
        assert_eq!(r.code(), "invalid_api_key");
        assert_eq!(r.json()["error"]["type"], "authentication_error");
        assert!(r.json()["error"]["param"].is_null());
        assert!(!r.text().contains("OR '1'"), "the token is never echoed");
        assert_eq!(
            r.header("x-ratelimit-limit-requests"),
            None,
            "unauthenticated: no limit headers"
        );
    }
    assert!(mock.requests().is_empty());
}

#[test]
fn expired_and_revoked_keys_get_their_own_401_codes() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&["--ttl", "1h"]);
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);

    // Move the key's clock: expires_at in the past, as if an hour went by.
    let mut store = gw.store();
    let patch = spidergate::store::KeyPatch {
        expires_at: Some(spidergate::clock::now_ms() - 1),
        ..Default::default()
    };
    store.update_key(&key.id, &patch).unwrap();
    let r = wait_for(Duration::from_secs(2), "expiry", || {
        Some(gw.chat(&key, "gpt-4o-mini")).filter(|r| r.status == 401)
    });
    assert_eq!(r.code(), "token_expired");

    let key2 = gw.create_key(&[]);
    // Used first: the worker remembers its token's digest (`TokenMemo`), which must not
    // outlive the revocation.
    assert_eq!(gw.chat(&key2, "gpt-4o-mini").status, 200);
    let out = gw.cli(&["keys", "revoke", &key2.id]);
    assert!(out.status.success());
    // Applied by the next reload poll (`server.reload_interval_ms`, at most 1000 by
    // validation: config tests); the deadline here only stops a hang.
    let r = wait_for(Duration::from_secs(10), "revocation", || {
        Some(gw.chat(&key2, "gpt-4o-mini")).filter(|r| r.status == 401)
    });
    assert_eq!(r.code(), "token_revoked");
}

/// SPEC §1: revocation is immediate, from the CLI too: once `keys revoke` (or a rotation
/// with no grace) returns, the running gateway refuses the key, with no wait. The command waits for the gateway's next poll of the
/// store instead of the agent getting served until it.
#[test]
fn a_key_revoked_from_the_cli_is_refused_as_soon_as_the_command_returns() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    for round in 0..4 {
        let key = gw.create_key(&[]);
        assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
        let (verb, args): (&str, Vec<&str>) = if round % 2 == 0 {
            ("revoke", vec!["keys", "revoke", &key.id])
        } else {
            ("rotate", vec!["keys", "rotate", &key.id, "--grace", "0s"])
        };
        let out = gw.cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = gw.chat(&key, "gpt-4o-mini");
        assert_eq!(
            (r.status, r.code().as_str()),
            (401, "token_revoked"),
            "round {round}: served after `keys {verb}` returned: {}",
            r.text()
        );
    }
}

/// SPEC: CLI changes apply within 1 s, no restart. The bound is the reload poll's period
/// (`server.reload_interval_ms`, refused above 1000 by `Config` validation, see
/// `reload_interval_above_one_second_is_refused`); here the change must arrive without a
/// restart, and the deadline only stops a hang (speed is not measured on a shared CI box).
#[test]
fn hot_reload_applies_cli_changes_without_a_restart() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    // Creation: the new key works once the CLI returns and the gateway polls.
    let v = gw.cli_json(&["keys", "create", "--name", "hot", "--json"]);
    let key = Key {
        id: v["id"].as_str().unwrap().into(),
        secret: v["secret"].as_str().unwrap().into(),
    };
    wait_for(Duration::from_secs(10), "new key live", || {
        Some(()).filter(|_| gw.chat(&key, "gpt-4o-mini").status == 200)
    });

    // Update: an allow-list added by the CLI applies.
    let out = gw.cli(&["keys", "update", &key.id, "--models", "gpt-4o"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = wait_for(Duration::from_secs(10), "update live", || {
        Some(gw.chat(&key, "gpt-4o-mini")).filter(|r| r.status == 403)
    });
    assert_eq!(r.code(), "model_not_allowed");
    assert_eq!(gw.chat(&key, "gpt-4o").status, 200);
}

/// A key made by the CLI (another process, writing the store) works from its first request,
/// not only after the gateway's next poll: a well-formed token no key in the snapshot has
/// makes the gateway read the store's key changes at once. The poll here is the slowest
/// allowed (1 s), so without that read the first request would nearly always be refused.
#[test]
fn a_key_made_by_the_cli_works_from_its_first_request() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("reload_interval_ms: 1000")
        .start();
    for i in 0..3 {
        let name = format!("first-{i}");
        let v = gw.cli_json(&["keys", "create", "--name", &name, "--json"]);
        let key = Key {
            id: v["id"].as_str().unwrap().into(),
            secret: v["secret"].as_str().unwrap().into(),
        };
        let r = gw.chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "key {i}'s first request: {}", r.text());
    }
    // An agent that opens with parallel calls: every one of them is admitted, those that
    // arrive while the first check runs included.
    for i in 0..3 {
        let name = format!("parallel-{i}");
        let v = gw.cli_json(&["keys", "create", "--name", &name, "--json"]);
        let key = Key {
            id: v["id"].as_str().unwrap().into(),
            secret: v["secret"].as_str().unwrap().into(),
        };
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..16)
                .map(|_| s.spawn(|| gw.get("/v1/models", &key.bearer()).status))
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        assert!(
            statuses.iter().all(|&st| st == 200),
            "round {i}: {statuses:?}"
        );
    }
    // A made-up token is still refused, however often it comes.
    let fake = Key {
        id: "key_fake".into(),
        secret: format!("spideriq_pat_{}", "0".repeat(32)),
    };
    for _ in 0..20 {
        let r = gw.chat(&fake, "gpt-4o-mini");
        assert_eq!((r.status, r.code().as_str()), (401, "invalid_api_key"));
    }
}

/// `keys update ID --free-only` takes the switch as `create` does; `--free-only false` lifts it.
#[test]
fn keys_update_takes_free_only_as_a_switch() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    let out = gw.cli(&["keys", "update", &key.id, "--free-only"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = wait_for(Duration::from_secs(10), "free-only live", || {
        Some(gw.chat(&key, "gpt-4o-mini")).filter(|r| r.status == 403)
    });
    assert_eq!(r.code(), "model_not_allowed");
    let shown = gw.cli_json(&["keys", "show", &key.id, "--json"]);
    assert_eq!(shown["free_only"], true, "{shown}");
    let out = gw.cli(&["keys", "update", &key.id, "--free-only", "false"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(10), "free-only lifted", || {
        Some(()).filter(|_| gw.chat(&key, "gpt-4o-mini").status == 200)
    });
    assert_eq!(
        gw.cli_json(&["keys", "show", &key.id, "--json"])["free_only"],
        false
    );
    // The switch before the id, as an operator types it too.
    let out = gw.cli(&["keys", "update", "--free-only", &key.id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        gw.cli_json(&["keys", "show", &key.id, "--json"])["free_only"],
        true
    );
}

/// Each endpoint takes its own method: the catalog and usage are read with GET (a POST there
/// is refused, as a GET of a model call is), with the error shape every refusal has.
#[test]
fn a_wrong_method_is_405_method_not_allowed() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    for path in [
        "/v1/models",
        "/v1/models/gpt-4o-mini",
        "/v1/aliases",
        "/v1/usage",
    ] {
        let r = gw.post(path, &key.bearer(), b"{}", &[]);
        assert_eq!(
            (r.status, r.code().as_str()),
            (405, "method_not_allowed"),
            "POST {path}"
        );
        assert_eq!(
            r.header("x-spidergate-error-code"),
            Some("method_not_allowed")
        );
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "POST {path}");
        assert_eq!(gw.get(path, &key.bearer()).status, 200, "GET {path}");
    }
    let r = gw.get("/v1/chat/completions", &key.bearer());
    assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
    assert_eq!(r.header("allow"), Some("POST"));
    assert!(mock.requests().is_empty(), "nothing reached the upstream");
}

#[test]
fn missing_scope_is_403_insufficient_scope() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let models_only = gw.create_key(&["--scopes", "gate:models,job:run"]);
    let r = gw.chat(&models_only, "gpt-4o-mini");
    assert_eq!(r.status, 403);
    assert_eq!(r.code(), "insufficient_scope");
    assert_eq!(gw.get("/v1/models", &models_only.bearer()).status, 200);
    let r = gw.get("/v1/usage", &models_only.bearer());
    assert_eq!((r.status, r.code().as_str()), (403, "insufficient_scope"));

    let chat_only = gw.create_key(&["--scopes", "gate:chat"]);
    let r = gw.get("/v1/models", &chat_only.bearer());
    assert_eq!((r.status, r.code().as_str()), (403, "insufficient_scope"));
    let r = gw.get("/v1/aliases", &chat_only.bearer());
    assert_eq!(r.status, 403);
    let r = gw.post(
        "/v1/embeddings",
        &models_only.bearer(),
        br#"{"model":"gpt-4o","input":"x"}"#,
        &[],
    );
    assert_eq!((r.status, r.code().as_str()), (403, "insufficient_scope"));
}

#[test]
fn bad_bodies_are_400_invalid_request_and_unknown_models_404() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    mock.clear();
    for body in [
        &b"not json"[..],
        b"",
        b"{}",
        br#"{"model": 42}"#,
        br#"{"model": null}"#,
        b"[]",
        br#"{"model":"gpt-4o-mini""#,
        b"\xff\xfe",
    ] {
        let r = gw.post("/v1/chat/completions", &key.bearer(), body, &[]);
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(body));
        assert_eq!(r.code(), "invalid_request");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    let r = gw.chat(&key, "gpt-9");
    assert_eq!((r.status, r.code().as_str()), (404, "model_not_found"));
    assert!(
        mock.requests().is_empty(),
        "nothing rejected reaches the upstream"
    );
    // Rejections consume no quota.
    assert_eq!(gw.usage(&key)["requests_today"], 0);
}

/// SPEC §1: the secret never appears in an error body or the database, and §4: every
/// trace names the model requested. A client that puts its secret where a model belongs
/// (the body's `model`, the path of `/v1/models/{id}`) gets 404 without it echoed, and the
/// trace names it redacted; a body refused for another field still names its model.
#[test]
fn a_secret_sent_as_the_model_is_never_repeated_and_refusals_name_the_model() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    mock.clear();
    let redacted = "spideriq_pat_[redacted]";
    let body = format!(r#"{{"model":"{}","messages":[]}}"#, key.secret);
    for path in ["/v1/chat/completions", "/v1/messages"] {
        let r = gw.post(path, &key.bearer(), body.as_bytes(), &[]);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert_eq!(r.header("x-spidergate-error-code"), Some("model_not_found"));
        assert!(!r.text().contains(&key.secret), "{path}: {}", r.text());
        assert!(r.text().contains(redacted), "{path}: {}", r.text());
    }
    let r = gw.get(&format!("/v1/models/{}", key.secret), &key.bearer());
    assert_eq!((r.status, r.code().as_str()), (404, "model_not_found"));
    assert!(!r.text().contains(&key.secret), "{}", r.text());
    // Refused for a field after the model: the trace still names the model.
    for bad in [
        r#"{"model":"gpt-4o-mini","max_tokens":-1,"messages":[]}"#,
        r#"{"model":"gpt-4o-mini","n":0,"messages":[]}"#,
    ] {
        let r = gw.post("/v1/chat/completions", &key.bearer(), bad.as_bytes(), &[]);
        assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    }
    assert!(mock.requests().is_empty());
    let traces = wait_for(Duration::from_secs(5), "five traces", || {
        let mut t = gw.trace_rows(&key.id);
        t.retain(|t| t.endpoint != "usage");
        (t.len() >= 5).then_some(t)
    });
    let requested: Vec<Option<&str>> = traces
        .iter()
        .map(|t| t.requested_model.as_deref())
        .collect();
    assert_eq!(
        requested,
        [
            Some(redacted),
            Some(redacted),
            Some(redacted),
            Some("gpt-4o-mini"),
            Some("gpt-4o-mini")
        ],
        "{traces:?}"
    );
    let leaked = gw.query_i64(
        "SELECT COUNT(*) FROM traces WHERE requested_model LIKE '%' || ?1 || '%'",
        [&key.secret[13..]],
    );
    assert_eq!(leaked, 0);
}

#[test]
fn bodies_over_max_body_bytes_are_413_declared_or_chunked() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .top("max_body_bytes: 4096")
        .start();
    let key = gw.create_key(&[]);
    mock.clear();
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(5000)
    );
    let r = gw.post("/v1/chat/completions", &key.bearer(), big.as_bytes(), &[]);
    assert_eq!((r.status, r.code().as_str()), (413, "request_too_large"));

    // Chunked, no Content-Length: caught while reading.
    let mut chunked = Vec::new();
    for part in big.as_bytes().chunks(1000) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = http(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("Authorization", &key.bearer()),
            ("Transfer-Encoding", "chunked"),
        ],
        &chunked,
    )
    .unwrap();
    assert_eq!((r.status, r.code().as_str()), (413, "request_too_large"));
    assert!(mock.requests().is_empty());

    // Just under the limit passes.
    let ok = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(3000)
    );
    assert_eq!(
        gw.post("/v1/chat/completions", &key.bearer(), ok.as_bytes(), &[])
            .status,
        200
    );
}

fn large_body(size: usize) -> Vec<u8> {
    // Varied bytes (not one repeated char) so any corruption or truncation shows.
    let mut content = String::with_capacity(size);
    let mut i: u64 = 0;
    while content.len() < size {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        content.push(char::from(b'a' + (i >> 59) as u8 % 26));
    }
    format!(r#"{{"model":"spideriq/fast","messages":[{{"role":"user","content":"{content}"}}],"max_tokens":5}}"#).into_bytes()
}

#[test]
fn one_and_sixteen_mib_bodies_arrive_byte_exact_with_the_rewritten_model() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    for size in [1 << 20, 16 << 20] {
        mock.clear();
        let body = large_body(size);
        let r = gw.post("/v1/chat/completions", &key.bearer(), &body, &[]);
        assert_eq!(r.status, 200, "{size}: {}", r.text());
        let reqs = mock.requests();
        assert_eq!(reqs.len(), 1);
        let expected = String::from_utf8(body.clone()).unwrap().replacen(
            r#""model":"spideriq/fast""#,
            r#""model":"meta-llama/llama-3.1-8b-instant""#,
            1,
        );
        assert_eq!(reqs[0].body.len(), expected.len(), "{size}: length");
        assert!(reqs[0].body == expected.as_bytes(), "{size}: body differs");
        assert_eq!(
            reqs[0].header("content-length"),
            Some(expected.len().to_string().as_str())
        );
    }
}

#[test]
fn unreachable_upstream_is_502_and_slow_upstream_504() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("read_timeout_ms: 500")
        .start();
    let key = gw.create_key(&[]);
    let r = gw.chat(&key, "dead-model");
    assert_eq!(
        (r.status, r.code().as_str()),
        (502, "upstream_error"),
        "{}",
        r.text()
    );
    assert!(r.header("x-ratelimit-limit-requests").is_some());

    let r = gw.chat_with(&key, "gpt-4o-mini", &[("x-mock-delay-ms", "3000")]);
    assert_eq!(
        (r.status, r.code().as_str()),
        (504, "upstream_timeout"),
        "{}",
        r.text()
    );

    // An upstream's own error response passes through with its status and body.
    let r = gw.chat_with(&key, "gpt-4o-mini", &[("x-mock-status", "400")]);
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), "mock_error");
    assert_eq!(r.header("retry-after"), None);
    // A 429 passed through carries `Retry-After` like the gateway's own (SPEC §2), though
    // this upstream sent none.
    let r = gw.chat_with(&key, "gpt-4o-mini", &[("x-mock-status", "429")]);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("x-spidergate-error-code"), Some("upstream_status"));
    // Its trace carries the same code (SPEC §4: every trace has its error code).
    wait_for(Duration::from_secs(5), "the 429's trace", || {
        gw.trace_rows(&key.id)
            .iter()
            .any(|t| t.status == 429 && t.error_code.as_deref() == Some("upstream_status"))
            .then_some(())
    });
}

#[test]
fn catalog_shows_a_key_only_what_it_may_call() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let all = gw.create_key(&[]);
    let ids = |r: Response| -> Vec<String> {
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["object"], "list");
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(gw.get("/v1/models", &all.bearer())),
        vec![
            "gpt-4o-mini",
            "gpt-4o",
            "llama-3.1-8b-instant",
            "dead-model"
        ]
    );
    assert_eq!(
        ids(gw.get("/v1/aliases", &all.bearer())),
        vec!["spideriq/failover", "spideriq/fast"]
    );

    let free = gw.create_key(&["--free-only"]);
    assert_eq!(
        ids(gw.get("/v1/models", &free.bearer())),
        vec!["llama-3.1-8b-instant"]
    );
    assert_eq!(
        ids(gw.get("/v1/aliases", &free.bearer())),
        vec!["spideriq/fast"]
    );

    let listed = gw.create_key(&["--models", "spideriq/fast"]);
    assert_eq!(
        ids(gw.get("/v1/models", &listed.bearer())),
        vec!["gpt-4o-mini", "llama-3.1-8b-instant"]
    );
    let r = gw.get("/v1/models/gpt-4o-mini", &listed.bearer());
    assert_eq!(r.json()["id"], "gpt-4o-mini");
    let r = gw.get("/v1/models/spideriq/fast", &listed.bearer());
    assert_eq!(
        r.json()["models"],
        json!(["llama-3.1-8b-instant", "gpt-4o-mini"])
    );
    // SDKs escape the id's `/` (openai-node's path encoding): the same alias.
    let r = gw.get("/v1/models/spideriq%2Ffast", &listed.bearer());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], "spideriq/fast");
    let r = gw.get("/v1/models/gpt-4o", &listed.bearer());
    assert_eq!((r.status, r.code().as_str()), (404, "model_not_found"));

    // Anonymous: 401 unless public_catalog.
    assert_eq!(gw.get("/v1/models", "").status, 401);
}

#[test]
fn public_catalog_allows_anonymous_listing_only() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .top("public_catalog: true")
        .start();
    let r = gw.get("/v1/models", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 4);
    assert_eq!(gw.get("/v1/aliases", "").status, 200);
    let r = gw.post(
        "/v1/chat/completions",
        "",
        br#"{"model":"gpt-4o-mini"}"#,
        &[],
    );
    assert_eq!((r.status, r.code().as_str()), (401, "invalid_api_key"));
    assert_eq!(gw.get("/v1/usage", "").status, 401);
}

#[test]
fn health_is_public() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let r = gw.get("/health", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
}

#[test]
fn keys_cli_mints_once_stores_only_the_hash_and_validates_ttl() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let v = gw.cli_json(&[
        "keys",
        "create",
        "--name",
        "agent-7",
        "--rpm",
        "60",
        "--rpd",
        "1000",
        "--budget",
        "12.5",
        "--budget-mode",
        "soft",
        "--models",
        "gpt-4o,spideriq/fast",
        "--scopes",
        "gate:chat,job:run",
        "--ttl",
        "7d",
        "--client-id",
        "ws-1",
        "--json",
    ]);
    let secret = v["secret"].as_str().unwrap();
    let id = v["id"].as_str().unwrap();
    assert!(secret.starts_with("spideriq_pat_") && secret.len() == 45);
    assert!(secret[13..]
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert!(
        !id.contains(&secret[13..21]),
        "id is not derived from the secret"
    );
    assert_eq!(v["name"], "agent-7");
    assert_eq!(v["prefix"], &secret[13..17]);
    assert_eq!(
        (v["rpm"].as_u64(), v["rpd"].as_u64()),
        (Some(60), Some(1000))
    );
    assert_eq!(v["monthly_budget_usd"], 12.5);
    assert_eq!(v["budget_mode"], "soft");
    assert_eq!(v["allowed_models"], json!(["gpt-4o", "spideriq/fast"]));
    assert_eq!(v["scopes"], json!(["gate:chat", "job:run"]));
    assert_eq!(v["client_id"], "ws-1");
    let expires = v["expires_at"].as_str().unwrap();
    assert!(
        expires.len() == 20 && expires.ends_with('Z'),
        "RFC 3339: {expires}"
    );

    // Shown once: no later view has it.
    let shown = gw.cli(&["keys", "show", id, "--json"]);
    let listed = gw.cli(&["keys", "list", "--json"]);
    for out in [&shown, &listed] {
        assert!(out.status.success());
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&secret[13..]));
    }
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["id"], id);
    // The database holds the SHA-256, never the secret.
    let db = std::fs::read(&gw.db).unwrap_or_default();
    let wal = std::fs::read(gw.db.with_extension("db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(32).any(|w| w == &secret.as_bytes()[13..]),
            "secret found in the database"
        );
    }
    // Checked against an independent SHA-256 (coreutils' `sha256sum`) of the secret, on the
    // raw column as SQLite stores it, not through the gateway's own hashing or store code.
    let mut sum = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    std::io::Write::write_all(sum.stdin.as_mut().unwrap(), secret.as_bytes()).unwrap();
    let out = sum.wait_with_output().unwrap();
    let expected = String::from_utf8(out.stdout).unwrap()[..64].to_string();
    let stored: String = gw
        .db()
        .query_row(
            "SELECT lower(hex(token_hash)) FROM keys WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, expected, "the stored hash is SHA-256 of the secret");

    for bad in ["59m", "91d", "0h", "abc", "1y"] {
        let before = gw.store().all_keys().unwrap().len();
        let out = gw.cli(&["keys", "create", "--name", "x", "--ttl", bad, "--json"]);
        assert!(!out.status.success(), "--ttl {bad} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ttl")
                || String::from_utf8_lossy(&out.stderr).contains("TTL")
        );
        assert_eq!(
            gw.store().all_keys().unwrap().len(),
            before,
            "no key for --ttl {bad}"
        );
    }
    let v = gw.cli_json(&["keys", "create", "--name", "default-ttl", "--json"]);
    let rec = gw
        .store()
        .get_key(v["id"].as_str().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(rec.expires_at - rec.created_at, 30 * 86_400_000);
    assert_eq!(rec.scopes, vec!["gate:chat", "gate:models", "gate:usage"]);

    // list hides revoked keys unless --all.
    assert!(gw.cli(&["keys", "revoke", id, "--json"]).status.success());
    let active = gw.cli_json(&["keys", "list", "--json"]);
    assert!(active.as_array().unwrap().iter().all(|k| k["id"] != id));
    let all = gw.cli_json(&["keys", "list", "--all", "--json"]);
    let revoked = all
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap();
    assert_eq!(revoked["status"], "revoked");

    let out = gw.cli(&["keys", "update", "key_nope", "--rpm", "3"]);
    assert!(!out.status.success());
}

/// SPEC §1: the secret never appears in a log line, at any log level: `info` (the default)
/// and `trace` (everything the gateway and its libraries can say, headers included).
#[test]
fn secrets_never_appear_in_logs() {
    for level in ["info", "trace"] {
        let mock = mock();
        let gw = GatewayBuilder::new(&mock).env("RUST_LOG", level).start();
        let key = gw.create_key(&[]);
        assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
        gw.chat(&key, "dead-model");
        gw.chat_with(&key, "gpt-4o-mini", &[("x-mock-delay-ms", "10")]);
        let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
        let (status, _, mut reader) = gw.open_stream(&key, &body, &[]);
        assert_eq!(status, 200);
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
        let bogus = "spideriq_pat_ffffffffffffffffffffffffffffffff";
        gw.post(
            "/v1/chat/completions",
            &format!("Bearer {bogus}"),
            b"{}",
            &[],
        );
        let log = gw.log_text();
        assert!(!log.is_empty());
        if level == "trace" {
            assert!(
                log.contains("TRACE") || log.contains("DEBUG"),
                "RUST_LOG=trace reached the gateway: {log}"
            );
        }
        // The failure names the log targets that leaked, not the lines.
        let leaks = |needle: &str| -> Vec<String> {
            log.lines()
                .filter(|l| l.contains(needle))
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .collect()
        };
        assert!(
            !log.contains(&key.secret[13..]),
            "secret in the log at {level}: {:?}",
            leaks(&key.secret[13..])
        );
        assert!(
            !log.contains(&bogus[13..]),
            "bogus token in the log at {level}: {:?}",
            leaks(&bogus[13..])
        );
        assert!(
            !log.contains(PROVIDER_KEY),
            "provider key in the log at {level}: {:?}",
            leaks(PROVIDER_KEY)
        );
    }
}

#[test]
fn check_config_names_the_field_path() {
    let dir = tempfile::tempdir().unwrap();
    let good =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/spidergate.yaml"))
            .unwrap();
    let run = |text: &str| {
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, text).unwrap();
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&p)
            .arg("check-config")
            .output()
            .unwrap()
    };
    let out = run(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&good.replacen("provider: mock", "provider: opnai", 1));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("models[0].provider: no provider named \"opnai\""));
    let out = run(&format!("{good}\nlisten_port: 1\n"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `listen_port`"));
    // $SPIDERGATE_CONFIG is honoured when --config is absent.
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .env("SPIDERGATE_CONFIG", dir.path().join("c.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// PostgreSQL alone shares keys and spend, not the live limits: `check-config` (and `serve`,
/// which logs the same warnings) says so, and is quiet once a Redis is named.
#[test]
fn shared_state_without_redis_is_accepted_with_a_warning_that_limits_are_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let good =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/spidergate.yaml"))
            .unwrap();
    let run = |shared: &str| {
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, format!("{good}\nshared_state:\n{shared}")).unwrap();
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&p)
            .arg("check-config")
            .env("SG_TEST_PG", "postgres://sg@127.0.0.1:1/sg")
            .env("SG_TEST_REDIS", "redis://127.0.0.1:1/")
            .output()
            .unwrap()
    };
    let out = run("  postgres_url_env: SG_TEST_PG\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: shared_state: PostgreSQL but no Redis")
            && stderr.contains("N times a key's limits"),
        "{stderr}"
    );
    let out = run("  postgres_url_env: SG_TEST_PG\n  redis_url_env: SG_TEST_REDIS\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("shared_state"), "{stderr}");
}

#[test]
fn clients_cannot_steer_the_upstream() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    mock.clear();
    let body = br#"{"model":"gpt-4o-mini","api_base":"http://169.254.169.254/","messages":[]}"#;
    let r = http(
        gw.addr,
        "POST",
        "/v1/chat/completions?api_base=http://evil",
        &[("Authorization", &key.bearer()), ("Host", "evil.example")],
        body,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1, "went to the configured provider");
    assert_eq!(reqs[0].path, "/v1/chat/completions");
    assert_eq!(
        reqs[0].header("host"),
        Some(mock.addr().to_string().as_str())
    );
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    use std::io::{BufRead, BufReader, Write};
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    let body = br#"{"model":"gpt-4o-mini","messages":[]}"#;
    let mut stream = std::net::TcpStream::connect(gw.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        key.bearer(),
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("HTTP/1.1 100"),
        "expected 100 Continue, got {line:?}"
    );
    // Skip the blank line that ends the interim response, then send the body.
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
    }
    stream.write_all(body).unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("HTTP/1.1 200"),
        "exactly one 100, then the answer: {line:?}"
    );
    let received = mock.requests();
    assert_eq!(
        received.last().unwrap().header("expect"),
        None,
        "not forwarded upstream"
    );
}

#[test]
fn hostile_input_never_takes_the_gateway_down() {
    use std::io::Write;
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    let bearer = key.bearer();
    // Raw garbage and broken HTTP.
    let raw: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\xff\xfe garbage\r\n\r\n".to_vec(),
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n".to_vec(),
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"
            .to_vec(),
        format!(
            "GET /v1/models HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(200_000)
        )
        .into_bytes(),
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
    ];
    for bytes in raw {
        if let Ok(mut s) = std::net::TcpStream::connect(gw.addr) {
            let _ = s.write_all(&bytes);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = std::io::Read::read_to_end(&mut s, &mut sink);
        }
    }
    // Hostile but well-framed bodies on an authenticated route.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bodies: Vec<Vec<u8>> = vec![
        deep.into_bytes(),
        format!(r#"{{"model":"{}"}}"#, "m".repeat(100_000)).into_bytes(),
        br#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#.to_vec(),
        br#"{"model":"gpt-4o-mini","stream":"yes"}"#.to_vec(),
        br#"{"model":"gpt-4o-mini","stream":true,"stream_options":7}"#.to_vec(),
        br#"{"model":"gpt-4o-mini","max_tokens":-1}"#.to_vec(),
        br#"{"model":"\ud800"}"#.to_vec(),
        b"{\"model\":\"gpt-4o-mini\"}\x00".to_vec(),
    ];
    for body in bodies {
        let r = gw.post("/v1/chat/completions", &bearer, &body, &[]);
        assert!(
            matches!(r.status, 400 | 404),
            "{} for {:?}",
            r.status,
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
    }
    let r = http(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer \u{7f}\u{1}")],
        b"{}",
    );
    assert!(r.map(|r| r.status).unwrap_or(400) >= 400);
    assert_eq!(gw.get("/health", "").status, 200, "still serving");
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    assert!(!gw.log_text().contains("panicked"), "a request panicked");
}

/// A typo in the config (made while the gateway runs on the last good one) must not keep
/// an operator from revoking a key: `keys revoke` then finds the store from the file's
/// `database` alone, warns, and the running gateway applies the revocation as any other.
/// Every other command still refuses the broken config.
#[test]
fn a_key_is_revoked_from_the_cli_even_when_the_config_no_longer_loads() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    let good = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, format!("{good}\nbudget_alerts_typo: 1\n")).unwrap();

    let out = gw.cli(&["keys", "create", "--name", "x"]);
    assert!(!out.status.success(), "the broken config is still refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("budget_alerts_typo"));

    let out = gw.cli(&["keys", "revoke", &key.id]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("budget_alerts_typo"),
        "the warning names what is wrong: {stderr}"
    );
    assert!(
        stderr.contains(&format!("database {}", gw.db.display())),
        "and where it revoked: {stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("Revoked key {}", key.id)));
    let stored = gw.store().get_key(&key.id).unwrap().unwrap();
    assert!(stored.revoked_at.is_some());
    let r = wait_for(Duration::from_secs(10), "revocation", || {
        Some(gw.chat(&key, "gpt-4o-mini")).filter(|r| r.status == 401)
    });
    assert_eq!(r.code(), "token_revoked");

    // A file whose store cannot be read either says both.
    std::fs::write(&gw.config, "database: [not a path\n").unwrap();
    let out = gw.cli(&["keys", "revoke", &key.id]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no store could be read"), "{stderr}");
    std::fs::write(&gw.config, good).unwrap();
}

/// SPEC §4: every request leaves a trace naming its key; a revoked or expired token still
/// belongs to one, so its refusals are in that key's traces.
#[test]
fn a_revoked_keys_refusals_are_in_its_own_traces() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    gw.cli_json(&["keys", "revoke", &key.id, "--json"]);
    wait_for(Duration::from_secs(5), "revocation live", || {
        (gw.chat(&key, "gpt-4o-mini").status == 401).then_some(())
    });
    wait_for(Duration::from_secs(5), "the refusal's trace", || {
        gw.trace_rows(&key.id)
            .iter()
            .any(|t| t.status == 401 && t.error_code.as_deref() == Some("token_revoked"))
            .then_some(())
    });
}

/// A small request reaches the provider in one write (one TCP segment): its head is held
/// for the body, read before the head goes (the vendored Pingora's opt-in,
/// `vendor/README.md`). Two writes cost the gateway a system call and the provider a
/// second wake-up. A body larger than a segment still arrives whole.
#[test]
fn a_small_request_reaches_the_provider_in_one_segment_and_a_large_one_whole() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    mock.clear();
    for _ in 0..3 {
        let r = gw.chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let big = "x".repeat(300_000);
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}]});
    let r = gw.post(
        "/v1/chat/completions",
        &key.bearer(),
        body.to_string().as_bytes(),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 4);
    for small in &reqs[..3] {
        assert_eq!(
            small.data_segments,
            Some(1),
            "head and body in one segment ({} body bytes)",
            small.body.len()
        );
    }
    let sent = reqs[3].json().expect("the large body arrived as JSON");
    assert_eq!(
        sent["messages"][0]["content"].as_str().map(str::len),
        Some(300_000)
    );
    assert!(reqs[3].data_segments.is_some_and(|n| n > 1));
}

/// A relative `database` is read from the directory a command runs in. Run from another one,
/// the CLI makes a new, empty store the gateway never reads: it says so on stderr (and the
/// command still runs); once that store exists, nothing is said.
#[test]
fn the_cli_warns_when_a_relative_database_is_made_anew() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("spidergate.yaml");
    std::fs::write(
        &config,
        "listen: \"127.0.0.1:1\"\ndatabase: \"data/rel.db\"\nproviders: [{name: p, kind: openai, base_url: \"http://127.0.0.1:1/v1\"}]\nmodels: [{id: m, provider: p, input_usd_per_mtok: 1, output_usd_per_mtok: 1}]\n",
    )
    .unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("data")).unwrap();
    let list = || {
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(["keys", "list", "--json"])
            .current_dir(&elsewhere)
            .output()
            .unwrap()
    };
    let first = list();
    assert!(first.status.success(), "{first:?}");
    let said = String::from_utf8_lossy(&first.stderr).to_string();
    assert!(said.contains("warning: no database at"), "{said}");
    assert!(said.contains("elsewhere/data/rel.db"), "{said}");
    let again = list();
    assert!(again.status.success(), "{again:?}");
    assert!(
        again.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&again.stderr)
    );
}
