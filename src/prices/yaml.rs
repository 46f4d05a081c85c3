//! Surgical edits of the config's YAML text: find each item of the top-level `models:`
//! sequence and set one `key: value` in it, keeping every other byte (comments, order,
//! quoting, blank lines) as it was. Nothing is re-serialized.

/// One item of `models:` in the text.
#[derive(Debug)]
pub struct ModelBlock {
    /// The item's `id`, as written (quotes removed).
    pub id: Option<String>,
    /// Column of the item's keys.
    key_indent: usize,
    /// Each key of the item at its own level: name and line index.
    keys: Vec<(String, usize)>,
    /// The item's last line with content (nested values included).
    last_line: usize,
}

/// A line change, applied by [`apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Replace { line: usize, text: String },
    InsertAfter { line: usize, text: String },
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// `key:` at the start of `rest`, if it is a plain mapping key.
fn key_of(rest: &str) -> Option<&str> {
    let (k, after) = rest.split_once(':')?;
    let ok = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && (after.is_empty() || after.starts_with(' ') || after.starts_with('\t'));
    ok.then_some(k)
}

/// The value part of `key: value  # comment`, without quotes.
fn scalar_of(after_colon: &str) -> String {
    let v = split_comment(after_colon).0.trim();
    v.trim_matches('"').trim_matches('\'').to_string()
}

/// Splits a line tail into (value, comment-with-its-leading-spaces).
fn split_comment(s: &str) -> (&str, &str) {
    let bytes = s.as_bytes();
    let mut quote = None;
    for (i, &b) in bytes.iter().enumerate() {
        match (quote, b) {
            (None, b'"') | (None, b'\'') => quote = Some(b),
            (Some(q), c) if c == q => quote = None,
            (None, b'#') if i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t' => {
                let value = &s[..i];
                let trimmed = value.trim_end();
                return (trimmed, &s[trimmed.len()..]);
            }
            _ => {}
        }
    }
    (s.trim_end(), &s[s.trim_end().len()..])
}

/// Finds the items of the top-level `models:` block (block style only).
pub fn model_blocks(lines: &[&str]) -> Result<Vec<ModelBlock>, String> {
    let start = lines
        .iter()
        .position(|l| l.starts_with("models:"))
        .ok_or("the config has no top-level `models:` block")?;
    let (_, after) = split_comment(&lines[start]["models:".len()..]);
    if !split_comment(&lines[start]["models:".len()..])
        .0
        .trim()
        .is_empty()
    {
        return Err(
            "`models:` is written in flow style ([...]); prices import edits block style only"
                .into(),
        );
    }
    let _ = after;
    let mut blocks: Vec<ModelBlock> = Vec::new();
    let mut dash_indent = None;
    for (i, line) in lines.iter().enumerate().skip(start + 1) {
        if !is_content(line) {
            continue;
        }
        let indent = indent_of(line);
        let rest = &line[indent..];
        let dash = *dash_indent.get_or_insert(indent);
        if indent < dash || (indent == dash && !rest.starts_with('-')) {
            break; // the next top-level key
        }
        if indent == dash {
            let item = rest[1..].trim_start_matches(' ');
            if item.starts_with('{') {
                return Err(format!(
                    "models[{}] is written in flow style ({{...}}); prices import edits block style only",
                    blocks.len()
                ));
            }
            let key_indent = indent + (rest.len() - item.len());
            let mut block = ModelBlock {
                id: None,
                key_indent,
                keys: Vec::new(),
                last_line: i,
            };
            if let Some(k) = key_of(item) {
                if k == "id" {
                    block.id = Some(scalar_of(&item[3..]));
                }
                block.keys.push((k.to_string(), i));
            } else if !item.trim().is_empty() {
                return Err(format!("models[{}] is not a mapping", blocks.len()));
            }
            blocks.push(block);
            continue;
        }
        let Some(block) = blocks.last_mut() else {
            return Err("unexpected indentation under `models:`".into());
        };
        if block.keys.is_empty() {
            // `-` alone on its line: the first key sets the item's indentation.
            block.key_indent = indent;
        }
        if indent == block.key_indent {
            if let Some(k) = key_of(rest) {
                if k == "id" {
                    block.id = Some(scalar_of(&rest[3..]));
                }
                block.keys.push((k.to_string(), i));
            }
        }
        block.last_line = i;
    }
    Ok(blocks)
}

impl ModelBlock {
    /// The current value of `key`, as written.
    pub fn value(&self, lines: &[&str], key: &str) -> Option<String> {
        let &(_, line) = self.keys.iter().find(|(k, _)| k == key)?;
        let l = lines[line];
        let at = l.find(&format!("{key}:"))? + key.len() + 1;
        Some(scalar_of(&l[at..]))
    }

