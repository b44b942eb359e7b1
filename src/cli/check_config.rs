//! `keysync check-config [--config PATH]`: validate and print the effective
//! config. The API key is never part of the output; whether one is found is.

use std::path::Path;

use super::{EXIT_OK, EXIT_USAGE};
use crate::config::SourceKind;

pub fn main(config: &Path) -> u8 {
    let settings = match crate::config::load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keysync: {e}");
            return EXIT_USAGE;
        }
    };
    println!("# effective config from:");
    for file in &settings.files {
        println!("#   {}", file.display());
    }
    for (name, source) in &settings.sources {
        if let SourceKind::Vast { api_key, .. } = &source.kind {
            match crate::source::vast::resolve_api_key(api_key) {
                Ok(_) => println!("# source {name}: API key found (redacted)"),
                Err(e) => println!("# source {name}: WARNING: {e}"),
            }
        }
    }
    print!("{}", settings.to_redacted_toml());
    EXIT_OK
}
