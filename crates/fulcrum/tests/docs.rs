//! The configuration reference (`docs/configuration.md`) is a valid configuration: every key
//! it documents exists (unknown keys are refused) with a value of the documented form.

use std::path::Path;

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
