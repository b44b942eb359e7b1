//! The per-source fetch loop (DESIGN.md §5, §7): the first fetch at once,
//! then every `interval` ± `jitter` (every `resync` while a subscription
//! stream is up), sooner when nudged (a stream event, a key file change, a
//! mass-removal confirmation), and with full-jitter backoff after failures.
//!
//! It touches no shared state: each fetch becomes a [`Report`] sent to the
//! writer, and so does each change of the subscription stream's state.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::report::{FailureKind, FetchReport, Fetched, Report, RoundPart};
use crate::backoff::{backoff, draw, jittered};
use crate::config::SourceSettings;
use crate::keys::{self, Policy};
use crate::source::{self, Answer, KeySource, SourceError};

/// How many rejected entries of one answer are logged one by one.
const LOGGED_REJECTIONS: usize = 10;

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
    // The refresh round the next fetch serves (its part is reported after
    // the fetch's own report, so the writer answers once it is written).
    let mut round: Option<u64> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
            Some(()) = nudge.recv() => {}
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
                // A refresh never shortens a backoff or a Retry-After.
                if failures > 0 {
                    let part = Report::Refresh { source: name.clone(), round: asked, part: RoundPart::InBackoff };
                    if reports.send(part).await.is_err() {
                        return;
                    }
                    continue;
                }
                round = Some(asked);
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
        let report = tokio::select! {
            _ = cancel.cancelled() => return,
            report = fetch(&name, src.as_mut(), &policy) => report,
        };
        let delay = match &report.fetched {
            Fetched::Failed { retry_after, .. } => {
                failures = failures.saturating_add(1);
                backoff_after(failures, *retry_after)
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
                jittered(base, settings.jitter, draw())
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
