//! Key parsing, the key policy and deduplication (DESIGN.md §6). Pure: no I/O.
//!
//! Every entry from a source goes through [`parse_entry`]. A bad entry is
//! rejected whole with a reason and never fails the rest of the list; what
//! comes out can be written into `authorized_keys` as one line without any
//! way to start a second line or smuggle in options.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use ssh_key::{HashAlg, PublicKey, public::KeyData};

/// The algorithms allowed unless `policy.allowed_algorithms` narrows them.
pub const DEFAULT_ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Longest accepted entry, in bytes.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024;
/// Comments are cut to this many bytes (at a character boundary).
pub const MAX_COMMENT_BYTES: usize = 256;

/// What keys are acceptable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Smallest RSA modulus in bits. Default 2048.
    pub min_rsa_bits: u32,
    /// Accepted key types. Default [`DEFAULT_ALGORITHMS`]; `ssh-dss` never.
    pub allowed_algorithms: Vec<String>,
    /// Keep `command=`, `from=`, … options that arrive with a key. Default false:
    /// such a key is rejected, since stripping them would widen its access.
    pub allow_source_options: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_rsa_bits: 2048,
            allowed_algorithms: DEFAULT_ALGORITHMS.iter().map(|s| s.to_string()).collect(),
            allow_source_options: false,
        }
    }
}

/// One accepted public key, ready to be rendered as an authorized_keys line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// Options that came with the key (only when the policy allows them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
    /// The key type, e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// The key blob in canonical base64.
    pub blob: String,
    /// Cleaned comment, possibly empty.
    #[serde(default)]
    pub comment: String,
    /// `SHA256:…`, as `ssh-keygen -l` and sshd's `%f` print it.
    pub fingerprint: String,
}

impl Key {
    /// Identity for dedup and diffing: comments and options do not count.
    pub fn id(&self) -> (&str, &str) {
        (&self.algorithm, &self.blob)
    }

    /// The authorized_keys line, with the user's options (from the config)
    /// before the key's own.
    pub fn line(&self, user_options: Option<&str>) -> String {
        let mut line = String::with_capacity(self.blob.len() + self.comment.len() + 64);
        let opts: Vec<&str> = [user_options, self.options.as_deref()]
            .into_iter()
            .flatten()
            .filter(|o| !o.is_empty())
            .collect();
        if !opts.is_empty() {
            line.push_str(&opts.join(","));
            line.push(' ');
        }
        line.push_str(&self.algorithm);
        line.push(' ');
        line.push_str(&self.blob);
        if !self.comment.is_empty() {
            line.push(' ');
            line.push_str(&self.comment);
        }
        line
    }
}

/// Why an entry was rejected. The entry is dropped and logged; the rest of
/// the list is used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("empty entry")]
    Empty,
    #[error("entry is {0} bytes, over the 16 KiB limit")]
    TooLong(usize),
    #[error("control character {0:?} in entry")]
    ControlCharacter(char),
    #[error("a private key, not a public key")]
    PrivateKey,
    #[error("ssh-dss keys are never accepted")]
    Dss,
    #[error("algorithm {0} is not allowed by policy.allowed_algorithms")]
    AlgorithmNotAllowed(String),
    #[error("RSA key of {bits} bits is under policy.min_rsa_bits = {min}")]
    RsaTooShort { bits: u32, min: u32 },
    #[error("key comes with options ({0}), which policy.allow_source_options forbids")]
    HasOptions(String),
    #[error("unparsable key: {0}")]
    Unparsable(String),
    #[error("sshd would read another key from this entry than the one checked")]
    Misread,
}

