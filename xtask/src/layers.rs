//! `cargo xtask layers`: checks that mesh-node's modules point one way, and prints the layers.
//!
//! The rule (docs/architecture.md, "Module map"): within every folder, the graph of its
//! children — each child counted with everything below it — has no cycle. A folder's own file
//! (`mod.rs`) is the folder's face: it declares and wires its children, and they may use what
//! it declares, so edges between a module and its own ancestors are not counted. A reference
//! is any `crate::…`, `super::…` or `self::…` path outside comments and `#[cfg(test)]` code
//! (`mod tests` blocks, `tests.rs` files).
//!
//! A unit test runs the check on every `cargo xtask test`, so a cycle fails CI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

type Module = Vec<String>;

/// One edge between two siblings, with a reference that makes it (for the error message).
#[derive(Debug)]
struct Edge {
    from: Module,
    to: Module,
    example: String,
}

/// The module path of a source file below `root` (`proxy/hbone/mod.rs` → `proxy::hbone`).
fn module_of(root: &Path, file: &Path) -> Option<Module> {
    let rel = file.strip_prefix(root).ok()?.with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    Some(parts)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The source without comment lines and without a trailing `#[cfg(test)] mod tests` block.
fn code_of(src: &str) -> String {
    let src = match src.find("#[cfg(test)]\nmod tests") {
        Some(i) => &src[..i],
        None => src,
    };
    src.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| match l.find(" // ") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Every path starting with `crate`, `super` or `self` in `code`, use-groups expanded
/// (`use crate::{a::b, c}` → `crate::a::b`, `crate::c`). Each path is its segments.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    for head in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(head).map(|i| i + from) {
            from = i + head.len();
            if i > 0 && (is_ident(bytes[i - 1]) || bytes[i - 1] == b':') {
                continue;
            }
            let prefix = vec![head.trim_end_matches(':').to_string()];
            parse_path(code, i + head.len(), prefix, &mut out);
        }
    }
    out
}

/// Reads a path (or a use-group) at `at`, after `prefix`, into `out`; returns where it ended.
fn parse_path(
    code: &str,
    mut at: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let bytes = code.as_bytes();
    loop {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if at < bytes.len() && bytes[at] == b'{' {
            at += 1;
            loop {
                while at < bytes.len() && (bytes[at].is_ascii_whitespace() || bytes[at] == b',') {
                    at += 1;
                }
                if at >= bytes.len() || bytes[at] == b'}' {
                    return at + 1;
                }
                let before = at;
                at = parse_path(code, at, prefix.clone(), out);
                // Skip `as name` and anything else up to the next item.
                while at < bytes.len() && bytes[at] != b',' && bytes[at] != b'}' {
                    at += 1;
                }
                if at == before {
                    at += 1;
                }
            }
        }
        let start = at;
        while at < bytes.len() && is_ident(bytes[at]) {
            at += 1;
        }
        if at > start {
            prefix.push(code[start..at].to_string());
        }
        if code[at..].starts_with("::") && at > start {
            at += 2;
            continue;
        }
        out.push(prefix);
        return at;
    }
}

/// The module a path names: the longest prefix that is a module (items are dropped).
fn resolve(from: &Module, path: &[String], modules: &BTreeSet<Module>) -> Module {
    let mut target: Module = Vec::new();
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => rest = &path[1..],
        Some("self") => {
            target = from.clone();
            rest = &path[1..];
        }
        Some("super") => {
            target = from.clone();
            while rest.first().map(String::as_str) == Some("super") {
                target.pop();
                rest = &rest[1..];
            }
        }
        _ => {}
    }
    target.extend(rest.iter().cloned());
    while !target.is_empty() && !modules.contains(&target) {
        target.pop();
    }
    target
}

