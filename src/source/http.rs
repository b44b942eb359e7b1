//! Standard HTTP for the sources: the client (rustls, timeouts, same-origin
//! redirects only), the conditional GET with a body limit, and the `http`
//! source kind (a URL whose body is in authorized_keys format, such as a
//! GitHub `.keys` URL).

use std::time::{Duration, SystemTime};

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Client, StatusCode, Url};

use super::format::authorized_keys_entries;
use super::{Answer, FetchFuture, KeySource, SourceError};
use crate::config::SourceSettings;

/// The User-Agent every request carries.
pub fn user_agent() -> String {
    format!("keysync/{}", env!("CARGO_PKG_VERSION"))
}

/// CA bundles where distributions keep the system's roots (the files
/// openssl-probe, and so rustls-native-certs, looks for).
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/ssl/cert.pem",
];

/// Whether the system has roots of its own (`SSL_CERT_FILE`/`SSL_CERT_DIR`
/// or a distribution's bundle). Then only those are trusted, so a CA an
/// operator removed stays removed; a minimal container image without any
/// gets the bundled Mozilla roots instead (DESIGN.md §5). Loading one set
/// rather than both also keeps a few hundred KiB of parsed roots out of
/// each client.
fn system_roots_present() -> bool {
    if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
        return std::path::Path::new(&file).is_file();
    }
    std::env::var_os("SSL_CERT_DIR").is_some()
        || SYSTEM_CA_BUNDLES
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0))
}

/// Builds the client for one source's requests to `target`. Redirects are
/// followed only within the same origin (at most 5), so credentials never
/// reach another host. The standard proxy variables (`HTTPS_PROXY`,
/// `NO_PROXY`, …) are honoured, except for a loopback target: that never
/// goes through a proxy (DESIGN.md §5), since a plain `http://` request
/// carries the API key in the clear and a same-origin redirect cannot
/// leave loopback.
pub fn client(settings: &SourceSettings, target: &Url) -> Result<Client, SourceError> {
    let system_roots = system_roots_present();
    let mut builder = Client::builder()
        .use_rustls_tls()
        .tls_built_in_native_certs(system_roots)
        .tls_built_in_webpki_certs(!system_roots)
        .user_agent(user_agent())
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let first = attempt.previous().first().cloned();
            if attempt.previous().len() > 5 {
                attempt.error("more than 5 redirects")
            } else if first.is_some_and(|f| f.origin() != attempt.url().origin()) {
                attempt.error("redirect to another origin refused")
            } else {
                attempt.follow()
            }
        }));
    if crate::config::is_loopback_host(target) {
        builder = builder.no_proxy();
    }
    if let Some(ca) = &settings.ca_file {
        let pem = std::fs::read(ca).map_err(|e| SourceError::Rejected {
            what: format!("cannot read ca_file {}", ca.display()),
            source: Some(Box::new(e)),
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| SourceError::Rejected {
                what: format!("bad ca_file {}", ca.display()),
                source: Some(Box::new(e)),
            })?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| SourceError::Rejected {
        what: "cannot build HTTP client".into(),
        source: Some(Box::new(e)),
    })
}

/// A response whose body was read within the limit.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// GETs `url` with `If-None-Match` when an ETag is known, reading at most
/// `max_body` bytes. Transport failures are transient.
/// The `Last-Event-ID` header value for a list fetch, or None when there
/// is no id or it is not a valid header value (the fetch goes without).
pub(crate) fn event_id_header(id: Option<&str>) -> Option<HeaderValue> {
    id.and_then(|id| HeaderValue::from_str(id).ok())
}

/// The header a list fetch carries the stream's latest event id in.
pub(crate) const LAST_EVENT_ID: header::HeaderName =
    header::HeaderName::from_static("last-event-id");

