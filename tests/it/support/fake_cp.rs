//! A fake of the cloud control plane (DESIGN.md §5) for keysync's tests, demo
//! and benchmarks: a real HTTP/1.1 server on loopback that answers
//! `GET /api/v0/ssh/` with the account's key list in any of the three shapes
//! the public material shows, with a strong ETag per list version and `304`
//! for a matching `If-None-Match`, plus a Server-Sent Events stream at
//! `GET /api/v0/ssh/events` that announces every change of the list.
//!
//! Tests drive it through [`FakeControlPlane`]: change the keys, inject faults
//! (any status, garbage, truncated or huge bodies, slow answers, closed
//! connections), switch the whole service down, and read back a log of every
//! request it saw. Everything except `start*`, `wait_*` and `shutdown` is a
//! plain synchronous call (std `Mutex`, tokio channels that need no runtime),
//! so it can be driven from any thread.
//!
//! The file is self-contained so it can be a module of the tests' support
//! tree (`tests/it/support/mod.rs`) and be included with
//! `#[path = "../tests/it/support/fake_cp.rs"]` from examples and benchmarks. Nothing here may panic on what a client
//! sends: odd requests get an HTTP answer, never an `unwrap`.

// Every includer uses a different subset of the helpers.
#![allow(dead_code)]

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Path of the key list, as on the reference API (trailing slash kept).
pub const LIST_PATH: &str = "/api/v0/ssh/";
/// Path of the Server-Sent Events stream.
pub const EVENTS_PATH: &str = "/api/v0/ssh/events";

/// fixtures/control-plane/unauthorized.json (401).
pub const UNAUTHORIZED_BODY: &str = "{\n  \"success\": false,\n  \"error\": \"invalid_api_key\",\n  \"msg\": \"Invalid API key\"\n}";
/// fixtures/control-plane/not-found-no-keys.json (404, authoritative empty list).
pub const NO_KEYS_BODY: &str =
    "{\n  \"success\": false,\n  \"msg\": \"No SSH keys found for the user.\"\n}";
/// fixtures/control-plane/rate-limited.txt (429, plain text).
pub const RATE_LIMITED_BODY: &str = "API requests too frequent endpoint threshold=1.0\n";
/// A 404 that is *not* the "no keys" answer (wrong URL, unknown route).
pub const PLAIN_404_BODY: &str = "{\"success\":false,\"msg\":\"Not found\"}";
/// The body of the `down` switch's 503.
pub const UNAVAILABLE_BODY: &str = "503 Service Unavailable\n";
/// What [`Fault::Garbage`] answers with status 200 and a JSON content type.
pub const GARBAGE_BODY: &[u8] =
    b"<html><body>502 Bad Gateway</body></html>\x00\xff\xfe{\"ssh_keys\": [ not json";

/// `user_id` in the array shapes (the fixtures' account).
pub const USER_ID: u64 = 4242;

/// The three ed25519 public keys of the fixtures: alice and bob are live in
/// every fixture list, `old@retired` is soft-deleted in list-array-key.json.
pub fn fixture_keys() -> [&'static str; 3] {
    [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi alice@laptop",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFRzugNBd+MDtj+CrHEVbfNBi8jOKFGD1yT48UoTK0oN bob@desktop",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIQqCk/WCCVJSnO/aqHWoU9WSh+5VYPMIdi/n06c9h+i old@retired",
    ]
}

/// `n` distinct, valid ed25519 public key lines (`ssh-ed25519 AAAA… keysync-test-<i>`),
/// deterministic across runs. The blob is the OpenSSH wire form
/// `[u32 11]"ssh-ed25519"[u32 32][32 bytes]`; OpenSSH and the `ssh-key` crate
/// accept any 32 bytes there, so a counter-based pattern needs no crypto.
pub fn gen_ed25519_keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let i = i as u64;
            let mut point = [0u8; 32];
            // The first 8 bytes are the index itself, so keys never collide.
            point[..8].copy_from_slice(&i.to_be_bytes());
            for (j, b) in point.iter_mut().enumerate().skip(8) {
                *b = (i.wrapping_mul(131).wrapping_add(j as u64 * 29) ^ 0x5a) as u8;
            }
            let mut blob = Vec::with_capacity(51);
            blob.extend_from_slice(&11u32.to_be_bytes());
            blob.extend_from_slice(b"ssh-ed25519");
            blob.extend_from_slice(&32u32.to_be_bytes());
            blob.extend_from_slice(&point);
            format!("ssh-ed25519 {} keysync-test-{i}", base64_encode(&blob))
        })
        .collect()
}

/// Standard base64 (RFC 4648 §4, with padding), as in authorized_keys lines.
pub fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if k <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `2026-10-01T12:00:00Z` for a Unix time in seconds (UTC, the API's format).
pub fn format_rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
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
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_rfc3339(secs)
}

