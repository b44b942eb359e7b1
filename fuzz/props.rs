//! The properties the fuzz targets check, shared with the stable replay test.
//!
//! Each `check_*` function takes the fuzzer's raw bytes and panics when a
//! property fails. The fuzz targets (`fuzz/fuzz_targets/*.rs`) call them
//! under libFuzzer; `tests/it/fuzz_replay.rs` includes this file with
//! `#[path]` and feeds it every committed seed and regression in
//! `fuzz/corpus-seed/<target>/`, so CI checks the same properties on stable
//! Rust without a fuzzer. Only `keysync`, `serde_json` and `std` are used, so
//! the file compiles in both crates.

#![allow(dead_code)]

use keysync::keys::{self, Key, KeyError, MAX_COMMENT_BYTES, Policy};
use keysync::render;
use keysync::source::format;
use serde_json::{Map, Value};

// ---------------------------------------------------------------------------
// keys::parse_entry and Key::line

/// The first byte picks the policy, the rest (lossily decoded) is the entry.
///
/// Properties: never panics; an entry whose trimmed text still holds a line
/// break is rejected; an accepted key obeys the policy, renders as exactly one
/// line with no control character but tab (with and without user options),
/// and parses back to the same key from its own line.
pub fn check_parse_entry(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let entry = String::from_utf8_lossy(rest);
    let policy = Policy {
        allow_source_options: selector & 1 != 0,
        min_rsa_bits: if selector & 2 != 0 { 1024 } else { 2048 },
        allowed_algorithms: if selector & 4 != 0 {
            vec!["ssh-ed25519".to_string(), "ssh-rsa".to_string()]
        } else {
            keys::DEFAULT_ALGORITHMS
                .iter()
                .map(|s| s.to_string())
                .collect()
        },
    };
    let result = keys::parse_entry(&entry, &policy);

    // An injected line break can never survive, whatever else the entry holds.
    let inner = entry.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r'));
    if inner.chars().any(is_line_break) {
        assert!(
            result.is_err(),
            "entry with an inner line break accepted: {entry:?} -> {result:?}"
        );
    }
    if entry.len() > keys::MAX_ENTRY_BYTES {
        assert!(
            matches!(result, Err(KeyError::TooLong(_))),
            "oversized entry not refused: {result:?}"
        );
    }
    let Ok(key) = result else { return };

    assert!(
        policy.allowed_algorithms.contains(&key.algorithm),
        "{key:?} outside the policy's algorithms"
    );
    assert!(key.algorithm != "ssh-dss", "ssh-dss accepted: {key:?}");
    assert!(
        policy.allow_source_options || key.options.is_none(),
        "options accepted although the policy forbids them: {key:?}"
    );
    assert!(
        key.comment.len() <= MAX_COMMENT_BYTES,
        "comment over {MAX_COMMENT_BYTES} bytes: {key:?}"
    );
    assert!(key.fingerprint.starts_with("SHA256:"), "{key:?}");

    for user_options in [None, Some("no-pty"), Some("restrict,command=\"echo a b\"")] {
        let line = key.line(user_options);
        assert_one_clean_line(&line, &key);
    }

    // The rendered line is a fixed point: parsing it gives the same key.
    let line = key.line(None);
    let again = keys::parse_entry(&line, &policy)
        .unwrap_or_else(|e| panic!("own line {line:?} of {key:?} refused: {e}"));
    assert_eq!(again, key, "re-parsing {line:?} changed the key");

    // With the user's options in front, the key is the same, options included.
    let open = Policy {
        allow_source_options: true,
        ..policy
    };
    let line = key.line(Some("no-pty"));
    let with_opts = keys::parse_entry(&line, &open)
        .unwrap_or_else(|e| panic!("own line {line:?} of {key:?} refused: {e}"));
    assert_eq!(
        (
            &with_opts.algorithm,
            &with_opts.blob,
            &with_opts.comment,
            &with_opts.fingerprint
        ),
        (&key.algorithm, &key.blob, &key.comment, &key.fingerprint),
        "{line:?}"
    );
    let want_opts = match &key.options {
        Some(o) => format!("no-pty,{o}"),
        None => "no-pty".to_string(),
    };
    assert_eq!(with_opts.options.as_deref(), Some(want_opts.as_str()));
}

/// Characters some tool could treat as the end of a line.
fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r' | '\u{0b}' | '\u{0c}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

/// One authorized_keys line: no line break, no control character but tab
/// (DESIGN.md §6: tab and space are the only whitespace allowed), and no
/// space or tab at either end (`managed_lines` and authorized_keys parsers
/// strip those, so the line read back would differ). Other Unicode blanks
/// (U+00A0, U+3000, …) may end a comment: comments are kept as they came
/// (DESIGN.md §6), and nothing strips them (fuzz finding, seed
/// `regression-nbsp-at-comment-end`).
fn assert_one_clean_line(line: &str, key: &Key) {
    assert!(
        !line
            .chars()
            .any(|c| is_line_break(c) || (c.is_control() && c != '\t')),
        "line of {key:?} holds a control character: {line:?}"
    );
    assert_eq!(line.lines().count(), 1, "{line:?}");
    assert_eq!(line.trim_ascii(), line, "blank at an end of {line:?}");
}

