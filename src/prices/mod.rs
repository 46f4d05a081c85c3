//! `spidergate prices import`: prices, context windows and output limits of the configured
//! models from LiteLLM's price map, written into the config file in place.
//!
//! Plain functions: `plan` reads both files and returns every change, the diff and the new
//! text (already validated as `check-config` validates); `write_in_place` swaps the file.
//! A bad price map or a result that does not validate changes nothing.

pub mod litellm;
pub mod yaml;

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::Config;
use crate::providers::ProviderKind;

use litellm::Entry;
use yaml::Edit;

/// One field an import sets.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldChange {
    pub model: String,
    pub field: &'static str,
    pub old: Option<String>,
    pub new: String,
}

/// What an import would do.
#[derive(Debug, Clone)]
pub struct ImportPlan {
    /// Model id -> the price-map entry it matched.
    pub matched: BTreeMap<String, String>,
    /// Models with no entry: `id (provider NAME, upstream_id X)`.
    pub unmatched: Vec<String>,
    pub changes: Vec<FieldChange>,
    /// A unified-style diff of the config file.
    pub diff: String,
    /// The config's new text (equal to the old one when nothing changes).
    pub text: String,
}

/// The entry for a model: `<provider name>/<upstream_id>`, `<upstream_id>` or
/// `<kind>/<upstream_id>`, whose `litellm_provider` (when given) is the provider's name or
/// kind.
fn find<'a>(
    entries: &'a BTreeMap<String, Entry>,
    provider: &str,
    kind: &str,
    upstream_id: &str,
) -> Option<(&'a String, &'a Entry)> {
    let names = [
        format!("{provider}/{upstream_id}"),
        upstream_id.to_string(),
        format!("{kind}/{upstream_id}"),
    ];
    names.iter().find_map(|n| {
        let (k, e) = entries.get_key_value(n.as_str())?;
        let fits = e
            .provider
            .as_deref()
            .is_none_or(|p| p == provider || p == kind);
        fits.then_some((k, e))
    })
}

/// USD per token -> USD per million tokens, as short decimal text (no float noise).
fn per_mtok(usd_per_token: f64) -> String {
    let v = (usd_per_token * 1e6 * 1e9).round() / 1e9;
    let s = format!("{v:.9}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

fn same_value(old: &str, new: &str) -> bool {
    match (old.parse::<f64>(), new.parse::<f64>()) {
        (Ok(a), Ok(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
        _ => old == new,
    }
}

/// Plans an import of `price_map` (LiteLLM JSON) into the config `config_text` (read from
/// `path`). Errors name the price-map entry, or the config field the result broke.
pub fn plan(config_text: &str, path: &Path, price_map: &str) -> Result<ImportPlan, String> {
    let entries = litellm::parse(price_map)?;
    let config =
        Config::parse(config_text, path).map_err(|e| format!("the config is not valid: {e}"))?;
    let lines = yaml::lines(config_text);
    let blocks = yaml::model_blocks(&lines)?;
    if blocks.len() != config.models.len() {
        return Err(format!(
            "found {} items under `models:` but the config has {} models",
            blocks.len(),
            config.models.len()
        ));
    }
    let mut plan = ImportPlan {
        matched: BTreeMap::new(),
        unmatched: Vec::new(),
        changes: Vec::new(),
        diff: String::new(),
        text: String::new(),
    };
    let mut edits: Vec<(usize, Edit)> = Vec::new();
    for (i, (m, block)) in config.models.iter().zip(&blocks).enumerate() {
        if block.id.as_deref() != Some(m.id.as_str()) {
            return Err(format!(
                "models[{i}]: could not locate model \"{}\" in the file's text",
                m.id
            ));
        }
        let provider = &config.providers[m.provider];
        let kind = match provider.kind {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        };
        let Some((name, e)) = find(&entries, &provider.name, kind, &m.upstream_id) else {
            plan.unmatched.push(format!(
                "{} (provider {}, upstream_id {})",
                m.id, provider.name, m.upstream_id
            ));
            continue;
        };
        plan.matched.insert(m.id.clone(), name.clone());
        // A model marked free keeps its prices (it is free on purpose); limits still apply.
        let prices = !m.free;
        let wanted: [(&'static str, Option<String>); 6] = [
            (
                "input_usd_per_mtok",
                e.input.filter(|_| prices).map(per_mtok),
            ),
            (
                "output_usd_per_mtok",
                e.output.filter(|_| prices).map(per_mtok),
            ),
            (
                "cache_read_usd_per_mtok",
                e.cache_read.filter(|_| prices).map(per_mtok),
            ),
            (
                "cache_write_usd_per_mtok",
                e.cache_write.filter(|_| prices).map(per_mtok),
            ),
            (
                "context_window_tokens",
                e.context_window.map(|t| t.to_string()),
            ),
            ("max_output_tokens", e.max_output.map(|t| t.to_string())),
        ];
        for (field, new) in wanted {
            let Some(new) = new else { continue };
            let old = block.value(&lines, field);
            if old.as_deref().is_some_and(|o| same_value(o, &new)) {
                continue;
            }
            edits.push((i, block.set(&lines, field, &new)));
            plan.changes.push(FieldChange {
                model: m.id.clone(),
                field,
                old,
                new,
            });
        }
    }
    let only: Vec<Edit> = edits.iter().map(|(_, e)| e.clone()).collect();
    plan.text = yaml::apply(config_text, &only);
    if !edits.is_empty() {
        let labelled: Vec<(String, Edit)> = edits
            .iter()
            .map(|(i, e)| (format!("models[{i}] {}", config.models[*i].id), e.clone()))
            .collect();
        plan.diff = format!(
            "--- {0}\n+++ {0} (prices import)\n{1}",
            path.display(),
            yaml::diff(&lines, &labelled)
        );
    }
    // Exactly what `check-config` (and SIGHUP) will check.
    let mut checked = Config::parse(&plan.text, path)
        .map_err(|e| format!("the imported config would not be valid, nothing written: {e}"))?;
    checked.load_provider_keys();
    crate::snapshot::Routes::build(checked)
        .map_err(|e| format!("the imported config would not be valid, nothing written: {e}"))?;
    Ok(plan)
}

/// Replaces the file with `text` atomically (a temporary file in the same directory, with
/// the original's permissions, renamed over it).
pub fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".into());
    let tmp = dir.join(format!(".{name}.prices-import.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_written_without_float_noise() {
        assert_eq!(per_mtok(1.5e-07), "0.15");
        assert_eq!(per_mtok(6e-07), "0.6");
        assert_eq!(per_mtok(3e-06), "3");
        assert_eq!(per_mtok(0.0), "0");
        assert_eq!(per_mtok(1.25e-06), "1.25");
    }
}
