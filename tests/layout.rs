//! Checks the shape of the source tree, by reading the files under `src/`.
//!
//! The proxy is built in layers, and these tests keep the layers apart:
//!
//! - The federation core (`src/federation/`) and the HTTP API on top of it (`src/api/`) are
//!   sans-io: they never hold a socket or a file, never start a thread and never read a
//!   clock. Bytes and the current time are handed to them, so a test, a simulation or a
//!   fuzz target can drive them with any input and any time it likes.
//! - The clock is read by the reactor, once per loop turn, and by a few places outside the
//!   loop (program start, test drivers); everything else uses the reading it is given.
//! - The protocol codecs (`src/proto/`) sit below everything: they may use each other and
//!   a couple of leaf helpers, never the layers built on them.
//! - No two modules import each other, directly or round a longer loop: the modules form a
//!   tree of layers that can be read, and tested, from the bottom up.
//!
//! The scan is textual and uses only the standard library. Comments (`//`, `//!`, `///`,
//! `/* */`) are ignored, and so is everything from the first `#[cfg(test)]` line to the end
//! of a file: unit tests may read the clock and reach across layers. A file `src/a/b.rs` is
//! the module `a::b`, `src/a/mod.rs` is `a`; `src/lib.rs` and `src/main.rs` are not modules.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// One source file, read and stripped.
struct Source {
    /// The path from the crate root, with `/`: `src/federation/mod.rs`.
    file: String,
    /// The module (`federation`), `None` for `src/lib.rs` and `src/main.rs`.
    module: Option<String>,
    /// The code: comments and the test section removed, string literals kept.
    code: String,
    /// As `code`, with the contents of string literals blanked too (for finding paths).
    paths_text: String,
}

/// Every `.rs` file under `src/`, sorted by path.
fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    collect_rs(&root.join("src"), &mut files);
    files.sort();
    assert!(
        !files.is_empty(),
        "no .rs files found under {}",
        root.join("src").display()
    );
    files
        .into_iter()
        .map(|path| {
            let rel = path
                .strip_prefix(root)
                .expect("a file under the crate root")
                .to_string_lossy()
                .replace('\\', "/");
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let module = module_of(&rel);
            Source {
                code: strip(&text, false),
                paths_text: strip(&text, true),
                file: rel,
                module,
            }
        })
        .collect()
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` → `a::b`, `src/a/mod.rs` → `a`; `src/lib.rs`, `src/main.rs` → `None`.
fn module_of(file: &str) -> Option<String> {
    let rel = file.strip_prefix("src/")?.strip_suffix(".rs")?;
    if rel == "lib" || rel == "main" {
        return None;
    }
    let rel = rel.strip_suffix("/mod").unwrap_or(rel);
    Some(rel.replace('/', "::"))
}

/// The text with comments removed (newlines kept, so line numbers still hold), cut at the
/// first line that contains `#[cfg(test)]`. With `blank_strings`, the contents of string
/// literals are replaced by spaces too.
fn strip(text: &str, blank_strings: bool) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    // Copies a character of a string literal (blanked, unless it is a newline).
    let lit = |out: &mut String, ch: char| {
        out.push(if blank_strings && ch != '\n' { ' ' } else { ch });
    };
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    while i < c.len() {
        let at = |k: usize| c.get(i + k).copied();
        match c[i] {
            // A line comment, doc comments included: dropped up to the newline.
            '/' if at(1) == Some('/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            // A block comment (they nest): dropped, its newlines kept.
            '/' if at(1) == Some('*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        if c[i] == '\n' {
                            out.push('\n');
                        }
                        i += 1;
                    }
                }
            }
            // A raw string: `r"…"`, `r#"…"#`, `br"…"`; the `r` must start a token (or follow `b`).
            'r' if {
                let before = if i > 0 { Some(c[i - 1]) } else { None };
                let starts = match before {
                    None => true,
                    Some('b') => i < 2 || !ident(c[i - 2]),
                    Some(p) => !ident(p),
                };
                let mut k = 1;
                while at(k) == Some('#') {
                    k += 1;
                }
                starts && at(k) == Some('"')
            } =>
            {
                out.push('r');
                i += 1;
                let mut hashes = 0;
                while c[i] == '#' {
                    out.push('#');
                    hashes += 1;
                    i += 1;
                }
                out.push('"');
                i += 1;
                while i < c.len() {
                    if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                        out.push('"');
                        out.extend(std::iter::repeat_n('#', hashes));
                        i += 1 + hashes;
                        break;
                    }
                    lit(&mut out, c[i]);
                    i += 1;
                }
            }
            // A string (or byte string) literal, with its escapes.
            '"' => {
                out.push('"');
                i += 1;
                while i < c.len() {
                    match c[i] {
                        '"' => {
                            out.push('"');
                            i += 1;
                            break;
                        }
                        '\\' => {
                            lit(&mut out, '\\');
                            if let Some(&n) = c.get(i + 1) {
                                lit(&mut out, n);
                            }
                            i += 2;
                        }
                        ch => {
                            lit(&mut out, ch);
                            i += 1;
                        }
                    }
                }
            }
            // A character literal (`'"'`, `'\''`); otherwise a lifetime or a label.
            '\'' => {
                if at(1) == Some('\\') {
                    out.push_str("'\\");
                    i += 2;
                    if i < c.len() {
                        out.push(c[i]);
                        i += 1;
                    }
                    while i < c.len() && c[i] != '\'' && c[i] != '\n' {
                        out.push(c[i]);
                        i += 1;
                    }
                    if i < c.len() && c[i] == '\'' {
                        out.push('\'');
                        i += 1;
                    }
                } else if at(2) == Some('\'') && at(1).is_some() {
                    out.push('\'');
                    out.push(c[i + 1]);
                    out.push('\'');
                    i += 3;
                } else {
                    out.push('\'');
                    i += 1;
                }
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    let mut kept = String::with_capacity(out.len());
    for line in out.split_inclusive('\n') {
        if line.contains("#[cfg(test)]") {
            break;
        }
        kept.push_str(line);
    }
    kept
}

