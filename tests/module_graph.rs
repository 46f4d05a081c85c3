//! The library's modules import each other without a circle.
//!
//! A circle of imports makes every module in it depend on all the others: none can be read,
//! tested or moved alone. Nine files were once tied in one (`config`, `catalog`, `keys`,
//! `limits`, `limits/store`, `admission`, `providers`, `shared/redis`, `store`), and a later
//! change tied `gate` and `admin` again; this test keeps it from coming back.
//!
//! The graph is read from the sources as text: a file depends on another when it names a
//! path into it (`use crate::a::b::{c, d}`, `crate::a::f()`, `super::x`), test modules
//! (after `#[cfg(test)] mod`) and comments left out. A path goes to the deepest module it
//! names that has a file: `crate::limits::store::LimitStore` is `src/limits/store.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every module of `src/` with a file of its own, by its path (`["limits", "store"]`);
/// the crate roots (`lib.rs`, `main.rs`, a binary's root) are not modules of the library.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src/");
            let mut parts: Module = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let root = parts.is_empty()
                || (parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main"))
                || parts.first().is_some_and(|p| p == "bin");
            if !root {
                found.insert(parts, path);
            }
        }
    }
    found
}

/// The file's code without comments and without its test module (everything from a
/// `#[cfg(test)]` that opens a `mod`).
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|n| n.trim_start().starts_with("mod "))
        {
            break;
        }
        let without_comment = match t.find("//") {
            Some(i) => &t[..i],
            None => t,
        };
        out.push_str(without_comment);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The full paths a `use` tree names: `a::{b, c::{d, e}}` gives `a::b`, `a::c::d`, `a::c::e`.
fn use_paths(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    match tree.find('{') {
        Some(open) if tree.ends_with('}') => {
            let base = format!("{prefix}{}", tree[..open].trim());
            let inner = &tree[open + 1..tree.len() - 1];
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        use_paths(&base, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            use_paths(&base, &inner[start..], out);
        }
        _ if tree.is_empty() => {}
        _ => {
            let path = tree.split(" as ").next().unwrap_or(tree).trim();
            out.push(format!("{prefix}{path}"));
        }
    }
}

/// Every path in `code` that starts at `crate`, `super` or `self`, as segments relative to
/// the crate root (`module` is the file's own module).
fn named_paths(code: &str, module: &Module) -> Vec<Module> {
    let mut raw = Vec::new();
    // `use` statements, whose trees may hold braces.
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let after = &rest[at + 4..];
        rest = after;
        if before.is_some_and(is_ident) {
            continue;
        }
        if let Some(end) = after.find(';') {
            use_paths("", &after[..end], &mut raw);
        }
    }
    // Paths written in place: `crate::a::b(...)`.
    for (at, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        if code[..at].chars().last().is_some_and(is_ident) {
            continue;
        }
        let len = code[at..]
            .find(|c: char| !(is_ident(c) || c == ':'))
            .unwrap_or(code.len() - at);
        raw.push(code[at..at + len].to_string());
    }
    let mut paths = Vec::new();
    for path in raw {
        let segments: Vec<&str> = path
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let Some((first, tail)) = segments.split_first() else {
            continue;
        };
        // A `mod.rs` file's module is its folder: `super` of `a/mod.rs` is the crate, of
        // `a/b.rs` it is `a`.
        let own = module.clone();
        let mut base: Module = match *first {
            "crate" => Vec::new(),
            "self" => own,
            "super" => {
                let mut m = own;
                m.pop();
                m
            }
            _ => continue,
        };
        let mut tail = tail.iter().peekable();
        while tail.peek() == Some(&&"super") {
            base.pop();
            tail.next();
        }
        base.extend(tail.map(|s| s.to_string()));
        if !base.is_empty() {
            paths.push(base);
        }
    }
    paths
}

/// The deepest module of `path` that has a file.
fn owner<'a>(path: &Module, modules: &'a BTreeMap<Module, PathBuf>) -> Option<&'a Module> {
    (1..=path.len())
        .rev()
        .find_map(|n| modules.get_key_value(&path[..n]).map(|(k, _)| k))
}