    /// The edit that sets `key` to `value`: in place (keeping the spacing before the value
    /// and any comment after it), else a new line after the item's last line.
    pub fn set(&self, lines: &[&str], key: &str, value: &str) -> Edit {
        match self.keys.iter().find(|(k, _)| k == key) {
            Some(&(_, line)) => {
                let l = lines[line];
                let at = l.find(&format!("{key}:")).unwrap_or(0) + key.len() + 1;
                let tail = &l[at..];
                let gap = &tail[..tail.len() - tail.trim_start().len()];
                let (old, comment) = split_comment(tail.trim_start());
                let gap = if gap.is_empty() { " " } else { gap };
                // Keep a trailing comment in its column where the spacing allows.
                let pad = comment.len() - comment.trim_start().len();
                let pad = if comment.is_empty() {
                    0
                } else {
                    (pad + old.len()).saturating_sub(value.len()).max(1)
                };
                Edit::Replace {
                    line,
                    text: format!(
                        "{}{gap}{value}{}{}",
                        &l[..at],
                        " ".repeat(pad),
                        comment.trim_start()
                    ),
                }
            }
            None => Edit::InsertAfter {
                line: self.last_line,
                text: format!("{}{key}: {value}", " ".repeat(self.key_indent)),
            },
        }
    }
}

/// Applies edits to the text's lines, keeping each line's own ending (new lines take the
/// ending of the line they follow).
pub fn apply(text: &str, edits: &[Edit]) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = String::with_capacity(text.len() + edits.len() * 40);
    for (i, raw) in lines.iter().enumerate() {
        let body = raw.trim_end_matches(['\n', '\r']);
        let ending = &raw[body.len()..];
        let replaced = edits.iter().rev().find_map(|e| match e {
            Edit::Replace { line, text } if *line == i => Some(text.as_str()),
            _ => None,
        });
        out.push_str(replaced.unwrap_or(body));
        let ending = if ending.is_empty()
            && edits
                .iter()
                .any(|e| matches!(e, Edit::InsertAfter { line, .. } if *line == i))
        {
            "\n"
        } else {
            ending
        };
        out.push_str(ending);
        for e in edits {
            if let Edit::InsertAfter { line, text } = e {
                if *line == i {
                    out.push_str(text);
                    out.push_str(if ending.is_empty() { "\n" } else { ending });
                }
            }
        }
    }
    out
}

/// A unified-style diff of the edits: old and new line numbers, the label of each hunk.
pub fn diff(old: &[&str], edits: &[(String, Edit)]) -> String {
    let mut out = String::new();
    let mut shift = 0usize;
    for (i, line) in old.iter().enumerate() {
        let n = i + shift;
        for (label, e) in edits {
            if let Edit::Replace { line: at, text } = e {
                if *at == i {
                    out.push_str(&format!(
                        "@@ -{} +{} @@ {label}\n-{line}\n+{text}\n",
                        i + 1,
                        n + 1
                    ));
                }
            }
        }
        let inserted: Vec<&(String, Edit)> = edits
            .iter()
            .filter(|(_, e)| matches!(e, Edit::InsertAfter { line: at, .. } if *at == i))
            .collect();
        if let Some((label, _)) = inserted.first() {
            out.push_str(&format!(
                "@@ -{},0 +{},{} @@ {label}\n",
                i + 1,
                n + 2,
                inserted.len()
            ));
            for (_, e) in &inserted {
                if let Edit::InsertAfter { text, .. } = e {
                    out.push_str(&format!("+{text}\n"));
                }
            }
            shift += inserted.len();
        }
    }
    out
}

/// The lines of `text` without their endings (the indexes edits use).
pub fn lines(text: &str) -> Vec<&str> {
    text.split_inclusive('\n')
        .map(|l| l.trim_end_matches(['\n', '\r']))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "listen: x\nmodels:\n  # the cheap one\n  - id: a   # first\n    provider: p\n    input_usd_per_mtok: 0.2    # old price\n    output_usd_per_mtok: 1\n\n  -\n    id: \"b\"\n    provider: p\n    meta:\n      deep: 1\naliases:\n  x: [a]\n";

    #[test]
    fn finds_each_item_and_its_keys() {
        let l = lines(CONF);
        let b = model_blocks(&l).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].id.as_deref(), Some("a"));
        assert_eq!(b[1].id.as_deref(), Some("b"));
        assert_eq!(b[0].value(&l, "input_usd_per_mtok").as_deref(), Some("0.2"));
        assert_eq!(b[1].last_line, 12);
    }

    #[test]
    fn edits_keep_comments_spacing_and_order() {
        let l = lines(CONF);
        let b = model_blocks(&l).unwrap();
        let edits = vec![
            b[0].set(&l, "input_usd_per_mtok", "0.15"),
            b[0].set(&l, "context_window_tokens", "128000"),
            b[1].set(&l, "max_output_tokens", "64"),
        ];
        let out = apply(CONF, &edits);
        // The comment stays in its column.
        assert!(
            out.contains("    input_usd_per_mtok: 0.15   # old price\n"),
            "{out}"
        );
        assert!(
            out.contains("    output_usd_per_mtok: 1\n    context_window_tokens: 128000\n\n  -\n"),
            "{out}"
        );
        assert!(
            out.contains("      deep: 1\n    max_output_tokens: 64\naliases:"),
            "{out}"
        );
        assert!(out.starts_with("listen: x\nmodels:\n  # the cheap one\n  - id: a   # first\n"));
    }

    #[test]
    fn flow_style_is_refused() {
        assert!(model_blocks(&lines("models: [{id: a}]\n")).is_err());
        assert!(model_blocks(&lines("models:\n  - {id: a}\n")).is_err());
    }
}
