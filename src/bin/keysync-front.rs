//! `keysync-front`, installed by the packages as `/usr/bin/keysync`: the
//! small binary sshd runs for every offered key, which answers from the
//! cache itself and hands every other command to the agent binary
//! (src/cli/entry.rs).

#![cfg_attr(not(test), no_main)]
#![cfg(not(test))]

use std::ffi::{c_char, c_int};

#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    keysync::cli::entry::c_main(keysync::cli::entry::front)
}
