//! The crate's layers (listed in `src/lib.rs`): every module imports only from the layers
//! before its own. A `crate::` path in code that names a later layer, or a peer of the same
//! layer, fails this test with the file and line.

use std::path::{Path, PathBuf};

/// The layers in order; modules on one line are peers and do not import each other.
const LAYERS: &[&[&str]] = &[
    &["runtime"],
    &["config"],
    &["wire"],
    &["upstream"],
    &["pool"],
    &["health", "discovery"],
    &["manager", "autoscale"],
    &["proxy"],
    &["listener"],
    &["server"],
    &["control"],
    &["cli"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a line of code names through `crate::` (in paths and in
/// `use crate::{a::…, b::…}` groups).
fn named_modules(line: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let group = rest.strip_prefix('{');
        let text = group.unwrap_or(rest);
        let mut parts = vec![text];
        if group.is_some() {
            let end = text.find('}').unwrap_or(text.len());
            parts = text[..end].split(',').map(str::trim).collect();
        }
        for part in parts {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

#[test]
fn no_layer_imports_a_later_one() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut checked = 0;
    let mut violations = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str();
        let top = top.to_str().unwrap().trim_end_matches(".rs");
        if top == "lib" || top == "main" {
            continue;
        }
        let own = rank(top).unwrap_or_else(|| {
            panic!(
                "src/{} is in no layer: add `{top}` to LAYERS and lib.rs",
                relative.display()
            )
        });
        let text = std::fs::read_to_string(file).unwrap();
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for name in named_modules(code) {
                checked += 1;
                let Some(theirs) = rank(&name) else { continue };
                if name != top && theirs >= own {
                    violations.push(format!(
                        "src/{}:{}: layer `{top}` imports `{name}`, which is not before it",
                        relative.display(),
                        number + 1
                    ));
                }
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} crate:: paths found: is the scan broken?"
    );
    assert!(violations.is_empty(), "\n{}", violations.join("\n"));
}

#[test]
fn the_scan_sees_paths_and_groups() {
    assert_eq!(named_modules("use crate::pool::Backend;"), ["pool"]);
    assert_eq!(
        named_modules("use crate::{config::Config, runtime::clock};"),
        ["config", "runtime"]
    );
    assert_eq!(
        named_modules("let x = crate::proxy::http::f(crate::wire::g());"),
        ["proxy", "wire"]
    );
}

#[test]
fn lib_lists_every_layer_in_order() {
    let lib = include_str!("../src/lib.rs");
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    let ranks: Vec<usize> = declared
        .iter()
        .map(|m| rank(m).unwrap_or_else(|| panic!("lib.rs declares `{m}`, in no layer")))
        .collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{declared:?}");
    let all: usize = LAYERS.iter().map(|l| l.len()).sum();
    assert_eq!(declared.len(), all, "{declared:?}");
}
