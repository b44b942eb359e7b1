//! The status document as a projection (DESIGN.md §8): derived from the
//! settings, the engine's knowledge (answers, keys applied) and a small log
//! of attempts the writer keeps (last attempt and error per source, last
//! write, error and drift repairs per user). Published after every event.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::config::{Settings, SourceKind};
use crate::engine::Engine;
use crate::status::{
    ConfigStatus, SourceKindName, SourceMode, SourceStatus, Status, UserStatus, to_unix,
};

/// What the engine does not know: the outcome of attempts.
#[derive(Debug, Default)]
pub(crate) struct AttemptLog {
    pub(crate) config: ConfigStatus,
    pub(crate) sources: BTreeMap<String, SourceAttempt>,
    pub(crate) users: BTreeMap<String, UserAttempt>,
}

#[derive(Debug, Default)]
pub(crate) struct SourceAttempt {
    pub(crate) last_attempt: Option<SystemTime>,
    pub(crate) last_error: Option<String>,
    pub(crate) stream_connected: bool,
}

#[derive(Debug, Default)]
pub(crate) struct UserAttempt {
    /// The file written, once the user's home is known.
    pub(crate) path: Option<PathBuf>,
    pub(crate) last_write: Option<SystemTime>,
    pub(crate) drift_repairs: u64,
    pub(crate) last_error: Option<String>,
    /// Waiting for sources, or for the confirmation of a mass removal.
    pub(crate) pending: Option<String>,
    /// Other writers' lines in the user's file that carry a revoked key.
    pub(crate) revoked_copies: usize,
}

impl AttemptLog {
    /// Forgets sources and users the config no longer names.
    pub(crate) fn follow(&mut self, settings: &Settings) {
        self.sources
            .retain(|name, _| settings.sources.contains_key(name));
        self.users
            .retain(|name, _| settings.users.iter().any(|u| &u.name == name));
    }

    pub(crate) fn source(&mut self, name: &str) -> &mut SourceAttempt {
        self.sources.entry(name.to_string()).or_default()
    }

    pub(crate) fn user(&mut self, name: &str) -> &mut UserAttempt {
        self.users.entry(name.to_string()).or_default()
    }
}

/// The kind's name in `/status`.
pub(crate) fn kind_name(kind: &SourceKind) -> SourceKindName {
    match kind {
        SourceKind::Vast { .. } => SourceKindName::Vast,
        SourceKind::Http { .. } => SourceKindName::Http,
        SourceKind::File { .. } => SourceKindName::File,
        #[cfg(test)]
        SourceKind::Static { .. } => SourceKindName::Static,
    }
}

/// The status document (uptime and summary are filled in by the reader).
pub(crate) fn project(settings: &Settings, engine: &Engine, log: &AttemptLog) -> Status {
    let empty_source = SourceAttempt::default();
    let sources = settings
        .sources
        .iter()
        .map(|(name, src)| {
            let attempt = log.sources.get(name).unwrap_or(&empty_source);
            let good = engine.last_good(name);
            let status = SourceStatus {
                kind: kind_name(&src.kind),
                mode: if src.subscribe_url.is_some() {
                    SourceMode::Subscribe
                } else {
                    SourceMode::Poll
                },
                last_attempt: attempt.last_attempt.map(to_unix),
                last_success: good.map(|g| to_unix(g.fetched_at)),
                last_error: attempt.last_error.clone(),
                etag: good.and_then(|g| g.etag.clone()),
                key_count: good.map_or(0, |g| g.keys.len()),
                has_answer: good.is_some(),
                stream_connected: attempt.stream_connected,
            };
            (name.clone(), status)
        })
        .collect();
    let empty_user = UserAttempt::default();
    let users = settings
        .users
        .iter()
        .map(|user| {
            let attempt = log.users.get(&user.name).unwrap_or(&empty_user);
            let status = UserStatus {
                path: attempt.path.clone(),
                write_mode: user.write,
                fingerprints: engine
                    .applied(&user.name)
                    .map(|k| k.fingerprints())
                    .unwrap_or_default(),
                last_write: attempt.last_write.map(to_unix),
                drift_repairs: attempt.drift_repairs,
                last_error: attempt.last_error.clone(),
                pending: attempt.pending.clone(),
                revoked_copies: attempt.revoked_copies,
            };
            (user.name.clone(), status)
        })
        .collect();
    Status {
        config: log.config.clone(),
        sources,
        users,
        ..Status::default()
    }
}
