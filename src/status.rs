//! The agent's observable state: what `/status`, `/readyz`, `/metrics`,
//! `keysync status` and systemd's `STATUS=` report (DESIGN.md §8).
//!
//! The status is a projection: the writer derives the whole document from
//! the engine and a small log of attempts after every event and publishes it
//! on the [`crate::board::Board`]; `/status`, `/readyz`, `STATUS=` and the
//! metrics read that snapshot. Nothing else writes it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::WriteMode;

/// Seconds since the Unix epoch, as JSON numbers.
pub fn unix_now() -> f64 {
    to_unix(SystemTime::now())
}

pub fn to_unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The whole status document (`GET /status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// Unix time the agent started.
    pub started_at: f64,
    pub uptime_seconds: f64,
    pub config: ConfigStatus,
    pub sources: BTreeMap<String, SourceStatus>,
    pub users: BTreeMap<String, UserStatus>,
    /// Login-triggered refreshes (`POST /refresh`) since start.
    #[serde(default)]
    pub refresh: RefreshStatus,
    /// One line for an operator, also sent as systemd `STATUS=`.
    pub summary: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub path: PathBuf,
    pub loaded_at: f64,
    pub last_reload_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SourceStatus {
    pub kind: SourceKindName,
    pub mode: SourceMode,
    pub last_attempt: Option<f64>,
    pub last_success: Option<f64>,
    pub last_error: Option<String>,
    pub etag: Option<String>,
    pub key_count: usize,
    /// A good answer is known (fresh or persisted).
    pub has_answer: bool,
    /// Whether the subscription stream is connected (subscribe mode).
    #[serde(default)]
    pub stream_connected: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserStatus {
    pub path: Option<PathBuf>,
    pub write_mode: WriteMode,
    pub fingerprints: Vec<String>,
    pub last_write: Option<f64>,
    pub drift_repairs: u64,
    pub last_error: Option<String>,
    /// Waiting for sources, or for the confirmation of a mass removal.
    pub pending: Option<String>,
    /// Lines of other writers in the user's file that carry a revoked key
    /// (sshd refuses them through `RevokedKeys`).
    #[serde(default)]
    pub revoked_copies: usize,
}

/// Login-triggered refreshes (DESIGN.md §3): what the requests to
/// `POST /refresh` got, counted per request since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefreshStatus {
    /// `refresh_min_interval` in milliseconds; 0: the feature is off.
    pub min_interval_ms: u64,
    /// Requests that reached the agent.
    pub asked: u64,
    /// Answered 200 after a round of fetches in which a source answered.
    pub served: u64,
    /// Inside the rate-limit window: answered 429 at once, nothing fetched.
    pub rate_limited: u64,
    /// Every source was in backoff or Retry-After: answered at once
    /// (`"refreshed": false`), nothing fetched.
    pub backoff: u64,
    /// Fetched, but no source answered (errors, or the round timed out).
    pub failed: u64,
    /// Refused because `refresh_min_interval` is 0 (404).
    pub off: u64,
    /// Unix time the last round of fetches ended.
    pub last_round: Option<f64>,
}

/// A source's kind, as `/status` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKindName {
    #[default]
    Vast,
    Http,
    File,
    Static,
}

/// How a source learns of changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    #[default]
    Poll,
    Subscribe,
}

impl std::fmt::Display for SourceKindName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceKindName::Vast => "vast",
            SourceKindName::Http => "http",
            SourceKindName::File => "file",
            SourceKindName::Static => "static",
        })
    }
}

impl std::fmt::Display for SourceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceMode::Poll => "poll",
            SourceMode::Subscribe => "subscribe",
        })
    }
}

impl Status {
    /// Ready: every source has a good answer and no user failed its last write.
    pub fn readiness(&self) -> Result<(), String> {
        let missing: Vec<&str> = self
            .sources
            .iter()
            .filter(|(_, s)| !s.has_answer)
            .map(|(n, _)| n.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "no good answer yet from source(s): {}",
                missing.join(", ")
            ));
        }
        let failed: Vec<String> = self
            .users
            .iter()
            .filter_map(|(n, u)| u.last_error.as_ref().map(|e| format!("{n}: {e}")))
            .collect();
        if !failed.is_empty() {
            return Err(format!("user write failed: {}", failed.join("; ")));
        }
        Ok(())
    }

    /// Recomputes the one-line summary.
    pub fn summarize(&mut self) {
        let keys: usize = self.users.values().map(|u| u.fingerprints.len()).sum();
        let failing: Vec<&str> = self
            .sources
            .iter()
            .filter(|(_, s)| s.last_error.is_some())
            .map(|(n, _)| n.as_str())
            .collect();
        let last = self
            .sources
            .values()
            .filter_map(|s| s.last_success)
            .fold(None, |acc: Option<f64>, t| {
                Some(acc.map_or(t, |a| a.max(t)))
            });
        let since = match last {
            Some(t) => format!("last success {:.0}s ago", (unix_now() - t).max(0.0)),
            None => "no success yet".to_string(),
        };
        self.summary = match self.readiness() {
            Ok(()) if failing.is_empty() => {
                format!(
                    "in sync: {keys} key(s) for {} user(s), {since}",
                    self.users.len()
                )
            }
            Ok(()) => format!(
                "serving last good keys ({keys}); failing source(s): {}; {since}",
                failing.join(", ")
            ),
            Err(why) => format!("not ready: {why}"),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_stay_lowercase() {
        let mut status = Status::default();
        status.sources.insert(
            "a".into(),
            SourceStatus {
                mode: SourceMode::Subscribe,
                kind: SourceKindName::Http,
                ..SourceStatus::default()
            },
        );
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["sources"]["a"]["mode"], "subscribe");
        assert_eq!(json["sources"]["a"]["kind"], "http");
    }
}
