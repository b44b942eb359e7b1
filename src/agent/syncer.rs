//! The writer side's state machine (DESIGN.md §2, §4): a [`Report`] goes in,
//! the engine decides, answers are persisted, files are written, and facts
//! come out ([`SyncOutcome`]); the status document is projected from what it
//! holds ([`Syncer::status`]). Its methods block (file I/O); the writer runs
//! them off the async threads.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::projection::{AttemptLog, project};
use super::report::{FetchReport, Fetched, Report};
use crate::config::{Settings, UserSettings, WriteMode};
use crate::engine::{Engine, Plan};
use crate::keys::{self, KeySet, Policy};
use crate::metrics::{FetchLabels, Metrics, SourceLabels, UserLabels};
use crate::render;
use crate::state::{LastGood, StateDir};
use crate::status::{Status, unix_now};
use crate::users;
use crate::write::{self, Outcome};

/// An error and its causes, `a: b: c`: "cannot write X" alone does not tell
/// an operator that the disk is full.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// What syncing one user asks of the caller.
#[derive(Debug, Default)]
pub(crate) struct SyncOutcome {
    /// Fetch these sources again at this time to confirm a mass removal.
    pub(crate) confirm: Option<(Instant, Vec<String>)>,
    /// The user's home file was (re)written.
    pub(crate) wrote_home: bool,
    /// The user failed (reported in status).
    pub(crate) failed: bool,
}

/// Owns the engine, the state dir, the attempt log and every file write.
pub(crate) struct Syncer {
    settings: Settings,
    engine: Engine,
    state: StateDir,
    log: AttemptLog,
    metrics: std::sync::Arc<Metrics>,
    /// When each source's answer was last persisted to the state dir.
    saved_at: HashMap<String, SystemTime>,
}

impl Syncer {
    /// Restores persisted last good answers and what each user holds.
    pub(crate) fn new(settings: Settings, metrics: std::sync::Arc<Metrics>) -> Self {
        let state = StateDir::new(&settings.state_dir);
        if let Err(e) = state.ensure() {
            tracing::error!(path = %settings.state_dir.display(), error = %e, "cannot create state_dir {}: {e}", settings.state_dir.display());
        }
        let mut syncer = Syncer {
            engine: Engine::new(&settings),
            state,
            log: AttemptLog::default(),
            metrics,
            settings,
            saved_at: HashMap::new(),
        };
        syncer.restore();
        syncer.remove_leftovers();
        syncer.config_loaded(None);
        syncer
    }