/// The JSON shape of a 200 list answer (the public sources disagree, DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shape {
    /// Bare array, key text in `key`, with `id`, `user_id`, `created_at`,
    /// `deleted_at` (the published OpenAPI spec; list-array-key.json).
    #[default]
    ArrayKey,
    /// Bare array, key text in `public_key` (list-array-public-key.json).
    ArrayPublicKey,
    /// `{"ssh_keys":[{"id":..,"ssh_key":..}]}` (list-object-ssh-keys.json).
    /// Soft-deleted keys are left out: this shape has no `deleted_at`.
    ObjectSshKeys,
}

impl Shape {
    /// Parses `array-key`, `array-public-key` or `object-ssh-keys`.
    pub fn from_name(name: &str) -> Option<Shape> {
        match name {
            "array-key" => Some(Shape::ArrayKey),
            "array-public-key" => Some(Shape::ArrayPublicKey),
            "object-ssh-keys" => Some(Shape::ObjectSshKeys),
            _ => None,
        }
    }
}

/// How the `down` switch answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DownMode {
    /// `503` with [`UNAVAILABLE_BODY`] (an outage behind a load balancer).
    #[default]
    Status503,
    /// Close the connection without answering (the host is gone).
    Close,
}

/// A wrong answer to inject, see [`FakeControlPlane::set_fault`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This status, body and headers, exactly (no ETag, no auth check).
    Status {
        code: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// 200, `Content-Type: application/json`, body [`GARBAGE_BODY`].
    Garbage,
    /// 200 whose `Content-Length` is the whole list, but only the first half
    /// is sent before the connection is closed (the client sees an incomplete body).
    TruncatedJson,
    /// 200 with the list cut in half mid-document and a *correct*
    /// `Content-Length`: the transfer succeeds, the JSON does not parse.
    CutJson,
    /// The normal answer, headers held back for this long.
    Slow(Duration),
    /// 200 with a body of exactly `bytes` bytes, streamed from a static
    /// buffer: `[`, spaces, `]` — a *valid, empty* JSON array, so an agent
    /// that does not enforce `max_body` mistakes it for "no keys" and a test
    /// catches it.
    HugeBody { bytes: usize },
    /// 200 with the list body, correct `Content-Length`, one byte per `interval`.
    SlowDrip { interval: Duration },
    /// Close the connection without answering.
    CloseConnection,
}

impl Fault {
    /// Any status with a body and no extra headers.
    pub fn status(code: u16, body: impl Into<String>) -> Fault {
        Fault::Status {
            code,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// 429 with rate-limited.txt's plain-text body and optionally `Retry-After: <secs>`.
    pub fn rate_limited(retry_after: Option<u64>) -> Fault {
        let mut headers = vec![("Content-Type".to_owned(), "text/plain".to_owned())];
        if let Some(secs) = retry_after {
            headers.push(("Retry-After".to_owned(), secs.to_string()));
        }
        Fault::Status {
            code: 429,
            body: RATE_LIMITED_BODY.to_owned(),
            headers,
        }
    }

    /// 401 with unauthorized.json's body.
    pub fn unauthorized() -> Fault {
        Fault::json(401, UNAUTHORIZED_BODY)
    }

    /// 403 with a JSON error body.
    pub fn forbidden() -> Fault {
        Fault::json(
            403,
            "{\"success\":false,\"error\":\"forbidden\",\"msg\":\"Insufficient permissions\"}",
        )
    }

    /// A 404 that does *not* mean "no keys": `{"success":false,"msg":"Not found"}`.
    pub fn plain_404() -> Fault {
        Fault::json(404, PLAIN_404_BODY)
    }

    /// 404 with not-found-no-keys.json's body (authoritative empty list).
    pub fn no_keys_404() -> Fault {
        Fault::json(404, NO_KEYS_BODY)
    }

    /// A 5xx (500, 502, 503, …) with a short plain-text body.
    pub fn server_error(code: u16) -> Fault {
        let reason = StatusCode::from_u16(code)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Server Error");
        Fault::Status {
            code,
            body: format!("{code} {reason}\n"),
            headers: vec![("Content-Type".to_owned(), "text/plain".to_owned())],
        }
    }

    /// 200 with exactly this JSON text (e.g. a fixture file replayed byte for byte).
    pub fn json_body(body: impl Into<String>) -> Fault {
        Fault::json(200, body)
    }

    fn json(code: u16, body: impl Into<String>) -> Fault {
        Fault::Status {
            code,
            body: body.into(),
            headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Fault::Status { .. } => "status",
            Fault::Garbage => "garbage",
            Fault::TruncatedJson => "truncated-json",
            Fault::CutJson => "cut-json",
            Fault::Slow(_) => "slow",
            Fault::HugeBody { .. } => "huge-body",
            Fault::SlowDrip { .. } => "slow-drip",
            Fault::CloseConnection => "close-connection",
        }
    }
}

/// Which route a request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/api/v0/ssh/`
    List,
    /// `/api/v0/ssh/events`
    Events,
    /// Anything else (answered with a plain 404 or 405).
    Other,
}

/// One request as the server saw it. A request is logged as soon as its
/// answer is decided: for [`Fault::Slow`] that is *before* the delay, for an
/// event stream when the stream opens.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// When the request arrived.
    pub at: Instant,
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    pub query: Option<String>,
    pub endpoint: Endpoint,
    pub if_none_match: Option<String>,
    /// The full `Authorization` header value (e.g. `Bearer abc`).
    pub authorization: Option<String>,
    pub last_event_id: Option<String>,
    pub user_agent: Option<String>,
    pub accept: Option<String>,
    /// The status answered; `None` when the connection was closed instead.
    pub status: Option<u16>,
    /// Which injected fault (or `"down"`) produced the answer, if any.
    pub fault: Option<&'static str>,
}