/// Parses and checks one entry (one key, possibly with options and comment).
/// Surrounding whitespace is trimmed first; anything else out of place rejects
/// the entry whole.
pub fn parse_entry(entry: &str, policy: &Policy) -> Result<Key, KeyError> {
    if entry.len() > MAX_ENTRY_BYTES {
        return Err(KeyError::TooLong(entry.len()));
    }
    let text = entry.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\n' || c == '\r');
    if text.is_empty() {
        return Err(KeyError::Empty);
    }
    if let Some(c) = text
        .chars()
        .find(|&c| (c.is_control() && c != '\t') || is_line_break(c))
    {
        return Err(KeyError::ControlCharacter(c));
    }
    if text.contains("PRIVATE KEY")
        || text.starts_with("-----BEGIN")
        || text.contains("b3BlbnNzaC1rZXktdjE")
    {
        return Err(KeyError::PrivateKey);
    }

    let (options, rest) = split_options(text)?;
    let (algorithm, after) = field(rest);
    if algorithm.is_empty() {
        return Err(KeyError::Empty);
    }
    let (blob, comment) = field(after);
    if blob.is_empty() {
        return Err(KeyError::Unparsable("no key data after the type".into()));
    }
    let comment = comment.trim_end_matches(BLANK);

    if algorithm == "ssh-dss" {
        return Err(KeyError::Dss);
    }
    if !policy.allowed_algorithms.iter().any(|a| a == algorithm) {
        return Err(KeyError::AlgorithmNotAllowed(algorithm.to_string()));
    }
    if let Some(opts) = options
        && !policy.allow_source_options
    {
        return Err(KeyError::HasOptions(truncate(opts, 64).to_string()));
    }

    let public = PublicKey::from_openssh(&format!("{algorithm} {blob}"))
        .map_err(|e| KeyError::Unparsable(e.to_string()))?;
    if let KeyData::Rsa(rsa) = public.key_data() {
        let bits = rsa.n.as_positive_bytes().map(bit_length).unwrap_or(0);
        if bits < policy.min_rsa_bits {
            return Err(KeyError::RsaTooShort {
                bits,
                min: policy.min_rsa_bits,
            });
        }
    }
    let canonical = public
        .to_openssh()
        .map_err(|e| KeyError::Unparsable(e.to_string()))?;
    let blob = canonical
        .split(' ')
        .nth(1)
        .ok_or_else(|| KeyError::Unparsable("cannot re-encode key".into()))?
        .to_string();
    let key = Key {
        options: options.map(str::to_string),
        algorithm: algorithm.to_string(),
        blob,
        comment: truncate(comment, MAX_COMMENT_BYTES).to_string(),
        fingerprint: public.fingerprint(HashAlg::Sha256).to_string(),
    };
    // The line keysync writes, read back the way sshd reads it, must hold
    // the key just checked: the splitting above and sshd's must never
    // disagree, and if they ever did, the entry goes.
    if sshd_key(&key.line(None)) != Some(key.id()) {
        return Err(KeyError::Misread);
    }
    Ok(key)
}

