//! `keysync authorized-keys [--state-dir DIR] [--socket PATH] USER [FPR]`:
//! sshd's AuthorizedKeysCommand. It reads no config and needs no API key: a
//! login costs about what `cat` of the cache costs (DESIGN.md §9,
//! `bench/hook.sh`).
//!
//! Without FPR it prints the cache. With FPR it prints that key's line,
//! found through the fingerprint index beside the cache
//! (src/cache_index.rs; the whole cache is read only when the index is
//! stale or missing). A key that is not in the cache may have been saved
//! on the account a moment ago: then, and only then, the hook asks the
//! running agent for a refresh (`POST /refresh` on its health socket), waits
//! at most 2 s in all, and looks again. No agent, a refused, slow or odd
//! answer: it prints what the cache holds. It never fails a login for that.
//!
//! An unknown user or a missing cache prints nothing and exits 0 (and asks
//! for nothing: the agent does not manage that user). The cache is replaced
//! by rename, so a read sees the old or the new file, never a mix.

use std::fs::{File, Metadata};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{EXIT_FAILED, EXIT_OK};
use crate::cache_index::{self, Lookup};
use crate::keys::{DEFAULT_ALGORITHMS, Policy, parse_entry};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/keysync";
/// The agent's health socket, where a refresh is asked for.
pub const DEFAULT_SOCKET: &str = "/run/keysync/health.sock";

/// The whole wait for a refresh: connect, request and answer (DESIGN.md §3).
const REFRESH_WITHIN: Duration = Duration::from_secs(2);

/// At most this many bytes per read and write: 64 KiB fills a pipe (sshd
/// reads one) in one write.
const CHUNK: usize = 64 * 1024;

/// The hook's arguments.
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub state_dir: PathBuf,
    /// None: [`DEFAULT_SOCKET`].
    pub socket: Option<PathBuf>,
    pub user: String,
    pub fingerprint: Option<String>,
}

impl Args {
    /// The health socket to ask for a refresh.
    pub fn socket(&self) -> &Path {
        self.socket.as_deref().unwrap_or(Path::new(DEFAULT_SOCKET))
    }
}

pub fn main(state_dir: &Path, socket: &Path, user: &str, fingerprint: Option<&str>) -> u8 {
    // Parse never defers.
    answer(state_dir, socket, user, fingerprint, Unindexed::Parse).unwrap_or(EXIT_OK)
}

/// The hook as the front binary (src/cli/entry.rs) answers it: everything
/// but parsing the cache, which needs this binary's key parser. None when
/// the index beside the cache is stale or missing, so only a parse of the
/// cache can find the key.
pub fn answer_from_cache(args: &Args) -> Option<u8> {
    let fpr = args.fingerprint.as_deref();
    answer(
        &args.state_dir,
        args.socket(),
        &args.user,
        fpr,
        Unindexed::Defer,
    )
}

/// What a lookup does when the index cannot say.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unindexed {
    /// Read and parse the whole cache.
    Parse,
    /// Leave it to the caller (the answer is None).
    Defer,
}

/// The hook's exit code, having printed its answer; None only when
/// `unindexed` is Defer and the index could not say.
fn answer(
    state_dir: &Path,
    socket: &Path,
    user: &str,
    fingerprint: Option<&str>,
    unindexed: Unindexed,
) -> Option<u8> {
    if !user_ok(user) {
        return Some(EXIT_OK);
    }
    let path = crate::state::cache_path(state_dir, user);
    let result = match fingerprint {
        None => print_cache(&path),
        Some(fpr) => match print_key(state_dir, socket, user, fpr, unindexed) {
            Ok(None) => return None,
            Ok(Some(())) => Ok(()),
            Err(e) => Err(e),
        },
    };
    Some(outcome(result, &path))
}

/// Prints the whole cache of `user`: the answer for any key when its line
/// cannot be found (sshd checks the offered key against every line).
pub fn print_all(state_dir: &Path, user: &str) -> u8 {
    // Without a fingerprint no socket is asked.
    main(state_dir, Path::new(DEFAULT_SOCKET), user, None)
}

