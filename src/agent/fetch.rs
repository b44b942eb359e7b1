//! The per-source fetch loop (DESIGN.md §5, §7): the first fetch at once,
//! then every `interval` ± `jitter` (every `resync` while a subscription
//! stream is up), sooner when nudged (a stream event, a key file change, a
//! mass-removal confirmation), and with full-jitter backoff after failures.
//! Nudges are coalesced: at most one fetch in flight and one more after it
//! for all nudges that came meanwhile, at least 100 ms between the start of
//! one fetch and a nudged one, and none while a backoff or a `Retry-After`
//! of a remote source runs (the nudge is served when it ends).
//!
//! It touches no shared state: each fetch becomes a [`Report`] sent to the
//! writer, and so does each change of the subscription stream's state.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::report::{FailureKind, FetchReport, Fetched, Report, RoundPart};
use crate::backoff::{backoff, draw, jittered, poll_after};
use crate::config::{SourceKind, SourceSettings};
use crate::keys::{self, Policy};
use crate::source::{self, Answer, KeySource, SourceError};

/// How many rejected entries of one answer are logged one by one.
const LOGGED_REJECTIONS: usize = 10;

/// The least time from the start of one fetch to a fetch a nudge asks for
/// (DESIGN.md §5, "Subscribe"): a flood of events costs at most ten
/// fetches a second.
const NUDGE_GAP: Duration = Duration::from_millis(100);

/// Fetches once and validates the answer with the key policy.
pub(crate) async fn fetch(name: &str, source: &mut dyn KeySource, policy: &Policy) -> FetchReport {
    let started = Instant::now();
    let fetched = match source.fetch().await {
        Ok(Answer::List { entries, etag }) => {
            let (keys, rejected) = keys::parse_entries(entries.iter().map(String::as_str), policy);
            // A few examples, then a count: a list padded with junk must not
            // flood the log (or the journal) with a line per entry.
            for r in rejected.iter().take(LOGGED_REJECTIONS) {
                tracing::warn!(source = name, rejected = %r, "dropping key that fails the key policy: {r}");
            }
            if rejected.len() > LOGGED_REJECTIONS {
                tracing::warn!(
                    source = name,
                    rejected = rejected.len(),
                    "{} keys in all fail the key policy; only the first {LOGGED_REJECTIONS} are logged",
                    rejected.len()
                );
            }
            Fetched::List { keys, etag }
        }
        Ok(Answer::Unchanged) => Fetched::Unchanged,
        Err(e) => failed(&e),
    };
    FetchReport {
        source: name.to_string(),
        fetched,
        at: SystemTime::now(),
        took: started.elapsed(),
    }
}

fn failed(e: &SourceError) -> Fetched {
    Fetched::Failed {
        error: e.chain(),
        kind: match e {
            SourceError::Transient { .. } => FailureKind::Transient,
            SourceError::Rejected { .. } => FailureKind::Rejected,
        },
        retry_after: e.retry_after(),
    }
}