impl RequestRecord {
    pub fn sent_if_none_match(&self) -> bool {
        self.if_none_match.is_some()
    }

    pub fn has_authorization(&self) -> bool {
        self.authorization.is_some()
    }
}

/// Totals over the request log (since start or the last `clear_requests`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: usize,
    pub list_requests: usize,
    pub event_requests: usize,
    /// 200 answers (list and streams).
    pub ok: usize,
    pub not_modified: usize,
    /// Answers with status ≥ 400.
    pub errors: usize,
    /// Connections closed without an answer.
    pub closed: usize,
    /// Requests answered by an injected fault or the down switch.
    pub faults: usize,
    /// Event streams opened since start (not reset by `clear_requests`).
    pub streams_opened: usize,
    /// Event streams open right now.
    pub open_streams: usize,
}

type BoxError = Box<dyn StdError + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// One key of the account, as the control plane stores it.
#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    key: String,
    created_at: String,
    deleted_at: Option<String>,
}

#[derive(Debug, Clone)]
struct ActiveFault {
    fault: Fault,
    /// Requests left; `None` until cleared.
    remaining: Option<usize>,
}

struct Inner {
    entries: Vec<Entry>,
    next_id: u64,
    generation: u64,
    shape: Shape,
    empty_is_404: bool,
    token: Option<String>,
    extra_headers: Vec<(String, String)>,
    list_fault: Option<ActiveFault>,
    events_fault: Option<ActiveFault>,
    down: bool,
    down_mode: DownMode,
    heartbeat: Duration,
    log: Vec<RequestRecord>,
    /// The rendered list of `generation`, shared by every answer of that version.
    cache: Option<(u64, Bytes)>,
}

impl Inner {
    /// A new version of the list: new ETag, one event on every open stream.
    fn bump(&mut self, shared: &Shared) {
        self.generation += 1;
        self.cache = None;
        // No receivers is fine: nobody is subscribed.
        let _ = shared.events.send(self.generation);
    }

    fn rendered_entries(&self) -> impl Iterator<Item = &Entry> {
        let with_deleted = self.shape != Shape::ObjectSshKeys;
        self.entries
            .iter()
            .filter(move |e| with_deleted || e.deleted_at.is_none())
    }

    fn list_body(&mut self) -> Bytes {
        if let Some((generation, body)) = &self.cache
            && *generation == self.generation
        {
            return body.clone();
        }
        let body = Bytes::from(render(self.shape, self.rendered_entries()));
        self.cache = Some((self.generation, body.clone()));
        body
    }

    fn take_fault(&mut self, endpoint: Endpoint) -> Option<Fault> {
        let slot = match endpoint {
            Endpoint::List => &mut self.list_fault,
            Endpoint::Events => &mut self.events_fault,
            Endpoint::Other => return None,
        };
        let active = slot.as_mut()?;
        let fault = active.fault.clone();
        if let Some(n) = active.remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                *slot = None;
            }
        }
        Some(fault)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let Ok(value) = value.to_str() else {
            return false;
        };
        match value.split_once(' ') {
            Some((scheme, given)) => scheme.eq_ignore_ascii_case("bearer") && given == token,
            None => false,
        }
    }
}

#[derive(Serialize)]
struct ArrayItem<'a> {
    id: u64,
    user_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_key: Option<&'a str>,
    created_at: &'a str,
    deleted_at: Option<&'a str>,
}

#[derive(Serialize)]
struct ObjectItem<'a> {
    id: u64,
    ssh_key: &'a str,
}

#[derive(Serialize)]
struct ObjectList<'a> {
    ssh_keys: Vec<ObjectItem<'a>>,
}

