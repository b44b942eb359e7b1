//! What the two binaries do before and around the command line.
//!
//! `keysync` (src/main.rs) is the whole agent. `keysync-front`
//! (src/bin/keysync-front.rs) is what the packages install as
//! `/usr/bin/keysync`: sshd runs `keysync authorized-keys` for every key a
//! client offers, and that must cost about what `cat` of the cache costs
//! (DESIGN.md §9, `bench/hook.sh`). Most of a big binary's start-up is the
//! dynamic loader relocating it, so the front is small: it answers from the
//! cache and its fingerprint index itself (a key the index does not hold
//! included: it asks the agent for a refresh and looks again), and `exec`s
//! the agent binary, same process, same arguments, for everything else:
//! every other command, and a cache whose index is stale or missing, which
//! only the agent binary's key parser can search. The agent binary on its
//! own still does all of it, only slower at the hook.
//!
//! Both entry points are C's `main` (`no_main`): std's set-up before a Rust
//! `main` (reading `/proc/self/maps` for the main thread's stack guard, an
//! alternate signal stack) costs about a quarter of a whole `cat`.
//! [`std_setup`] does by hand the parts that matter here. What is lost is
//! the "has overflowed its stack" message before a stack overflow's SIGSEGV.

use std::ffi::{OsString, c_int};
use std::io::{self, ErrorKind};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use super::EXIT_FAILED;
use super::authorized_keys;

/// What std's runtime returns when `main` panics.
const EXIT_PANIC: c_int = 101;

/// Where the packages install the agent binary, under the prefix of the
/// front's own directory (`/usr/bin` -> `/usr`).
const PACKAGED_AGENT: &str = "libexec/keysync/keysync";

/// The body of a binary's C `main`: `run` with std's essentials set up, and
/// a panic turned into std's exit code (a panic must not unwind into C;
/// debug builds unwind, release builds abort).
pub fn c_main(run: fn() -> u8) -> c_int {
    std::panic::catch_unwind(|| c_int::from(run())).unwrap_or(EXIT_PANIC)
}

/// The part of std's runtime set-up keysync relies on: fds 0-2 are open (so
/// no file we open lands on stdout or stderr), and SIGPIPE is ignored (a
/// closed pipe is an EPIPE error, not a silent death).
pub fn std_setup() {
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

/// The front binary: the hook's cached answers here, the rest by the agent
/// binary.
pub fn front() -> u8 {
    // On glibc std captures the arguments itself (.init_array), runtime or not.
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "authorized-keys")
        && let Some(hook) = authorized_keys::fast_args(&args[2..])
    {
        std_setup();
        if let Some(code) = authorized_keys::answer_from_cache(&hook) {
            return code;
        }
        let err = exec_agent(&args);
        // The hook never fails a login for its own trouble. The whole
        // cache is a right answer for any key (sshd matches the offered key
        // against every line), only not a refresh for one it lacks.
        eprintln!(
            "keysync authorized-keys: the cache's fingerprint index is stale or missing, and {err}; printing the whole cache"
        );
        return authorized_keys::print_all(&hook.state_dir, &hook.user);
    }
    let err = exec_agent(&args);
    eprintln!("keysync: {err}");
    EXIT_FAILED
}

/// Replaces this process with the agent binary, with the same arguments
/// (argv[0] included, so messages name the command as it was typed).
/// Returns only on failure.
fn exec_agent(args: &[OsString]) -> io::Error {
    let agent = match std::env::current_exe().and_then(|me| agent_binary(&me)) {
        Ok(agent) => agent,
        Err(e) => return e,
    };
    let mut command = std::process::Command::new(&agent);
    if let Some(arg0) = args.first() {
        command.arg0(arg0);
    }
    let e = command.args(args.iter().skip(1)).exec();
    io::Error::new(e.kind(), format!("cannot run {}: {e}", agent.display()))
}

/// The agent binary for the front binary at `me`: `PREFIX/libexec/keysync/
/// keysync` where the packages put it (`me` in `PREFIX/bin`), else a
/// `keysync` beside `me` that is not `me` itself (cargo's target directory).
pub fn agent_binary(me: &Path) -> io::Result<PathBuf> {
    let dir = me.parent().unwrap_or(Path::new("/"));
    let packaged = dir.parent().map(|prefix| prefix.join(PACKAGED_AGENT));
    if let Some(packaged) = packaged.as_ref().filter(|p| p.is_file()) {
        return Ok(packaged.clone());
    }
    let beside = dir.join("keysync");
    if beside.is_file() && !same_file(&beside, me) {
        return Ok(beside);
    }
    let looked = match packaged {
        Some(packaged) => format!("{} or {}", packaged.display(), beside.display()),
        None => beside.display().to_string(),
    };
    Err(io::Error::new(
        ErrorKind::NotFound,
        format!(
            "the agent binary is not installed: {} is the front binary, which runs {looked} for this command",
            me.display()
        ),
    ))
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn the_agent_binary_is_the_packaged_one_else_the_one_beside() {
        let root = tempfile::tempdir().unwrap();
        let me = root.path().join("usr/bin/keysync");
        file(&me);
        // Only the front: no agent binary, and the front is never its own.
        let err = agent_binary(&me).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().contains("libexec/keysync/keysync"), "{err}");

        let packaged = root.path().join("usr/libexec/keysync/keysync");
        file(&packaged);
        assert_eq!(agent_binary(&me).unwrap(), packaged);

        // cargo's layout: keysync-front beside keysync.
        let me = root.path().join("target/release/keysync-front");
        file(&me);
        assert!(agent_binary(&me).is_err());
        let beside = root.path().join("target/release/keysync");
        file(&beside);
        assert_eq!(agent_binary(&me).unwrap(), beside);
    }
}