/// The 1-based line numbers and lines of `code` that contain `needle`.
fn lines_with<'a>(code: &'a str, needle: &str) -> Vec<(usize, &'a str)> {
    code.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(n, l)| (n + 1, l.trim()))
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Path,
    Open,
    Close,
    Comma,
    Star,
    Other,
}

fn tokenize(text: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = text.chars().collect();
    let mut toks = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            toks.push((Tok::Ident(c[start..i].iter().collect()), line));
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            toks.push((Tok::Path, line));
            i += 2;
        } else {
            let t = match ch {
                '{' => Tok::Open,
                '}' => Tok::Close,
                ',' => Tok::Comma,
                '*' => Tok::Star,
                _ => Tok::Other,
            };
            toks.push((t, line));
            i += 1;
        }
    }
    toks
}

/// Parses a path (or a `use` tree) whose leading segments are `prefix`, from `toks[pos]`
/// (just after a `::`). Every complete path goes to `out`; returns the position after it.
fn parse_tree(
    toks: &[(Tok, usize)],
    mut pos: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        match toks.get(pos).map(|t| &t.0) {
            Some(Tok::Ident(s)) => {
                if s != "self" {
                    prefix.push(s.clone());
                }
                pos += 1;
                if toks.get(pos).map(|t| &t.0) == Some(&Tok::Path) {
                    pos += 1;
                } else {
                    out.push(prefix);
                    return pos;
                }
            }
            Some(Tok::Open) => {
                pos += 1;
                while let Some((t, _)) = toks.get(pos) {
                    match t {
                        Tok::Close => {
                            pos += 1;
                            break;
                        }
                        Tok::Comma => pos += 1,
                        // `b as c`: the alias is no path.
                        Tok::Ident(s) if s == "as" => pos += 2,
                        _ => {
                            let next = parse_tree(toks, pos, prefix.clone(), out);
                            pos = next.max(pos + 1);
                        }
                    }
                }
                return pos;
            }
            Some(Tok::Star) => {
                out.push(prefix);
                return pos + 1;
            }
            _ => {
                out.push(prefix);
                return pos;
            }
        }
    }
}