type Graph = BTreeMap<Module, BTreeSet<Module>>;

fn graph(src: &Path) -> Graph {
    let modules = modules(src);
    let mut g = Graph::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).expect("a source file is readable");
        let deps = g.entry(module.clone()).or_default();
        for path in named_paths(&code(&text), module) {
            if let Some(target) = owner(&path, &modules) {
                if target != module {
                    deps.insert(target.clone());
                }
            }
        }
    }
    g
}

/// The circles of `g`: its strongly connected components of more than one module (Tarjan).
fn circles(g: &Graph) -> Vec<Vec<Module>> {
    struct Walk<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, m: &'a Module) {
            let i = self.index.len();
            self.index.insert(m, i);
            self.low.insert(m, i);
            self.stack.push(m);
            self.on_stack.insert(m);
            for d in self.g.get(m).into_iter().flatten() {
                if !self.index.contains_key(d) {
                    self.visit(d);
                    let low = self.low[m].min(self.low[d]);
                    self.low.insert(m, low);
                } else if self.on_stack.contains(d) {
                    let low = self.low[m].min(self.index[d]);
                    self.low.insert(m, low);
                }
            }
            if self.low[m] == self.index[m] {
                let mut component = Vec::new();
                while let Some(top) = self.stack.pop() {
                    self.on_stack.remove(top);
                    component.push(top.clone());
                    if top == m {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for m in g.keys() {
        if !walk.index.contains_key(m) {
            walk.visit(m);
        }
    }
    walk.found
}

fn name(m: &Module) -> String {
    m.join("::")
}

#[test]
fn the_librarys_modules_import_each_other_without_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    // The reading works: modules known to depend on each other one way are seen so.
    let deps = |from: &str, to: &str| {
        let key: Module = from.split("::").map(str::to_string).collect();
        let to: Module = to.split("::").map(str::to_string).collect();
        g.get(&key).is_some_and(|d| d.contains(&to))
    };
    assert!(deps("keys", "catalog"), "keys names crate::catalog");
    assert!(deps("proxy", "gate"), "proxy names crate::gate");
    assert!(
        deps("limits::store", "limits"),
        "limits/store.rs names super::"
    );
    assert!(!deps("config", "keys") && !deps("catalog", "keys"));
    let found = circles(&g);
    let described: Vec<String> = found
        .iter()
        .map(|c| {
            let members: BTreeSet<&Module> = c.iter().collect();
            let edges: Vec<String> = c
                .iter()
                .flat_map(|m| {
                    g[m].iter()
                        .filter(|d| members.contains(d))
                        .map(move |d| format!("{} -> {}", name(m), name(d)))
                })
                .collect();
            edges.join(", ")
        })
        .collect();
    assert!(found.is_empty(), "modules in a circle: {described:#?}");
}

#[test]
fn a_circle_is_found_and_a_chain_is_not() {
    let m = |s: &str| -> Module { s.split("::").map(str::to_string).collect() };
    let mut g = Graph::new();
    g.entry(m("a")).or_default().insert(m("b"));
    g.entry(m("b")).or_default().insert(m("c"));
    g.entry(m("c")).or_default();
    assert!(circles(&g).is_empty());
    g.get_mut(&m("c")).unwrap().insert(m("a"));
    assert_eq!(circles(&g), vec![vec![m("a"), m("b"), m("c")]]);
}

#[test]
fn paths_are_read_from_use_trees_in_place_paths_and_super() {
    let module = vec!["limits".to_string(), "store".to_string()];
    let code = code(
        "use crate::{admission::{self, Endpoint}, clock::now_ms as now};\n\
         use super::Reservation;\n\
         // crate::commented::out\n\
         fn f() { crate::money::Nanos::new(1); my_crate::x::y(); }\n\
         #[cfg(test)]\nmod tests { use crate::keys::KeyEntry; }\n",
    );
    let paths: BTreeSet<String> = named_paths(&code, &module)
        .iter()
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = [
        "admission::self",
        "admission::Endpoint",
        "clock::now_ms",
        "limits::Reservation",
        "money::Nanos::new",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    assert_eq!(paths, want);
}
