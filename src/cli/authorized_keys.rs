//! `keysync authorized-keys [--state-dir DIR] USER [FPR]`: sshd's
//! AuthorizedKeysCommand. It reads no config, touches no network and does
//! one read of one file: a login costs about what `cat` of the cache costs.
//! An unknown user or a missing cache prints nothing and exits 0. The cache
//! is replaced by rename, so a read sees the old or the new file, never a mix.

use std::io::Write;
use std::path::Path;

use super::{EXIT_FAILED, EXIT_OK};
use crate::keys::{DEFAULT_ALGORITHMS, Policy, parse_entry};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/keysync";

pub fn main(state_dir: &Path, user: &str, fingerprint: Option<&str>) -> u8 {
    if user.is_empty() || user.contains('/') || user.starts_with('.') {
        return EXIT_OK;
    }
    let path = crate::state::cache_path(state_dir, user);
    let content = match std::fs::read(&path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return EXIT_OK,
        Err(e) => {
            eprintln!("keysync authorized-keys: cannot read {}: {e}", path.display());
            return EXIT_FAILED;
        }
    };
    let out = match fingerprint {
        None => content,
        Some(fpr) => filter(&content, fpr),
    };
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&out).and_then(|()| stdout.flush()) {
        Ok(()) => EXIT_OK,
        // sshd closing the pipe early is not our failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(_) => EXIT_FAILED,
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
        let Ok(text) = std::str::from_utf8(line) else { continue };
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
pub fn fast_args(args: &[std::ffi::OsString]) -> Option<(std::path::PathBuf, String, Option<String>)> {
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