/// A path found in a file: its line, its text as written and its absolute segments.
struct PathRef {
    line: usize,
    written: String,
    segments: Vec<String>,
}

/// Every `crate::…` path in `text` and, for a file of module `module`, every `super::…` path
/// (made absolute). `use` groups are expanded, each item under the group's prefix.
fn paths_in(text: &str, module: Option<&str>) -> Vec<PathRef> {
    let toks = tokenize(text);
    let mut refs = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let follows_path = i > 0 && toks[i - 1].0 == Tok::Path;
        let (base, written_head, mut pos) = match &toks[i].0 {
            Tok::Ident(s) if s == "crate" && !follows_path => {
                if toks.get(i + 1).map(|t| &t.0) != Some(&Tok::Path) {
                    i += 1;
                    continue;
                }
                (Vec::new(), "crate".to_string(), i + 2)
            }
            Tok::Ident(s) if s == "super" && !follows_path => {
                let Some(m) = module else {
                    i += 1;
                    continue;
                };
                let mut base: Vec<String> = m.split("::").map(String::from).collect();
                let mut pos = i;
                let mut head = Vec::new();
                while toks.get(pos).map(|t| &t.0) == Some(&Tok::Ident("super".into()))
                    && toks.get(pos + 1).map(|t| &t.0) == Some(&Tok::Path)
                {
                    base.pop();
                    head.push("super");
                    pos += 2;
                }
                if head.is_empty() {
                    i += 1;
                    continue;
                }
                (base, head.join("::"), pos)
            }
            _ => {
                i += 1;
                continue;
            }
        };
        let line = toks[i].1;
        let mut found = Vec::new();
        pos = parse_tree(&toks, pos, Vec::new(), &mut found);
        for rel in found {
            let written = format!("{written_head}::{}", rel.join("::"));
            let mut segments = base.clone();
            segments.extend(rel);
            refs.push(PathRef {
                line,
                written,
                segments,
            });
        }
        i = pos.max(i + 1);
    }
    refs
}

/// The longest leading part of `segments` that is a module, if any.
fn module_prefix(segments: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (1..=segments.len())
        .rev()
        .map(|k| segments[..k].join("::"))
        .find(|m| modules.contains(m))
}

/// The evidence for an edge: the file, the line and the path as written.
type Evidence = (String, usize, String);

/// The module graph: for each module, the modules it refers to, each with the first
/// reference found. `files` holds (file, module, text with comments and tests stripped).
fn module_graph(files: &[(&str, &str, &str)]) -> BTreeMap<String, BTreeMap<String, Evidence>> {
    let modules: BTreeSet<String> = files.iter().map(|(_, m, _)| m.to_string()).collect();
    let mut graph: BTreeMap<String, BTreeMap<String, Evidence>> = BTreeMap::new();
    for (file, module, text) in files {
        let edges = graph.entry(module.to_string()).or_default();
        for r in paths_in(text, Some(module)) {
            if let Some(target) = module_prefix(&r.segments, &modules)
                && target != *module
            {
                edges
                    .entry(target)
                    .or_insert_with(|| (file.to_string(), r.line, r.written));
            }
        }
    }
    graph
}

/// The strongly connected components with more than one module (Tarjan's algorithm).
fn cycles<V>(graph: &BTreeMap<String, BTreeMap<String, V>>) -> Vec<Vec<String>> {
    struct Tarjan<'g, V> {
        graph: &'g BTreeMap<String, BTreeMap<String, V>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g, V> Tarjan<'g, V> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flat_map(|e| e.keys()) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().expect("v is on the stack");
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
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
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.found
}

