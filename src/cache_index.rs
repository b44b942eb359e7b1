//! The fingerprint index beside each hook cache (`users/<user>.fpr`), so
//! that `keysync authorized-keys USER FPR` finds one key among thousands
//! without parsing any of the others (DESIGN.md §9: as cheap as printing
//! the whole cache). The cache itself stays plain authorized_keys (§4).
//!
//! The format is text with fixed widths, so it can be read with `cat` and
//! searched by position:
//!
//! ```text
//! keysync-fpr-index v1 <dev> <ino> <size> <mtime>.<nsec> <count>   padded to 127 bytes, then \n
//! <fingerprint, 43 base64 chars> <offset, 10 digits> <length, 8 digits>\n   64 bytes each,
//!                                                                        sorted by fingerprint
//! ```
//!
//! The header names the cache file the index was made for by its identity
//! (device, inode, size, modification time) after its rename. The agent
//! writes the cache first and then the index, each atomically; the hook uses
//! the index only when the identity matches the cache it opened, and then
//! reads the line from that cache, at the offset given, checking that it is
//! one whole line. So an index that is stale (a write in progress, a failed
//! write) is not believed: the hook falls back to reading the whole cache.
//! And whatever an index says, the hook prints only lines of the cache it
//! opened, keys the agent grants; sshd checks the offered key against what
//! is printed. An index cannot let a key in, only (were it wrong while its
//! identity matched) keep one out.

use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};

const MAGIC: &str = "keysync-fpr-index v1";
/// Bytes of the header, newline included.
pub(crate) const HEADER_LEN: usize = 128;
/// Bytes of a record, newline included.
pub(crate) const RECORD_LEN: usize = 64;
/// A SHA-256 fingerprint without its `SHA256:` prefix: 32 bytes in
/// unpadded base64.
pub(crate) const FPR_LEN: usize = 43;
const OFFSET_DIGITS: usize = 10;
const LEN_DIGITS: usize = 8;

/// Which cache file an index describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Identity {
    pub(crate) fn of(meta: &Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// The part of `SHA256:<43 chars>` that the index holds; None for anything
/// else (another hash, or not a fingerprint).
pub(crate) fn sha256_part(fpr: &str) -> Option<&[u8]> {
    let b64 = fpr.strip_prefix("SHA256:")?.as_bytes();
    let ok = b64.len() == FPR_LEN
        && b64
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    ok.then_some(b64)
}

/// The index of a cache made of `lines` (each followed by `\n`, in order)
/// whose keys have `fingerprints` (`SHA256:…`, one per line); None when a
/// fingerprint or a line does not fit the format, so that no index (and a
/// fallback to reading the cache) is better than an incomplete one.
pub(crate) fn render<'a>(
    identity: Identity,
    lines: &[String],
    fingerprints: impl IntoIterator<Item = &'a str>,
) -> Option<Vec<u8>> {
    let mut records: Vec<(&[u8], usize, usize)> = Vec::with_capacity(lines.len());
    let mut offset = 0usize;
    let mut fingerprints = fingerprints.into_iter();
    for line in lines {
        let fpr = sha256_part(fingerprints.next()?)?;
        let len = line.len() + 1;
        records.push((fpr, offset, len));
        offset += len;
    }
    if fingerprints.next().is_some()
        || offset >= 10usize.pow(OFFSET_DIGITS as u32)
        || records
            .iter()
            .any(|r| r.2 >= 10usize.pow(LEN_DIGITS as u32))
    {
        return None;
    }
    records.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::with_capacity(HEADER_LEN + records.len() * RECORD_LEN);
    let header = format!(
        "{MAGIC} {} {} {} {}.{:09} {}",
        identity.dev,
        identity.ino,
        identity.size,
        identity.mtime,
        identity.mtime_nsec,
        records.len()
    );
    if header.len() >= HEADER_LEN {
        return None;
    }
    out.extend_from_slice(header.as_bytes());
    out.resize(HEADER_LEN - 1, b' ');
    out.push(b'\n');
    for (fpr, offset, len) in records {
        out.extend_from_slice(fpr);
        out.extend_from_slice(format!(" {offset:010} {len:08}\n").as_bytes());
    }
    Some(out)
}