/// sshd's `%u` is a user name: one that could leave the cache directory
/// names no cache.
fn user_ok(user: &str) -> bool {
    !(user.is_empty() || user.contains('/') || user.starts_with('.'))
}

/// The exit code for the hook's `result`; an error is reported with the
/// cache's `path`.
fn outcome(result: std::io::Result<()>, path: &Path) -> u8 {
    match result {
        Ok(()) => EXIT_OK,
        // sshd closing the pipe early is not our failure.
        Err(e) if e.kind() == ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            eprintln!("keysync authorized-keys: {}: {e}", path.display());
            EXIT_FAILED
        }
    }
}

/// fd 1, not through std's `Stdout`: that is a `LineWriter`, which splits
/// every chunk at its last newline (two writes per chunk). A dup of it,
/// which needs no `unsafe`.
fn stdout() -> std::io::Result<File> {
    Ok(File::from(std::io::stdout().as_fd().try_clone_to_owned()?))
}

/// Copies the whole cache to stdout, like `cat`: whole chunks straight to
/// fd 1 (not `io::copy`, which into a pipe falls back to 8 KiB chunks).
fn print_cache(path: &Path) -> std::io::Result<()> {
    // One open: everything below reads that inode, so a cache renamed over
    // meanwhile is printed whole, old or new.
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if no_such_cache(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut out = stdout()?;
    // Sized to the file, up to CHUNK: the buffer is zeroed, so each of its
    // pages costs a fault, and a 64 KiB buffer for a 1 KiB cache would add
    // 15 needless ones to a run of about 100. The loop reads to the end
    // whatever the size said.
    let size = file.metadata()?.len();
    let mut buf = vec![0u8; usize::try_from(size).map_or(CHUNK, |s| s.clamp(1, CHUNK))];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => out.write_all(&buf[..n])?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What the cache holds for one fingerprint.
enum Found {
    /// No cache: a user the agent does not manage (or not yet).
    NoCache,
    Absent,
    /// The key's line(s), newline included.
    Lines(Vec<u8>),
}

/// Prints the line of the key with fingerprint `fpr`; asks the agent for a
/// refresh first when the cache does not hold it. Ok(None): deferred (see
/// [`Unindexed`]), nothing printed.
fn print_key(
    state_dir: &Path,
    socket: &Path,
    user: &str,
    fpr: &str,
    unindexed: Unindexed,
) -> std::io::Result<Option<()>> {
    // sshd passes SHA256 fingerprints (its default FingerprintHash); for
    // anything else no cached key matches, and a refresh would not help.
    let Some(wanted) = cache_index::sha256_part(fpr) else {
        return Ok(Some(()));
    };
    let lines = match find(state_dir, user, fpr, wanted, unindexed)? {
        None => return Ok(None),
        Some(Found::Lines(lines)) => lines,
        Some(Found::NoCache) => return Ok(Some(())),
        Some(Found::Absent) => {
            if let Err(why) = ask_refresh(socket, REFRESH_WITHIN) {
                eprintln!(
                    "keysync authorized-keys: key {fpr} is not in the cache of {user}, and no refresh: {why}; printing what the cache holds"
                );
            }
            // Whatever the agent answered (or not), the cache decides.
            match find(state_dir, user, fpr, wanted, unindexed)? {
                None => return Ok(None),
                Some(Found::Lines(lines)) => lines,
                Some(Found::NoCache | Found::Absent) => return Ok(Some(())),
            }
        }
    };
    stdout()?.write_all(&lines).map(Some)
}

/// Looks `fpr` up in USER's cache: through the index when it describes the
/// cache that is there, else as `unindexed` says (None: deferred).
fn find(
    state_dir: &Path,
    user: &str,
    fpr: &str,
    wanted: &[u8],
    unindexed: Unindexed,
) -> std::io::Result<Option<Found>> {
    let Some((mut cache, meta)) = open_cache(state_dir, user)? else {
        return Ok(Some(Found::NoCache));
    };
    if let Some(found) = indexed(state_dir, user, &cache, &meta, wanted) {
        return Ok(Some(found));
    }
    if unindexed == Unindexed::Defer {
        return Ok(None);
    }
    let mut content = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    cache.read_to_end(&mut content)?;
    let lines = filter(&content, fpr);
    Ok(Some(if lines.is_empty() {
        Found::Absent
    } else {
        Found::Lines(lines)
    }))
}

/// USER's cache, opened once (everything after reads that inode), and its
/// metadata; None when there is none.
fn open_cache(state_dir: &Path, user: &str) -> std::io::Result<Option<(File, Metadata)>> {
    match File::open(crate::state::cache_path(state_dir, user)) {
        Ok(cache) => {
            let meta = cache.metadata()?;
            Ok(Some((cache, meta)))
        }
        Err(e) if no_such_cache(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether opening a cache failed because there is no such cache: none
/// was written, or the user's name is too long for a file name (no user
/// the agent manages has one; DESIGN.md §3: nothing printed, exit 0).
fn no_such_cache(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidFilename)
}

/// What the index beside `cache` says about `wanted`; None when there is no
/// index of that cache.
fn indexed(
    state_dir: &Path,
    user: &str,
    cache: &File,
    meta: &Metadata,
    wanted: &[u8],
) -> Option<Found> {
    let index = File::open(crate::state::index_path(state_dir, user)).ok()?;
    // Not parsed again: the line comes from the cache that was opened, so
    // it is a key the agent grants, and sshd itself checks that the key it
    // was offered is the one printed.
    match cache_index::lookup(&index, cache, meta, wanted) {
        Lookup::Absent => Some(Found::Absent),
        Lookup::Line(line) => Some(Found::Lines(line)),
        Lookup::Unusable => None,
    }
}

/// The lines of `content` whose key has the SHA256 fingerprint `fpr`.
pub fn filter(content: &[u8], fpr: &str) -> Vec<u8> {
    let policy = Policy {
        min_rsa_bits: 0,
        allowed_algorithms: DEFAULT_ALGORITHMS.iter().map(|s| s.to_string()).collect(),
        allow_source_options: true,
    };
    let mut out = Vec::new();
    for line in content.split(|&b| b == b'\n') {
        let Ok(text) = std::str::from_utf8(line) else {
            continue;
        };
        if parse_entry(text, &policy).is_ok_and(|k| k.fingerprint == fpr) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out
}

/// The request, written by hand: the hook must start instantly, and this is
/// all of HTTP/1.1 it needs.
const REFRESH_REQUEST: &[u8] =
    b"POST /refresh HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Asks the agent at `socket` for a refresh and waits for its answer, at
/// most `within` in all. Ok once the agent answered 200 (the refresh is
/// written) or 429 (one ran a moment ago); the error says why not.
pub fn ask_refresh(socket: &Path, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut stream = connect(socket, within)
        .map_err(|e| format!("cannot reach the agent at {}: {e}", socket.display()))?;
    let left = |deadline: Instant| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("the agent did not answer within {within:?}"))
    };
    stream
        .set_write_timeout(Some(left(deadline)?))
        .and_then(|()| stream.write_all(REFRESH_REQUEST))
        .map_err(|e| format!("cannot send the request: {e}"))?;
    // Only the status line matters; the agent sends the answer when the
    // refresh is written.
    let mut answer = [0u8; 512];
    let mut len = 0;
    while !answer[..len].windows(2).any(|w| w == b"\r\n") {
        if len == answer.len() {
            return Err("the agent's answer has no status line".into());
        }
        stream
            .set_read_timeout(Some(left(deadline)?))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut answer[len..]) {
            Ok(0) => return Err("the agent closed the connection without an answer".into()),
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("the agent did not answer within {within:?}"));
            }
            Err(e) => return Err(format!("reading the answer failed: {e}")),
        }
    }
    let status = answer[..len]
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| rest.get(..3));
    match status {
        Some(b"200") | Some(b"429") => Ok(()),
        Some(code) => Err(format!(
            "the agent answered {}",
            String::from_utf8_lossy(code)
        )),
        None => Err("the agent's answer is not HTTP/1.1".into()),
    }
}

