//! The `keysync` binary: parse the command line and call into the library.
//!
//! `no_main`: sshd runs `keysync authorized-keys` on every login, and it
//! must cost about what `cat` of the cache costs (DESIGN.md §9,
//! `bench/hook.sh`). std's set-up before a Rust `main` (reading
//! `/proc/self/maps` for the main thread's stack guard, an alternate signal
//! stack) costs about a quarter of a whole `cat`. So the entry point is C's
//! `main`, and it does by hand the parts of that set-up that matter here:
//! fds 0-2 are open (so no file we open lands on stdout or stderr), SIGPIPE
//! is ignored (a closed pipe is an EPIPE error, not a silent death), and
//! stdout is flushed at the end. What is lost is the "has overflowed its
//! stack" message before a stack overflow's SIGSEGV.

// `cargo test` builds this file as a test harness, which brings its own
// `main`: there the C entry point must not exist (no tests live here).
#![cfg_attr(not(test), no_main)]
#![cfg(not(test))]

use std::ffi::{OsString, c_char, c_int};
use std::io::Write;

use clap::Parser;
use keysync::cli::{self, authorized_keys};

/// What std's runtime returns when `main` panics.
const EXIT_PANIC: c_int = 101;

#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    // A panic must not unwind into C (debug builds unwind; release aborts).
    std::panic::catch_unwind(run).unwrap_or(EXIT_PANIC)
}

fn run() -> c_int {
    std_setup();
    // On glibc std captures the arguments itself (.init_array), runtime or not.
    let args: Vec<OsString> = std::env::args_os().collect();
    // The login path: skip clap when the arguments are the plain ones sshd passes.
    if args.get(1).is_some_and(|a| a == "authorized-keys")
        && let Some(hook) = authorized_keys::fast_args(&args[2..])
    {
        let socket = hook.socket.as_deref();
        let socket = socket.unwrap_or(std::path::Path::new(authorized_keys::DEFAULT_SOCKET));
        let fpr = hook.fingerprint.as_deref();
        return c_int::from(authorized_keys::main(
            &hook.state_dir,
            socket,
            &hook.user,
            fpr,
        ));
    }
    let code = cli::dispatch(cli::Cli::parse_from(args));
    // std's runtime would flush at exit; C's exit does not know Rust's buffer.
    let _ = std::io::stdout().flush();
    c_int::from(code)
}

/// The part of std's runtime set-up keysync relies on.
fn std_setup() {
    use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
    use nix::sys::signal::{SigHandler, Signal, signal};
    use nix::sys::stat::Mode;
    for fd in 0..=2 {
        if fcntl(fd, FcntlArg::F_GETFD) == Err(nix::errno::Errno::EBADF) {
            // open takes the lowest free fd: this one. Kept open for good.
            let _ = open("/dev/null", OFlag::O_RDWR, Mode::empty());
        }
    }
    // SAFETY: no other thread exists yet, and SIG_IGN runs no code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
}
