//! The writer side's state machine (DESIGN.md §2, §4): a [`Report`] goes in,
//! the engine decides, answers are persisted, files are written, and facts
//! come out ([`SyncOutcome`]); the status document is projected from what it
//! holds ([`Syncer::status`]). Its methods block (file I/O); the writer runs
//! them off the async threads.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Instant, SystemTime};

use super::projection::{AttemptLog, project};
use super::report::{FetchReport, Fetched, Report};
use super::revoke::Revocation;
use crate::board::Board;
use crate::config::{Settings, UserSettings};
use crate::engine::{Engine, Plan};
use crate::keys::{self, Policy};
use crate::logging::error_chain;
use crate::metrics::{FetchLabels, SourceLabels, UserLabels};
use crate::state::{LastGood, StateDir};
use crate::status::{Status, unix_now};
use crate::users;
use crate::write;

mod user_files;

/// How many added (and removed) keys of one write are logged one by one: a
/// new instance with a fleet-sized list must not spend its first sync (and
/// the journal) on ten thousand lines.
const LOGGED_CHANGES: usize = 100;

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
    /// Where the status projection is published (and the metrics counted).
    board: Board,
    revocation: Revocation,
    /// What was written for each user (`written.json`).
    written: super::reconcile::Record,
}

impl Syncer {
    /// Restores persisted last good answers and what each user holds.
    pub(crate) fn new(settings: Settings, board: Board) -> Self {
        let state = StateDir::new(&settings.state_dir);
        if let Err(e) = state.ensure() {
            tracing::error!(path = %settings.state_dir.display(), error = %e, "cannot create state_dir {}: {e}", settings.state_dir.display());
        }
        let mut syncer = Syncer {
            engine: Engine::new(&settings),
            revocation: Revocation::load(&state),
            written: Default::default(),
            state,
            log: AttemptLog::default(),
            board,
            settings,
        };
        syncer.restore();
        syncer.written = super::reconcile::at_start(&syncer.settings, &syncer.state);
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
        let (now, wall) = (Instant::now(), SystemTime::now());
        for name in self.settings.sources.keys() {
            if let Some(good) = self.state.load_source(name, policy) {
                tracing::info!(source = %name, keys = good.keys.len(), "restored {} last good keys of source {name} from state_dir", good.keys.len());
                self.engine.restore(name, good, now, wall);
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
        let policy_changed = self.settings.policy.keys != settings.policy.keys;
        self.state = StateDir::new(&settings.state_dir);
        if let Err(e) = self.state.ensure() {
            tracing::error!(path = %settings.state_dir.display(), error = %e, "cannot create state_dir {}: {e}", settings.state_dir.display());
        }
        self.engine.configure(&settings);
        self.log.follow(&settings);
        self.settings = settings;
        self.restore();
        // The persisted records drop their ETags under another policy; so
        // must the answers held only in memory (one whose save failed): the
        // next fetch brings the whole list, with the keys the new policy allows.
        if policy_changed {
            self.engine.forget_etags();
        }
        // A user whose target moved or who is gone: take the agent's lines out
        // of the old file so no key stays behind where nothing manages it.
        for (name, old) in old_users {
            let new = self.settings.users.iter().find(|u| u.name == name);
            let moved = new.is_none_or(|n| n.write != old.write || n.path != old.path);
            if moved {
                super::reconcile::clear_home_file(&old);
                self.written.remove(&name);
            }
            if new.is_none()
                && let Err(e) = self.state.remove_cache(&name)
            {
                tracing::warn!(user = %name, error = %e, "cannot remove the cache of removed user {name}: {e}");
            }
        }
        self.config_loaded(None);
        self.publish();
    }

    /// Records a failed reload: the running config stays.
    pub(crate) fn reload_failed(&mut self, error: String) {
        self.config_loaded(Some(error));
        self.publish();
    }

    /// Takes in a report; returns the users whose keys may have changed.
    pub(crate) fn on_report(&mut self, report: &Report, now: Instant) -> Vec<String> {
        let users = self.take_report(report, now);
        self.publish();
        users
    }

    fn take_report(&mut self, report: &Report, now: Instant) -> Vec<String> {
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
        self.board
            .metrics
            .fetch_duration
            .get_or_create(&labels)
            .observe(report.took.as_secs_f64());
        self.board
            .metrics
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
                // Every good answer refreshes the persisted time, so a
                // restart reports (and `max_stale` measures) the real one.
                self.persist(name, &good);
                let old = self.engine.last_good(name).map(|g| &g.keys);
                self.revocation.answered(&self.state, old, keys);
                self.engine.answer(name, good, now);
            }
            Fetched::Unchanged => {
                attempt.last_error = None;
                self.engine.unchanged(name, report.at, now);
                if let Some(good) = self.engine.last_good(name).cloned() {
                    self.persist(name, &good);
                }
            }
        }
        self.engine.users_of(name)
    }

    fn persist(&mut self, name: &str, good: &LastGood) {
        match self
            .state
            .save_source(name, good, &self.settings.policy.keys)
        {
            Ok(_) => {}
            Err(e) => {
                // The next answer (a 304 too) tries again: a persisted list
                // left behind would bring a key revoked meanwhile back at a
                // restart without network.
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
        let wrote = keys.is_some();
        if let Some(keys) = keys {
            match self.write_user(&user, &keys) {
                Ok(wrote) => {
                    outcome.wrote_home = wrote;
                    outcome.failed = self.log.user(name).last_error.is_some();
                }
                Err(error) => {
                    tracing::error!(user = %name, error = %error, "cannot write keys for user {name}: {error}; other users go on");
                    self.log.user(name).last_error = Some(error);
                    outcome.failed = true;
                }
            }
        }
        if wrote {
            self.settle_revocations();
        }
        // Published as soon as the files are written, so a reader that
        // sees the files also sees the status that goes with them.
        self.publish();
        outcome
    }

    /// Publishes the status projection on the board.
    pub(crate) fn publish(&self) {
        self.board.publish(self.status());
    }

    /// Revokes what no source grants and no user holds any more.
    fn settle_revocations(&mut self) {
        let sources: Vec<&str> = self.settings.sources.keys().map(String::as_str).collect();
        let users: Vec<&str> = self
            .settings
            .users
            .iter()
            .map(|u| u.name.as_str())
            .collect();
        self.revocation.settle(
            &self.state,
            &self.engine,
            &sources,
            &users,
            self.settings.policy.revoked_retention,
        );
    }

    /// Records a drift repair (another writer changed the file).
    pub(crate) fn count_drift_repair(&mut self, user: &str) {
        self.board
            .metrics
            .drift_repairs_total
            .get_or_create(&UserLabels {
                user: user.to_string(),
            })
            .inc();
        self.log.user(user).drift_repairs += 1;
    }

    /// Each user's home file, for the drift watch, with the ids to watch
    /// it as (the same as the writer acts with there).
    pub(crate) fn watched_files(&self) -> Vec<super::watch::DriftTarget> {
        let mut files = Vec::new();
        for user in &self.settings.users {
            if let Ok(account) = users::lookup(&user.name)
                && let Some(spec) = users::home_file_spec(user, &account)
            {
                files.push((spec.path, user.name.clone(), spec.act_as));
            }
        }
        files
    }

    /// Whether time alone can change what is written (`max_stale`).
    pub(crate) fn has_max_stale(&self) -> bool {
        self.settings.policy.max_stale.is_some()
    }
}