    /// The status document as of now.
    pub(crate) fn status(&self) -> Status {
        project(&self.settings, &self.engine, &self.log)
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The persisted ETag of a source's last good answer.
    pub(crate) fn etag(&self, source: &str) -> Option<String> {
        self.engine.last_good(source).and_then(|g| g.etag.clone())
    }

    /// Removes `.keysync.*` leftovers of a crash (a kill between creating a
    /// temporary file and renaming it) beside every file the agent writes, at
    /// start: the next write would remove them too, but it may never come
    /// when the files are already right.
    fn remove_leftovers(&self) {
        let mut specs = Vec::new();
        // One file per state directory is enough: the whole directory is swept.
        let mut state_dirs = HashSet::new();
        let state_files = self
            .settings
            .sources
            .keys()
            .map(|name| self.state.source_path(name))
            .chain(
                self.settings
                    .users
                    .iter()
                    .map(|u| self.state.cache_path(&u.name)),
            );
        for path in state_files {
            if state_dirs.insert(path.parent().map(Path::to_path_buf)) {
                specs.push(write::FileSpec {
                    path,
                    base: self.state.root().to_path_buf(),
                    owner: None,
                    act_as: None,
                    file_mode: 0o600,
                    dir_mode: 0o700,
                });
            }
        }
        for user in &self.settings.users {
            if let Ok(account) = users::lookup(&user.name)
                && let Some(spec) = users::home_file_spec(user, &account)
            {
                specs.push(spec);
            }
        }
        for spec in specs {
            if let Err(e) = write::remove_leftovers(&spec) {
                tracing::debug!(path = %spec.path.display(), error = %e, "cannot look for leftover temporary files");
            }
        }
    }

    fn restore(&mut self) {
        let policy = &self.settings.policy.keys;
        for name in self.settings.sources.keys() {
            if let Some(good) = self.state.load_source(name, policy) {
                tracing::info!(source = %name, keys = good.keys.len(), "restored {} last good keys of source {name} from state_dir", good.keys.len());
                self.saved_at.insert(name.clone(), good.fetched_at);
                self.engine.restore(name, good);
            }
        }
        let readback = Policy {
            allow_source_options: true,
            ..policy.clone()
        };
        for user in &self.settings.users {
            if let Some(cache) = self.state.load_cache(&user.name) {
                let text = String::from_utf8_lossy(&cache);
                let (keys, _) = keys::parse_authorized_keys(&text, &readback);
                self.engine.set_applied(&user.name, keys);
            }
            self.log.user(&user.name).path = users::lookup(&user.name)
                .ok()
                .and_then(|a| user.path.as_deref().map(|p| users::expand(p, &a)));
        }
    }

    fn config_loaded(&mut self, reload_error: Option<String>) {
        self.log.config.path = self.settings.config_path.clone();
        if reload_error.is_none() {
            self.log.config.loaded_at = unix_now();
        }
        self.log.config.last_reload_error = reload_error;
    }

    /// Applies a reloaded config: sources and users come and go; known
    /// answers and written state are kept.
    pub(crate) fn reconfigure(&mut self, settings: Settings) {
        let old_users: HashMap<String, UserSettings> = self
            .settings
            .users
            .iter()
            .map(|u| (u.name.clone(), u.clone()))
            .collect();
        self.state = StateDir::new(&settings.state_dir);
        if let Err(e) = self.state.ensure() {
            tracing::error!(path = %settings.state_dir.display(), error = %e, "cannot create state_dir {}: {e}", settings.state_dir.display());
        }
        self.engine.configure(&settings);
        self.log.follow(&settings);
        self.settings = settings;
        self.restore();
        // A user whose target moved or who is gone: take the agent's lines out
        // of the old file so no key stays behind where nothing manages it.
        for (name, old) in old_users {
            let new = self.settings.users.iter().find(|u| u.name == name);
            let moved = new.is_none_or(|n| n.write != old.write || n.path != old.path);
            if moved {
                self.clear_home_file(&old);
            }
            if new.is_none()
                && let Err(e) = self.state.remove_cache(&name)
            {
                tracing::warn!(user = %name, error = %e, "cannot remove the cache of removed user {name}: {e}");
            }
        }
        self.config_loaded(None);
    }

    /// Records a failed reload: the running config stays.
    pub(crate) fn reload_failed(&mut self, error: String) {
        self.config_loaded(Some(error));
    }

    fn clear_home_file(&self, user: &UserSettings) {
        let Ok(account) = users::lookup(&user.name) else {
            return;
        };
        let Some(spec) = users::home_file_spec(user, &account) else {
            return;
        };
        let result = match user.write {
            WriteMode::Block => write::apply(&spec, &mut |cur| render::merge_block(cur, &[])),
            WriteMode::Fragment => write::apply(&spec, &mut |_| None),
            WriteMode::None => return,
        };
        if let Err(e) = result {
            tracing::warn!(user = %user.name, error = %e, "cannot remove keys from the old target of user {}: {e}", user.name);
        }
    }

    /// Takes in a report; returns the users whose keys may have changed.
    pub(crate) fn on_report(&mut self, report: &Report, now: Instant) -> Vec<String> {
        match report {
            Report::Fetched(fetch) => self.on_fetch(fetch, now),
            Report::Stream { source, connected } => {
                if self.settings.sources.contains_key(source) {
                    self.log.source(source).stream_connected = *connected;
                }
                Vec::new()
            }
            // The writer answers the refresh's waiters; nothing to sync.
            Report::Refresh { .. } => Vec::new(),
        }
    }

    fn on_fetch(&mut self, report: &FetchReport, now: Instant) -> Vec<String> {
        let name = &report.source;
        if !self.settings.sources.contains_key(name) {
            return Vec::new();
        }
        let labels = SourceLabels {
            source: name.clone(),
        };
        self.metrics
            .fetch_duration
            .get_or_create(&labels)
            .observe(report.took.as_secs_f64());
        self.metrics
            .fetch_total
            .get_or_create(&FetchLabels {
                source: name.clone(),
                result: report.fetched.result().label().to_string(),
            })
            .inc();
        let attempt = self.log.source(name);
        attempt.last_attempt = Some(report.at);
        match &report.fetched {
            Fetched::Failed { error, .. } => {
                attempt.last_error = Some(error.clone());
                tracing::warn!(source = %name, error = %error, "fetch of source {name} failed ({error}); keeping the last good keys");
                return Vec::new();
            }
            Fetched::List { keys, etag } => {
                attempt.last_error = None;
                let good = LastGood {
                    keys: keys.clone(),
                    etag: etag.clone(),
                    fetched_at: report.at,
                };
                let changed = self
                    .engine
                    .last_good(name)
                    .is_none_or(|old| old.keys != *keys || old.etag != *etag);
                if changed || self.save_is_due(name, report.at) {
                    self.persist(name, &good);
                }
                self.engine.answer(name, good, now);
            }
            Fetched::Unchanged => {
                attempt.last_error = None;
                self.engine.unchanged(name, report.at, now);
                if self.save_is_due(name, report.at)
                    && let Some(good) = self.engine.last_good(name).cloned()
                {
                    self.persist(name, &good);
                }
            }
        }
        self.engine.users_of(name)
    }

    /// The persisted time of the last good answer only matters for
    /// `max_stale` across restarts; refresh it now and then, not at every poll.
    fn save_is_due(&self, name: &str, at: SystemTime) -> bool {
        let every = self
            .settings
            .policy
            .max_stale
            .map_or(Duration::from_secs(600), |m| {
                (m / 10).min(Duration::from_secs(600))
            });
        self.saved_at
            .get(name)
            .is_none_or(|saved| at.duration_since(*saved).is_ok_and(|age| age >= every))
    }

    fn persist(&mut self, name: &str, good: &LastGood) {
        match self.state.save_source(name, good) {
            Ok(_) => {
                self.saved_at.insert(name.to_string(), good.fetched_at);
            }
            Err(e) => {
                // Forget the last save, so the next answer (a 304 too) tries
                // again: a persisted list left behind would bring a key revoked
                // meanwhile back at a restart without network.
                self.saved_at.remove(name);
                let error = error_chain(&e);
                tracing::error!(source = %name, error = %error, "cannot persist the last good keys of source {name}: {error}");
            }
        }
    }

    /// Brings every user's files in line.
    pub(crate) fn sync_all(&mut self, now: Instant) -> Vec<(String, SyncOutcome)> {
        let names: Vec<String> = self.settings.users.iter().map(|u| u.name.clone()).collect();
        names
            .into_iter()
            .map(|n| {
                let outcome = self.sync_user(&n, now);
                (n, outcome)
            })
            .collect()
    }

    /// Brings one user's files in line with the engine's plan.
    pub(crate) fn sync_user(&mut self, name: &str, now: Instant) -> SyncOutcome {
        let Some(user) = self.settings.users.iter().find(|u| u.name == name).cloned() else {
            return SyncOutcome::default();
        };
        let mut outcome = SyncOutcome::default();
        let (keys, pending) = match self.engine.plan(name, now, SystemTime::now()) {
            Plan::Write(keys) => (Some(keys), None),
            Plan::Waiting { sources } => (
                None,
                Some(format!(
                    "waiting for a first answer from {}",
                    sources.join(", ")
                )),
            ),
            Plan::Confirm { keep, at, sources } => {
                let note = format!(
                    "a removal of more than half of the keys awaits confirmation by a second fetch of {}",
                    sources.join(", ")
                );
                tracing::warn!(user = %name, "user {name}: {note}");
                outcome.confirm = Some((at, sources));
                (keep, Some(note))
            }
        };
        self.log.user(name).pending = pending;
        if let Some(keys) = keys {
            match self.write_user(&user, &keys) {
                Ok(wrote) => outcome.wrote_home = wrote,
                Err(error) => {
                    tracing::error!(user = %name, error = %error, "cannot write keys for user {name}: {error}; other users go on");
                    self.log.user(name).last_error = Some(error);
                    outcome.failed = true;
                }
            }
        }
        outcome
    }

    /// Writes the cache and the home file of one user; true when the home
    /// file changed. The error is what status reports.
    fn write_user(&mut self, user: &UserSettings, keys: &KeySet) -> Result<bool, String> {
        let name = &user.name;
        let account = users::lookup(name).map_err(|e| e.to_string())?;
        let lines = render::key_lines(keys, user.options.as_deref());
        let cache = render::cache(&lines);
        let mut wrote_any = false;
        match self.state.save_cache(name, &cache) {
            Ok(Outcome::Unchanged) => {}
            Ok(_) => wrote_any = true,
            Err(e) => return Err(format!("cache: {}", error_chain(&e))),
        }
        self.state.save_index(name, &lines, keys);
        let spec = users::home_file_spec(user, &account);
        let home = match (&spec, user.write) {
            (Some(spec), WriteMode::Block) => {
                write::apply(spec, &mut |cur| render::merge_block(cur, &lines))
            }
            (Some(spec), WriteMode::Fragment) => {
                write::apply(spec, &mut |_| render::fragment(&lines))
            }
            _ => Ok(Outcome::Unchanged),
        };
        let wrote_home = home.map_err(|e| error_chain(&e))? != Outcome::Unchanged;
        wrote_any |= wrote_home;
        self.log_changes(name, keys);
        self.engine.written(name, keys.clone());
        if wrote_any {
            self.metrics
                .writes_total
                .get_or_create(&UserLabels { user: name.clone() })
                .inc();
        }
        let attempt = self.log.user(name);
        attempt.last_error = None;
        attempt.path = spec.map(|s| s.path);
        if wrote_any {
            attempt.last_write = Some(SystemTime::now());
        }
        Ok(wrote_home)
    }

    fn log_changes(&self, user: &str, keys: &KeySet) {
        let empty = KeySet::default();
        let before = self.engine.applied(user).unwrap_or(&empty);
        let old: HashSet<(&str, &str)> = before.keys().iter().map(|k| k.id()).collect();
        let new: HashSet<(&str, &str)> = keys.keys().iter().map(|k| k.id()).collect();
        let mut added = keys
            .keys()
            .iter()
            .filter(|k| !old.contains(&k.id()))
            .peekable();
        if added.peek().is_some() {
            // Which sources name each key: one pass over each source's list.
            let mut sources_of: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
            let names = self
                .settings
                .users
                .iter()
                .find(|u| u.name == user)
                .map(|u| u.sources.as_slice())
                .unwrap_or_default();
            for name in names {
                if let Some(good) = self.engine.last_good(name) {
                    for k in good.keys.keys() {
                        sources_of.entry(k.id()).or_default().push(name);
                    }
                }
            }
            for key in added {
                let source = sources_of
                    .get(&key.id())
                    .map(|s| s.join(","))
                    .unwrap_or_default();
                tracing::info!(user, source, fingerprint = %key.fingerprint, comment = %key.comment, "key added");
            }
        }
        for key in before.keys().iter().filter(|k| !new.contains(&k.id())) {
            tracing::info!(user, fingerprint = %key.fingerprint, comment = %key.comment, "key removed");
        }
    }

    /// Records a drift repair (another writer changed the file).
    pub(crate) fn count_drift_repair(&mut self, user: &str) {
        self.metrics
            .drift_repairs_total
            .get_or_create(&UserLabels {
                user: user.to_string(),
            })
            .inc();
        self.log.user(user).drift_repairs += 1;
    }

    /// Each user's home file, for the drift watch.
    pub(crate) fn watched_files(&self) -> Vec<(PathBuf, String)> {
        let mut files = Vec::new();
        for user in &self.settings.users {
            if let Ok(account) = users::lookup(&user.name)
                && let Some(spec) = users::home_file_spec(user, &account)
            {
                files.push((spec.path, user.name.clone()));
            }
        }
        files
    }

    /// Whether time alone can change what is written (`max_stale`).
    pub(crate) fn has_max_stale(&self) -> bool {
        self.settings.policy.max_stale.is_some()
    }
}