pub async fn get(
    client: &Client,
    url: &Url,
    headers: HeaderMap,
    etag: Option<&str>,
    max_body: u64,
) -> Result<Response, SourceError> {
    let mut request = client.get(url.clone()).headers(headers);
    if let Some(etag) = etag
        && let Ok(value) = HeaderValue::from_str(etag)
    {
        request = request.header(header::IF_NONE_MATCH, value);
    }
    let mut response = request.send().await.map_err(transport)?;
    let status = response.status();
    let headers = response.headers().clone();
    if response.content_length().is_some_and(|len| len > max_body) {
        return Err(too_large(max_body, retry_after(&headers)));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() as u64 + chunk.len() as u64 > max_body {
            return Err(too_large(max_body, retry_after(&headers)));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn too_large(max_body: u64, retry_after: Option<Duration>) -> SourceError {
    SourceError::Transient {
        what: format!("response body over max_body ({max_body} bytes)"),
        retry_after,
        source: None,
    }
}

fn transport(e: reqwest::Error) -> SourceError {
    let what = if e.is_timeout() {
        "request timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_redirect() {
        "redirect refused"
    } else if e.is_body() || e.is_decode() {
        "broken response body"
    } else {
        "request failed"
    };
    SourceError::Transient {
        what: what.to_string(),
        retry_after: None,
        source: Some(Box::new(e.without_url())),
    }
}

/// `Retry-After` as seconds or an HTTP date (see [`parse_retry_after`]).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    parse_retry_after(
        headers.get(header::RETRY_AFTER)?.as_bytes(),
        SystemTime::now(),
    )
}

/// Parses a `Retry-After` value defensively: it is untrusted input, and
/// whatever it says, the backoff caps it at `max_backoff` (DESIGN.md §5).
///
/// - delay-seconds (ASCII digits only): that many seconds; a number too
///   large for a `u64` saturates to [`Duration::MAX`] rather than being
///   dropped, since the server clearly meant "a long time";
/// - an HTTP date: the time until then, zero for a date in the past;
/// - anything else (negative, fractional, with a unit, not UTF-8, empty):
///   `None`, and the ordinary backoff applies.
pub fn parse_retry_after(value: &[u8], now: SystemTime) -> Option<Duration> {
    let value = std::str::from_utf8(value).ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(
            value
                .parse::<u64>()
                .map_or(Duration::MAX, Duration::from_secs),
        );
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `max-age` of the `Cache-Control` headers, read defensively (RFC 9111
/// §5.2): the first `max-age` directive whose value is delta-seconds
/// (quoted or not); a number too large saturates. `s-maxage` is for shared
/// caches, and `no-cache` or `no-store` only ask a cache to revalidate,
/// which every conditional poll does: both are ignored.
pub fn max_age(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok())
        .flat_map(|v| v.split(','))
        .filter_map(|directive| {
            let (name, value) = directive.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("max-age") {
                return None;
            }
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit())).then(|| {
                value
                    .parse::<u64>()
                    .map_or(Duration::MAX, Duration::from_secs)
            })
        })
        .next()
}

/// The strong or weak ETag of a response, if any.
pub fn etag(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 1024)
        .map(str::to_string)
}

/// The status rules shared by the HTTP kinds (DESIGN.md §5): 429 and 5xx are
/// transient (honouring Retry-After), 401 and 403 rejected. Returns None for
/// statuses the caller handles itself (2xx, 304, 404).
pub fn classify(response: &Response) -> Option<SourceError> {
    let status = response.status;
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Some(SourceError::Transient {
            what: format!("server answered {status}"),
            retry_after: retry_after(&response.headers),
            source: None,
        });
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Some(SourceError::rejected(format!(
            "server answered {status}: check the API key and its scope"
        )));
    }
    if status.is_success() || status == StatusCode::NOT_MODIFIED || status == StatusCode::NOT_FOUND
    {
        return None;
    }
    if status.is_client_error() {
        return Some(SourceError::rejected(format!("server answered {status}")));
    }
    Some(SourceError::transient(format!(
        "unexpected status {status}"
    )))
}

/// Parses a configured URL (validated at config load).
pub fn parse_url(url: &str) -> Result<Url, SourceError> {
    Url::parse(url).map_err(|e| SourceError::Rejected {
        what: format!("bad url {}", crate::config::redact_url(url)),
        source: Some(Box::new(e)),
    })
}

