//! Traces in SQLite as pages: `trace_page (id, n, key_id, ts_min, ts_max, rows)` holds up to
//! [`PAGE_ROWS`] traces of one key from one commit, `rows` being a compact JSON array with
//! one array per trace (its time and the other fields, [`ROW_FIELDS`]). Trace `id + i` is
//! the page's row `i`. A `traces` view reads them back one row per trace (SQLite's own
//! `json_each` and `json_extract`), so every query, and any operator's ad-hoc
//! `SELECT ... FROM traces`, works as before.
//!
//! Why: a trace is written for every request. One table row per trace cost the ledger
//! writer two B-tree inserts per request (the rowid table and the per-key index), most of
//! its work as counted by `benches/instr.py`; a page is one insert per key and commit. Reads
//! are rare (the admin API, the dashboard, a restart) and reach a key's pages, newest first,
//! through the `(key_id, id)` index; they pay for the JSON instead.

use rusqlite::types::{ToSql, ToSqlOutput, ValueRef};
use rusqlite::{params, CachedStatement, OptionalExtension, Transaction};

use crate::store::ledger::{Sums, TraceRow};
use crate::store::Result;

/// Traces per page at most: a read of a key's newest traces parses at most one page more
/// than it returns, and a page stays a few pages of the file.
pub(super) const PAGE_ROWS: usize = 256;

/// The positions in each trace's array, in the order [`Encoder`] writes them; with `id` and
/// `key_id` (the page's), the view's column list.
pub(super) const ROW_FIELDS: [&str; 17] = [
    "ts",
    "status",
    "latency_ms",
    "ttfb_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost_nanos",
    "usage_estimated",
    "units",
    "trace_id",
    // The names last, together: consecutive traces mostly repeat them all.
    "endpoint",
    "requested_model",
    "served_model",
    "provider",
    "error_code",
    "fallback_from",
    "unit",
];