fn render<'a>(shape: Shape, entries: impl Iterator<Item = &'a Entry>) -> Vec<u8> {
    let result = match shape {
        Shape::ArrayKey | Shape::ArrayPublicKey => {
            let items: Vec<ArrayItem<'_>> = entries
                .map(|e| ArrayItem {
                    id: e.id,
                    user_id: USER_ID,
                    key: (shape == Shape::ArrayKey).then_some(e.key.as_str()),
                    public_key: (shape == Shape::ArrayPublicKey).then_some(e.key.as_str()),
                    created_at: &e.created_at,
                    deleted_at: e.deleted_at.as_deref(),
                })
                .collect();
            serde_json::to_vec(&items)
        }
        Shape::ObjectSshKeys => serde_json::to_vec(&ObjectList {
            ssh_keys: entries
                .map(|e| ObjectItem {
                    id: e.id,
                    ssh_key: &e.key,
                })
                .collect(),
        }),
    };
    // Serializing plain strings and integers cannot fail.
    result.unwrap_or_default()
}

/// Whether a key entry is `key`: same text, or same algorithm and blob.
fn same_key(entry: &str, key: &str) -> bool {
    if entry == key {
        return true;
    }
    let mut a = entry.split_whitespace();
    let mut b = key.split_whitespace();
    match (a.next(), a.next(), b.next(), b.next()) {
        (Some(at), Some(ab), Some(bt), Some(bb)) => at == bt && ab == bb,
        _ => false,
    }
}

/// `If-None-Match` against our ETag (weak comparison, RFC 9110 §13.1.2).
fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag
    })
}

struct Shared {
    inner: Mutex<Inner>,
    /// Generation of every list change, for the event streams.
    events: broadcast::Sender<u64>,
    /// Bumped by `drop_streams`: open streams end cleanly.
    drop_streams: watch::Sender<u64>,
    /// Bumped when `down` is set: open streams are cut (connection aborted).
    cut_streams: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    /// Length of the request log, for `wait_for_requests`.
    logged: watch::Sender<usize>,
    open_streams: watch::Sender<usize>,
    streams_opened: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock must not take the server down.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self, record: RequestRecord) {
        let len = {
            let mut inner = self.lock();
            inner.log.push(record);
            inner.log.len()
        };
        self.logged.send_replace(len);
    }
}

/// The error a handler returns to make hyper drop the connection unanswered.
fn close_connection() -> BoxError {
    "fake control plane: closing the connection without an answer".into()
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn response(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    resp
}

fn add_headers(resp: &mut Response<Body>, headers: &[(String, String)]) {
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            resp.headers_mut().append(name, value);
        }
    }
}

