//! Replays every committed fuzz seed and regression (`fuzz/corpus-seed/<target>/*`)
//! through the same property code the fuzz targets run (`fuzz/props.rs`), on
//! stable Rust: CI checks the fuzzers' findings stay fixed without fuzzing.
//! A new finding is added by copying its minimized input into the target's
//! directory (see docs/security.md).

#[path = "../../fuzz/props.rs"]
mod props;

use std::path::{Path, PathBuf};

/// The seed files of one target, sorted; fails when there are none, so a
/// moved or emptied corpus cannot make this test pass vacuously.
fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus-seed")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
}

/// Runs `check` on every seed of `target`; reports every failing file, not
/// just the first.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let files = seeds(target);
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{}: {why}", file.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "{} seed(s) fail:\n{}",
        failed.len(),
        failed.join("\n")
    );
    files.len()
}

#[test]
fn parse_entry_seeds_hold_the_key_properties() {
    let n = replay("parse_entry", props::check_parse_entry);
    eprintln!("parse_entry: {n} seeds replayed");
}

#[test]
fn vast_list_seeds_hold_the_list_properties() {
    let n = replay("vast_list", props::check_vast);
    eprintln!("vast_list: {n} seeds replayed");
}

#[test]
fn merge_block_seeds_hold_the_block_properties() {
    let n = replay("merge_block", props::check_merge_block);
    eprintln!("merge_block: {n} seeds replayed");
}

/// The properties are not vacuous: inputs that break them are caught.
#[test]
fn the_properties_catch_what_they_claim_to() {
    // A body whose entries differ from what the JSON says fails the oracle:
    // checked by feeding the oracle a hand-made mismatch.
    let value: serde_json::Value =
        serde_json::from_str(r#"[{"key":"a"},{"key":"b","deleted_at":"x"}]"#).expect("json");
    assert_eq!(props::expected_entries(&value), Some(vec!["a".to_string()]));
    let unreadable: serde_json::Value =
        serde_json::from_str(r#"[{"key":"a"},{"id":1}]"#).expect("json");
    assert_eq!(props::expected_entries(&unreadable), None);
    // An injected newline in an accepted key would fail check_parse_entry; the
    // seed with one passes only because parse_entry refuses it.
    let alice = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi alice@laptop";
    let injected = format!("{alice}\n{alice}");
    assert!(keysync::keys::parse_entry(&injected, &keysync::keys::Policy::default()).is_err());
}