// ---------------------------------------------------------------------------
// format::parse_list and format::says_no_ssh_keys

/// The first byte picks the mode: odd bytes build a JSON answer from the rest
/// (so most inputs are well-formed lists), even bytes pass the rest as the
/// raw body. Both check the answer against [`expected_entries`].
pub fn check_vast(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        let (body, expected) = build_answer(rest);
        let got = format::parse_list(&body);
        assert_eq!(
            got.as_ref().ok(),
            expected.as_ref(),
            "body {}",
            String::from_utf8_lossy(&body)
        );
        check_vast_body(&body);
    } else {
        check_vast_body(rest);
    }
}

/// Properties of any body: no panic, and parse_list's entries are exactly the
/// key texts of the live elements, in order (an answer with an element that
/// is not a readable key record is an error, never a shorter list);
/// says_no_ssh_keys only for a JSON object whose `msg` or `error` says so.
pub fn check_vast_body(body: &[u8]) {
    let got = format::parse_list(body);
    let expected = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| expected_entries(&v));
    assert_eq!(
        got.as_ref().ok(),
        expected.as_ref(),
        "body {:?}",
        String::from_utf8_lossy(body)
    );

    let no_keys = format::says_no_ssh_keys(body);
    let expected_no_keys = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => ["msg", "error"].iter().any(|f| {
            map.get(*f)
                .and_then(Value::as_str)
                .is_some_and(|t| t.to_lowercase().contains("no ssh keys"))
        }),
        _ => false,
    };
    assert_eq!(
        no_keys,
        expected_no_keys,
        "says_no_ssh_keys on {:?}",
        String::from_utf8_lossy(body)
    );
}

/// DESIGN.md §5 restated: a JSON array of objects, or an object with an
/// `ssh_keys` array; key text in `public_key`, else `key`, else `ssh_key`;
/// elements with a non-null `deleted_at` skipped. None: not a list answer.
pub fn expected_entries(value: &Value) -> Option<Vec<String>> {
    let elements = match value {
        Value::Array(items) => items,
        Value::Object(map) => map.get("ssh_keys")?.as_array()?,
        _ => return None,
    };
    let mut out = Vec::new();
    for element in elements {
        let obj = element.as_object()?;
        if obj.get("deleted_at").is_some_and(|d| !d.is_null()) {
            continue;
        }
        let text = ["public_key", "key", "ssh_key"]
            .iter()
            .find_map(|f| obj.get(*f).and_then(Value::as_str))?;
        out.push(text.to_string());
    }
    Some(out)
}

/// Builds an answer body from bytes, with the entries it must yield (None
/// when it holds an unreadable element). Every byte steers a choice, so
/// the fuzzer explores shapes, field orders, deletions and string contents.
fn build_answer(data: &[u8]) -> (Vec<u8>, Option<Vec<String>>) {
    let mut bytes = Bytes(data);
    let object_shape = bytes.next() & 1 == 1;
    let count = usize::from(bytes.next() % 8);
    let mut elements = Vec::new();
    let mut expected = Some(Vec::new());
    for _ in 0..count {
        let flags = bytes.next();
        if flags == 0xff {
            // Not an object at all: the answer is unreadable.
            elements.push(Value::from(bytes.string()));
            expected = None;
            continue;
        }
        let mut obj = Map::new();
        // Inserted in reverse precedence order; the first string one in
        // precedence order wins.
        let mut strings = Vec::new();
        for (bit, field) in [(1, "ssh_key"), (2, "key"), (4, "public_key")] {
            if flags & bit != 0 {
                if flags & 0x40 != 0 && field == "public_key" {
                    // A non-string value does not count as key text.
                    obj.insert(field.to_string(), Value::from(7));
                } else {
                    let s = bytes.string();
                    obj.insert(field.to_string(), Value::from(s.clone()));
                    strings.push(s);
                }
            }
        }
        // The last string pushed has the highest precedence.
        let best = strings.pop();
        let deleted = match (flags >> 3) & 3 {
            0 => None,
            1 => Some(Value::Null),
            2 => Some(Value::from("2026-06-01T10:00:00Z")),
            _ => Some(Value::from(0)),
        };
        if let Some(d) = &deleted {
            obj.insert("deleted_at".to_string(), d.clone());
        }
        if flags & 0x80 != 0 {
            obj.insert("id".to_string(), Value::from(bytes.next()));
            obj.insert(
                "nested".to_string(),
                serde_json::json!({"a": [1, {"b": null}], "key": "nested is not the key"}),
            );
        }
        let live = deleted.as_ref().is_none_or(Value::is_null);
        if live {
            match best {
                Some(t) => {
                    if let Some(list) = expected.as_mut() {
                        list.push(t);
                    }
                }
                None => expected = None,
            }
        }
        elements.push(Value::Object(obj));
    }
    let value = if object_shape {
        serde_json::json!({"success": true, "ssh_keys": elements})
    } else {
        Value::Array(elements)
    };
    let body = serde_json::to_vec(&value).expect("serializable");
    (body, expected)
}