fn streamed<S>(frames: S, content_length: Option<usize>) -> Response<Body>
where
    S: futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static,
{
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(len) = content_length {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp
}

static SPACES: [u8; 64 * 1024] = [b' '; 64 * 1024];

/// `[` + spaces + `]`, `bytes` long, from a static buffer.
fn huge_body(bytes: usize) -> Response<Body> {
    let frames = stream::unfold(0usize, move |sent| async move {
        if sent >= bytes {
            return None;
        }
        let chunk = if sent == 0 {
            Bytes::from_static(b"[")
        } else if sent == bytes - 1 {
            Bytes::from_static(b"]")
        } else {
            let n = (bytes - 1 - sent).min(SPACES.len());
            Bytes::from_static(&SPACES[..n])
        };
        let next = sent + chunk.len();
        Some((Ok(Frame::data(chunk)), next))
    });
    streamed(frames, Some(bytes))
}

fn slow_drip(body: Bytes, interval: Duration) -> Response<Body> {
    let len = body.len();
    let frames = stream::unfold(0usize, move |i| {
        let body = body.clone();
        async move {
            if i >= body.len() {
                return None;
            }
            tokio::time::sleep(interval).await;
            Some((Ok(Frame::data(body.slice(i..i + 1))), i + 1))
        }
    });
    streamed(frames, Some(len))
}

fn truncated(body: Bytes) -> Response<Body> {
    let len = body.len();
    let half = body.slice(..len / 2);
    let frames = stream::unfold(Some(Some(half)), |step| async move {
        match step? {
            Some(half) => Some((Ok(Frame::data(half)), Some(None))),
            None => {
                // Let hyper flush the head and the half first: it writes
                // nothing more once the body fails.
                tokio::time::sleep(Duration::from_millis(50)).await;
                // A body error makes hyper abort the connection mid-body.
                Some((Err("fake control plane: truncating the body".into()), None))
            }
        }
    });
    streamed(frames, Some(len))
}

/// What the server does with one request.
enum Answer {
    Now(Response<Body>),
    After(Duration, Response<Body>),
    Close,
}

/// A running fake control plane; dropping it stops the server too.
pub struct FakeControlPlane {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

impl FakeControlPlane {
    /// Starts on `127.0.0.1` with a random port: no token, shape
    /// [`Shape::ArrayKey`], no keys (answered as 404 "no keys"), heartbeats every 15 s.
    pub async fn start() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(any)
            .await
            .expect("fake control plane: bind 127.0.0.1:0")
    }

    /// Starts on `addr` (port 0 picks a free one).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                entries: Vec::new(),
                next_id: 101,
                generation: 1,
                shape: Shape::default(),
                empty_is_404: true,
                token: None,
                extra_headers: Vec::new(),
                list_fault: None,
                events_fault: None,
                down: false,
                down_mode: DownMode::default(),
                heartbeat: Duration::from_secs(15),
                log: Vec::new(),
                cache: None,
            }),
            events: broadcast::channel(1024).0,
            drop_streams: watch::channel(0).0,
            cut_streams: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            logged: watch::channel(0).0,
            open_streams: watch::channel(0).0,
            streams_opened: AtomicUsize::new(0),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        Ok(FakeControlPlane {
            shared,
            addr,
            server: Some(server),
        })
    }

    /// `http://127.0.0.1:PORT/api/v0/ssh/`
    pub fn url(&self) -> String {
        format!("http://{}{LIST_PATH}", self.addr)
    }

    /// `http://127.0.0.1:PORT/api/v0/ssh/events`
    pub fn events_url(&self) -> String {
        format!("http://{}{EVENTS_PATH}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requires `Authorization: Bearer <token>` on both endpoints (`None`: no check).
    pub fn set_token(&self, token: Option<&str>) {
        self.shared.lock().token = token.map(str::to_owned);
    }

    /// Changes the JSON shape; a new generation (the body changes, so does the ETag).
    pub fn set_shape(&self, shape: Shape) {
        let mut inner = self.shared.lock();
        if inner.shape != shape {
            inner.shape = shape;
            inner.bump(&self.shared);
        }
    }

    /// Replaces the whole list (soft-deleted entries go too). Always a new
    /// generation and an event, even when the keys are the same. A key that
    /// was already present keeps its `id` and `created_at`.
    pub fn set_keys<I: IntoIterator<Item = impl Into<String>>>(&self, keys: I) {
        let mut inner = self.shared.lock();
        let mut old = std::mem::take(&mut inner.entries);
        let mut entries = Vec::new();
        for key in keys {
            let key = key.into();
            let kept = old
                .iter()
                .position(|e| e.deleted_at.is_none() && e.key == key);
            let entry = match kept {
                Some(pos) => old.swap_remove(pos),
                None => {
                    let id = inner.next_id;
                    inner.next_id += 1;
                    Entry {
                        id,
                        key,
                        created_at: now_rfc3339(),
                        deleted_at: None,
                    }
                }
            };
            entries.push(entry);
        }
        inner.entries = entries;
        inner.bump(&self.shared);
    }

    /// Appends a key (duplicates are kept: deduplicating is the agent's job).
    pub fn add_key(&self, key: &str) {
        let mut inner = self.shared.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.entries.push(Entry {
            id,
            key: key.to_owned(),
            created_at: now_rfc3339(),
            deleted_at: None,
        });
        inner.bump(&self.shared);
    }

    /// Removes every entry with this key (same text, or same algorithm and
    /// blob). Returns whether one was found; only then is there a new generation.
    pub fn remove_key(&self, key: &str) -> bool {
        let mut inner = self.shared.lock();
        let before = inner.entries.len();
        inner.entries.retain(|e| !same_key(&e.key, key));
        let found = inner.entries.len() != before;
        if found {
            inner.bump(&self.shared);
        }
        found
    }

    /// Marks every live entry with this key deleted (`deleted_at` = now): it
    /// stays in the array shapes with `deleted_at` set and leaves the object
    /// shape. Returns whether one was found; only then is there a new generation.
    pub fn soft_delete(&self, key: &str) -> bool {
        let mut inner = self.shared.lock();
        let now = now_rfc3339();
        let mut found = false;
        for e in inner.entries.iter_mut() {
            if e.deleted_at.is_none() && same_key(&e.key, key) {
                e.deleted_at = Some(now.clone());
                found = true;
            }
        }
        if found {
            inner.bump(&self.shared);
        }
        found
    }

    /// Loads exactly the entries of fixtures' list-array-key.json: alice (101),
    /// bob (102) and the soft-deleted old@retired (99), with their dates.
    pub fn load_fixture(&self) {
        let [alice, bob, old] = fixture_keys();
        let mut inner = self.shared.lock();
        inner.entries = vec![
            Entry {
                id: 101,
                key: alice.to_owned(),
                created_at: "2026-10-01T12:00:00Z".to_owned(),
                deleted_at: None,
            },
            Entry {
                id: 102,
                key: bob.to_owned(),
                created_at: "2026-10-02T08:30:00Z".to_owned(),
                deleted_at: None,
            },
            Entry {
                id: 99,
                key: old.to_owned(),
                created_at: "2026-01-05T09:00:00Z".to_owned(),
                deleted_at: Some("2026-06-01T10:00:00Z".to_owned()),
            },
        ];
        inner.next_id = inner.next_id.max(103);
        inner.bump(&self.shared);
    }

    /// The live (not soft-deleted) keys, in list order.
    pub fn keys(&self) -> Vec<String> {
        let inner = self.shared.lock();
        inner
            .entries
            .iter()
            .filter(|e| e.deleted_at.is_none())
            .map(|e| e.key.clone())
            .collect()
    }

    /// An empty list (nothing to render in the current shape) answers 404 with
    /// [`NO_KEYS_BODY`] like the real API (`true`, the default) or 200 with an
    /// empty list (`false`). In the array shapes, soft-deleted entries count
    /// as content. A new generation when the setting changes.
    pub fn set_empty_is_404(&self, yes: bool) {
        let mut inner = self.shared.lock();
        if inner.empty_is_404 != yes {
            inner.empty_is_404 = yes;
            inner.bump(&self.shared);
        }
    }

    /// Extra headers on every normal list answer (200 and 304), e.g. `Cache-Control`.
    pub fn set_extra_headers(&self, headers: Vec<(String, String)>) {
        self.shared.lock().extra_headers = headers;
    }

    /// Answers the next `times` list requests (`None`: every one until
    /// [`clear_fault`](Self::clear_fault)) with `fault`, before any auth
    /// check. Replaces an earlier list fault; `Some(0)` clears it.
    pub fn set_fault(&self, fault: Fault, times: Option<usize>) {
        self.shared.lock().list_fault = (times != Some(0)).then_some(ActiveFault {
            fault,
            remaining: times,
        });
    }

    /// The same for requests to the events endpoint. [`Fault::Slow`] delays
    /// the stream's headers; the body faults answer with the list body as on
    /// the list endpoint (which is not an event stream at all).
    pub fn set_events_fault(&self, fault: Fault, times: Option<usize>) {
        self.shared.lock().events_fault = (times != Some(0)).then_some(ActiveFault {
            fault,
            remaining: times,
        });
    }

    /// Clears the list fault and the events fault.
    pub fn clear_fault(&self) {
        let mut inner = self.shared.lock();
        inner.list_fault = None;
        inner.events_fault = None;
    }

    /// An outage: while set, every request (any path) is answered as the
    /// [`DownMode`] says, and setting it cuts every open event stream
    /// (connection aborted mid-body).
    pub fn set_down(&self, down: bool) {
        let was = std::mem::replace(&mut self.shared.lock().down, down);
        if down && !was {
            self.shared.cut_streams.send_modify(|n| *n += 1);
        }
    }

    /// 503 (default) or a closed connection while down.
    pub fn set_down_mode(&self, mode: DownMode) {
        self.shared.lock().down_mode = mode;
    }

    /// Interval of `: heartbeat` comments on event streams (default 15 s;
    /// takes effect after each stream's next heartbeat or event).
    pub fn set_heartbeat(&self, interval: Duration) {
        self.shared.lock().heartbeat = interval.max(Duration::from_millis(1));
    }

    /// Ends every open event stream cleanly (the body ends; the client reconnects).
    pub fn drop_streams(&self) {
        self.shared.drop_streams.send_modify(|n| *n += 1);
    }

    /// The version of the list; the ETag is `"v<generation>"`. Starts at 1.
    pub fn generation(&self) -> u64 {
        self.shared.lock().generation
    }

    /// The ETag of the current list.
    pub fn etag(&self) -> String {
        format!("\"v{}\"", self.generation())
    }

    /// The request log since start or the last [`clear_requests`](Self::clear_requests).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    /// How many list requests the fake has served.
    pub fn list_requests(&self) -> usize {
        self.shared
            .lock()
            .log
            .iter()
            .filter(|r| r.endpoint == Endpoint::List)
            .count()
    }

    pub fn request_count(&self) -> usize {
        self.shared.lock().log.len()
    }

    /// Empties the request log (e.g. between benchmark phases).
    pub fn clear_requests(&self) {
        self.shared.lock().log.clear();
        self.shared.logged.send_replace(0);
    }

    /// The `Last-Event-ID` headers sent when opening event streams, in order
    /// (`None` for a stream opened without one).
    pub fn last_event_ids(&self) -> Vec<Option<String>> {
        self.shared
            .lock()
            .log
            .iter()
            .filter(|r| r.endpoint == Endpoint::Events && r.status == Some(200))
            .map(|r| r.last_event_id.clone())
            .collect()
    }

    pub fn open_streams(&self) -> usize {
        *self.shared.open_streams.borrow()
    }

    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            streams_opened: self.shared.streams_opened.load(Ordering::Relaxed),
            open_streams: self.open_streams(),
            ..Stats::default()
        };
        for r in self.shared.lock().log.iter() {
            stats.requests += 1;
            match r.endpoint {
                Endpoint::List => stats.list_requests += 1,
                Endpoint::Events => stats.event_requests += 1,
                Endpoint::Other => {}
            }
            match r.status {
                Some(200) => stats.ok += 1,
                Some(304) => stats.not_modified += 1,
                Some(s) if s >= 400 => stats.errors += 1,
                Some(_) => {}
                None => stats.closed += 1,
            }
            if r.fault.is_some() {
                stats.faults += 1;
            }
        }
        stats
    }

    /// Waits until at least `n` requests are in the log; `false` on timeout.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        wait_until(self.shared.logged.subscribe(), timeout, |c| c >= n).await
    }

    /// Waits until at least `n` event streams are open; `false` on timeout.
    pub async fn wait_for_streams(&self, n: usize, timeout: Duration) -> bool {
        wait_until(self.shared.open_streams.subscribe(), timeout, |c| c >= n).await
    }

    /// Stops accepting, ends event streams, lets answers in flight finish
    /// (at most 2 s), then cuts what is left.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for FakeControlPlane {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