/// The shortest loop from `start` back to it through `members` (breadth first), as
/// `[start, …, start]`.
fn shortest_loop<V>(
    graph: &BTreeMap<String, BTreeMap<String, V>>,
    members: &BTreeSet<&str>,
    start: &str,
) -> Vec<String> {
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !members.contains(w) || came_from.contains_key(w) {
                continue;
            }
            came_from.insert(w, v);
            if w == start {
                let mut path = vec![start.to_string()];
                let mut at = came_from[start];
                while at != start {
                    path.push(at.to_string());
                    at = came_from[at];
                }
                path.push(start.to_string());
                path.reverse();
                return path;
            }
            queue.push_back(w);
        }
    }
    vec![start.to_string()]
}

/// The graph of `src/` and its cycles, each described with the references that close it.
fn describe_cycles(graph: &BTreeMap<String, BTreeMap<String, Evidence>>) -> Vec<String> {
    cycles(graph)
        .into_iter()
        .map(|component| {
            let members: BTreeSet<&str> = component.iter().map(String::as_str).collect();
            let mut s = format!(
                "cycle among modules [{}]\n  shortest loop: {}\n  references inside it:",
                component.join(", "),
                shortest_loop(graph, &members, &component[0]).join(" -> ")
            );
            for m in &component {
                for (t, (file, line, written)) in &graph[m] {
                    if members.contains(t.as_str()) {
                        s.push_str(&format!("\n    {m} -> {t}: {file}:{line}: `{written}`"));
                    }
                }
            }
            s
        })
        .collect()
}