/// Reads choices from the input; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    /// A length byte, then that many bytes, lossily decoded.
    fn string(&mut self) -> String {
        let len = usize::from(self.next() % 64).min(self.0.len());
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8_lossy(s).into_owned()
    }
}

// ---------------------------------------------------------------------------
// render::merge_block and render::managed_lines

/// The first byte picks how many keys (0–4) and whether they carry comments
/// made from the input; the rest is the existing file.
///
/// Properties: merging twice changes nothing; the result holds exactly one
/// BEGIN and one END marker line with keys and none without; managed_lines
/// reads back exactly the keys; the lines outside the block are the same for
/// any key list (so changing keys never touches them), and for a file
/// without markers they are the file itself, byte for byte, in order.
pub fn check_merge_block(data: &[u8]) {
    let Some((&selector, existing)) = data.split_first() else {
        return;
    };
    let n = usize::from(selector % 5);
    let comment_source = String::from_utf8_lossy(existing);
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let base = format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKEY{i}");
            if selector & 0x80 != 0 {
                // Comments as Key::line renders them: no control characters
                // but tab, no space or tab at the ends.
                let comment: String = comment_source
                    .chars()
                    .skip(i * 7)
                    .take(20)
                    .filter(|&c| !(is_line_break(c) || c.is_control() && c != '\t'))
                    .collect();
                let comment = comment.trim_matches([' ', '\t']);
                if comment.is_empty() {
                    base
                } else {
                    format!("{base} {comment}")
                }
            } else {
                format!("{base} k{i}")
            }
        })
        .collect();

    let merged = render::merge_block(Some(existing), &lines)
        .unwrap_or_else(|| panic!("an existing file is never deleted by merge_block"));
    let again = render::merge_block(Some(&merged), &lines).expect("some");
    assert_eq!(
        again,
        merged,
        "merging twice changed the file {:?}",
        String::from_utf8_lossy(existing)
    );

    let markers = marker_lines(&merged);
    if lines.is_empty() {
        assert_eq!(markers, (0, 0), "{:?}", String::from_utf8_lossy(&merged));
    } else {
        assert_eq!(markers, (1, 1), "{:?}", String::from_utf8_lossy(&merged));
    }
    let managed: Vec<&[u8]> = render::managed_lines(&merged);
    let want: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
    assert_eq!(
        managed,
        want,
        "managed_lines of {:?}",
        String::from_utf8_lossy(&merged)
    );

    // The lines outside the block do not depend on the keys. The one change
    // allowed: appending a block to a file whose last line is unterminated
    // adds its newline (fuzz finding, seed `regression-unterminated-line-then-keys`).
    let outside = render::merge_block(Some(&merged), &[]).expect("some");
    let bare = render::merge_block(Some(existing), &[]).expect("some");
    let other =
        render::merge_block(Some(&merged), &["ssh-ed25519 OTHER x".to_string()]).expect("some");
    let other_outside = render::merge_block(Some(&other), &[]).expect("some");
    assert!(
        same_or_newline_added(&outside, &other_outside),
        "changing the keys moved foreign lines: {:?} -> {:?}",
        String::from_utf8_lossy(&outside),
        String::from_utf8_lossy(&other_outside)
    );
    if lines.is_empty() {
        assert_eq!(outside, bare);
    } else {
        assert!(
            same_or_newline_added(&bare, &outside),
            "foreign lines changed: {:?} -> {:?}",
            String::from_utf8_lossy(&bare),
            String::from_utf8_lossy(&outside)
        );
    }

    // Without markers the file is all foreign lines: kept byte for byte, in
    // order, with the block after them.
    if marker_lines(existing) == (0, 0) {
        assert_eq!(bare, existing, "a file without a block was changed");
        let mut want = existing.to_vec();
        if !lines.is_empty() {
            if want.last().is_some_and(|&b| b != b'\n') {
                want.push(b'\n');
            }
            want.extend_from_slice(&render::block(&lines));
        }
        assert_eq!(merged, want);
    }
}

/// `after` is `before`, or `before` with the newline its unterminated last
/// line was missing.
fn same_or_newline_added(before: &[u8], after: &[u8]) -> bool {
    after == before
        || (before.last().is_some_and(|&b| b != b'\n')
            && after.len() == before.len() + 1
            && after.starts_with(before)
            && after.ends_with(b"\n"))
}

/// (BEGIN lines, END lines), recognised as DESIGN.md §4 and the module say:
/// by prefix, after leading blanks.
fn marker_lines(content: &[u8]) -> (usize, usize) {
    let begin = b"# BEGIN keysync managed keys";
    let end = b"# END keysync managed keys";
    let mut counts = (0, 0);
    for line in content.split(|&b| b == b'\n') {
        let t = line.trim_ascii_start();
        if t.starts_with(begin) {
            counts.0 += 1;
        } else if t.starts_with(end) {
            counts.1 += 1;
        }
    }
    counts
}