async fn wait_until(
    mut rx: watch::Receiver<usize>,
    timeout: Duration,
    done: impl Fn(usize) -> bool,
) -> bool {
    matches!(
        tokio::time::timeout(timeout, rx.wait_for(|c| done(*c))).await,
        Ok(Ok(_))
    )
}

/// Resolves once `shutdown` is set (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await: it is not Send.
    let _ = shutdown.wait_for(|s| *s).await;
}

/// The accept loop: one task per connection, all stopped by `shutdown`.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(stream, shared.clone()));
                }
                // Out of file descriptors and the like: breathe, then go on.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(Duration::from_secs(2), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.shutdown().await;
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let handler = shared.clone();
    let service = service_fn(move |req| handle(handler.clone(), req));
    // No header-read timeout: it needs a timer, and a timer fires at once
    // under tokio's paused clock (`start_paused` tests), cutting idle
    // keep-alive connections. A fake has no slowloris to fear.
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = pin!(conn);
    // Errors of the connection are the client's doing or our injected faults.
    let stopping = tokio::select! {
        _ = conn.as_mut() => false,
        _ = stopped(&mut shutdown) => true,
    };
    if stopping {
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}

fn header_string(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, BoxError> {
    let at = Instant::now();
    let path = req.uri().path().to_owned();
    let endpoint = match path.as_str() {
        LIST_PATH => Endpoint::List,
        EVENTS_PATH | "/api/v0/ssh/events/" => Endpoint::Events,
        _ => Endpoint::Other,
    };
    let headers = req.headers();
    let mut record = RequestRecord {
        at,
        method: req.method().as_str().to_owned(),
        path,
        query: req.uri().query().map(str::to_owned),
        endpoint,
        if_none_match: header_string(headers, header::IF_NONE_MATCH),
        authorization: header_string(headers, header::AUTHORIZATION),
        last_event_id: header_string(headers, HeaderName::from_static("last-event-id")),
        user_agent: header_string(headers, header::USER_AGENT),
        accept: header_string(headers, header::ACCEPT),
        status: None,
        fault: None,
    };
    let get = matches!(*req.method(), Method::GET | Method::HEAD);

    let answer = decide(&shared, &req, endpoint, get, &mut record);
    record.status = match &answer {
        Answer::Now(resp) | Answer::After(_, resp) => Some(resp.status().as_u16()),
        Answer::Close => None,
    };
    shared.log(record);
    match answer {
        Answer::Now(resp) => Ok(resp),
        Answer::After(delay, resp) => {
            tokio::time::sleep(delay).await;
            Ok(resp)
        }
        Answer::Close => Err(close_connection()),
    }
}

/// Picks the answer under the lock: down switch, then fault, then method and
/// route, then auth, then the list or the stream.
fn decide(
    shared: &Arc<Shared>,
    req: &Request<Incoming>,
    endpoint: Endpoint,
    get: bool,
    record: &mut RequestRecord,
) -> Answer {
    let mut inner = shared.lock();
    if inner.down {
        record.fault = Some("down");
        return match inner.down_mode {
            DownMode::Status503 => Answer::Now(response(503, "text/plain", UNAVAILABLE_BODY)),
            DownMode::Close => Answer::Close,
        };
    }
    if let Some(fault) = inner.take_fault(endpoint) {
        record.fault = Some(fault.name());
        let resp = match fault {
            Fault::Status {
                code,
                body,
                headers,
            } => {
                let mut resp = Response::new(full(body));
                *resp.status_mut() =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                add_headers(&mut resp, &headers);
                if !resp.headers().contains_key(header::CONTENT_TYPE) {
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                }
                resp
            }
            Fault::Garbage => response(200, "application/json", GARBAGE_BODY),
            Fault::TruncatedJson => truncated(inner.list_body()),
            Fault::CutJson => {
                let list = inner.list_body();
                response(200, "application/json", list.slice(..list.len() / 2))
            }
            Fault::Slow(delay) => {
                let resp = normal_answer(shared, &mut inner, req, endpoint, get);
                return Answer::After(delay, resp);
            }
            Fault::HugeBody { bytes } => huge_body(bytes),
            Fault::SlowDrip { interval } => slow_drip(inner.list_body(), interval),
            Fault::CloseConnection => return Answer::Close,
        };
        return Answer::Now(resp);
    }
    Answer::Now(normal_answer(shared, &mut inner, req, endpoint, get))
}

fn normal_answer(
    shared: &Arc<Shared>,
    inner: &mut Inner,
    req: &Request<Incoming>,
    endpoint: Endpoint,
    get: bool,
) -> Response<Body> {
    if endpoint == Endpoint::Other {
        return response(404, "application/json", PLAIN_404_BODY);
    }
    if !get {
        let mut resp = response(
            405,
            "application/json",
            "{\"success\":false,\"msg\":\"Method not allowed\"}",
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    if !inner.authorized(req.headers()) {
        return response(401, "application/json", UNAUTHORIZED_BODY);
    }
    match endpoint {
        Endpoint::List => list_answer(inner, req.headers()),
        _ => event_stream(shared, inner, req.headers()),
    }
}

fn list_answer(inner: &mut Inner, headers: &HeaderMap) -> Response<Body> {
    if inner.empty_is_404 && inner.rendered_entries().next().is_none() {
        return response(404, "application/json", NO_KEYS_BODY);
    }
    let etag = format!("\"v{}\"", inner.generation);
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| etag_matches(v, &etag));
    let mut resp = if not_modified {
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp
    } else {
        response(200, "application/json", inner.list_body())
    };
    if let Ok(value) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, value);
    }
    add_headers(&mut resp, &inner.extra_headers);
    resp
}

