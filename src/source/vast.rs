//! The control-plane source (`kind = "vast"`, DESIGN.md §5).
//!
//! `GET <url>` with the Bearer API key; the answer table:
//! 200 with a JSON array of objects, or an object with an `ssh_keys` array,
//! is the list (key text in `public_key`, else `key`, else `ssh_key`;
//! elements with a non-null `deleted_at` skipped); 304 is unchanged; a 404
//! whose JSON says there are no SSH keys is the authoritative empty list;
//! other 404s, 401 and 403 are rejected; 429, 5xx, timeouts, bad JSON and
//! oversized bodies are transient.
//!
//! The API key is looked up here, at each fetch, and only ever held as a
//! [`Secret`], whose `Debug` and `Display` redact it.

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Client, StatusCode, Url};

use super::format::{parse_list, says_no_ssh_keys};
use super::http::{
    LAST_EVENT_ID, classify, client, etag, event_id_header, get, max_age, parse_url,
};
use super::{Answer, FetchFuture, KeySource, SourceError};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{ApiKeySource, SourceSettings};

pub struct VastSource {
    client: Client,
    url: Url,
    api_key: ApiKeySource,
    etag: Option<String>,
    /// The stream's latest event id, sent as `Last-Event-ID` (see
    /// [`KeySource::set_event_id`]).
    event_id: Option<HeaderValue>,
    max_body: u64,
    max_age: Option<Duration>,
}

impl VastSource {
    pub fn new(
        settings: &SourceSettings,
        url: &str,
        api_key: ApiKeySource,
        etag: Option<String>,
    ) -> Result<Self, SourceError> {
        let url = parse_url(url)?;
        Ok(VastSource {
            client: client(settings, &url)?,
            url,
            api_key,
            etag,
            event_id: None,
            max_body: settings.max_body,
            max_age: None,
        })
    }

    async fn fetch_once(&mut self) -> Result<Answer, SourceError> {
        let key = resolve_api_key(&self.api_key).map_err(|e| SourceError::Rejected {
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
        if let Some(id) = &self.event_id {
            headers.insert(LAST_EVENT_ID, id.clone());
        }

        let response = get(
            &self.client,
            &self.url,
            headers,
            self.etag.as_deref(),
            self.max_body,
        )
        .await?;
        self.max_age = max_age(&response.headers);
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

    fn max_age(&self) -> Option<Duration> {
        self.max_age
    }

    fn set_event_id(&mut self, id: Option<&str>) {
        self.event_id = event_id_header(id);
    }
}

/// An API key. `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    /// The raw value, for the Authorization header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why no API key could be had.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error("cannot read api_key_file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no API key: api_key_file is missing or empty, and neither the {env} environment variable nor the systemd credential api-key is set"
    )]
    Missing { env: String },
}

/// Looks the key up: `api_key_file`, else the env var, else
/// `$CREDENTIALS_DIRECTORY/api-key`. Surrounding whitespace is trimmed.
pub fn resolve_api_key(place: &ApiKeySource) -> Result<Secret, ApiKeyError> {
    if let Some(path) = &place.api_key_file {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                warn_if_readable_by_others(path);
                if let Some(key) = non_empty(text) {
                    return Ok(key);
                }
            }
            // Not there (yet): the next places may have it, e.g. a
            // packaged default config used with LoadCredential=.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ApiKeyError::Read {
                    path: path.clone(),
                    source,
                });
            }
        }
    }
    if let Some(key) = std::env::var(&place.api_key_env).ok().and_then(non_empty) {
        return Ok(key);
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join("api-key");
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Some(key) = non_empty(text)
        {
            return Ok(key);
        }
    }
    Err(ApiKeyError::Missing {
        env: place.api_key_env.clone(),
    })
}

fn non_empty(text: String) -> Option<Secret> {
    let trimmed = text.trim();
    (!trimmed.is_empty()).then(|| Secret(trimmed.to_string()))
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The key is read at every fetch; warn once per path, not every minute.
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
        && let Ok(mut warned) = WARNED.lock()
        && !warned.iter().any(|p| p == path)
    {
        warned.push(path.to_path_buf());
        let mode = format!("{:o}", meta.permissions().mode() & 0o7777);
        tracing::warn!(
            path = %path.display(),
            %mode,
            "API key file {} is readable by group or others (mode {mode}); chmod 600 it",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `answers` one-request connections on loopback and returns
    /// the requests' headers, lower-cased.
    async fn header_capture(answers: usize) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api/v0/ssh/", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..answers {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut chunk).await.unwrap();
                    assert!(n > 0);
                    buf.extend_from_slice(&chunk[..n]);
                }
                seen.push(String::from_utf8_lossy(&buf).to_lowercase());
                let body = "[]";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        });
        (url, task)
    }

    #[tokio::test]
    async fn the_stream_event_id_rides_along_as_last_event_id_and_the_url_is_kept() {
        let (url, server) = header_capture(3).await;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "k").unwrap();
        let settings =
            SourceSettings::for_tests("cp", crate::config::SourceKind::File { path: key.clone() });
        let api_key = ApiKeySource {
            api_key_file: Some(key),
            api_key_env: "KEYSYNC_TEST_NOT_SET_3".into(),
        };
        let mut source = VastSource::new(&settings, &url, api_key, None).unwrap();
        source.fetch().await.unwrap();
        source.set_event_id(Some("1796248800:0"));
        source.fetch().await.unwrap();
        // An id that is no header value is dropped, not a failed fetch.
        source.set_event_id(Some("bad\nid"));
        source.fetch().await.unwrap();
        let seen = server.await.unwrap();
        for request in &seen {
            assert!(
                request.starts_with("get /api/v0/ssh/ http/1.1\r\n"),
                "{request}"
            );
        }
        assert!(!seen[0].contains("last-event-id"), "{}", seen[0]);
        assert!(
            seen[1].contains("\r\nlast-event-id: 1796248800:0\r\n"),
            "{}",
            seen[1]
        );
        assert!(!seen[2].contains("last-event-id"), "{}", seen[2]);
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("sk-live-123".into());
        assert_eq!(format!("{s:?} {s}"), "Secret(<redacted>) <redacted>");
    }

    #[test]
    fn api_key_lookup_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        let src = ApiKeySource {
            api_key_file: Some(file),
            api_key_env: "KEYSYNC_TEST_NOT_SET_1".into(),
        };
        assert_eq!(resolve_api_key(&src).unwrap().expose(), "from-file");
        let src = ApiKeySource {
            api_key_file: None,
            api_key_env: "KEYSYNC_TEST_NOT_SET_2".into(),
        };
        assert!(matches!(
            resolve_api_key(&src),
            Err(ApiKeyError::Missing { .. })
        ));
    }
}
