//! The `keysync` binary, the whole agent: parse the command line and call
//! into the library. Packages install it as /usr/libexec/keysync/keysync,
//! behind the front binary (src/cli/entry.rs); alone, as /usr/bin/keysync,
//! it does everything too.

// C's `main` (src/cli/entry.rs says why). `cargo test` builds this file as
// a test harness, which brings its own `main`: there the C entry point must
// not exist (no tests live here).
#![cfg_attr(not(test), no_main)]
#![cfg(not(test))]

use std::ffi::{OsString, c_char, c_int};
use std::io::Write;

use clap::Parser;
use keysync::cli::{self, authorized_keys, entry};

#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    entry::c_main(run)
}

fn run() -> u8 {
    entry::std_setup();
    // On glibc std captures the arguments itself (.init_array), runtime or not.
    let args: Vec<OsString> = std::env::args_os().collect();
    // The login path: skip clap when the arguments are the plain ones sshd passes.
    if args.get(1).is_some_and(|a| a == "authorized-keys")
        && let Some(hook) = authorized_keys::fast_args(&args[2..])
    {
        let fpr = hook.fingerprint.as_deref();
        return authorized_keys::main(&hook.state_dir, hook.socket(), &hook.user, fpr);
    }
    let code = cli::dispatch(cli::Cli::parse_from(args));
    // std's runtime would flush at exit; C's exit does not know Rust's buffer.
    let _ = std::io::stdout().flush();
    code
}
