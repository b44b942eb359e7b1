//! Fuzzes keys::parse_entry and Key::line; the properties are in fuzz/props.rs,
//! shared with tests/it/fuzz_replay.rs.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../props.rs"]
mod props;

fuzz_target!(|data: &[u8]| props::check_parse_entry(data));
