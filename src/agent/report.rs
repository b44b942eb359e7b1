//! The one message the fetch side hands the writer (DESIGN.md §2).
//!
//! Owned and serializable, so the boundary can later become a process
//! boundary (network and parsing unprivileged, only the writer as root):
//! nothing else crosses from a fetch loop or a subscription to the writer.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::keys::KeySet;

/// What the fetch side tells the writer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Report {
    /// One fetch and what it produced.
    Fetched(FetchReport),
    /// A source's subscription stream went up or down (subscribe mode).
    Stream { source: String, connected: bool },
    /// A source's part in login-triggered refresh round `round` (DESIGN.md
    /// §3) is over: its fetch's `Fetched` report came just before, or it
    /// fetched nothing because it was in backoff.
    Refresh {
        source: String,
        round: u64,
        part: RoundPart,
    },
}

/// What one source did for a refresh round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RoundPart {
    /// Fetched, and the answer was a list or "unchanged".
    Answered,
    /// Fetched, and the fetch failed.
    Failed,
    /// In backoff or Retry-After: nothing fetched (a refresh never shortens one).
    InBackoff,
}

/// What one fetch produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct FetchReport {
    pub source: String,
    pub fetched: Fetched,
    /// Wall-clock time of the answer, for status and the persisted state.
    pub at: SystemTime,
    pub took: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Fetched {
    /// The list is this (validated; rejected entries were logged).
    List { keys: KeySet, etag: Option<String> },
    /// Unchanged since the last good answer.
    Unchanged,
    /// No authoritative answer: the last good keys stay.
    Failed {
        error: String,
        kind: FailureKind,
        retry_after: Option<Duration>,
    },
}

/// Why a fetch gave no answer, so metrics and readiness can tell a 401 from
/// a 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FailureKind {
    /// 429, 5xx, timeouts, bad bodies: retried with backoff.
    Transient,
    /// 401, 403, a plain 404, no API key: an operator has to act.
    Rejected,
}

/// The `result` label of `keysync_fetch_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchResult {
    Ok,
    Unchanged,
    Empty,
    Error,
}

impl FetchResult {
    pub(crate) fn label(self) -> &'static str {
        match self {
            FetchResult::Ok => "ok",
            FetchResult::Unchanged => "unchanged",
            FetchResult::Empty => "empty",
            FetchResult::Error => "error",
        }
    }
}

impl Fetched {
    pub(crate) fn result(&self) -> FetchResult {
        match self {
            Fetched::List { keys, .. } if keys.is_empty() => FetchResult::Empty,
            Fetched::List { .. } => FetchResult::Ok,
            Fetched::Unchanged => FetchResult::Unchanged,
            Fetched::Failed { .. } => FetchResult::Error,
        }
    }
}
