//! Subscribe mode (DESIGN.md §5): keep the control plane's Server-Sent
//! Events stream open and trigger an immediate fetch on every event.
//!
//! The fetch is the truth; an event's data is only a hint and is not read.
//! `: comment` lines are heartbeats. On a dropped stream the task reconnects
//! with backoff and full jitter, sending `Last-Event-ID`; while the stream is
//! down the fetch loop polls at `interval`, and while it is up at `resync`.
//! The task tells the fetch loop which of the two applies through a watch
//! channel, so a loop waiting out a long `resync` starts polling as soon as
//! the stream drops.

use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{SourceKind, SourceSettings};
use crate::status::Shared;

/// Incremental SSE parser: feed bytes, get the number of dispatched events.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    has_data: bool,
    pending_id: Option<String>,
    /// The last event ID seen (sent as `Last-Event-ID` on reconnect).
    pub last_id: Option<String>,
}

/// Lines longer than this are dropped (a hostile stream cannot grow memory).
const MAX_LINE: usize = 64 * 1024;

/// A stream that sends nothing at all, not even a heartbeat, for this long
/// (or for `resync`, when that is longer) is taken for dead and reopened.
/// It catches a connection a proxy holds open after its upstream died; a
/// vanished peer is already noticed by TCP keepalive (reqwest's default,
/// about a minute). The floor keeps a short `resync` (a test's, a
/// benchmark's) from turning a quiet but healthy stream into a reconnect
/// loop: `resync` is the fetch loop's business, not the stream's.
const SILENCE_FLOOR: Duration = Duration::from_secs(90);

impl SseParser {
    /// Feeds a chunk; returns how many events were dispatched.
    pub fn feed(&mut self, chunk: &[u8]) -> usize {
        let mut events = 0;
        for &b in chunk {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                events += self.line_done(line);
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        events
    }

    fn line_done(&mut self, line: &[u8]) -> usize {
        if line.is_empty() {
            // Blank line: dispatch if anything was collected.
            let had = self.has_data || self.pending_id.is_some();
            if let Some(id) = self.pending_id.take() {
                self.last_id = Some(id);
            }
            self.has_data = false;
            return usize::from(had);
        }
        if line.starts_with(b":") {
            return 0; // heartbeat comment
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" | b"event" => self.has_data = true,
            b"id" if !value.contains(&0) => {
                self.pending_id = Some(String::from_utf8_lossy(value).into_owned());
            }
            _ => {}
        }
        0
    }
}

/// Runs the subscription for one source until cancelled.
pub async fn run(
    settings: SourceSettings,
    nudge: mpsc::Sender<()>,
    stream_up: watch::Sender<bool>,
    shared: Shared,
    cancel: CancellationToken,
) {
    let Some(sub_url) = settings.subscribe_url.clone() else {
        return;
    };
    let name = settings.name.clone();
    let client = match crate::source::http::client(&SourceSettings {
        // The stream stays open: only connecting is bounded by the timeout.
        timeout: Duration::from_secs(365 * 24 * 3600),
        ..settings.clone()
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(source = %name, error = %e.chain(), "cannot set up the subscription");
            return;
        }
    };
    let Ok(url) = reqwest::Url::parse(&sub_url) else {
        return;
    };
    let silence = settings.resync.max(SILENCE_FLOOR);
    let mut parser = SseParser::default();
    let mut failures = 0u32;
    loop {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if let SourceKind::Vast {
            url: list_url,
            api_key,
        } = &settings.kind
            && reqwest::Url::parse(list_url).is_ok_and(|l| l.origin() == url.origin())
            && let Ok(key) = api_key.resolve()
            && let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
        {
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        if let Some(id) = &parser.last_id
            && let Ok(value) = HeaderValue::from_str(id)
        {
            headers.insert("last-event-id", value);
        }
        let connect = tokio::time::timeout(
            settings.timeout,
            client.get(url.clone()).headers(headers).send(),
        );
        let response = tokio::select! {
            _ = cancel.cancelled() => return,
            r = connect => r,
        };
        let error = match response {
            Ok(Ok(mut resp)) if resp.status().is_success() => {
                tracing::info!(source = %name, "subscription stream connected");
                set_up(&shared, &name, &stream_up, true);
                failures = 0;
                // A (re)connect may have missed events: fetch now.
                let _ = nudge.try_send(());
                let reason = loop {
                    // Heartbeats keep a healthy stream talking; long silence
                    // means a dead connection.
                    let chunk = tokio::select! {
                        _ = cancel.cancelled() => {
                            set_up(&shared, &name, &stream_up, false);
                            return;
                        }
                        c = tokio::time::timeout(silence, resp.chunk()) => c,
                    };
                    match chunk {
                        Ok(Ok(Some(bytes))) => {
                            if parser.feed(&bytes) > 0 {
                                let _ = nudge.try_send(());
                            }
                        }
                        Ok(Ok(None)) => break "stream closed by the server".to_string(),
                        Ok(Err(e)) => break format!("stream broke: {e}"),
                        Err(_) => break format!("stream silent for {silence:?}"),
                    }
                };
                set_up(&shared, &name, &stream_up, false);
                reason
            }
            Ok(Ok(resp)) => format!("subscription answered {}", resp.status()),
            Ok(Err(e)) => format!("cannot connect the subscription: {}", e.without_url()),
            Err(_) => "subscription connect timed out".to_string(),
        };
        failures = failures.saturating_add(1);
        let delay = crate::agent::backoff(
            &SourceSettings {
                interval: Duration::from_secs(1).min(settings.interval),
                ..settings.clone()
            },
            failures,
            None,
        );
        tracing::warn!(source = %name, error = %error, retry_in = ?delay, "subscription down; polling meanwhile");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn set_up(shared: &Shared, name: &str, flag: &watch::Sender<bool>, up: bool) {
    flag.send_replace(up);
    let mut status = shared.lock();
    let entry = status.sources.entry(name.to_string()).or_default();
    entry.stream_connected = up;
    entry.mode = "subscribe".to_string();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_comments_and_ids() {
        let mut p = SseParser::default();
        assert_eq!(p.feed(b": heartbeat\n\n"), 0);
        assert_eq!(
            p.feed(b"id: 7\nevent: keys\ndata: {\"generation\": 7}\n\n"),
            1
        );
        assert_eq!(p.last_id.as_deref(), Some("7"));
        // Split across chunks and CRLF.
        assert_eq!(p.feed(b"data: a\r"), 0);
        assert_eq!(p.feed(b"\n\r\nid:8\n"), 1);
        assert_eq!(p.feed(b"\n"), 1);
        assert_eq!(p.last_id.as_deref(), Some("8"));
        // Two events in one chunk.
        assert_eq!(p.feed(b"data: x\n\ndata: y\n\n"), 2);
    }

    #[test]
    fn endless_line_does_not_grow_memory() {
        let mut p = SseParser::default();
        for _ in 0..100 {
            p.feed(&[b'a'; 10_000]);
        }
        assert!(p.line.len() <= MAX_LINE);
    }
}
