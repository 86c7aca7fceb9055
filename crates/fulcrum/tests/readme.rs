//! The README's configuration reference is a valid configuration: every key it documents
//! exists (unknown keys are refused) with a value of the documented form.

use std::path::Path;

/// Every ```toml block of the README's "Configuration reference" section, joined.
fn reference_config() -> String {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("## Configuration reference")
        .expect("README has a Configuration reference section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut config = String::new();
    let mut blocks = section.split("```toml\n").skip(1);
    for block in blocks.by_ref() {
        let (toml, _) = block.split_once("```").expect("closed toml block");
        config.push_str(toml);
        config.push('\n');
    }
    config
}

#[test]
fn readme_configuration_reference_parses() {
    let text = reference_config();
    assert!(text.contains("[pools.app]"), "{text}");
    if let Err(error) = fulcrum::config::Config::parse(&text, Path::new("README.md")) {
        panic!("README configuration reference: {error}\n{text}");
    }
}
