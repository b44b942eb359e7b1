//! Fuzzes format::parse_list and format::says_no_ssh_keys; the properties are in fuzz/props.rs,
//! shared with tests/it/fuzz_replay.rs.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../props.rs"]
mod props;

fuzz_target!(|data: &[u8]| props::check_vast(data));
