//! Desired keys -> file bytes (DESIGN.md §4). Pure: no I/O.
//!
//! The managed block is merged into whatever the file holds. Every line
//! outside the block is kept byte for byte (CRLF endings included). Rules for
//! damaged files, chosen so that a revoked key can never survive and no
//! foreign line is lost when the markers are intact:
//!
//! - No block yet: the block is appended at the end. If the last line has no
//!   newline, one is added to it first (its bytes are otherwise unchanged),
//!   since the marker would otherwise be glued onto it.
//! - Several blocks: the first is replaced, the others removed; all lines
//!   between markers are the agent's.
//! - `BEGIN` without `END`: the block runs to the end of the file. The lines
//!   after the unterminated marker were inside the block, which is where the
//!   agent's old keys are; keeping them could keep a revoked key working.
//! - A stray `END` with no `BEGIN` before it is dropped (it is the agent's marker).
//! - No keys: the block is removed entirely; a file that did not exist is not created.
//!
//! Markers are recognised by their prefix, so an edited trailing text or a
//! CRLF ending still counts. The block's own lines always end in `\n`.
//!
//! With `max_stale`, every line starts with `expiry-time="YYYYMMDDHHMMSSZ"`
//! (OpenSSH's authorized_keys option, in UTC), then the user's options, then
//! the key's own: sshd stops taking the key at that time even when the agent
//! is no longer there to remove it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::keys::KeySet;

pub const BEGIN: &str = "# BEGIN keysync managed keys: edits inside this block are overwritten";
pub const END: &str = "# END keysync managed keys";
const BEGIN_PREFIX: &[u8] = b"# BEGIN keysync managed keys";
const END_PREFIX: &[u8] = b"# END keysync managed keys";

/// What a user's files should hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub keys: KeySet,
    /// When sshd must stop taking the keys (`max_stale` set), written in
    /// front of every line.
    pub expiry: Option<SystemTime>,
}

/// The authorized_keys lines for a user's keys: the expiry, the user's
/// options and the key's own, comma-separated, in that order.
pub fn key_lines(desired: &Desired, user_options: Option<&str>) -> Vec<String> {
    let options = match (desired.expiry.map(expiry_option), user_options) {
        (Some(expiry), Some(user)) => Some(format!("{expiry},{user}")),
        (Some(expiry), None) => Some(expiry),
        (None, user) => user.map(str::to_string),
    };
    desired
        .keys
        .keys()
        .iter()
        .map(|k| k.line(options.as_deref()))
        .collect()
}

/// `expiry-time="YYYYMMDDHHMMSSZ"` for `t`, in UTC (the `Z`), to the second,
/// inside the years sshd can parse (1970 to 9999).
pub fn expiry_option(t: SystemTime) -> String {
    // 9999-12-31T23:59:59Z.
    const LAST: u64 = 253_402_300_799;
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
        .min(LAST);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "expiry-time=\"{year:04}{month:02}{day:02}{:02}{:02}{:02}Z\"",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The block, markers included, or nothing when there are no keys.
pub fn block(lines: &[String]) -> Vec<u8> {
    if lines.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>() + 100);
    out.extend_from_slice(BEGIN.as_bytes());
    out.push(b'\n');
    for line in lines {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(END.as_bytes());
    out.push(b'\n');
    out
}

enum Marker {
    Begin,
    End,
}

fn marker(line: &[u8]) -> Option<Marker> {
    let trimmed = line.trim_ascii_start();
    if trimmed.starts_with(BEGIN_PREFIX) {
        Some(Marker::Begin)
    } else if trimmed.starts_with(END_PREFIX) {
        Some(Marker::End)
    } else {
        None
    }
}

/// Merges the block for `lines` into `existing` (None: the file does not
/// exist). Returns the new content, or None when the file should stay absent.
pub fn merge_block(existing: Option<&[u8]>, lines: &[String]) -> Option<Vec<u8>> {
    let Some(existing) = existing else {
        return (!lines.is_empty()).then(|| block(lines));
    };
    let block = block(lines);
    let mut out = Vec::with_capacity(existing.len() + block.len());
    let mut inside = false;
    let mut insert_at: Option<usize> = None;
    for line in existing.split_inclusive(|&b| b == b'\n') {
        match (inside, marker(line)) {
            (false, Some(Marker::Begin)) => {
                inside = true;
                insert_at.get_or_insert(out.len());
            }
            (true, Some(Marker::End)) => inside = false,
            (false, Some(Marker::End)) | (true, _) => {}
            (false, None) => out.extend_from_slice(line),
        }
    }
    let at = match insert_at {
        Some(at) => at,
        None => {
            if !block.is_empty() && out.last().is_some_and(|&b| b != b'\n') {
                out.push(b'\n');
            }
            out.len()
        }
    };
    // `at` is always at a line start, so the preceding byte is a newline (or
    // there is none): splicing here never joins two lines.
    out.splice(at..at, block);
    Some(out)
}

/// The lines outside the managed block of `content` for which `drop`
/// answers true are taken out; returns the new content and how many went.
/// Used, when asked, to remove other writers' copies of revoked keys.
pub fn drop_foreign_lines(content: &[u8], drop: impl Fn(&[u8]) -> bool) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(content.len());
    let mut dropped = 0;
    let mut inside = false;
    for line in content.split_inclusive(|&b| b == b'\n') {
        match (inside, marker(line)) {
            (false, Some(Marker::Begin)) => inside = true,
            (true, Some(Marker::End)) => inside = false,
            (false, None) if drop(line) => {
                dropped += 1;
                continue;
            }
            _ => {}
        }
        out.extend_from_slice(line);
    }
    (out, dropped)
}