/// Connects to a Unix socket, giving up after `within` when its backlog is
/// full (std's `connect` would wait for as long as that lasts).
fn connect(socket: &Path, within: Duration) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
    use nix::sys::time::TimeVal;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Linux bounds a blocking connect of a Unix socket by its send timeout.
    let timeout = TimeVal::new(
        i64::try_from(within.as_secs()).unwrap_or(i64::MAX),
        i64::from(within.subsec_micros()),
    );
    socket::setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    let addr = UnixAddr::new(socket)?;
    use std::os::fd::AsRawFd;
    socket::connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

/// Parses `authorized-keys` arguments without clap: this is the login path,
/// so it does as little as possible. Returns None to fall back to clap
/// (help, or anything unusual) for a proper message.
pub fn fast_args(args: &[std::ffi::OsString]) -> Option<Args> {
    let mut state_dir = PathBuf::from(DEFAULT_STATE_DIR);
    let mut socket = None;
    let mut positional = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let text = arg.to_str()?;
        if text == "--state-dir" {
            state_dir = iter.next()?.into();
        } else if let Some(dir) = text.strip_prefix("--state-dir=") {
            state_dir = dir.into();
        } else if text == "--socket" {
            socket = Some(iter.next()?.into());
        } else if let Some(path) = text.strip_prefix("--socket=") {
            socket = Some(path.into());
        } else if text.starts_with('-') {
            return None;
        } else {
            positional.push(text.to_string());
        }
    }
    let fingerprint = match positional.len() {
        1 => None,
        2 => positional.pop(),
        _ => return None,
    };
    Some(Args {
        state_dir,
        socket,
        user: positional.remove(0),
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
        args.iter().map(Into::into).collect()
    }

    #[test]
    fn fast_args_take_the_forms_sshd_and_people_write() {
        assert_eq!(
            fast_args(&os(&["alice"])),
            Some(Args {
                state_dir: DEFAULT_STATE_DIR.into(),
                socket: None,
                user: "alice".into(),
                fingerprint: None,
            })
        );
        let full = Some(Args {
            state_dir: "/s".into(),
            socket: Some("/run/x.sock".into()),
            user: "alice".into(),
            fingerprint: Some("SHA256:x".into()),
        });
        for args in [
            &[
                "--state-dir",
                "/s",
                "--socket",
                "/run/x.sock",
                "alice",
                "SHA256:x",
            ][..],
            &[
                "--socket=/run/x.sock",
                "--state-dir=/s",
                "alice",
                "SHA256:x",
            ][..],
            &[
                "alice",
                "--socket",
                "/run/x.sock",
                "SHA256:x",
                "--state-dir",
                "/s",
            ][..],
        ] {
            assert_eq!(fast_args(&os(args)), full, "{args:?}");
        }
        // Left to clap: help, unknown flags, a flag without its value, extra words.
        for args in [
            &["--help"][..],
            &["--sock", "/x", "alice"][..],
            &["alice", "--socket"][..],
            &["alice", "SHA256:x", "more"][..],
            &[][..],
        ] {
            assert_eq!(fast_args(&os(args)), None, "{args:?}");
        }
    }

    #[test]
    fn no_agent_is_an_error_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let err = ask_refresh(&dir.path().join("none.sock"), REFRESH_WITHIN).unwrap_err();
        assert!(err.contains("cannot reach the agent"), "{err}");
        assert!(
            started.elapsed() < REFRESH_WITHIN,
            "{:?}",
            started.elapsed()
        );
    }
}
