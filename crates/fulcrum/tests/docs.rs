//! The documentation holds together: the configuration reference (`docs/configuration.md`) is
//! a valid configuration (every key it documents exists, unknown keys being refused, with a
//! value of the documented form), and every relative link of README.md, docs/*.md and
//! bench/RESULTS.md names a file inside the repository.

use std::fs;
use std::path::{Component, Path, PathBuf};

/// Every ```toml block of `docs/configuration.md`, joined: the whole page is the reference.
fn reference_config() -> String {
    let page = include_str!("../../../docs/configuration.md");
    let mut config = String::new();
    let mut blocks = page.split("```toml\n").skip(1);
    for block in blocks.by_ref() {
        let (toml, _) = block.split_once("```").expect("closed toml block");
        config.push_str(toml);
        config.push('\n');
    }
    config
}

#[test]
fn configuration_reference_parses() {
    let text = reference_config();
    assert!(text.contains("[pools.app]"), "{text}");
    if let Err(error) = fulcrum::config::Config::parse(&text, Path::new("docs/configuration.md")) {
        panic!("docs/configuration.md: {error}\n{text}");
    }
}

/// The repository root: `crates/fulcrum/../..`.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// The Markdown pages whose links are checked: README.md, docs/*.md and bench/RESULTS.md.
fn pages(root: &Path) -> Vec<PathBuf> {
    let mut pages = vec![root.join("README.md"), root.join("bench/RESULTS.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("docs/ directory")
        .map(|entry| entry.expect("docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The targets of the inline links (`[text](target)`, images too) of a Markdown text, outside
/// fenced code blocks and code spans.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop code spans: the text between pairs of backticks.
        let prose: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, part)| part)
            .collect();
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let end = rest.find([')', ' ']).unwrap_or(rest.len());
            targets.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    targets
}

/// What is wrong with the link `target` written on `page` (`None` when it is fine): relative
/// links must name an existing file or directory inside the repository.
fn check_link(root: &Path, page: &Path, target: &str) -> Option<String> {
    if target.starts_with("http://") || target.starts_with("https://") || target.starts_with('#') {
        return None;
    }
    let file = target.split('#').next().unwrap_or(target);
    if file.is_empty() {
        return Some("empty link".to_string());
    }
    if file.contains(':') || Path::new(file).is_absolute() {
        return Some("not a relative path inside the repository".to_string());
    }
    // Resolve lexically first, so `..` past the root is caught even when the target exists.
    let mut resolved = page.parent().expect("page directory").to_path_buf();
    for component in Path::new(file).components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(part) => resolved.push(part),
            _ => return Some("not a relative path inside the repository".to_string()),
        }
    }
    if !resolved.starts_with(root) {
        return Some("leaves the repository".to_string());
    }
    match resolved.canonicalize() {
        Ok(real) if real.starts_with(root) => None,
        Ok(_) => Some("leaves the repository (through a symbolic link)".to_string()),
        Err(_) => Some("no such file in the repository".to_string()),
    }
}

#[test]
fn documentation_links_point_into_the_repository() {
    let root = repo_root();
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages(&root) {
        let text =
            fs::read_to_string(&page).unwrap_or_else(|error| panic!("{}: {error}", page.display()));
        for target in link_targets(&text) {
            checked += 1;
            if let Some(problem) = check_link(&root, &page, &target) {
                let name = page.strip_prefix(&root).unwrap_or(&page).display();
                problems.push(format!("{name}: ({target}): {problem}"));
            }
        }
    }
    assert!(
        checked >= 20,
        "only {checked} links found: is the parser broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn link_check_catches_bad_links() {
    let root = repo_root();
    let page = root.join("docs/architecture.md");
    let text = "[a](../README.md) [b](configuration.md#server) [c](#layers) \
                [d](https://example.com) `[e](missing.md)` [f](missing.md) \
                [g](../../shared/DESIGN.md) [h](/etc/hosts) ![i](../../outside.png)";
    let targets = link_targets(text);
    assert_eq!(
        targets,
        [
            "../README.md",
            "configuration.md#server",
            "#layers",
            "https://example.com",
            "missing.md",
            "../../shared/DESIGN.md",
            "/etc/hosts",
            "../../outside.png",
        ]
    );
    let bad: Vec<&str> = targets
        .iter()
        .filter(|target| check_link(&root, &page, target).is_some())
        .map(String::as_str)
        .collect();
    assert_eq!(
        bad,
        [
            "missing.md",
            "../../shared/DESIGN.md",
            "/etc/hosts",
            "../../outside.png"
        ]
    );
}