/// The sibling edges of the crate below `root`.
fn edges(root: &Path) -> Result<Vec<Edge>> {
    let mut files = Vec::new();
    rust_files(root, &mut files)?;
    files.sort();
    let mut sources = Vec::new();
    for f in &files {
        let Some(m) = module_of(root, f) else {
            continue;
        };
        if m.first().map(String::as_str) == Some("bin") || f.ends_with("tests.rs") {
            continue;
        }
        let src = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        sources.push((m, f.clone(), code_of(&src)));
    }
    let modules: BTreeSet<Module> = sources.iter().map(|(m, _, _)| m.clone()).collect();
    let mut out = Vec::new();
    for (m, file, code) in &sources {
        for path in paths_in(code) {
            let t = resolve(m, &path, &modules);
            let common = m.iter().zip(&t).take_while(|(a, b)| a == b).count();
            if common == m.len() || common == t.len() {
                continue; // a module and its ancestor or descendant
            }
            out.push(Edge {
                from: m[..=common].to_vec(),
                to: t[..=common].to_vec(),
                example: format!(
                    "{} uses {}",
                    file.strip_prefix(root).unwrap_or(file).display(),
                    path.join("::")
                ),
            });
        }
    }
    Ok(out)
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(next) = s.graph.get(v) {
            for w in next {
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.push(w.clone());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                s.out.push(scc);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// Checks the crate below `root`; the error lists every cycle with a reference per edge.
pub fn check(root: &Path) -> Result<BTreeMap<Module, BTreeSet<Module>>> {
    let edges = edges(root)?;
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for e in &edges {
        graph
            .entry(e.from.clone())
            .or_default()
            .insert(e.to.clone());
        graph.entry(e.to.clone()).or_default();
    }
    let found = cycles(&graph);
    if found.is_empty() {
        return Ok(graph);
    }
    let mut msg = String::new();
    for scc in &found {
        let names: Vec<String> = scc.iter().map(|m| m.join("::")).collect();
        msg.push_str(&format!("cycle: {}\n", names.join(" ↔ ")));
        for e in edges
            .iter()
            .filter(|e| scc.contains(&e.from) && scc.contains(&e.to))
        {
            msg.push_str(&format!(
                "  {} → {}: {}\n",
                e.from.join("::"),
                e.to.join("::"),
                e.example
            ));
        }
    }
    bail!(
        "{} import cycle(s) among sibling modules of {}:\n{msg}",
        found.len(),
        root.display()
    )
}

/// `cargo xtask layers`: check, then print each folder's children from the bottom layer up.
pub fn run() -> Result<()> {
    let root = crate::workspace_root().join("mesh-node/src");
    let graph = check(&root)?;
    let mut folders: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for m in graph.keys() {
        let parent = m[..m.len() - 1].to_vec();
        folders.entry(parent).or_default().insert(m.clone());
    }
    for (folder, children) in &folders {
        // Layer = longest chain of siblings below; layer 0 uses no sibling.
        let mut layer: BTreeMap<&Module, usize> = BTreeMap::new();
        let mut changed = true;
        while changed {
            changed = false;
            for c in children {
                let l = graph[c]
                    .iter()
                    .map(|d| layer.get(d).map_or(1, |l| l + 1))
                    .max()
                    .unwrap_or(0);
                if layer.get(c) != Some(&l) {
                    layer.insert(c, l);
                    changed = true;
                }
            }
        }
        let top = layer.values().copied().max().unwrap_or(0);
        let name = if folder.is_empty() {
            "mesh-node".to_string()
        } else {
            folder.join("::")
        };
        println!("{name}:");
        for l in 0..=top {
            let at: Vec<&str> = children
                .iter()
                .filter(|c| layer.get(c) == Some(&l))
                .filter_map(|c| c.last().map(String::as_str))
                .collect();
            if !at.is_empty() {
                println!("  {l}: {}", at.join(", "));
            }
        }
    }
    println!("no import cycles among sibling modules");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_groups_and_relative_paths_are_read() {
        let code =
            "use crate::{a::b, c::{d, e as f}};\nfn x() { super::super::g::h(); self::i::j(); }";
        let paths = paths_in(code);
        let has = |p: &[&str]| paths.iter().any(|q| q == p);
        assert!(has(&["crate", "a", "b"]), "{paths:?}");
        assert!(has(&["crate", "c", "d"]), "{paths:?}");
        assert!(has(&["crate", "c", "e"]), "{paths:?}");
        assert!(has(&["super", "super", "g", "h"]), "{paths:?}");
        assert!(has(&["self", "i", "j"]), "{paths:?}");
    }

    #[test]
    fn a_cycle_between_siblings_is_found_and_named() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("sidenode-layers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a"))?;
        std::fs::write(dir.join("lib.rs"), "pub mod a;\npub mod b;\n")?;
        std::fs::write(dir.join("a/mod.rs"), "pub mod x;\n")?;
        std::fs::write(dir.join("a/x.rs"), "use crate::b::Thing;\n")?;
        // The parent may be used by its children, and comments do not count.
        std::fs::write(dir.join("b.rs"), "// crate::a::x\nuse super::a;\n")?;
        let err = check(&dir).err().map(|e| format!("{e:#}"));
        std::fs::write(dir.join("b.rs"), "// crate::a::x\npub struct Thing;\n")?;
        let ok = check(&dir);
        std::fs::remove_dir_all(&dir)?;
        let err = err.context("the cycle a ↔ b was not found")?;
        assert!(err.contains("cycle: a ↔ b"), "{err}");
        assert!(err.contains("a/x.rs uses crate::b::Thing"), "{err}");
        ok.context("no cycle once b stops using a")?;
        Ok(())
    }

    #[test]
    fn mesh_node_modules_point_one_way() -> Result<()> {
        check(&crate::workspace_root().join("mesh-node/src")).map(|_| ())
    }
}
