//! LiteLLM's `model_prices_and_context_window.json`: the entries' prices (USD per token) and
//! token limits, validated so a bad file is refused whole with the entry named.

use std::collections::BTreeMap;

use serde_json::Value;

/// Above this a per-token price is not a price (USD 1 per token is USD 1,000,000 per
/// million tokens, the most the config accepts).
const MAX_USD_PER_TOKEN: f64 = 1.0;

/// One model of the price map, as far as SpiderGate reads it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entry {
    pub provider: Option<String>,
    /// USD per token.
    pub input: Option<f64>,
    pub output: Option<f64>,
    pub cache_read: Option<f64>,
    pub cache_write: Option<f64>,
    /// The context window (`max_input_tokens`).
    pub context_window: Option<u32>,
    pub max_output: Option<u32>,
}

/// Parses and validates the whole map; the error names the entry and field.
pub fn parse(text: &str) -> Result<BTreeMap<String, Entry>, String> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| format!("not a JSON price map: {e}"))?;
    let Value::Object(map) = root else {
        return Err("not a JSON price map: the top level must be an object of models".into());
    };
    let mut out = BTreeMap::new();
    for (name, v) in map {
        // LiteLLM's own documentation entry, with strings where numbers go.
        if name == "sample_spec" {
            continue;
        }
        let Value::Object(fields) = v else {
            return Err(format!("entry \"{name}\": must be an object"));
        };
        let price = |field: &str| -> Result<Option<f64>, String> {
            match fields.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => match n.as_f64() {
                    Some(p) if p.is_finite() && p < 0.0 => {
                        Err(format!("entry \"{name}\": {field} is negative ({p})"))
                    }
                    Some(p) if p.is_finite() && p <= MAX_USD_PER_TOKEN => Ok(Some(p)),
                    _ => Err(format!(
                        "entry \"{name}\": {field} is not a plausible price per token ({n})"
                    )),
                },
                Some(other) => Err(format!(
                    "entry \"{name}\": {field} must be a number of USD per token, not {other}"
                )),
            }
        };
        let tokens = |field: &str| -> Result<Option<u32>, String> {
            match fields.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => match n.as_u64().and_then(|t| u32::try_from(t).ok()) {
                    Some(t) if t > 0 => Ok(Some(t)),
                    _ => Err(format!(
                        "entry \"{name}\": {field} must be a whole number of tokens between 1 and {}, not {n}",
                        u32::MAX
                    )),
                },
                Some(other) => Err(format!(
                    "entry \"{name}\": {field} must be a number of tokens, not {other}"
                )),
            }
        };
        let entry = Entry {
            provider: fields
                .get("litellm_provider")
                .and_then(Value::as_str)
                .map(str::to_string),
            input: price("input_cost_per_token")?,
            output: price("output_cost_per_token")?,
            cache_read: price("cache_read_input_token_cost")?,
            cache_write: price("cache_creation_input_token_cost")?,
            context_window: tokens("max_input_tokens")?,
            max_output: tokens("max_output_tokens")?,
        };
        out.insert(name, entry);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_prices_and_limits() {
        let m = parse(
            r#"{"sample_spec": {"max_tokens": "LEGACY"},
                "gpt-4o-mini": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07,
                  "cache_read_input_token_cost": 7.5e-08, "max_input_tokens": 128000,
                  "max_output_tokens": 16384, "litellm_provider": "openai", "mode": "chat",
                  "supports_vision": true}}"#,
        )
        .unwrap();
        let e = &m["gpt-4o-mini"];
        assert_eq!(e.input, Some(1.5e-07));
        assert_eq!(e.context_window, Some(128_000));
        assert_eq!(e.provider.as_deref(), Some("openai"));
        assert!(!m.contains_key("sample_spec"));
    }

    #[test]
    fn bad_entries_are_named() {
        for (text, needle) in [
            ("[1]", "top level"),
            ("{nope", "not a JSON"),
            (
                r#"{"m": {"input_cost_per_token": -1e-6}}"#,
                "entry \"m\": input_cost_per_token is negative",
            ),
            (
                r#"{"m": {"output_cost_per_token": 5}}"#,
                "entry \"m\": output_cost_per_token is not a plausible",
            ),
            (
                r#"{"m": {"input_cost_per_token": "cheap"}}"#,
                "entry \"m\": input_cost_per_token must be a number",
            ),
            (
                r#"{"m": {"max_output_tokens": -3}}"#,
                "entry \"m\": max_output_tokens must be a whole",
            ),
            (r#"{"m": 3}"#, "entry \"m\": must be an object"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
