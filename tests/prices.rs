//! `spidergate prices import` (SPEC §5): a LiteLLM price map fills prices, context windows
//! and output limits of the configured models, written into the config file in place with
//! comments, order and formatting kept; `--dry-run` prints the diff and writes nothing; a bad
//! map is refused naming the entry, and nothing is written. Goldens in `tests/golden/prices/`
//! (`BLESS=1` rewrites them).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::BIN;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/prices")
        .join(name)
}

fn golden(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/prices")
        .join(name);
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with BLESS=1)", path.display()));
    assert_eq!(
        got,
        want,
        "{} differs (BLESS=1 rewrites it)",
        path.display()
    );
}

/// A copy of the sample config in a temp dir, and `spidergate --config <it> <args>`.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("spidergate.yaml");
    std::fs::copy(fixture("config.yaml"), &config).unwrap();
    (dir, config)
}

fn run(config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn an_import_fills_prices_and_limits_in_place_keeping_the_file_as_written() {
    let (_dir, config) = setup();
    let map = fixture("litellm_sample.json");
    let out = run(&config, &["prices", "import", map.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout).replace(&config.display().to_string(), "CONFIG");
    golden("import.stdout", &stdout);
    let written = std::fs::read_to_string(&config).unwrap();
    golden("imported.yaml", &written);
    // Every line of the original that was not a changed value is still there, in order.
    let original = std::fs::read_to_string(fixture("config.yaml")).unwrap();
    let mut rest = written.lines();
    for line in original
        .lines()
        .filter(|l| !l.contains("_usd_per_mtok") && !l.contains("max_output_tokens"))
    {
        assert!(rest.any(|w| w == line), "lost or moved: {line:?}");
    }
    // The result passes check-config, and importing again changes nothing.
    let check = run(&config, &["check-config"]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    let again = run(&config, &["prices", "import", map.to_str().unwrap()]);
    assert!(again.status.success());
    assert!(
        text(&again.stdout).contains("0 fields changed"),
        "{}",
        text(&again.stdout)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), written);
}

#[test]
fn a_dry_run_prints_the_diff_and_writes_nothing() {
    let (_dir, config) = setup();
    let before = std::fs::read_to_string(&config).unwrap();
    let map = fixture("litellm_sample.json");
    let out = run(
        &config,
        &["prices", "import", map.to_str().unwrap(), "--dry-run"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout).replace(&config.display().to_string(), "CONFIG");
    golden("dry_run.stdout", &stdout);
    assert!(stdout.contains("unmatched: in-house (provider openai, upstream_id our-finetune-v3)"));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before);

    let json = run(
        &config,
        &[
            "prices",
            "import",
            map.to_str().unwrap(),
            "--dry-run",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["written"], false);
    assert_eq!(v["matched"]["gpt-4o"], "gpt-4o-2024-08-06");
    assert_eq!(
        v["matched"]["llama-3.1-8b-instant"],
        "groq/llama-3.1-8b-instant"
    );
    assert_eq!(v["unmatched"].as_array().unwrap().len(), 1);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before);
}

#[test]
fn bad_price_maps_are_refused_naming_the_entry_and_nothing_is_written() {
    let (dir, config) = setup();
    let before = std::fs::read_to_string(&config).unwrap();
    let not_json = dir.path().join("not.json");
    std::fs::write(&not_json, "<html>rate limited</html>").unwrap();
    let absurd = dir.path().join("absurd.json");
    std::fs::write(
        &absurd,
        r#"{"gpt-4o": {"input_cost_per_token": 2500, "litellm_provider": "openai"}}"#,
    )
    .unwrap();
    let bad_window = dir.path().join("window.json");
    std::fs::write(
        &bad_window,
        r#"{"gpt-4o-mini": {"max_input_tokens": 1000, "max_output_tokens": 16384, "litellm_provider": "openai"}}"#,
    )
    .unwrap();
    let negative = fixture("bad_negative.json");
    for (file, needle) in [
        (not_json.as_path(), "not a JSON price map"),
        (
            negative.as_path(),
            "entry \"gpt-4o-mini\": input_cost_per_token is negative",
        ),
        (
            absurd.as_path(),
            "entry \"gpt-4o\": input_cost_per_token is not a plausible price",
        ),
        (bad_window.as_path(), "models[0].max_output_tokens"),
        (
            Path::new("/nonexistent/prices.json"),
            "/nonexistent/prices.json",
        ),
    ] {
        let out = run(&config, &["prices", "import", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{file:?} was accepted");
        let err = text(&out.stderr);
        assert!(err.contains(needle), "{file:?}: {err}");
        assert_eq!(
            std::fs::read_to_string(&config).unwrap(),
            before,
            "{file:?}"
        );
    }
}
