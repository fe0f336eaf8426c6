//! The agent's modules import each other in one direction only: this reads
//! every file under agent/src, takes each `crate::<module>` path (in `use
//! crate::...` lines, `use crate::{a, b}` groups and inline paths alike) as
//! an edge from the file's top-level module to that module, and fails on a
//! cycle, naming it. Items of the crate root (`crate::Ctx`) are no module
//! and make no edge; a module's own submodules are part of it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The first path segment of each item of a `{...}` group starting at
/// `s[0] == '{'`, at the group's top level only.
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let (mut depth, mut at_item, mut cur) = (0, true, String::new());
    for ch in s.chars() {
        match ch {
            '{' => {
                depth += 1;
                at_item = depth == 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => {
                if !cur.is_empty() {
                    heads.push(std::mem::take(&mut cur));
                }
                at_item = true;
            }
            c if depth == 1 && at_item && (c.is_alphanumeric() || c == '_') => cur.push(c),
            _ if depth == 1 && at_item && !cur.is_empty() => {
                heads.push(std::mem::take(&mut cur));
                at_item = false;
            }
            _ => {}
        }
    }
    if !cur.is_empty() {
        heads.push(cur);
    }
    heads
}

/// The modules a file's text names through `crate::`.
fn targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if rest.starts_with('{') {
            out.extend(group_heads(rest));
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.push(name);
        }
    }
    out
}

fn agent_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let top = |p: &Path| {
        let rel = p.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
        first.trim_end_matches(".rs").to_string()
    };
    let modules: BTreeSet<String> = files.iter().map(|p| top(p)).filter(|m| m != "lib" && m != "main").collect();
    let mut g = Graph::new();
    for f in &files {
        let from = top(f);
        if !modules.contains(&from) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let edges = g.entry(from.clone()).or_default();
        for t in targets(&text) {
            if t != from && modules.contains(&t) {
                edges.insert(t);
            }
        }
    }
    g
}

/// A cycle in `g`, as the path of modules around it, if there is one.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(n: &str, g: &Graph, marks: &mut BTreeMap<String, Mark>, path: &mut Vec<String>) -> Option<Vec<String>> {
        marks.insert(n.to_string(), Mark::Open);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match marks.get(m.as_str()).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let start = path.iter().position(|p| p == m).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(m, g, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(n.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in g.keys() {
        if marks.get(n.as_str()).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(n, g, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn agent_modules_import_each_other_without_a_cycle() {
    let g = agent_graph();
    // The graph is really read: the lifecycle edges are there.
    for (from, to) in
        [("admit", "registry"), ("life", "spawn"), ("life", "reap"), ("warm", "life"), ("listen", "admit")]
    {
        assert!(g.get(from).is_some_and(|e| e.contains(to)), "expected edge {from} -> {to} in {g:#?}");
    }
    if let Some(cycle) = find_cycle(&g) {
        panic!("agent/src has an import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_reader_sees_groups_inline_paths_and_cycles() {
    let text = "use crate::{listen, recover::sweep, sys::{a, b}, Ctx};\nuse crate::admit::Client;\nlet x = crate::warm::refill(&c);";
    assert_eq!(targets(text), vec!["listen", "recover", "sys", "Ctx", "admit", "warm"]);
    let mut g = Graph::new();
    for (a, b) in [("admit", "spawn"), ("spawn", "reap"), ("reap", "admit"), ("listen", "admit")] {
        g.entry(a.into()).or_default().insert(b.into());
    }
    let c = find_cycle(&g).expect("a cycle is found");
    assert_eq!(c.first(), c.last());
    assert_eq!(c.len(), 4, "{c:?}");
    g.get_mut("reap").unwrap().clear();
    assert_eq!(find_cycle(&g), None);
}