#[test]
fn the_module_graph_has_no_cycle() {
    let sources = sources();
    let files: Vec<(&str, &str, &str)> = sources
        .iter()
        .filter_map(|s| Some((s.file.as_str(), s.module.as_deref()?, s.paths_text.as_str())))
        .collect();
    let graph = module_graph(&files);
    let found = describe_cycles(&graph);
    assert!(
        found.is_empty(),
        "modules under src/ refer to each other in a loop (break it by moving the shared \
         items down a layer):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_core_holds_no_socket_or_file_and_reads_no_clock() {
    // No file either: the state log and resource files are written by the reactor (the core
    // fills a batch of records and names the files to delete, in actions).
    const FORBIDDEN: &[&str] = &[
        "std::fs",
        "File::",
        "OpenOptions",
        "sync_all",
        "sync_data",
        "mio",
        "TcpStream",
        "TcpListener",
        "UdpSocket",
        "Instant::now",
        "SystemTime::now",
        "Now::read",
        "crate::io",
        "rustls",
        "tungstenite",
        "std::thread",
    ];
    let mut bad = Vec::new();
    let mut scanned = 0;
    for s in sources() {
        if !(s.file.starts_with("src/federation/") || s.file.starts_with("src/api/")) {
            continue;
        }
        scanned += 1;
        for needle in FORBIDDEN {
            for (n, line) in lines_with(&s.code, needle) {
                bad.push(format!("{}:{n}: `{needle}` in `{line}`", s.file));
            }
        }
    }
    assert!(
        scanned > 0,
        "found no files under src/federation/ or src/api/"
    );
    assert!(
        bad.is_empty(),
        "the sans-io core (src/federation/, src/api/) must hold no socket, file, thread or clock:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_clock_is_read_only_by_the_reactor() {
    const READS: &[&str] = &[
        "Instant::now()",
        "SystemTime::now()",
        "Now::read()",
        "now_ms()",
        "now_secs()",
    ];
    // A file is allowed if its path equals an entry, or starts with one ending in `/`.
    const ALLOWED: &[&str] = &[
        // Defines `Now::read` (both clocks, one reading) and `now_ms`.
        "src/clock.rs",
        // The loop: one reading per turn, handed to the core in `proxy.fed.now`.
        "src/io/reactor.rs",
        // Program start: the first reading, before the loop runs; `now_secs` for a token's `iat`.
        "src/main.rs",
        // Time-derived bytes when the OS random source fails (ids only, never secrets).
        "src/random.rs",
        // The simulation and the fuzz harness fix a start instant, then step time themselves.
        "src/sim.rs",
        "src/harness.rs",
    ];
    let allowed = |file: &str| {
        ALLOWED
            .iter()
            .any(|a| file == *a || (a.ends_with('/') && file.starts_with(a)))
    };
    let mut bad = Vec::new();
    for s in sources() {
        if allowed(&s.file) {
            continue;
        }
        for needle in READS {
            for (n, line) in lines_with(&s.code, needle) {
                bad.push(format!("{}:{n}: `{needle}` in `{line}`", s.file));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "only the reactor (and the few files allowed in this test) may read a clock; \
         the rest must use the turn's reading it is given:\n{}",
        bad.join("\n")
    );
}

#[test]
fn protocol_codecs_depend_on_no_layer_above() {
    const ALLOWED: &[&str] = &["proto", "audit", "random"];
    let mut bad = Vec::new();
    let mut scanned = 0;
    for s in sources() {
        if !s.file.starts_with("src/proto/") {
            continue;
        }
        scanned += 1;
        for r in paths_in(&s.paths_text, s.module.as_deref()) {
            let top = r.segments.first().map(String::as_str).unwrap_or("");
            if !ALLOWED.contains(&top) {
                bad.push(format!("{}:{}: `{}`", s.file, r.line, r.written));
            }
        }
    }
    assert!(scanned > 0, "found no files under src/proto/");
    assert!(
        bad.is_empty(),
        "src/proto/ may refer only to crate::proto, crate::audit and crate::random:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_scanner_finds_a_planted_cycle() {
    let check = |files: &[(&str, &str, &str)]| {
        let stripped: Vec<(String, String, String)> = files
            .iter()
            .map(|(f, m, t)| (f.to_string(), m.to_string(), strip(t, true)))
            .collect();
        let view: Vec<(&str, &str, &str)> = stripped
            .iter()
            .map(|(f, m, t)| (f.as_str(), m.as_str(), t.as_str()))
            .collect();
        cycles(&module_graph(&view))
    };

    // a -> b -> a: found.
    let found = check(&[
        ("src/a.rs", "a", "use crate::b::X;\n"),
        ("src/b.rs", "b", "fn f() -> u8 { crate::a::Y }\n"),
    ]);
    assert_eq!(found, vec![vec!["a".to_string(), "b".to_string()]]);
    let graph = module_graph(&[
        ("src/a.rs", "a", "use crate::b::X;\n"),
        ("src/b.rs", "b", "fn f() -> u8 { crate::a::Y }\n"),
    ]);
    let text = describe_cycles(&graph).join("\n");
    assert!(
        text.contains("a -> b -> a") && text.contains("b -> a: src/b.rs:1: `crate::a::Y`"),
        "the report should show the loop and the reference that closes it:\n{text}"
    );

    // The same through a `use` group, a nested group and `super::`: found.
    let found = check(&[
        ("src/p/mod.rs", "p", "pub mod q;\n"),
        (
            "src/p/q.rs",
            "p::q",
            "use super::super::r::{Z, s::{self, T}};\n",
        ),
        ("src/r/mod.rs", "r", "pub mod s;\n"),
        ("src/r/s.rs", "r::s", "use crate::{p::q::W};\n"),
    ]);
    assert_eq!(found, vec![vec!["p::q".to_string(), "r::s".to_string()]]);

    // a -> b only; the way back is in a comment, a string or the test section: none.
    let found = check(&[
        ("src/a.rs", "a", "use crate::b::X;\n"),
        (
            "src/b.rs",
            "b",
            "/// See [`crate::a::Y`].\nconst S: &str = \"crate::a::Y\"; // crate::a::Y\n\
             #[cfg(test)]\nmod tests { use crate::a::Y; }\n",
        ),
    ]);
    assert!(found.is_empty(), "no cycle expected, found {found:?}");
}