/// The fields of a `trace_log` row (before trace pages), in its order.
const LOG_FIELDS: [&str; 16] = [
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

/// The pages with one row per trace (`p` the page, `j` its trace), for reads' `FROM`.
pub(super) const FROM_PAGES: &str = "trace_page AS p, json_each(p.rows) AS j";

/// The SQL expression of one of the view's columns over [`FROM_PAGES`].
pub(super) fn column(name: &str) -> String {
    match name {
        "id" => "(p.id + j.key)".into(),
        "key_id" => "p.key_id".into(),
        // Every caller names a column of the view; anything else reads as NULL.
        _ => match ROW_FIELDS.iter().position(|f| *f == name) {
            Some(i) => format!("json_extract(j.value, '$[{i}]')"),
            None => "NULL".into(),
        },
    }
}

/// `cols` (view column names, comma-separated) as expressions over [`FROM_PAGES`].
pub(super) fn columns(cols: &str) -> String {
    cols.split(',')
        .map(|c| column(c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `CREATE VIEW traces`: the columns of the old `traces` table, one row per trace.
pub(super) fn view_sql() -> String {
    // The old `traces` table's order: its three keys, then a `trace_log` row's fields.
    let columns = ["id", "ts", "key_id"]
        .iter()
        .chain(&LOG_FIELDS)
        .map(|name| format!("{} AS {name}", column(name)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("CREATE VIEW IF NOT EXISTS traces AS SELECT {columns} FROM {FROM_PAGES}")
}

/// Moves the traces of an older database into pages, in the same transaction as the
/// schema, then drops the old table; ids are kept. `source` is a `SELECT id, ts, key_id,
/// row` of every trace, `row` its JSON array as [`Encoder`] writes it. A page holds one key's
/// run of consecutive ids, [`PAGE_ROWS`] at most.
fn pages_from_sql(source: &str) -> String {
    format!(
        "INSERT INTO trace_page (id, n, key_id, ts_min, ts_max, rows)
         SELECT MIN(id), COUNT(*), key_id, MIN(ts), MAX(ts),
                '[' || group_concat(row, ',' ORDER BY id) || ']'
         FROM (SELECT id, ts, key_id, row, run,
                      (ROW_NUMBER() OVER (PARTITION BY key_id, run ORDER BY id) - 1)
                          / {PAGE_ROWS} AS part
               FROM (SELECT id, ts, key_id, row,
                            id - ROW_NUMBER() OVER (PARTITION BY key_id ORDER BY id) AS run
                     FROM ({source})))
         GROUP BY key_id, run, part"
    )
}

/// Moves the rows of a `traces` table (databases from before `trace_log`) into pages.
pub(super) fn convert_table_sql() -> String {
    let fields = ROW_FIELDS
        .iter()
        .map(|c| match *c {
            "units" => "COALESCE(units, 0)",
            c => c,
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{};
         DROP TABLE traces;",
        pages_from_sql(&format!(
            "SELECT id, ts, key_id, json_array({fields}) AS row FROM traces"
        ))
    )
}

/// Moves the rows of `trace_log` (one row per trace, its fields but `ts` and `key_id` as a
/// JSON array) into pages, and drops it and the view over it.
pub(super) fn convert_trace_log_sql() -> String {
    format!(
        "{};
         DROP VIEW IF EXISTS traces;
         DROP TABLE trace_log;",
        pages_from_sql(&format!(
            "SELECT id, ts, key_id, json_array({}) AS row FROM trace_log",
            ROW_FIELDS
                .iter()
                .map(|f| match LOG_FIELDS.iter().position(|l| l == f) {
                    Some(i) => format!("json_extract(row, '$[{i}]')"),
                    None => "ts".into(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ))
    )
}

/// Writes traces as pages: each key's traces, in their order, [`PAGE_ROWS`] to a page.
pub(super) fn insert_traces<'t>(
    tx: &Transaction<'_>,
    traces: impl IntoIterator<Item = &'t TraceRow>,
) -> Result<()> {
    // First the page group of every trace, so each group's buffer is sized once (a page
    // of JSON grown by doubling was copied over and over).
    let mut keys: Vec<Option<&'t str>> = Vec::new();
    let mut counts: Vec<usize> = Vec::new();
    let mut group: Vec<(u32, &'t TraceRow)> = Vec::new();
    let mut by_key: Sums<Option<&'t str>, usize> = Sums::default();
    let mut last = usize::MAX;
    for t in traces {
        let key = t.key_id.as_deref();
        // Consecutive traces of one key (the common case) find their group without hashing.
        if keys.get(last).is_none_or(|k| !same_str(*k, key)) {
            last = *by_key.entry(key).or_insert_with(|| {
                keys.push(key);
                counts.push(0);
                keys.len() - 1
            });
        }
        counts[last] += 1;
        group.push((last as u32, t));
    }
    if group.is_empty() {
        return Ok(());
    }
    let mut next: i64 = tx
        .prepare_cached("SELECT id + n FROM trace_page ORDER BY id DESC LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(1);
    let mut insert = tx.prepare_cached(
        "INSERT INTO trace_page (id, n, key_id, ts_min, ts_max, rows)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut pages: Vec<Page<'t>> = keys
        .iter()
        .zip(&counts)
        .map(|(key, &n)| Page::new(*key, n.min(PAGE_ROWS)))
        .collect();
    let mut encoder = Encoder::default();
    for (g, t) in group {
        crate::priority::turn_point();
        let page = &mut pages[g as usize];
        page.push(&mut encoder, t);
        if page.n == PAGE_ROWS {
            page.write(&mut insert, &mut next)?;
        }
    }
    for page in &mut pages {
        if page.n > 0 {
            page.write(&mut insert, &mut next)?;
        }
    }
    Ok(())
}

/// Text known to be UTF-8, bound as TEXT as it is (a `String` would check it again).
struct Utf8<'a>(&'a [u8]);

impl ToSql for Utf8<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Text(self.0)))
    }
}

/// The same string: the same bytes in memory (shared names), else equal text.
fn same_str(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b) || a == b,
        (None, None) => true,
        _ => false,
    }
}

/// One page being filled: its key and its rows' JSON, opened with `[`.
struct Page<'t> {
    key: Option<&'t str>,
    /// UTF-8: ASCII and the names' own text (see [`Encoder`]).
    rows: Vec<u8>,
    n: usize,
    ts_min: i64,
    ts_max: i64,
}

/// Room for one encoded trace, most of the time.
const ROW_BYTES: usize = 160;

impl<'t> Page<'t> {
    /// A page for `key`'s next `rows` traces.
    fn new(key: Option<&'t str>, rows: usize) -> Page<'t> {
        let mut buf = Vec::with_capacity(rows * ROW_BYTES + 2);
        buf.push(b'[');
        Page {
            key,
            rows: buf,
            n: 0,
            ts_min: i64::MAX,
            ts_max: i64::MIN,
        }
    }

    fn push(&mut self, encoder: &mut Encoder<'t>, t: &'t TraceRow) {
        if self.n > 0 {
            self.rows.push(b',');
        }
        encoder.encode(t, &mut self.rows);
        self.n += 1;
        self.ts_min = self.ts_min.min(t.ts);
        self.ts_max = self.ts_max.max(t.ts);
    }

    /// Inserts the page at id `next` (then moves `next` past it) and empties it.
    fn write(&mut self, insert: &mut CachedStatement<'_>, next: &mut i64) -> Result<()> {
        self.rows.push(b']');
        insert.execute(params![
            *next,
            self.n as i64,
            self.key,
            self.ts_min,
            self.ts_max,
            Utf8(&self.rows)
        ])?;
        *next += self.n as i64;
        self.rows.clear();
        self.rows.push(b'[');
        self.n = 0;
        self.ts_min = i64::MAX;
        self.ts_max = i64::MIN;
        Ok(())
    }
}

/// Encodes traces as JSON arrays of their [`ROW_FIELDS`], remembering for each string field the last text it found needing no
/// escape: the names in consecutive traces are mostly the very same shared strings, so
/// each is checked once per batch instead of byte by byte in every trace.
/// The names of the trace encoded last (endpoint, models, provider, error code, fallback,
/// unit) are kept as JSON too: a trace with the same names (mostly the very same shared strings;
/// the requested model is the request's own copy) copies them in one piece.
#[derive(Default)]
struct Encoder<'t> {
    plain: [Option<&'t str>; 7],
    names: Option<[Option<&'t str>; 7]>,
    names_json: Vec<u8>,
}

impl<'t> Encoder<'t> {
    /// Appends `t`'s [`ROW_FIELDS`] to `out` as a JSON array.
    fn encode(&mut self, t: &'t TraceRow, out: &mut Vec<u8>) {
        // The numbers, flag and trace id are written on the stack, last first (a number is
        // written from its last digit), then go to `out` in one copy: pushed piece by piece
        // they were most of what a trace cost the ledger writer.
        let mut row = Figures::default();
        match t.trace_id {
            // 32 lower-case hex digits, as in `traceparent`.
            Some(id) => {
                row.text(b"\"");
                row.text(&hex32(u128::from_be_bytes(id.to_bytes())));
                row.text(b",\"");
            }
            None => row.text(b",null"),
        }
        row.uint(t.units);
        row.text(if t.usage_estimated { b",1," } else { b",0," });
        row.int(t.cost.get());
        row.text(b",");
        row.uint(t.completion_tokens);
        row.text(b",");
        row.uint(t.prompt_tokens);
        row.text(b",");
        match t.ttfb_ms {
            Some(ms) => row.int(ms),
            None => row.text(b"null"),
        }
        row.text(b",");
        row.int(t.latency_ms);
        row.text(b",");
        row.uint(u64::from(t.status));
        row.text(b",");
        row.int(t.ts);
        row.text(b"[");
        out.reserve(FIGURES_MAX + self.names_json.len());
        out.extend_from_slice(row.written());
        let names = [
            Some(t.endpoint.as_ref()),
            t.requested_model.as_deref(),
            t.served_model.as_deref(),
            t.provider.as_deref(),
            t.error_code.as_deref(),
            t.fallback_from.as_deref(),
            t.unit.as_deref(),
        ];
        let same = self
            .names
            .is_some_and(|last| last.iter().zip(&names).all(|(a, b)| same_str(*a, *b)));
        if same {
            out.extend_from_slice(&self.names_json);
        } else {
            let start = out.len();
            for (slot, name) in names.into_iter().enumerate() {
                out.push(b',');
                self.string(slot, out, name);
            }
            out.push(b']');
            self.names_json.clear();
            self.names_json.extend_from_slice(&out[start..]);
            self.names = Some(names);
        }
    }

    /// Field `slot`'s string (or `null`); the check for characters to escape is skipped for
    /// the text that needed none the last time.
    fn string(&mut self, slot: usize, out: &mut Vec<u8>, s: Option<&'t str>) {
        let Some(s) = s else {
            out.extend_from_slice(b"null");
            return;
        };
        if same_str(self.plain[slot], Some(s)) {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        } else if string(out, s) {
            self.plain[slot] = Some(s);
        }
    }
}

/// Room for a trace's figures: nine integers of at most 20 characters, the trace id's 35,
/// the brackets and commas.
const FIGURES_MAX: usize = 9 * 20 + 35 + 16;

/// A trace's figures as ASCII text, written in place with no allocation, from the end of
/// the buffer back: `buf[start..]` is what was written.
struct Figures {
    buf: [u8; FIGURES_MAX],
    start: usize,
}

impl Default for Figures {
    fn default() -> Figures {
        Figures {
            buf: [0; FIGURES_MAX],
            start: FIGURES_MAX,
        }
    }
}

/// `00`, `01`, ... `99`: two digits a division.
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

impl Figures {
    /// Puts `t` before what was written.
    fn text(&mut self, t: &[u8]) {
        self.start -= t.len();
        self.buf[self.start..self.start + t.len()].copy_from_slice(t);
    }

    fn int(&mut self, n: i64) {
        self.uint(n.unsigned_abs());
        if n < 0 {
            self.text(b"-");
        }
    }

    /// Puts `n` in decimal before what was written: its last two digits first.
    #[inline(always)]
    fn uint(&mut self, mut n: u64) {
        while n >= 100 {
            self.pair(n % 100);
            n /= 100;
        }
        if n >= 10 {
            self.pair(n);
        } else {
            self.text(&[b'0' + n as u8]);
        }
    }

    /// Puts `n` (below 100) as two digits before what was written.
    fn pair(&mut self, n: u64) {
        let at = n as usize * 2;
        self.text(&DIGIT_PAIRS[at..at + 2]);
    }

    fn written(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// `v` as 32 lower-case hex digits, most significant first, computed on whole words: each
/// half's nibbles spread one to a byte, then turned into digits all at once.
fn hex32(v: u128) -> [u8; 32] {
    let mut out = [0; 32];
    out[..16].copy_from_slice(&hex16((v >> 64) as u64));
    out[16..].copy_from_slice(&hex16(v as u64));
    out
}

fn hex16(x: u64) -> [u8; 16] {
    const ONES: u128 = 0x0101_0101_0101_0101_0101_0101_0101_0101;
    // Nibble k of `x` (k = 0 the least significant) to byte k of `y`, halving the pieces.
    let mut y = u128::from(x);
    y = (y | (y << 32)) & 0x0000_0000_FFFF_FFFF_0000_0000_FFFF_FFFF;
    y = (y | (y << 16)) & 0x0000_FFFF_0000_FFFF_0000_FFFF_0000_FFFF;
    y = (y | (y << 8)) & 0x00FF_00FF_00FF_00FF_00FF_00FF_00FF_00FF;
    y = (y | (y << 4)) & 0x0F0F_0F0F_0F0F_0F0F_0F0F_0F0F_0F0F_0F0F;
    // A nibble of 10 or more gets `a` - `0` - 10 = 39 more: its byte + 6 reaches 16.
    let letters = ((y + ONES * 6) >> 4) & ONES;
    (y + ONES * b'0' as u128 + letters * 39).to_be_bytes()
}

/// `s` as a JSON string; true if it needed no escape. Only `"`, `\\` and control characters
/// need escaping, and the names written here (endpoints, models, providers, codes) almost
/// never have any.
fn string(out: &mut Vec<u8>, s: &str) -> bool {
    let plain = !s.bytes().fold(false, |bad, b| {
        bad | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    out.push(b'"');
    if plain {
        out.extend_from_slice(s.as_bytes());
    } else {
        // Byte by byte: a multi-byte character's bytes are all 0x80 or more, copied as is.
        for &b in s.as_bytes() {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b if b < 0x20 => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
                }
                b => out.push(b),
            }
        }
    }
    out.push(b'"');
    plain
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
            ts: 1_700_000_000_123,
            ..TraceRow::default()
        };
        let mut row = Vec::new();
        Encoder::default().encode(&t, &mut row);
        let row = String::from_utf8(row).unwrap();
        // Independent reader: serde_json, then SQLite's own json_extract.
        let v: serde_json::Value = serde_json::from_str(&row).expect(&row);
        assert_eq!(v.as_array().unwrap().len(), ROW_FIELDS.len());
        assert_eq!(v[0], 1_700_000_000_123i64);
        assert_eq!(v[11], "we\"ird\\mod\nel");
        assert_eq!(v[9], "0af7651916cd43dd8448eb211c80319c");
        let db = rusqlite::Connection::open_in_memory().unwrap();
        let got: (String, Option<String>, i64, i64, String, i64) = db
            .query_row(
                "SELECT json_extract(?1, '$[11]'), json_extract(?1, '$[13]'),
                        json_extract(?1, '$[6]'), json_extract(?1, '$[7]'),
                        json_extract(?1, '$[15]'), json_extract(?1, '$[8]')",
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

    #[test]
    fn figures_and_trace_ids_read_as_the_standard_formatting_writes_them() {
        let mut ints = vec![
            0i64, 1, 9, 10, 99, 100, 101, 999, 1000, 12_345, -1, -10, -99, -100,
        ];
        for p in 1..19 {
            let t = 10i64.pow(p);
            ints.extend([t - 1, t, t + 1, -t, -(t - 1), -(t + 1)]);
        }
        ints.extend([i64::MAX, i64::MIN, i64::MIN + 1]);
        for n in ints {
            let mut f = Figures::default();
            f.int(n);
            assert_eq!(f.written(), n.to_string().as_bytes());
        }
        for n in [
            u64::MAX,
            u64::MAX - 1,
            10_000_000_000_000_000_000,
            9_999_999_999_999_999_999,
        ] {
            let mut f = Figures::default();
            f.uint(n);
            assert_eq!(f.written(), n.to_string().as_bytes());
        }
        // Every nibble value at every position, and patterns across the halves.
        let mut ids = vec![0u128, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210];
        for shift in 0..32 {
            for nibble in 0..16u128 {
                ids.push(nibble << (4 * shift));
                ids.push(!(nibble << (4 * shift)));
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834u128;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(0x2545_f491_4f6c_dd1d_9e37_79b9_7f4a_7c15)
                .wrapping_add(1);
            ids.push(x);
        }
        for id in ids {
            assert_eq!(
                std::str::from_utf8(&hex32(id)).unwrap(),
                format!("{id:032x}")
            );
        }
        // The longest figures fit.
        let t = TraceRow {
            ts: i64::MIN,
            latency_ms: i64::MIN,
            ttfb_ms: Some(i64::MIN),
            prompt_tokens: u64::MAX,
            completion_tokens: u64::MAX,
            cost: Nanos::new(i64::MIN),
            units: u64::MAX,
            status: u16::MAX,
            trace_id: Some(opentelemetry::trace::TraceId::from_bytes([0xff; 16])),
            ..TraceRow::default()
        };
        let mut row = Vec::new();
        Encoder::default().encode(&t, &mut row);
        let row = String::from_utf8(row).unwrap();
        let v: serde_json::Value = serde_json::from_str(&row).expect(&row);
        assert_eq!(v[0], i64::MIN);
        assert_eq!(v[5], u64::MAX);
        assert_eq!(v[9], "ffffffffffffffffffffffffffffffff");
    }

    #[test]
    fn an_encoder_escapes_every_string_that_needs_it_whatever_came_before() {
        let plain: Arc<str> = Arc::from("gpt-4o");
        let weird: Arc<str> = Arc::from("a\"b");
        let trace = |m: &Arc<str>| TraceRow {
            requested_model: Some(m.clone()),
            served_model: Some(m.clone()),
            ..TraceRow::default()
        };
        // Equal texts in different strings too (a request's own copy of its model name).
        let copy: Arc<str> = Arc::from("a\"b");
        let traces: Vec<TraceRow> = [&plain, &weird, &copy, &plain, &weird]
            .into_iter()
            .map(trace)
            .collect();
        let mut e = Encoder::default();
        let mut out = b"[".to_vec();
        for (i, t) in traces.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            e.encode(t, &mut out);
        }
        out.push(b']');
        let out = String::from_utf8(out).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
        let models: Vec<&str> = (0..5).map(|i| v[i][11].as_str().unwrap()).collect();
        assert_eq!(models, ["gpt-4o", "a\"b", "a\"b", "gpt-4o", "a\"b"]);
    }
}
