//! Traces in SQLite as a cheap row: `trace_log (id, ts, key_id, row)`, where `row` is a
//! compact JSON array of the other fields, and a `traces` view that reads them back as
//! columns (with SQLite's own `json_extract`), so every query, and any operator's ad-hoc
//! `SELECT ... FROM traces`, works as before.
//!
//! Why: a trace is written for every request. As eighteen bound columns it was the largest
//! part of the ledger writer's work (about 13k instructions per request, counted by
//! `benches/instr.py`: binding each column, then building an eighteen-field record). Four
//! columns, one of them text built in one reused buffer, cost a fraction of that. Reads,
//! which are rare (the admin API, the dashboard, a restart), pay for the JSON instead.

use std::fmt::Write as _;

use crate::store::ledger::TraceRow;

/// The positions in `row`, in the order [`encode`] writes them; the view's column list.
pub(super) const ROW_FIELDS: [&str; 16] = [
    "endpoint",
    "requested_model",
    "served_model",
    "provider",
    "status",
    "error_code",
    "latency_ms",
    "ttfb_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost_nanos",
    "usage_estimated",
    "fallback_from",
    "trace_id",
    "unit",
    "units",
];

/// `CREATE VIEW traces`: the columns of the old `traces` table, read from `trace_log`.
pub(super) fn view_sql() -> String {
    let mut sql = String::from("CREATE VIEW IF NOT EXISTS traces AS SELECT id, ts, key_id");
    for (i, name) in ROW_FIELDS.iter().enumerate() {
        let _ = write!(sql, ", json_extract(row, '$[{i}]') AS {name}");
    }
    sql.push_str(" FROM trace_log");
    sql
}

/// Moves the rows of a `traces` table (databases from before `trace_log`) into `trace_log`,
/// in the same transaction as the schema, then drops the table; ids are kept.
pub(super) fn convert_table_sql() -> String {
    let columns = ROW_FIELDS
        .iter()
        .map(|c| match *c {
            "units" => "COALESCE(units, 0)",
            c => c,
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO trace_log (id, ts, key_id, row)
             SELECT id, ts, key_id, json_array({columns}) FROM traces;
         DROP TABLE traces;"
    )
}

/// Appends `t`'s [`ROW_FIELDS`] to `out` as a JSON array, without allocating.
pub(super) fn encode(t: &TraceRow, out: &mut String) {
    out.push('[');
    string(out, Some(&t.endpoint));
    out.push(',');
    string(out, t.requested_model.as_deref());
    out.push(',');
    string(out, t.served_model.as_deref());
    out.push(',');
    string(out, t.provider.as_deref());
    out.push(',');
    number(out, i64::from(t.status));
    out.push(',');
    string(out, t.error_code.as_deref());
    out.push(',');
    number(out, t.latency_ms);
    out.push(',');
    match t.ttfb_ms {
        Some(ms) => number(out, ms),
        None => out.push_str("null"),
    }
    out.push(',');
    number(out, t.prompt_tokens as i64);
    out.push(',');
    number(out, t.completion_tokens as i64);
    out.push(',');
    number(out, t.cost.get());
    out.push(',');
    out.push(if t.usage_estimated { '1' } else { '0' });
    out.push(',');
    string(out, t.fallback_from.as_deref());
    out.push(',');
    match t.trace_id {
        // 32 lower-case hex digits, as in `traceparent`.
        Some(id) => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push('"');
            for b in id.to_bytes() {
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
            out.push('"');
        }
        None => out.push_str("null"),
    }
    out.push(',');
    string(out, t.unit.as_deref());
    out.push(',');
    number(out, t.units as i64);
    out.push(']');
}

fn number(out: &mut String, n: i64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// A JSON string (or `null`): only `"`, `\` and control characters need escaping, and the
/// names written here (endpoints, models, providers, key ids, codes) almost never have any.
fn string(out: &mut String, s: Option<&str>) {
    let Some(s) = s else {
        out.push_str("null");
        return;
    };
    out.push('"');
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push_str(s);
    } else {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::Arc;

    use super::*;
    use crate::money::Nanos;

    #[test]
    fn a_row_is_json_that_sqlite_reads_back_field_by_field() {
        let t = TraceRow {
            endpoint: Cow::Borrowed("chat.completions"),
            requested_model: Some(Arc::from("we\"ird\\mod\nel")),
            served_model: Some(Arc::from("gpt-4o-mini")),
            provider: None,
            status: 200,
            error_code: None,
            latency_ms: 12,
            ttfb_ms: Some(3),
            prompt_tokens: 11,
            completion_tokens: 7,
            cost: Nanos::new(1_234_567_890_123),
            usage_estimated: true,
            fallback_from: Some(Arc::from("é-model")),
            trace_id: opentelemetry::trace::TraceId::from_hex("0af7651916cd43dd8448eb211c80319c")
                .ok(),
            unit: Some(Cow::Borrowed("image")),
            units: 2,
            ..TraceRow::default()
        };
        let mut row = String::new();
        encode(&t, &mut row);
        // Independent reader: serde_json, then SQLite's own json_extract.
        let v: serde_json::Value = serde_json::from_str(&row).expect(&row);
        assert_eq!(v.as_array().unwrap().len(), ROW_FIELDS.len());
        assert_eq!(v[1], "we\"ird\\mod\nel");
        assert_eq!(v[13], "0af7651916cd43dd8448eb211c80319c");
        let db = rusqlite::Connection::open_in_memory().unwrap();
        let got: (String, Option<String>, i64, i64, String, i64) = db
            .query_row(
                "SELECT json_extract(?1, '$[1]'), json_extract(?1, '$[3]'),
                        json_extract(?1, '$[10]'), json_extract(?1, '$[11]'),
                        json_extract(?1, '$[12]'), json_extract(?1, '$[15]')",
                [&row],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .unwrap();
        assert_eq!(
            got,
            (
                "we\"ird\\mod\nel".to_string(),
                None,
                1_234_567_890_123,
                1,
                "é-model".to_string(),
                2
            )
        );
    }
}