/// The `http` kind: a body in authorized_keys format.
pub struct HttpSource {
    client: Client,
    url: Url,
    etag: Option<String>,
    event_id: Option<HeaderValue>,
    max_body: u64,
    max_age: Option<Duration>,
}

impl HttpSource {
    pub fn new(
        settings: &SourceSettings,
        url: &str,
        etag: Option<String>,
    ) -> Result<Self, SourceError> {
        let url = parse_url(url)?;
        Ok(HttpSource {
            client: client(settings, &url)?,
            url,
            etag,
            event_id: None,
            max_body: settings.max_body,
            max_age: None,
        })
    }

    async fn fetch_once(&mut self) -> Result<Answer, SourceError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("text/plain, */*"));
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
            StatusCode::NOT_FOUND => Err(SourceError::rejected("server answered 404 Not Found")),
            s if s.is_success() => {
                let text = std::str::from_utf8(&response.body)
                    .map_err(|_| SourceError::transient("body is not valid UTF-8"))?;
                let etag = etag(&response.headers);
                self.etag.clone_from(&etag);
                Ok(Answer::List {
                    entries: authorized_keys_entries(text),
                    etag,
                })
            }
            s => Err(SourceError::transient(format!("unexpected status {s}"))),
        }
    }
}

impl KeySource for HttpSource {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        h.insert(header::RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(25),
            "{d:?}"
        );
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn max_age_of_any_shape_is_never_a_crash() {
        let of = |values: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CACHE_CONTROL, HeaderValue::from_bytes(v).unwrap());
            }
            max_age(&h)
        };
        let s = Duration::from_secs;
        assert_eq!(of(&[]), None);
        assert_eq!(of(&[b"max-age=30"]), Some(s(30)));
        assert_eq!(
            of(&[b"public, Max-Age = 30 , must-revalidate"]),
            Some(s(30))
        );
        assert_eq!(of(&[b"max-age=\"7\""]), Some(s(7)));
        assert_eq!(of(&[b"no-cache", b"max-age=5"]), Some(s(5)));
        assert_eq!(of(&[b"s-maxage=60"]), None);
        assert_eq!(
            of(&[b"max-age=99999999999999999999999"]),
            Some(Duration::MAX)
        );
        for bad in [
            &b"max-age=-1"[..],
            b"max-age=",
            b"max-age=1.5",
            b"max-age",
            b"\xffmax-age=3",
            b"max-age=3s",
        ] {
            assert_eq!(of(&[bad]), None, "{:?}", String::from_utf8_lossy(bad));
        }
        // The first usable one counts.
        assert_eq!(of(&[b"max-age=x, max-age=4, max-age=9"]), Some(s(4)));
    }

    #[test]
    fn retry_after_of_any_shape_is_never_a_crash() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |v: &[u8]| parse_retry_after(v, now);
        assert_eq!(at(b" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(at(b"0"), Some(Duration::ZERO));
        // Too large for any clock: as long as allowed (the backoff caps it
        // at max_backoff), not ignored and not a panic.
        assert_eq!(at(b"99999999999999999999"), Some(Duration::MAX));
        assert_eq!(at(&[b'9'; 4096]), Some(Duration::MAX));
        assert_eq!(
            at(b"18446744073709551615"),
            Some(Duration::from_secs(u64::MAX))
        );
        // A date in the past means now; one far ahead is just long.
        assert_eq!(at(b"Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
        assert!(
            at(b"Fri, 31 Dec 9999 23:59:59 GMT").is_some_and(|d| d > Duration::from_secs(1 << 37))
        );
        // Malformed: ignored, the ordinary backoff applies.
        for bad in [
            &b"-5"[..],
            b"+5",
            b"1.5",
            b"5s",
            b"",
            b"   ",
            b"garbage",
            b"Thu, 32 Jan 1970 00:00:00 GMT",
            b"\xff\xfe",
            b"\x009",
        ] {
            assert_eq!(at(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        // Through the header map too, with bytes a HeaderValue allows.
        let mut h = HeaderMap::new();
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_bytes(b"\xff 12").unwrap(),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("99999999999999999999"),
        );
        assert_eq!(retry_after(&h), Some(Duration::MAX));
    }
}
