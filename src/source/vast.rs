//! The control-plane source (`kind = "vast"`, DESIGN.md §5).
//!
//! `GET <url>` with the Bearer API key; the answer table:
//! 200 with a JSON array of objects, or an object with an `ssh_keys` array,
//! is the list (key text in `public_key`, else `key`, else `ssh_key`;
//! elements with a non-null `deleted_at` skipped); 304 is unchanged; a 404
//! whose JSON says there are no SSH keys is the authoritative empty list;
//! other 404s, 401 and 403 are rejected; 429, 5xx, timeouts, bad JSON and
//! oversized bodies are transient.

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Client, StatusCode, Url};
use serde_json::Value;

use super::http::{classify, client, etag, get, parse_url};
use super::{Answer, FetchFuture, KeySource, SourceError};
use crate::config::{ApiKeySource, SourceSettings};

pub struct VastSource {
    client: Client,
    url: Url,
    api_key: ApiKeySource,
    etag: Option<String>,
    max_body: u64,
}

impl VastSource {
    pub fn new(
        settings: &SourceSettings,
        url: &str,
        api_key: ApiKeySource,
        etag: Option<String>,
    ) -> Result<Self, SourceError> {
        Ok(VastSource {
            client: client(settings)?,
            url: parse_url(url)?,
            api_key,
            etag,
            max_body: settings.max_body,
        })
    }

    async fn fetch_once(&mut self) -> Result<Answer, SourceError> {
        let key = self.api_key.resolve().map_err(|e| SourceError::Rejected {
            what: "no usable API key".into(),
            source: Some(Box::new(e)),
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                SourceError::rejected("the API key contains characters not allowed in a header")
            })?;
        auth.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, auth);

        let response = get(
            &self.client,
            &self.url,
            headers,
            self.etag.as_deref(),
            self.max_body,
        )
        .await?;
        if let Some(err) = classify(&response) {
            return Err(err);
        }
        match response.status {
            StatusCode::NOT_MODIFIED => Ok(Answer::Unchanged),
            StatusCode::NOT_FOUND if says_no_ssh_keys(&response.body) => {
                self.etag = None;
                Ok(Answer::List {
                    entries: Vec::new(),
                    etag: None,
                })
            }
            StatusCode::NOT_FOUND => Err(SourceError::rejected(
                "server answered 404 Not Found (not the no-keys answer): check the url",
            )),
            s if s.is_success() => {
                let entries =
                    parse_list(&response.body).map_err(|what| SourceError::Transient {
                        what,
                        retry_after: None,
                        source: None,
                    })?;
                let etag = etag(&response.headers);
                self.etag.clone_from(&etag);
                Ok(Answer::List { entries, etag })
            }
            s => Err(SourceError::transient(format!("unexpected status {s}"))),
        }
    }
}

impl KeySource for VastSource {
    fn fetch(&mut self) -> FetchFuture<'_> {
        Box::pin(self.fetch_once())
    }
}

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
}
