//! Key sources (DESIGN.md §2, §5): each fetches one list of public keys.
//!
//! A source answers with the raw entries of its list (validated afterwards by
//! the key policy), with "unchanged", or with an error whose variant says
//! what the agent does next. Adding a source kind means one new file here
//! and one arm in [`build`].

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::config::{SourceKind, SourceSettings};

pub mod file;
#[cfg(test)]
mod fixed;
pub mod format;
pub mod http;
pub(crate) mod sse;
pub(crate) mod subscribe;
pub mod vast;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Answer, SourceError>> + Send + 'a>>;

/// An authoritative answer: it changes (or confirms) the source's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The list is exactly these entries (possibly none).
    List {
        entries: Vec<String>,
        etag: Option<String>,
    },
    /// The list is what it was (304 Not Modified, or an unchanged file).
    Unchanged,
}

/// A fetch that did not produce an authoritative answer. In every case the
/// source keeps its last good keys.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// 429, 5xx, timeout, connection error, bad JSON, body too large, an
    /// unreadable file: retry with backoff and full jitter, at the earliest
    /// after `retry_after`.
    #[error("{what}")]
    Transient {
        what: String,
        retry_after: Option<Duration>,
        #[source]
        source: Option<BoxError>,
    },
    /// 401, 403, a plain 404, no API key: misconfigured or unauthorized.
    /// Report it (not ready) and back off; an operator has to act.
    #[error("{what}")]
    Rejected {
        what: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl SourceError {
    pub fn transient(what: impl Into<String>) -> Self {
        SourceError::Transient {
            what: what.into(),
            retry_after: None,
            source: None,
        }
    }

    pub fn rejected(what: impl Into<String>) -> Self {
        SourceError::Rejected {
            what: what.into(),
            source: None,
        }
    }

    /// The server's requested pause, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Transient { retry_after, .. } => *retry_after,
            SourceError::Rejected { .. } => None,
        }
    }

    /// The message with its causes, for status and logs.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

/// A source of keys. Implementations keep their own conditional-request
/// state (ETag, file identity).
pub trait KeySource: Send {
    /// Fetches the list once.
    fn fetch(&mut self) -> FetchFuture<'_>;

    /// How long the last answer said it stays fresh (`Cache-Control:
    /// max-age`); the next poll waits at least that long, up to
    /// `max_backoff` (DESIGN.md §5). None when it said nothing.
    fn max_age(&self) -> Option<Duration> {
        None
    }

    /// The id of the latest event the subscription stream delivered, sent
    /// as `Last-Event-ID` on the following fetches so that a cache in
    /// front of the list can key on it (DESIGN.md §5, "Beyond one control
    /// plane"; packaging/fleet/README.md). None: no header. The URL is
    /// never changed. Sources that are not HTTP ignore it.
    fn set_event_id(&mut self, _id: Option<&str>) {}
}

/// Builds the source for a config entry. `etag` is the persisted ETag of
/// the last good answer, sent as `If-None-Match` on the first fetch.
pub fn build(
    settings: &SourceSettings,
    etag: Option<String>,
) -> Result<Box<dyn KeySource>, SourceError> {
    Ok(match &settings.kind {
        SourceKind::Vast { url, api_key } => {
            Box::new(vast::VastSource::new(settings, url, api_key.clone(), etag)?)
        }
        SourceKind::Http { url } => Box::new(http::HttpSource::new(settings, url, etag)?),
        SourceKind::File { path } => {
            Box::new(file::FileSource::new(path.clone(), settings.max_body))
        }
        #[cfg(test)]
        SourceKind::Static { keys } => Box::new(fixed::StaticSource::new(keys.clone())),
    })
}