/// What the index says about a fingerprint.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The cache line (with its newline) the index points at, read from
    /// `cache`.
    Line(Vec<u8>),
    /// The cache has no key with this fingerprint.
    Absent,
    /// Not an index of this cache (stale, or damaged): read the cache.
    Unusable,
}

/// Looks `fpr` (the 43 characters after `SHA256:`) up in `index`, an index
/// that should describe `cache`, whose metadata is `meta`. A binary search
/// with one positioned read per step: a few reads of 64 bytes however large
/// the cache.
pub(crate) fn lookup(index: &File, cache: &File, meta: &Metadata, fpr: &[u8]) -> Lookup {
    let mut header = [0u8; HEADER_LEN];
    if index.read_exact_at(&mut header, 0).is_err() {
        return Lookup::Unusable;
    }
    let Some(count) = check_header(&header, Identity::of(meta)) else {
        return Lookup::Unusable;
    };
    let mut record = [0u8; RECORD_LEN];
    let (mut lo, mut hi) = (0u64, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at = HEADER_LEN as u64 + mid * RECORD_LEN as u64;
        if index.read_exact_at(&mut record, at).is_err() || record[RECORD_LEN - 1] != b'\n' {
            return Lookup::Unusable;
        }
        match record[..FPR_LEN].cmp(fpr) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return read_line(cache, meta, &record),
        }
    }
    Lookup::Absent
}

/// The record count, when the header is this format's and names `cache`.
fn check_header(header: &[u8; HEADER_LEN], cache: Identity) -> Option<u64> {
    let text = std::str::from_utf8(header).ok()?;
    let rest = text.strip_prefix(MAGIC)?;
    let mut fields = rest.split_ascii_whitespace();
    let mut number = || fields.next()?.parse::<u64>().ok();
    let (dev, ino, size) = (number()?, number()?, number()?);
    let mtime = fields.next()?;
    let count = fields.next()?.parse::<u64>().ok()?;
    let (secs, nsec) = mtime.split_once('.')?;
    let found = Identity {
        dev,
        ino,
        size,
        mtime: secs.parse().ok()?,
        mtime_nsec: nsec.parse().ok()?,
    };
    (found == cache).then_some(count)
}

