//! `keysync authorized-keys [--state-dir DIR] USER [FPR]`: sshd's
//! AuthorizedKeysCommand. It reads no config, touches no network and opens
//! one file: a login costs about what `cat` of the cache costs (DESIGN.md §9,
//! `bench/hook.sh`).
//! An unknown user or a missing cache prints nothing and exits 0. The cache
//! is replaced by rename, so a read sees the old or the new file, never a mix.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use super::{EXIT_FAILED, EXIT_OK};
use crate::keys::{DEFAULT_ALGORITHMS, Policy, parse_entry};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/keysync";

/// At most this many bytes per read and write: 64 KiB fills a pipe (sshd
/// reads one) in one write.
const CHUNK: usize = 64 * 1024;

pub fn main(state_dir: &Path, user: &str, fingerprint: Option<&str>) -> u8 {
    if user.is_empty() || user.contains('/') || user.starts_with('.') {
        return EXIT_OK;
    }
    let path = crate::state::cache_path(state_dir, user);
    // One open: everything below reads that inode, so a cache renamed over
    // meanwhile is printed whole, old or new.
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return EXIT_OK,
        Err(e) => {
            eprintln!(
                "keysync authorized-keys: cannot read {}: {e}",
                path.display()
            );
            return EXIT_FAILED;
        }
    };
    match print(file, fingerprint) {
        Ok(()) => EXIT_OK,
        // sshd closing the pipe early is not our failure.
        Err(e) if e.kind() == ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            eprintln!("keysync authorized-keys: {}: {e}", path.display());
            EXIT_FAILED
        }
    }
}

/// Copies the cache (or its lines with key `fingerprint`) to stdout.
///
/// Not through std's `Stdout`, a `LineWriter` that splits every chunk at its
/// last newline (two writes per chunk), and not with `io::copy`, which into
/// a pipe falls back to 8 KiB chunks: like `cat`, whole chunks straight to
/// fd 1 (a dup of it, which needs no `unsafe`).
fn print(mut file: File, fingerprint: Option<&str>) -> std::io::Result<()> {
    let mut out = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    if let Some(fpr) = fingerprint {
        let mut content = Vec::new();
        file.read_to_end(&mut content)?;
        return out.write_all(&filter(&content, fpr));
    }
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

/// Parses `authorized-keys` arguments without clap: this is the login path,
/// so it does as little as possible. Returns None to fall back to clap
/// (help, or anything unusual) for a proper message.
pub fn fast_args(
    args: &[std::ffi::OsString],
) -> Option<(std::path::PathBuf, String, Option<String>)> {
    let mut state_dir = std::path::PathBuf::from(DEFAULT_STATE_DIR);
    let mut positional = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let text = arg.to_str()?;
        if text == "--state-dir" {
            state_dir = iter.next()?.into();
        } else if let Some(dir) = text.strip_prefix("--state-dir=") {
            state_dir = dir.into();
        } else if text.starts_with('-') {
            return None;
        } else {
            positional.push(text.to_string());
        }
    }
    match positional.len() {
        1 => Some((state_dir, positional.remove(0), None)),
        2 => {
            let fpr = positional.pop();
            Some((state_dir, positional.remove(0), fpr))
        }
        _ => None,
    }
}