/// Unicode line and paragraph separators are not control characters but
/// some tools break lines on them; refuse them too.
fn is_line_break(c: char) -> bool {
    matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// The blanks that separate an authorized_keys line's fields.
const BLANK: [char; 2] = [' ', '\t'];

/// The first field of `text` and what follows it, blanks skipped (the way
/// sshd's `sshkey_read` takes the type and the blob: up to a space or tab).
fn field(text: &str) -> (&str, &str) {
    match text.find(BLANK) {
        Some(i) => (&text[..i], text[i..].trim_start_matches(BLANK)),
        None => (text, ""),
    }
}

/// Splits leading options off an entry the way sshd does
/// (`auth_check_authkey_line` in OpenSSH's auth2-pubkeyfile.c): a line
/// whose first field is a key type is a key without options; otherwise
/// [`options_end`] says where the options stop, and the key follows.
fn split_options(text: &str) -> Result<(Option<&str>, &str), KeyError> {
    let (first, _) = field(text);
    if looks_like_algorithm(first) {
        return Ok((None, text));
    }
    let end = options_end(text)
        .ok_or_else(|| KeyError::Unparsable("a quote in the options is never closed".into()))?;
    let rest = text[end..].trim_start_matches(BLANK);
    if rest.is_empty() {
        return Err(KeyError::Unparsable("options and no key after them".into()));
    }
    Ok((Some(&text[..end]), rest))
}

/// Where options starting `text` end, as OpenSSH's
/// `sshkey_advance_past_options` finds it: at the first space or tab outside
/// double quotes. A `"` toggles quoting; `\"` is skipped whole, inside
/// quotes and out, and is the only escape (a backslash before anything else
/// is itself, so `\\"` is a backslash and an escaped quote). None when a
/// quote is still open at the end (sshd refuses such a line).
fn options_end(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut quoted = false;
    let mut i = 0;
    // Bytes, not chars: every byte that matters is ASCII, and no byte of a
    // multi-byte UTF-8 character is, so `i` stays on a character boundary
    // wherever it stops.
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\\' if bytes.get(i + 1) == Some(&b'"') => i += 1,
            b'"' => quoted = !quoted,
            b' ' | b'\t' if !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    (!quoted).then_some(i)
}

/// The (type, blob) fields sshd takes from an authorized_keys line: those
/// at the start when the first field is a key type, else those after the
/// options. None when it finds no key there. Also decides for
/// [`parse_entry`], which rejects an entry whose own line does not read back
/// as the key it checked.
pub fn sshd_key(line: &str) -> Option<(&str, &str)> {
    let line = line.trim_start_matches(BLANK);
    let (first, _) = field(line);
    let key = if looks_like_algorithm(first) {
        line
    } else {
        line[options_end(line)?..].trim_start_matches(BLANK)
    };
    let (algorithm, after) = field(key);
    let (blob, _) = field(after);
    (!algorithm.is_empty() && !blob.is_empty()).then_some((algorithm, blob))
}

/// Whether `options` is a whole options list as sshd splits it: it ends
/// where it ends, with no quote left open and no blank outside quotes, so
/// that joined with others by commas in front of a key it ends exactly there.
pub fn options_are_closed(options: &str) -> bool {
    options_end(options) == Some(options.len())
}

/// Whether sshd may take this first field for a key type (and read the
/// line as a key without options). Wider than the names sshd knows (every
/// one starts so, and it also takes `rsa`, `ed25519`, … in any case), so
/// that a line sshd reads as a key is never split into options here.
fn looks_like_algorithm(field: &str) -> bool {
    const SHORT_NAMES: &[&str] = &[
        "rsa",
        "dsa",
        "ecdsa",
        "ed25519",
        "ecdsa-sk",
        "ed25519-sk",
        "xmss",
    ];
    field.starts_with("ssh-")
        || field.starts_with("ecdsa-")
        || field.starts_with("sk-")
        || field.starts_with("rsa-")
        || SHORT_NAMES.iter().any(|n| field.eq_ignore_ascii_case(n))
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].trim_end()
}

fn bit_length(bytes: &[u8]) -> u32 {
    match bytes.iter().position(|&b| b != 0) {
        Some(i) => (bytes.len() - i - 1) as u32 * 8 + (8 - bytes[i].leading_zeros()),
        None => 0,
    }
}

/// A deduplicated, ordered list of keys: what one source says, or what one
/// user gets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySet(Vec<Key>);

impl KeySet {
    /// Builds a set, keeping the first of each (algorithm, blob).
    pub fn from_keys(keys: impl IntoIterator<Item = Key>) -> Self {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for key in keys {
            if seen.insert((key.algorithm.clone(), key.blob.clone())) {
                out.push(key);
            }
        }
        KeySet(out)
    }

    /// The union of several sets, in order, deduplicated.
    pub fn union<'a>(sets: impl IntoIterator<Item = &'a KeySet>) -> Self {
        Self::from_keys(sets.into_iter().flat_map(|s| s.0.iter().cloned()))
    }

    pub fn keys(&self) -> &[Key] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn fingerprints(&self) -> Vec<String> {
        self.0.iter().map(|k| k.fingerprint.clone()).collect()
    }

    /// How many keys of `self` are not in `newer`.
    pub fn removed_in(&self, newer: &KeySet) -> usize {
        let ids: HashSet<(&str, &str)> = newer.0.iter().map(Key::id).collect();
        self.0.iter().filter(|k| !ids.contains(&k.id())).count()
    }

    /// Same keys (identity and rendering), regardless of order.
    pub fn same_as(&self, other: &KeySet) -> bool {
        self.0.len() == other.0.len() && self.removed_in(other) == 0 && other.removed_in(self) == 0
    }
}

/// One rejected entry, for the log.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// Position in the source's list (0-based).
    pub index: usize,
    pub error: KeyError,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "entry {}: {}", self.index, self.error)
    }
}