fn read_line(cache: &File, meta: &Metadata, record: &[u8; RECORD_LEN]) -> Lookup {
    let digits = |from: usize, n: usize| -> Option<u64> {
        std::str::from_utf8(record.get(from..from + n)?)
            .ok()?
            .parse()
            .ok()
    };
    let offset = digits(FPR_LEN + 1, OFFSET_DIGITS);
    let len = digits(FPR_LEN + 2 + OFFSET_DIGITS, LEN_DIGITS);
    let (Some(offset), Some(len)) = (offset, len) else {
        return Lookup::Unusable;
    };
    let Ok(len) = usize::try_from(len) else {
        return Lookup::Unusable;
    };
    if len == 0 || offset.saturating_add(len as u64) > meta.size() {
        return Lookup::Unusable;
    }
    // With the byte before it, to check that it is a whole line.
    let before = usize::from(offset > 0);
    let mut line = vec![0u8; len + before];
    if cache
        .read_exact_at(&mut line, offset - before as u64)
        .is_err()
        || line.last() != Some(&b'\n')
        || (before == 1 && line[0] != b'\n')
    {
        return Lookup::Unusable;
    }
    line.drain(..before);
    Lookup::Line(line)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A fingerprint-shaped string for key `i`; the index does not care
    /// whether it is the real one (the hook checks the line it gets).
    fn fpr(i: usize) -> String {
        format!("SHA256:{i:043}")
    }

    fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> File {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        drop(f);
        File::open(&path).unwrap()
    }

    #[test]
    fn finds_every_line_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0usize, 1, 2, 7, 300] {
            let lines: Vec<String> = (0..n)
                .map(|i| format!("opt{} ssh-ed25519 AAAA{i} k{i}", "x".repeat(i % 5)))
                .collect();
            let fprs: Vec<String> = (0..n).map(fpr).collect();
            let content: String = lines.iter().map(|l| format!("{l}\n")).collect();
            let cache = write(dir.path(), "c.keys", content.as_bytes());
            let meta = cache.metadata().unwrap();
            let index =
                render(Identity::of(&meta), &lines, fprs.iter().map(String::as_str)).unwrap();
            assert_eq!(index.len(), HEADER_LEN + n * RECORD_LEN);
            let index = write(dir.path(), "c.fpr", &index);
            for (line, f) in lines.iter().zip(&fprs) {
                let got = lookup(&index, &cache, &meta, sha256_part(f).unwrap());
                assert_eq!(got, Lookup::Line(format!("{line}\n").into_bytes()), "{f}");
            }
            let absent = fpr(n + 1000);
            assert_eq!(
                lookup(&index, &cache, &meta, sha256_part(&absent).unwrap()),
                Lookup::Absent
            );
        }
    }

    #[test]
    fn an_index_of_another_cache_is_not_believed() {
        let dir = tempfile::tempdir().unwrap();
        let lines = vec!["ssh-ed25519 AAAA1 a".to_string()];
        let old = write(dir.path(), "old.keys", b"ssh-ed25519 AAAA1 a\n");
        let meta = old.metadata().unwrap();
        let index = render(Identity::of(&meta), &lines, [fpr(1).as_str()]).unwrap();
        let index = write(dir.path(), "c.fpr", &index);
        // The cache was replaced (by rename: another inode) since.
        let new = write(dir.path(), "new.keys", b"ssh-ed25519 AAAA2 b\n");
        let new_meta = new.metadata().unwrap();
        let f = fpr(1);
        assert_eq!(
            lookup(&index, &new, &new_meta, sha256_part(&f).unwrap()),
            Lookup::Unusable
        );
        // Pointing into the middle of a line, or past the end.
        let two = write(
            dir.path(),
            "two.keys",
            b"ssh-ed25519 AAAA1 a\nssh-ed25519 AAAA2 b\n",
        );
        let two_meta = two.metadata().unwrap();
        let lines = vec![
            "ssh-ed25519 AAAA1".to_string(),
            "a\nssh-ed25519 AAAA2 b".to_string(),
        ];
        let index = render(
            Identity::of(&two_meta),
            &lines,
            [fpr(1).as_str(), fpr(2).as_str()],
        )
        .unwrap();
        let index = write(dir.path(), "two.fpr", &index);
        for f in [fpr(1), fpr(2)] {
            assert_eq!(
                lookup(&index, &two, &two_meta, sha256_part(&f).unwrap()),
                Lookup::Unusable,
                "{f}"
            );
        }
        // Damaged: truncated, or not an index at all.
        let short = write(dir.path(), "short.fpr", &[b' '; 10]);
        assert_eq!(
            lookup(&short, &old, &meta, sha256_part(&f).unwrap()),
            Lookup::Unusable
        );
    }

    #[test]
    fn only_sha256_fingerprints_have_a_place_in_it() {
        let real = "SHA256:aoz8/q/RosyYYQ9Hp59h1Hj596PX0VwO6ROTDsCWjtk";
        assert_eq!(sha256_part(real).map(<[u8]>::len), Some(FPR_LEN));
        for bad in [
            "SHA256:",
            "garbage",
            "MD5:00:11:22",
            "SHA256:aoz8/q/RosyYYQ9Hp59h1Hj596PX0VwO6ROTDsCWjt",
            "SHA256:aoz8/q/RosyYYQ9Hp59h1Hj596PX0VwO6ROTDsCWjtk=",
            "SHA256:aoz8/q/RosyYYQ9Hp59h1Hj596PX0VwO6ROTDsCW\ntk",
        ] {
            assert_eq!(sha256_part(bad), None, "{bad:?}");
        }
        // A key whose fingerprint does not fit: no index rather than a partial one.
        let lines = vec!["a".to_string(), "b".to_string()];
        let id = Identity {
            dev: 1,
            ino: 2,
            size: 4,
            mtime: 5,
            mtime_nsec: 6,
        };
        assert!(render(id, &lines, [fpr(1).as_str(), "MD5:00"]).is_none());
        assert!(render(id, &lines, [fpr(1).as_str()]).is_none());
        assert!(render(id, &lines, [fpr(1).as_str(), fpr(2).as_str()]).is_some());
    }
}
