//! The list formats every source kind shares (DESIGN.md §5): the control
//! plane's JSON (an array of objects, or an object with an `ssh_keys`
//! array), its "no SSH keys" 404, and bodies in authorized_keys format.
//! Pure: bytes in, raw entries out; the key policy validates them after.

use serde_json::Value;

use super::SourceError;

/// Parses a 200 body into key entries. An error means the body is not one of
/// the accepted shapes, which is transient (the list is not known).
///
/// A live element that is not an object with a key text makes the whole
/// answer unreadable rather than being skipped: were it skipped, a renamed
/// field in the API (or a million `{}`) would read as "no keys" and revoke
/// every key on every instance.
pub fn parse_list(body: &[u8]) -> Result<Vec<String>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("bad JSON in answer: {e}"))?;
    let elements = match &value {
        Value::Array(items) => items,
        Value::Object(map) => match map.get("ssh_keys") {
            Some(Value::Array(items)) => items,
            _ => return Err("JSON answer has no ssh_keys array".into()),
        },
        _ => return Err("JSON answer is neither an array nor an object".into()),
    };
    let mut entries = Vec::with_capacity(elements.len());
    for (index, element) in elements.iter().enumerate() {
        let Value::Object(obj) = element else {
            return Err(format!("list element {index} is not an object"));
        };
        if obj.get("deleted_at").is_some_and(|d| !d.is_null()) {
            continue;
        }
        let text = ["public_key", "key", "ssh_key"]
            .iter()
            .find_map(|field| obj.get(*field).and_then(Value::as_str));
        match text {
            Some(text) => entries.push(text.to_string()),
            None => {
                return Err(format!(
                    "list element {index} has no key text (public_key, key or ssh_key)"
                ));
            }
        }
    }
    Ok(entries)
}

/// True when a 404 body says the account has no SSH keys (the authoritative
/// empty list), in `msg` or `error`.
pub fn says_no_ssh_keys(body: &[u8]) -> bool {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    ["msg", "error"].iter().any(|field| {
        map.get(*field)
            .and_then(Value::as_str)
            .is_some_and(|text| text.to_ascii_lowercase().contains("no ssh keys"))
    })
}

/// The entries of a body in authorized_keys format: every line that is not
/// blank or a `#` comment.
pub fn authorized_keys_entries(text: &str) -> Vec<String> {
    text.split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        })
        .map(str::to_string)
        .collect()
}

/// JSON when the first non-blank byte is `[` or `{`, else authorized_keys lines.
pub fn parse_file(bytes: &[u8]) -> Result<Vec<String>, SourceError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'[') | Some(b'{')) {
        return parse_list(bytes).map_err(SourceError::transient);
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| SourceError::transient("key file is not valid UTF-8"))?;
    Ok(authorized_keys_entries(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/control-plane")
            .join(name);
        let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/control-plane")
            .join(name);
        std::fs::read(&local)
            .or_else(|_| std::fs::read(&path))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn every_200_fixture_shape_parses_and_skips_deleted() {
        for name in [
            "list-array-key.json",
            "list-array-public-key.json",
            "list-object-ssh-keys.json",
        ] {
            let entries = parse_list(&fixture(name)).unwrap();
            assert_eq!(entries.len(), 2, "{name}");
            assert!(entries[0].ends_with("alice@laptop"), "{name}");
            assert!(entries[1].ends_with("bob@desktop"), "{name}");
            assert!(!entries.iter().any(|e| e.contains("old@retired")), "{name}");
        }
    }

    #[test]
    fn the_404_fixtures_are_told_apart() {
        assert!(says_no_ssh_keys(&fixture("not-found-no-keys.json")));
        assert!(!says_no_ssh_keys(&fixture("unauthorized.json")));
        assert!(!says_no_ssh_keys(br#"{"success":false,"msg":"Not found"}"#));
        assert!(says_no_ssh_keys(
            br#"{"error":"No SSH keys for this account"}"#
        ));
        assert!(!says_no_ssh_keys(b"no ssh keys"));
    }

    #[test]
    fn field_precedence_public_key_then_key_then_ssh_key() {
        let body = br#"[{"ssh_key":"c","key":"b","public_key":"a"},{"ssh_key":"c","key":"b"},{"ssh_key":"c"},{"public_key":null,"key":"d"}]"#;
        assert_eq!(parse_list(body).unwrap(), ["a", "b", "c", "d"]);
    }

    #[test]
    fn an_unreadable_element_makes_the_answer_an_error_not_a_shorter_list() {
        for body in [
            &br#"[{"key":"a"},{"id":1}]"#[..],
            br#"[{"key":"a"},{"key":5}]"#,
            br#"[{"key":"a"},7]"#,
            br#"[{}]"#,
        ] {
            assert!(
                parse_list(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // A soft-deleted element needs no key text.
        assert_eq!(
            parse_list(br#"[{"key":"a"},{"id":1,"deleted_at":"2026-01-01T00:00:00Z"}]"#).unwrap(),
            ["a"]
        );
    }

    #[test]
    fn wrong_shapes_are_errors_not_empty_lists() {
        for body in [
            &b"garbage"[..],
            b"{\"success\":true}",
            b"\"x\"",
            b"[{\"key\": \"a\"",
            b"",
        ] {
            assert!(
                parse_list(body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse_list(deep.as_bytes()).is_err());
    }

    #[test]
    fn entries_skip_comments_and_blank_lines() {
        assert_eq!(
            authorized_keys_entries("# c\n\nssh-ed25519 A b\r\n  \n"),
            ["ssh-ed25519 A b"]
        );
    }
}
