//! Subscribe mode (DESIGN.md §5): keep the control plane's Server-Sent
//! Events stream open and trigger an immediate fetch on every event.
//!
//! The fetch is the truth; an event's data is only a hint and is not read.
//! `: comment` lines and blocks without data (a hub's `event: ping`) are
//! heartbeats (`source/sse.rs` has the parsing rules). The fetch loop
//! coalesces the nudges (`agent/fetch.rs`).
//!
//! On a dropped stream the task reconnects with backoff and full jitter,
//! sending `Last-Event-ID`. The backoff resets only after a stream stayed
//! up for `interval`, so a hub that accepts and drops streams gets one try
//! per backoff step, not a storm; a `Retry-After` on a refused stream and
//! the stream's `retry:` are floors, capped at `max_backoff`. While the
//! stream is down the fetch loop polls at `interval`, and while it is up
//! at `resync`. The task talks only through the nudge and a watch channel
//! that says whether the stream is up (the fetch loop reports that to the
//! writer), so a loop waiting out a long `resync` starts polling as soon as
//! the stream drops.
//!
//! The id of the latest event the stream delivered goes to the fetch loop
//! through a third channel, and every later fetch sends it as
//! `Last-Event-ID`: a cache in front of the list that keys on it
//! (packaging/fleet/) then makes one origin request per change for a whole
//! fleet, and never answers a fetch with an entry filled before the change
//! the agent was told about.

use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::sse::SseParser;
use crate::backoff::{backoff, draw};
use crate::config::{SourceKind, SourceSettings};

/// A stream that sends nothing at all, not even a heartbeat, for this long
/// (or for `resync`, when that is longer) is taken for dead and reopened.
/// It catches a connection a proxy holds open after its upstream died; a
/// vanished peer is already noticed by TCP keepalive (reqwest's default,
/// about a minute). The floor keeps a short `resync` (a test's, a
/// benchmark's) from turning a quiet but healthy stream into a reconnect
/// loop: `resync` is the fetch loop's business, not the stream's.
const SILENCE_FLOOR: Duration = Duration::from_secs(90);

/// Runs the subscription for one source until cancelled.
pub(crate) async fn run(
    settings: SourceSettings,
    nudge: mpsc::Sender<()>,
    stream_up: watch::Sender<bool>,
    event_id: watch::Sender<Option<String>>,
    cancel: CancellationToken,
) {
    let Some(sub_url) = settings.subscribe_url.clone() else {
        return;
    };
    let name = settings.name.clone();
    // Validated at config load; a URL that does not parse is no stream.
    let Ok(url) = reqwest::Url::parse(&sub_url) else {
        tracing::error!(source = %name, "subscribe_url of source {name} is not a URL; polling only");
        return;
    };
    let client = match super::http::client(
        &SourceSettings {
            // The stream stays open: only connecting is bounded by the timeout.
            timeout: Duration::from_secs(365 * 24 * 3600),
            ..settings.clone()
        },
        &url,
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(source = %name, error = %e.chain(), "cannot set up the subscription ({}); polling only", e.chain());
            return;
        }
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
            && let Ok(key) = crate::source::vast::resolve_api_key(api_key)
            && let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
        {
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        if let Some(id) = parser.last_id()
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
        // A 429 or 503 may say when to come back; so may the stream's `retry:`.
        let mut retry_after = None;
        let error = match response {
            Ok(Ok(mut resp)) if resp.status().is_success() => {
                tracing::info!(source = %name, "subscription stream of source {name} connected");
                parser.reset();
                stream_up.send_replace(true);
                let connected_at = tokio::time::Instant::now();
                // A (re)connect may have missed events: fetch now.
                let _ = nudge.try_send(());
                let reason = loop {
                    // Heartbeats keep a healthy stream talking; long silence
                    // means a dead connection.
                    let chunk = tokio::select! {
                        _ = cancel.cancelled() => {
                            stream_up.send_replace(false);
                            return;
                        }
                        c = tokio::time::timeout(silence, resp.chunk()) => c,
                    };
                    match chunk {
                        Ok(Ok(Some(bytes))) => {
                            if parser.feed(&bytes) > 0 {
                                // The id first: the fetch this nudge causes
                                // carries it.
                                publish_id(&event_id, parser.last_id());
                                let _ = nudge.try_send(());
                            }
                        }
                        Ok(Ok(None)) => break "stream closed by the server".to_string(),
                        Ok(Err(e)) => break format!("stream broke: {e}"),
                        Err(_) => break format!("stream silent for {silence:?}"),
                    }
                };
                stream_up.send_replace(false);
                // Only a stream that stayed up for `interval` shows a healthy
                // hub and resets the backoff: one that accepts and drops
                // streams gets one try per backoff step, not a storm.
                if connected_at.elapsed() >= settings.interval {
                    failures = 0;
                }
                reason
            }
            Ok(Ok(resp)) => {
                retry_after = super::http::retry_after(resp.headers());
                format!("subscription answered {}", resp.status())
            }
            Ok(Err(e)) => format!("cannot connect the subscription: {}", e.without_url()),
            Err(_) => "subscription connect timed out".to_string(),
        };
        failures = failures.saturating_add(1);
        // The server's wishes are a floor, capped at max_backoff.
        let delay = backoff(
            Duration::from_secs(1).min(settings.interval),
            settings.max_backoff,
            failures,
            retry_after.max(parser.retry()),
            draw(),
        );
        tracing::warn!(source = %name, error = %error, retry_in = ?delay, failures, "subscription down ({error}); reconnecting in {delay:?}, polling meanwhile");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Hands the latest event id to the fetch loop; an event without an id
/// keeps the one before (the WHATWG last-event-id buffer).
fn publish_id(event_id: &watch::Sender<Option<String>>, id: Option<&str>) {
    event_id.send_if_modified(|held| {
        if held.as_deref() == id {
            return false;
        }
        *held = id.map(str::to_owned);
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fetch_loop_sees_the_latest_event_id() {
        let (tx, mut rx) = watch::channel(None);
        let mut parser = SseParser::default();
        assert!(parser.feed(b"id: 1:0\ndata: x\n\nid: 2:0\ndata: y\n\n") > 0);
        publish_id(&tx, parser.last_id());
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().as_deref(), Some("2:0"));
        // The same id again is no change.
        publish_id(&tx, parser.last_id());
        assert!(!rx.has_changed().unwrap());
    }
}