/// `now + delay` on tokio's clock, saturating far in the future instead of
/// panicking on an absurd delay.
fn after(delay: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(delay)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// The loop's inputs besides its settings.
pub(crate) struct Inputs {
    /// The persisted ETag of the last good answer, for the first fetch.
    pub(crate) etag: Option<String>,
    /// A fetch is wanted now.
    pub(crate) nudge: mpsc::Receiver<()>,
    /// Whether the subscription stream is up; never changes without one.
    pub(crate) stream: watch::Receiver<bool>,
    /// The number of the latest login-triggered refresh round (DESIGN.md §3).
    pub(crate) refresh: watch::Receiver<u64>,
    /// The id of the latest event the subscription stream delivered; each
    /// fetch carries it (`KeySource::set_event_id`). Never changes without
    /// a subscription.
    pub(crate) event_id: watch::Receiver<Option<String>>,
}

/// Runs one source's loop until cancelled or the writer is gone.
pub(crate) async fn source_loop(
    settings: SourceSettings,
    policy: Policy,
    inputs: Inputs,
    reports: mpsc::Sender<Report>,
    cancel: CancellationToken,
) {
    let Inputs {
        etag,
        mut nudge,
        mut stream,
        mut refresh,
        event_id,
    } = inputs;
    let name = settings.name.clone();
    let mut source: Option<Box<dyn KeySource>> = None;
    let mut etag = etag;
    let mut failures = 0u32;
    let backoff_after = |failures: u32, retry_after: Option<Duration>| {
        backoff(
            settings.interval,
            settings.max_backoff,
            failures,
            retry_after,
            draw(),
        )
    };
    // The first fetch after start is immediate.
    let mut next = tokio::time::Instant::now();
    // Nudges are coalesced: one waiting is as good as many. It is served
    // `NUDGE_GAP` after the last fetch started, but while a backoff or a
    // Retry-After runs (failures > 0) only when that ends, at `next`. The
    // loop runs one fetch at a time, so at most one is in flight and the
    // nudges that came during it make one more.
    //
    // A file source is exempt from the backoff rule: a backoff spares a
    // server, a file has none, and its watch says when it is worth reading
    // again (a key file that was missing and is back is read at once).
    let mut nudged = false;
    let mut last_fetch: Option<tokio::time::Instant> = None;
    let backoff_holds_nudges = !matches!(settings.kind, SourceKind::File { .. });
    // The refresh round the next fetch serves (its part is reported after
    // the fetch's own report, so the writer answers once it is written).
    let mut round: Option<u64> = None;
    loop {
        let wake = if nudged && (failures == 0 || !backoff_holds_nudges) {
            let earliest = last_fetch.map_or_else(tokio::time::Instant::now, |at| {
                at.checked_add(NUDGE_GAP).unwrap_or(at)
            });
            next.min(earliest)
        } else {
            next
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
            Some(()) = nudge.recv() => {
                nudged = true;
                continue;
            }
            // Errs (and is skipped) when there is no subscription.
            Ok(()) = stream.changed() => {
                let connected = *stream.borrow_and_update();
                // The stream went down while this loop waited out `resync`:
                // from now on it polls at `interval`. A backoff in progress
                // is kept.
                if !connected && failures == 0 {
                    next = next.min(after(jittered(settings.interval, settings.jitter, draw())));
                }
                let report = Report::Stream { source: name.clone(), connected };
                if reports.send(report).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(()) = refresh.changed() => {
                let asked = *refresh.borrow_and_update();
                // A refresh never shortens a backoff or a Retry-After: it
                // is answered at once, with what the cache holds.
                if failures > 0 && backoff_holds_nudges {
                    let part = Report::Refresh { source: name.clone(), round: asked, part: RoundPart::InBackoff };
                    if reports.send(part).await.is_err() {
                        return;
                    }
                    continue;
                }
                // Otherwise it is one more nudge, coalesced with the others.
                round = Some(asked);
                nudged = true;
                continue;
            }
        }
        // Whatever woke this fetch, it also serves a round announced meanwhile.
        if refresh.has_changed().unwrap_or(false) {
            round = Some(*refresh.borrow_and_update());
        }
        if source.is_none() {
            match source::build(&settings, etag.take()) {
                Ok(s) => source = Some(s),
                Err(e) => {
                    let report = FetchReport {
                        source: name.clone(),
                        fetched: failed(&e),
                        at: SystemTime::now(),
                        took: Duration::ZERO,
                    };
                    failures = failures.saturating_add(1);
                    next = after(backoff_after(failures, None));
                    if reports.send(Report::Fetched(report)).await.is_err()
                        || !report_part(&reports, &name, round.take(), RoundPart::Failed).await
                    {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(src) = source.as_mut() else { continue };
        nudged = false;
        last_fetch = Some(tokio::time::Instant::now());
        src.set_event_id(event_id.borrow().as_deref());
        let report = tokio::select! {
            _ = cancel.cancelled() => return,
            report = fetch(&name, src.as_mut(), &policy) => report,
        };
        let delay = match &report.fetched {
            Fetched::Failed { retry_after, .. } => {
                failures = failures.saturating_add(1);
                let delay = backoff_after(failures, *retry_after);
                if let Some(asked) = retry_after
                    && *asked > delay
                {
                    tracing::info!(
                        source = %name,
                        retry_after = ?asked,
                        retry_in = ?delay,
                        "source {name} asked to retry after {asked:?}; retrying in {delay:?} instead, because Retry-After is capped at max_backoff so that no answer can hold up a revocation"
                    );
                }
                delay
            }
            _ => {
                failures = 0;
                // `borrow`, not `borrow_and_update`: a change not yet seen
                // by the select above must still be reported to the writer.
                let base = if *stream.borrow() {
                    settings.resync
                } else {
                    settings.interval
                };
                let poll = jittered(base, settings.jitter, draw());
                let max_age = src.max_age();
                let delay = poll_after(poll, max_age, settings.max_backoff);
                if delay > poll {
                    tracing::debug!(source = %name, max_age = ?max_age, next_poll_in = ?delay, "the answer says it stays fresh (Cache-Control: max-age); next poll in {delay:?}");
                }
                delay
            }
        };
        next = after(delay);
        let part = match report.fetched {
            Fetched::Failed { .. } => RoundPart::Failed,
            _ => RoundPart::Answered,
        };
        if reports.send(Report::Fetched(report)).await.is_err()
            || !report_part(&reports, &name, round.take(), part).await
        {
            return;
        }
    }
}

/// Reports this source's part in a refresh round, if the fetch served one;
/// false when the writer is gone.
async fn report_part(
    reports: &mpsc::Sender<Report>,
    source: &str,
    round: Option<u64>,
    part: RoundPart,
) -> bool {
    let Some(round) = round else { return true };
    let report = Report::Refresh {
        source: source.to_string(),
        round,
        part,
    };
    reports.send(report).await.is_ok()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl inline@test";

    /// The settings of source `s` in a config whose only source has `table`.
    fn source(table: &str) -> SourceSettings {
        let text = format!(
            "state_dir = \"/nonexistent/state\"\nhealth_socket = \"/nonexistent/s\"\n\
             [sources.s]\n{table}\ninterval = \"60s\"\njitter = \"0s\"\n\
             [[users]]\nname = \"root\"\nsources = [\"s\"]\nwrite = \"none\"\n"
        );
        let settings =
            config::from_texts(&[(Path::new("/test.toml"), text.as_str())]).expect("config");
        settings.sources["s"].clone()
    }

    struct Loop {
        reports: mpsc::Receiver<Report>,
        nudge: mpsc::Sender<()>,
        rounds: watch::Sender<u64>,
        _stream: watch::Sender<bool>,
        cancel: CancellationToken,
    }

    fn start(settings: SourceSettings) -> Loop {
        let (reports_tx, reports) = mpsc::channel(16);
        let (nudge, nudge_rx) = mpsc::channel(1);
        let rounds = watch::Sender::new(0);
        let stream = watch::Sender::new(false);
        let cancel = CancellationToken::new();
        let inputs = Inputs {
            etag: None,
            nudge: nudge_rx,
            stream: stream.subscribe(),
            refresh: rounds.subscribe(),
            event_id: watch::Sender::new(None).subscribe(),
        };
        tokio::spawn(source_loop(
            settings,
            Policy::default(),
            inputs,
            reports_tx,
            cancel.clone(),
        ));
        Loop {
            reports,
            nudge,
            rounds,
            _stream: stream,
            cancel,
        }
    }

    /// The next report, within `within` of tokio's (paused) clock.
    async fn next(l: &mut Loop, within: Duration) -> Option<Report> {
        tokio::time::timeout(within, l.reports.recv())
            .await
            .ok()
            .flatten()
    }

    fn is_fetch(r: &Option<Report>) -> bool {
        matches!(r, Some(Report::Fetched(_)))
    }

    /// The round and part of a refresh report.
    fn round_part(r: &Option<Report>) -> Option<(u64, RoundPart)> {
        match r {
            Some(Report::Refresh { round, part, .. }) => Some((*round, *part)),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_round_is_a_coalesced_nudge_and_its_part_follows_the_fetch() {
        let mut l = start(source(&format!("kind = \"static\"\nkeys = [\"{KEY}\"]")));
        assert!(
            is_fetch(&next(&mut l, Duration::from_secs(1)).await),
            "the first fetch at once"
        );
        let first = tokio::time::Instant::now();

        // A round and a nudge together: one fetch serves both.
        l.rounds.send_replace(1);
        l.nudge.send(()).await.expect("nudge");
        let fetched = next(&mut l, Duration::from_secs(1)).await;
        assert!(is_fetch(&fetched), "{fetched:?}");
        assert!(
            first.elapsed() >= NUDGE_GAP,
            "a nudged fetch waits {NUDGE_GAP:?} after the last one"
        );
        let part = next(&mut l, Duration::from_secs(1)).await;
        assert_eq!(
            round_part(&part),
            Some((1, RoundPart::Answered)),
            "{part:?}"
        );
        // Nothing more until the next poll, a minute away.
        assert!(next(&mut l, Duration::from_secs(30)).await.is_none());
        l.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn during_a_backoff_a_refresh_is_answered_without_a_fetch() {
        // No API key: each fetch fails at once, without any network.
        let mut l = start(source(
            "kind = \"vast\"\nurl = \"http://127.0.0.1:9/\"\napi_key_env = \"KEYSYNC_UNIT_TEST_NO_SUCH_VARIABLE\"\nmax_backoff = \"1h\"",
        ));
        let failed = next(&mut l, Duration::from_secs(1)).await;
        assert!(
            matches!(
                &failed,
                Some(Report::Fetched(FetchReport {
                    fetched: Fetched::Failed { .. },
                    ..
                }))
            ),
            "{failed:?}"
        );
        l.rounds.send_replace(1);
        let part = next(&mut l, Duration::from_secs(1)).await;
        assert_eq!(
            round_part(&part),
            Some((1, RoundPart::InBackoff)),
            "answered at once, nothing fetched: {part:?}"
        );
        l.cancel.cancel();
    }
}