/// Validates a list of entries: good keys deduplicated, bad ones reported.
pub fn parse_entries<'a>(
    entries: impl IntoIterator<Item = &'a str>,
    policy: &Policy,
) -> (KeySet, Vec<Rejected>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        match parse_entry(entry, policy) {
            Ok(key) => good.push(key),
            Err(error) => bad.push(Rejected { index, error }),
        }
    }
    (KeySet::from_keys(good), bad)
}

/// Validates a body in authorized_keys format: blank lines and `#` comments
/// are skipped, every other line is one entry.
pub fn parse_authorized_keys(text: &str, policy: &Policy) -> (KeySet, Vec<Rejected>) {
    parse_entries(
        text.split('\n').filter(|line| {
            let t = line.trim();
            !t.is_empty() && !t.starts_with('#')
        }),
        policy,
    )
}

/// The (algorithm, base64 blob) an authorized_keys line of another writer
/// names, with its options split off as for an entry; None for a blank or
/// comment line, or one whose fields do not look like a key. Used to find
/// copies of revoked keys outside the managed block.
pub fn line_key_id(line: &str) -> Option<(&str, &str)> {
    let text = line.trim_matches([' ', '\t', '\r', '\n']);
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    let (_, rest) = split_options(text).ok()?;
    let mut fields = rest.split([' ', '\t']).filter(|f| !f.is_empty());
    let algorithm = fields.next()?;
    let blob = fields.next()?;
    looks_like_algorithm(algorithm).then_some((algorithm, blob))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(super) const ALICE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi alice@laptop";
    pub(super) const BOB: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFRzugNBd+MDtj+CrHEVbfNBi8jOKFGD1yT48UoTK0oN bob@desktop";
    // ssh-keygen -t rsa -b 1024 (public half only).
    const RSA1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCtH1LFLHEiYTOeF+ZJABiwwtfK4XLt4enfE1fAq2NvZKJBaaauQo5Q1GSnqZlCscmMymJFk9ImoCl+vRwtMhVsQyzzgQMZGypxtlhZDmhetV37Bo9tpwzrIKKww8fjJ6y5xA3Ps/hUjnX/fKBN5/qg5M0dWNiVDyXaIziwoZbAsQ== short";
    const DSS: &str = "ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7WT2NWPq/xfW6MPbLm1Vs14E7gB00b/JmYLdrmVClpJ+f6AR7ECLCT7up1/63xhv4O1fnxqimFQ8E+4P208UewwI1VBNaFpEy9nXzrith1yrv8iIDGZ3RSAHHAAAAFQCXYFCPFSMLzLKSuYKi64QL8Fgc9QAAAIEA9+GghdabPd7LvKtcNrhXuXmUr7v6OuqC+VdMCz0HgmdRWVeOutRZT+ZxBxCBgLRJFnEj6EwoFhO3zwkyjMim4TwWeotUfI0o4KOuHiuzpnWRbqN/C/ohNWLx+2J6ASQ7zKTxvqhRkImog9/hWuWfBpKLZl6Ae1UlZAFMO/7PSSoAAACBAPBjzKvYkuMJ4S0ZXHtYMm2UaDfKmVMV6XDIoUXtIfpG5FgMVnzPR9CZyH2Kx0Nm0yqEI6T8RSvmQUx8hF30kSmPEK+EnLG5A4C7DVS3rAvtsmBlCtJvmRtu1K/hzH29yPvsgCu9DsB8hT7WnXH6m5jfvKt3Y8dSPBaobTJ2Yr2Y dss";

    fn policy() -> Policy {
        Policy::default()
    }

    #[test]
    fn accepts_fixture_keys_and_computes_fingerprint() {
        let key = parse_entry(ALICE, &policy()).unwrap();
        assert_eq!(key.algorithm, "ssh-ed25519");
        assert_eq!(key.comment, "alice@laptop");
        assert!(key.fingerprint.starts_with("SHA256:"));
        assert_eq!(key.line(None), ALICE);
        assert_eq!(key.line(Some("no-pty")), format!("no-pty {ALICE}"));
    }

    #[test]
    fn rejects_every_hostile_shape() {
        let p = policy();
        let injected = format!("{ALICE}\n{BOB}");
        assert!(matches!(
            parse_entry(&injected, &p),
            Err(KeyError::ControlCharacter('\n'))
        ));
        let injected_cr = format!("{ALICE}\rcommand=\"x\" {BOB}");
        assert!(matches!(
            parse_entry(&injected_cr, &p),
            Err(KeyError::ControlCharacter('\r'))
        ));
        assert!(matches!(
            parse_entry(&format!("{ALICE}\u{7}"), &p),
            Err(KeyError::ControlCharacter(_))
        ));
        assert!(matches!(
            parse_entry(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi a\u{2028}b",
                &p
            ),
            Err(KeyError::ControlCharacter(_))
        ));
        assert!(matches!(
            parse_entry(&format!("command=\"/bin/sh\" {ALICE}"), &p),
            Err(KeyError::HasOptions(_))
        ));
        assert!(matches!(
            parse_entry(&format!("no-pty,from=\"10.0.0.0/8\" {ALICE}"), &p),
            Err(KeyError::HasOptions(_))
        ));
        assert!(matches!(
            parse_entry("-----BEGIN OPENSSH PRIVATE KEY-----", &p),
            Err(KeyError::PrivateKey)
        ));
        assert!(matches!(parse_entry(DSS, &p), Err(KeyError::Dss)));
        assert!(matches!(
            parse_entry(RSA1024, &p),
            Err(KeyError::RsaTooShort {
                bits: 1024,
                min: 2048
            })
        ));
        let long_comment = format!("{ALICE} {}", "x".repeat(20 * 1024));
        assert!(matches!(
            parse_entry(&long_comment, &p),
            Err(KeyError::TooLong(_))
        ));
        assert!(matches!(parse_entry("", &p), Err(KeyError::Empty)));
        assert!(matches!(parse_entry("   \t ", &p), Err(KeyError::Empty)));
        assert!(matches!(
            parse_entry("ssh-ed25519 AAAAnotbase64!!", &p),
            Err(KeyError::Unparsable(_))
        ));
        assert!(matches!(
            parse_entry("ssh-ed25519", &p),
            Err(KeyError::Unparsable(_))
        ));
        assert!(parse_entry("hello world", &p).is_err());
        // The blob's inner type must match the named type.
        let mismatched = ALICE.replace("ssh-ed25519 ", "ssh-rsa ");
        assert!(parse_entry(&mismatched, &p).is_err());
    }

    #[test]
    fn options_kept_when_allowed() {
        let p = Policy {
            allow_source_options: true,
            ..policy()
        };
        let key = parse_entry(&format!("command=\"echo hi there\",no-pty {ALICE}"), &p).unwrap();
        assert_eq!(
            key.options.as_deref(),
            Some("command=\"echo hi there\",no-pty")
        );
        assert_eq!(
            key.line(Some("restrict")),
            format!("restrict,command=\"echo hi there\",no-pty {ALICE}")
        );
    }

    #[test]
    fn algorithm_allow_list() {
        let p = Policy {
            allowed_algorithms: vec!["ssh-rsa".into()],
            ..policy()
        };
        assert!(matches!(
            parse_entry(ALICE, &p),
            Err(KeyError::AlgorithmNotAllowed(_))
        ));
    }

    #[test]
    fn comments_trimmed_and_cut_at_char_boundary() {
        let key = parse_entry(&format!("  {ALICE}\t \r\n"), &policy()).unwrap();
        assert_eq!(key.comment, "alice@laptop");
        let long = format!(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi {}",
            "é".repeat(200)
        );
        let key = parse_entry(&long, &policy()).unwrap();
        assert!(key.comment.len() <= MAX_COMMENT_BYTES);
        assert!(key.comment.chars().all(|c| c == 'é'));
        let tabbed = "ssh-ed25519\tAAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi\tmy laptop";
        let key = parse_entry(tabbed, &policy()).unwrap();
        assert_eq!(key.comment, "my laptop");
        assert!(!key.line(None).contains('\t'));
    }

    #[test]
    fn dedup_ignores_comments() {
        let other_comment = ALICE.replace("alice@laptop", "alice@other");
        let (set, bad) = parse_entries([ALICE, BOB, other_comment.as_str(), ""], &policy());
        assert_eq!(set.len(), 2);
        assert_eq!(set.keys()[0].comment, "alice@laptop");
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].index, 3);
    }

    #[test]
    fn authorized_keys_text_skips_comments_and_blanks() {
        let text = format!("# header\n\n{ALICE}\r\n{BOB}\n   \n");
        let (set, bad) = parse_authorized_keys(&text, &policy());
        assert_eq!(set.len(), 2);
        assert!(bad.is_empty());
    }

    #[test]
    fn removal_counting() {
        let (a, _) = parse_entries([ALICE, BOB], &policy());
        let (b, _) = parse_entries([BOB], &policy());
        assert_eq!(a.removed_in(&b), 1);
        assert_eq!(b.removed_in(&a), 0);
        assert!(!a.same_as(&b));
        assert!(a.same_as(&KeySet::union([&b, &a])));
    }

    #[test]
    fn bit_length_counts_from_top_bit() {
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x01]), 1);
        assert_eq!(bit_length(&[]), 0);
    }

    // ssh-keygen -t rsa -b 2048 (public half only).
    const RSA2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCV1tUuXGpgDcG48IZVMBqnuC5iIWgh84+b73IfnV52HGrnBdb5oS5WoMWov5HXIKrJl+leNfnrd09pKHUNY5vUnn3BEdMlaDXTf0Fpfbsjban809KbTtv+ayECclHStzT+mvwNWGL0fodIDmcTc5a0V4jKcIiGcX9nSN2yiNUAW5d4uyIh6sjJ4pukA/6HeAuHCWE3MOZCdvZk3vHQjBzqXJzxlOMFaLsxq2067Cw+jDL1tauGfmacbaUwPgYG9R63dmoC5Au5ge4+IVK/jyERlWFC96kv1u1olBHBvM6dwksHnwh6YbIed137X7AQIgkxngS7B13tt3o8lijxPNJD rsa2048";

    fn blob(line: &str) -> &str {
        line.split(' ').nth(1).unwrap()
    }

    fn open_policy() -> Policy {
        Policy {
            allow_source_options: true,
            ..policy()
        }
    }

    #[test]
    fn options_end_where_sshd_ends_them() {
        let p = open_policy();
        // Inside quotes `\\` escapes nothing: `x\\"` is a backslash and an
        // escaped quote, so the quote stays open over the ed25519 key and
        // sshd reads the RSA key after it.
        let hidden_short = format!("command=\"x\\\\\" {ALICE}\" {RSA1024}");
        assert!(
            matches!(
                parse_entry(&hidden_short, &p),
                Err(KeyError::RsaTooShort { bits: 1024, .. })
            ),
            "{:?}",
            parse_entry(&hidden_short, &p)
        );
        let hidden = format!("command=\"x\\\\\" {ALICE}\" {RSA2048}");
        let key = parse_entry(&hidden, &p).unwrap();
        assert_eq!(key.blob, blob(RSA2048));
        assert_eq!(key.algorithm, "ssh-rsa");
        assert_eq!(
            key.options.as_deref(),
            Some(format!("command=\"x\\\\\" {ALICE}\"").as_str())
        );
        // `\"` is skipped whole outside quotes too: it opens no quote.
        let key = parse_entry(&format!("no-pty,\\\"x {ALICE}"), &p).unwrap();
        assert_eq!(key.blob, blob(ALICE));
        assert_eq!(key.options.as_deref(), Some("no-pty,\\\"x"));
        // An escaped quote inside quotes keeps the quote open.
        let key = parse_entry(&format!("command=\"echo \\\"a b\\\"\" {BOB}"), &p).unwrap();
        assert_eq!(key.blob, blob(BOB));
        // A quote never closed: sshd refuses the line, so do we.
        assert!(parse_entry(&format!("command=\"x {ALICE}"), &p).is_err());
        // Options and nothing after them.
        assert!(parse_entry("no-pty,command=\"a b\"", &p).is_err());
    }

    #[test]
    fn sshd_key_reads_lines_as_sshd_does() {
        assert_eq!(sshd_key(ALICE), Some(("ssh-ed25519", blob(ALICE))));
        let hidden = format!("command=\"x\\\\\" {ALICE}\" {RSA2048}");
        assert_eq!(sshd_key(&hidden), Some(("ssh-rsa", blob(RSA2048))));
        assert_eq!(
            sshd_key(&format!("no-pty\t{BOB}")),
            Some(("ssh-ed25519", blob(BOB)))
        );
        assert_eq!(sshd_key("command=\"x ssh-ed25519 AAAA"), None);
        assert_eq!(sshd_key("no-pty"), None);
    }

    /// The fingerprints `ssh-keygen -l` prints for the lines of a file: it
    /// splits lines with OpenSSH's own `sshkey_advance_past_options`, as
    /// sshd does.
    fn ssh_keygen_fingerprints(lines: &[String]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys");
        std::fs::write(
            &path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(&path)
            .output()
            .expect("ssh-keygen (openssh-client) must be installed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(' ').nth(1).map(str::to_string))
            .collect()
    }

    /// For an accepted entry: every line keysync would write for it (bare,
    /// with user options, with an expiry in front) holds, for OpenSSH, the
    /// key keysync checked and reports.
    fn assert_openssh_reads_the_checked_key(entry: &str) -> Result<(), TestCaseError> {
        let Ok(key) = parse_entry(entry, &open_policy()) else {
            return Ok(());
        };
        let lines = vec![
            key.line(None),
            key.line(Some("no-pty")),
            key.line(Some("expiry-time=\"20991231235959Z\",restrict")),
        ];
        let got = ssh_keygen_fingerprints(&lines);
        prop_assert_eq!(
            got,
            vec![key.fingerprint.clone(); 3],
            "entry {:?} accepted as {:?}; lines {:#?}",
            entry,
            key,
            lines
        );
        Ok(())
    }

    #[test]
    fn openssh_reads_the_key_keysync_checked_in_crafted_entries() {
        let entries = [
            format!("command=\"x\\\\\" {ALICE}\" {RSA2048}"),
            format!("command=\"x\\\\\" {ALICE}\" {RSA1024}"),
            format!("no-pty,\\\"x {ALICE}"),
            format!("from=\"a\\\\\",command=\"b {BOB}\" {RSA2048}"),
            format!("command=\"echo \\\"a b\\\"\" {BOB}"),
            format!("environment=\"A=\\\\\" {BOB} {RSA2048}\" {ALICE}"),
            format!("{ALICE} \"{RSA2048}\""),
        ];
        for entry in &entries {
            assert_openssh_reads_the_checked_key(entry).unwrap();
        }
    }

    /// Bits of options that quote, escape and end early.
    fn head() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("\\\\\""),
            Just("\\\""),
            Just("\""),
            Just("\\"),
            Just(" "),
            Just("\t"),
            Just("a,b="),
        ]
    }

    /// What follows the first key: closing quotes, blanks, more keys.
    fn tail() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"".to_string()),
            Just("\" ".to_string()),
            Just(" ".to_string()),
            Just("\\\"".to_string()),
            Just(format!(" {ALICE}")),
            Just(format!(" {RSA1024}")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        // Options full of quotes, backslashes and blanks around real keys:
        // whatever keysync accepts, OpenSSH reads as the same key.
        #[test]
        fn openssh_reads_the_key_keysync_checked(
            start in prop::bool::ANY,
            head in prop::collection::vec(head(), 0..6),
            tail in prop::collection::vec(tail(), 0..6),
        ) {
            let prefix = if start { "command=\"" } else { "no-pty," };
            let entry = format!("{prefix}{} {BOB}{}", head.concat(), tail.concat());
            assert_openssh_reads_the_checked_key(&entry)?;
        }
    }

    proptest! {
        // Whatever the input, an accepted key renders as exactly one line
        // with no control characters but tab (allowed inside a comment,
        // DESIGN.md §6).
        #[test]
        fn accepted_keys_render_as_one_clean_line(prefix in ".{0,40}", suffix in ".{0,300}") {
            let entry = format!("{prefix}{ALICE}{suffix}");
            let p = Policy { allow_source_options: true, ..Policy::default() };
            if let Ok(key) = parse_entry(&entry, &p) {
                let line = key.line(Some("no-pty"));
                prop_assert!(!line.chars().any(|c| c.is_control() && c != '\t'));
                prop_assert_eq!(line.lines().count(), 1);
                prop_assert!(key.comment.len() <= MAX_COMMENT_BYTES);
            }
        }

        #[test]
        fn parse_never_panics(entry in "\\PC{0,200}") {
            let _ = parse_entry(&entry, &Policy::default());
        }
    }
}