/// Counts an open stream for as long as its body lives.
struct StreamGuard(Arc<Shared>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0
            .open_streams
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

struct StreamState {
    shared: Arc<Shared>,
    _guard: StreamGuard,
    events: broadcast::Receiver<u64>,
    drop_streams: watch::Receiver<u64>,
    cut_streams: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    /// An event owed on connect: the client's `Last-Event-ID` is behind.
    pending: Option<u64>,
    next_heartbeat: tokio::time::Instant,
    done: bool,
}

fn sse_event(generation: u64) -> Bytes {
    Bytes::from(format!(
        "id: {generation}\nevent: keys\ndata: {{\"generation\": {generation}}}\n\n"
    ))
}

fn event_stream(shared: &Arc<Shared>, inner: &Inner, headers: &HeaderMap) -> Response<Body> {
    shared.streams_opened.fetch_add(1, Ordering::Relaxed);
    shared.open_streams.send_modify(|n| *n += 1);
    // A reconnecting client that missed versions gets the latest one at once
    // (collapsed replay); with no or an unparsable Last-Event-ID, nothing.
    let pending = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&seen| seen < inner.generation)
        .map(|_| inner.generation);
    let mut drop_streams = shared.drop_streams.subscribe();
    let mut cut_streams = shared.cut_streams.subscribe();
    drop_streams.mark_unchanged();
    cut_streams.mark_unchanged();
    let state = StreamState {
        shared: shared.clone(),
        _guard: StreamGuard(shared.clone()),
        // Subscribed under the lock: no change can slip between here and `pending`.
        events: shared.events.subscribe(),
        drop_streams,
        cut_streams,
        shutdown: shared.shutdown.subscribe(),
        pending,
        next_heartbeat: tokio::time::Instant::now() + inner.heartbeat,
        done: false,
    };
    let frames = stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(generation) = st.pending.take() {
            return Some((Ok(Frame::data(sse_event(generation))), st));
        }
        let item = tokio::select! {
            _ = stopped(&mut st.shutdown) => return None,
            _ = st.drop_streams.changed() => return None,
            _ = st.cut_streams.changed() => {
                st.done = true;
                Err::<Frame<Bytes>, BoxError>("fake control plane: down, cutting the stream".into())
            }
            received = st.events.recv() => match received {
                Ok(generation) => Ok(Frame::data(sse_event(generation))),
                // Too far behind: the latest version is all a client needs.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let generation = st.shared.lock().generation;
                    Ok(Frame::data(sse_event(generation)))
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            _ = tokio::time::sleep_until(st.next_heartbeat) => {
                let interval = st.shared.lock().heartbeat;
                st.next_heartbeat = tokio::time::Instant::now() + interval;
                Ok(Frame::data(Bytes::from_static(b": heartbeat\n\n")))
            }
        };
        Some((item, st))
    });
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