/// The keys currently inside the managed block of `content` (lines between
/// the first BEGIN and its END), for reading back what the agent manages.
pub fn managed_lines(content: &[u8]) -> Vec<&[u8]> {
    let mut inside = false;
    let mut lines = Vec::new();
    for line in content.split_inclusive(|&b| b == b'\n') {
        match (inside, marker(line)) {
            (false, Some(Marker::Begin)) => inside = true,
            (true, Some(Marker::End)) => break,
            (true, None) => lines.push(line.trim_ascii_end()),
            _ => {}
        }
    }
    lines
}

/// The whole agent-owned file (fragment mode): None removes it.
pub fn fragment(lines: &[String]) -> Option<Vec<u8>> {
    (!lines.is_empty()).then(|| plain(lines))
}

/// The per-user cache the hook prints: always present, empty with no keys.
pub fn cache(lines: &[String]) -> Vec<u8> {
    plain(lines)
}

fn plain(lines: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in lines {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

/// The `RevokedKeys` file (DESIGN.md §4): one public key per line, in
/// OpenSSH's plain format; empty when nothing is revoked.
pub fn revoked_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for key in keys {
        out.extend_from_slice(key.as_bytes());
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ssh-ed25519 KEY{i} k{i}")).collect()
    }

    fn s(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[test]
    fn expiry_is_utc_to_the_second_in_what_sshd_parses() {
        let at = |secs: u64| expiry_option(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "expiry-time=\"19700101000000Z\"");
        // date -u -d @1709251199: Thu Feb 29 23:59:59 UTC 2024.
        assert_eq!(at(1_709_251_199), "expiry-time=\"20240229235959Z\"");
        assert_eq!(at(1_709_251_200), "expiry-time=\"20240301000000Z\"");
        assert_eq!(
            expiry_option(UNIX_EPOCH + Duration::from_millis(4_102_444_799_999)),
            "expiry-time=\"20991231235959Z\""
        );
        // Out of sshd's range: clamped, never a panic.
        assert_eq!(at(u64::MAX / 2), "expiry-time=\"99991231235959Z\"");
        assert_eq!(
            expiry_option(UNIX_EPOCH - Duration::from_secs(5)),
            "expiry-time=\"19700101000000Z\""
        );
    }

    #[test]
    fn key_lines_put_the_expiry_first_then_user_then_key_options() {
        let p = crate::keys::Policy {
            allow_source_options: true,
            ..Default::default()
        };
        let (keys, bad) = crate::keys::parse_entries(
            [
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi a",
                "command=\"echo a b\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFRzugNBd+MDtj+CrHEVbfNBi8jOKFGD1yT48UoTK0oN b",
            ],
            &p,
        );
        assert!(bad.is_empty());
        let mut desired = Desired { keys, expiry: None };
        let blobs: Vec<String> = key_lines(&desired, None);
        assert!(blobs[0].starts_with("ssh-ed25519 "), "{blobs:?}");
        assert!(blobs[1].starts_with("command=\"echo a b\" ssh-ed25519 "));
        desired.expiry = Some(UNIX_EPOCH + Duration::from_secs(1_709_251_199));
        let lines = key_lines(&desired, Some("no-pty"));
        assert!(
            lines[0].starts_with("expiry-time=\"20240229235959Z\",no-pty ssh-ed25519 "),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with(
                "expiry-time=\"20240229235959Z\",no-pty,command=\"echo a b\" ssh-ed25519 "
            ),
            "{lines:?}"
        );
        let lines = key_lines(&desired, None);
        assert!(lines[0].starts_with("expiry-time=\"20240229235959Z\" ssh-ed25519 "));
        // Every line still holds its key for sshd.
        for (line, key) in lines.iter().zip(desired.keys.keys()) {
            assert_eq!(crate::keys::sshd_key(line), Some(key.id()), "{line}");
        }
    }

    #[test]
    fn absent_file() {
        assert_eq!(merge_block(None, &[]), None);
        let out = merge_block(None, &lines(1)).unwrap();
        assert_eq!(s(&out), format!("{BEGIN}\nssh-ed25519 KEY0 k0\n{END}\n"));
    }

    #[test]
    fn empty_file_gets_block_or_stays_empty() {
        assert_eq!(merge_block(Some(b""), &[]).unwrap(), b"");
        assert_eq!(
            s(&merge_block(Some(b""), &lines(1)).unwrap()),
            format!("{BEGIN}\nssh-ed25519 KEY0 k0\n{END}\n")
        );
    }

    #[test]
    fn no_block_appends_after_foreign_lines() {
        let out = merge_block(Some(b"ssh-rsa FOREIGN platform\n"), &lines(2)).unwrap();
        assert_eq!(
            s(&out),
            format!(
                "ssh-rsa FOREIGN platform\n{BEGIN}\nssh-ed25519 KEY0 k0\nssh-ed25519 KEY1 k1\n{END}\n"
            )
        );
    }

    #[test]
    fn missing_trailing_newline_gets_one() {
        let out = merge_block(Some(b"ssh-rsa FOREIGN"), &lines(1)).unwrap();
        assert!(s(&out).starts_with("ssh-rsa FOREIGN\n# BEGIN"));
        // Without keys nothing changes, not even the missing newline.
        assert_eq!(
            merge_block(Some(b"ssh-rsa FOREIGN"), &[]).unwrap(),
            b"ssh-rsa FOREIGN"
        );
    }

    #[test]
    fn block_replaced_in_place_keeping_neighbours() {
        let before = format!("a\r\n{BEGIN}\nold\n{END}\nb\n");
        let out = merge_block(Some(before.as_bytes()), &lines(1)).unwrap();
        assert_eq!(
            s(&out),
            format!("a\r\n{BEGIN}\nssh-ed25519 KEY0 k0\n{END}\nb\n")
        );
        let removed = merge_block(Some(before.as_bytes()), &[]).unwrap();
        assert_eq!(s(&removed), "a\r\nb\n");
    }

    #[test]
    fn crlf_markers_recognised_and_foreign_crlf_kept() {
        let before = format!("x\r\n{BEGIN}\r\nold\r\n{END}\r\ny\r\n");
        let out = merge_block(Some(before.as_bytes()), &lines(1)).unwrap();
        assert_eq!(
            s(&out),
            format!("x\r\n{BEGIN}\nssh-ed25519 KEY0 k0\n{END}\ny\r\n")
        );
    }

    #[test]
    fn begin_without_end_runs_to_eof() {
        let before = format!("a\n{BEGIN}\nold-key\nmore\n");
        let out = merge_block(Some(before.as_bytes()), &lines(1)).unwrap();
        assert_eq!(s(&out), format!("a\n{BEGIN}\nssh-ed25519 KEY0 k0\n{END}\n"));
    }

    #[test]
    fn two_blocks_become_one() {
        let before = format!("a\n{BEGIN}\nold1\n{END}\nb\n{BEGIN}\nold2\n{END}\nc\n");
        let out = merge_block(Some(before.as_bytes()), &lines(1)).unwrap();
        assert_eq!(
            s(&out),
            format!("a\n{BEGIN}\nssh-ed25519 KEY0 k0\n{END}\nb\nc\n")
        );
    }

    #[test]
    fn stray_end_dropped() {
        let before = format!("a\n{END}\nb\n");
        assert_eq!(
            s(&merge_block(Some(before.as_bytes()), &[]).unwrap()),
            "a\nb\n"
        );
    }

    #[test]
    fn managed_lines_reads_back() {
        let out = merge_block(Some(b"x\n"), &lines(2)).unwrap();
        let got: Vec<&str> = managed_lines(&out).into_iter().map(s).collect();
        assert_eq!(got, ["ssh-ed25519 KEY0 k0", "ssh-ed25519 KEY1 k1"]);
    }

    #[test]
    fn fragment_and_cache() {
        assert_eq!(fragment(&[]), None);
        assert_eq!(fragment(&lines(1)).unwrap(), b"ssh-ed25519 KEY0 k0\n");
        assert_eq!(cache(&[]), b"");
    }

    fn foreign_line() -> impl Strategy<Value = String> {
        // Any line that is not one of our markers, with LF or CRLF.
        ("[^\n]{0,30}", prop::bool::ANY)
            .prop_filter("not a marker", |(l, _)| marker(l.as_bytes()).is_none())
            .prop_map(|(l, crlf)| {
                if crlf {
                    format!("{l}\r\n")
                } else {
                    format!("{l}\n")
                }
            })
    }

    proptest! {
        #[test]
        fn merge_is_idempotent(existing in proptest::collection::vec(foreign_line(), 0..8), n in 0usize..4, m in 0usize..4) {
            let text = existing.concat();
            let once = merge_block(Some(text.as_bytes()), &lines(n)).unwrap();
            let twice = merge_block(Some(&once), &lines(n)).unwrap();
            prop_assert_eq!(&once, &twice);
            // Changing the keys later keeps every foreign line, in order.
            let other = merge_block(Some(&once), &lines(m)).unwrap();
            let removed = merge_block(Some(&other), &[]).unwrap();
            prop_assert_eq!(s(&removed), text.as_str());
        }

        #[test]
        fn foreign_lines_survive_any_file(bytes in proptest::collection::vec(any::<u8>(), 0..300), n in 0usize..3) {
            let out = merge_block(Some(&bytes), &lines(n)).unwrap();
            let again = merge_block(Some(&out), &lines(n)).unwrap();
            prop_assert_eq!(&out, &again);
            let managed: Vec<&[u8]> = managed_lines(&out);
            prop_assert_eq!(managed.len(), n);
        }
    }
}
