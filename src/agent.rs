//! The agent's tasks (DESIGN.md §2, §8): one fetch loop per source, one
//! writer that owns the sync state, a directory watcher for drift, signals,
//! and `run --once`.
//!
//! Fetch loops hand the writer owned, validated [`FetchReport`]s over a
//! channel and share nothing else with it: that boundary is serializable,
//! so it can later become a process boundary (network and parsing
//! unprivileged, only the writer as root). All tasks stop together on a
//! [`CancellationToken`]; blocking file I/O runs on the blocking pool.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Settings, SourceSettings, UserSettings, WriteMode};
use crate::engine::{Engine, Plan};
use crate::keys::{self, KeySet, Policy};
use crate::render;
use crate::source::{self, Answer, KeySource};
use crate::state::{LastGood, StateDir};
use crate::status::{Shared, SourceStatus, UserStatus, to_unix};
use crate::users;
use crate::write::{self, Outcome};

/// An error and its causes, `a: b: c`: "cannot write X" alone does not tell
/// an operator that the disk is full.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// What one fetch produced. Owned and serializable: the fetch side's only
/// message to the writer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchReport {
    pub source: String,
    pub fetched: Fetched,
    pub at: SystemTime,
    pub took: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Fetched {
    /// The list is this (validated; rejected entries were logged).
    List { keys: KeySet, etag: Option<String> },
    /// Unchanged since the last good answer.
    Unchanged,
    /// No authoritative answer: the last good keys stay.
    Failed {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// How many rejected entries of one answer are logged one by one.
const LOGGED_REJECTIONS: usize = 10;

/// Fetches once and validates the answer with the key policy.
pub async fn fetch(name: &str, source: &mut dyn KeySource, policy: &Policy) -> FetchReport {
    let started = Instant::now();
    let fetched = match source.fetch().await {
        Ok(Answer::List { entries, etag }) => {
            let (keys, rejected) = keys::parse_entries(entries.iter().map(String::as_str), policy);
            // A few examples, then a count: a list padded with junk must not
            // flood the log (or the journal) with a line per entry.
            for r in rejected.iter().take(LOGGED_REJECTIONS) {
                tracing::warn!(source = name, rejected = %r, "dropping key that fails the key policy");
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
        Err(e) => Fetched::Failed {
            error: e.chain(),
            retry_after: e.retry_after(),
        },
    };
    FetchReport {
        source: name.to_string(),
        fetched,
        at: SystemTime::now(),
        took: started.elapsed(),
    }
}

/// What syncing one user asks of the caller.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    /// Fetch these sources again at this time to confirm a mass removal.
    pub confirm: Option<(Instant, Vec<String>)>,
    /// The user's home file was (re)written.
    pub wrote_home: bool,
    /// The user failed (reported in status).
    pub failed: bool,
}

/// The writer side: owns the engine, the state dir and every file write.
/// Its methods block (file I/O); the daemon calls them on the blocking pool.
pub struct Syncer {
    settings: Settings,
    engine: Engine,
    state: StateDir,
    shared: Shared,
    /// Source answers not yet persisted to the state dir, by time of the last save.
    saved_at: HashMap<String, SystemTime>,
}

impl Syncer {
    /// Restores persisted last good answers and what each user holds.
    pub fn new(settings: Settings, shared: Shared) -> Self {
        let state = StateDir::new(&settings.state_dir);
        if let Err(e) = state.ensure() {
            tracing::error!(path = %settings.state_dir.display(), error = %e, "cannot create state_dir");
        }
        let mut syncer = Syncer {
            engine: Engine::new(&settings),
            state,
            shared,
            settings,
            saved_at: HashMap::new(),
        };
        syncer.restore();
        syncer.remove_leftovers();
        syncer.publish_config(None);
        syncer
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
        for (name, src) in &self.settings.sources {
            let good = self.state.load_source(name, policy);
            let mut status = self.shared.lock();
            let entry = status.sources.entry(name.clone()).or_default();
            entry.kind = src.kind.name().to_string();
            entry.mode = if src.subscribe_url.is_some() {
                "subscribe"
            } else {
                "poll"
            }
            .to_string();
            if let Some(good) = good {
                entry.has_answer = true;
                entry.key_count = good.keys.len();
                entry.etag.clone_from(&good.etag);
                entry.last_success = Some(to_unix(good.fetched_at));
                drop(status);
                tracing::info!(source = %name, keys = good.keys.len(), "restored last good keys from state_dir");
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
            self.init_user_status(user);
        }
    }

    fn init_user_status(&self, user: &UserSettings) {
        let mut status = self.shared.lock();
        let entry = status.users.entry(user.name.clone()).or_default();
        entry.write_mode = match user.write {
            WriteMode::Block => "block",
            WriteMode::Fragment => "fragment",
            WriteMode::None => "none",
        }
        .to_string();
        entry.path = users::lookup(&user.name)
            .ok()
            .and_then(|a| user.path.as_deref().map(|p| users::expand(p, &a)));
        if let Some(keys) = self.engine.applied(&user.name) {
            entry.fingerprints = keys.fingerprints();
        }
    }

    fn publish_config(&self, reload_error: Option<String>) {
        let mut status = self.shared.lock();
        status.config.path = self.settings.config_path.clone();
        if reload_error.is_none() {
            status.config.loaded_at = crate::status::unix_now();
        }
        status.config.last_reload_error = reload_error;
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Applies a reloaded config: sources and users come and go; known
    /// answers and written state are kept.
    pub fn reconfigure(&mut self, settings: Settings) {
        let old_users: HashMap<String, UserSettings> = self
            .settings
            .users
            .iter()
            .map(|u| (u.name.clone(), u.clone()))
            .collect();
        self.state = StateDir::new(&settings.state_dir);
        if let Err(e) = self.state.ensure() {
            tracing::error!(path = %settings.state_dir.display(), error = %e, "cannot create state_dir");
        }
        self.engine.configure(&settings);
        {
            let mut status = self.shared.lock();
            status
                .sources
                .retain(|n, _| settings.sources.contains_key(n));
            status
                .users
                .retain(|n, _| settings.users.iter().any(|u| &u.name == n));
        }
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
                tracing::warn!(user = %name, error = %e, "cannot remove cache of removed user");
            }
        }
        self.publish_config(None);
    }

    /// Records a failed reload: the running config stays.
    pub fn reload_failed(&self, error: String) {
        self.publish_config(Some(error));
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
            tracing::warn!(user = %user.name, error = %e, "cannot remove keys from the old target");
        }
    }

    /// Takes in a fetch report; returns the users whose keys may have changed.
    pub fn on_fetch(&mut self, report: &FetchReport, now: Instant) -> Vec<String> {
        let name = &report.source;
        let Some(settings) = self.settings.sources.get(name) else {
            return Vec::new();
        };
        let metrics = self.shared.metrics.clone();
        let labels = crate::status::SourceLabels {
            source: name.clone(),
        };
        metrics
            .fetch_duration
            .get_or_create(&labels)
            .observe(report.took.as_secs_f64());
        let result = match &report.fetched {
            Fetched::List { keys, .. } if keys.is_empty() => "empty",
            Fetched::List { .. } => "ok",
            Fetched::Unchanged => "unchanged",
            Fetched::Failed { .. } => "error",
        };
        metrics
            .fetch_total
            .get_or_create(&crate::status::FetchLabels {
                source: name.clone(),
                result: result.to_string(),
            })
            .inc();

        let mut status = self.shared.lock();
        let entry: &mut SourceStatus = status.sources.entry(name.clone()).or_default();
        entry.kind = settings.kind.name().to_string();
        entry.last_attempt = Some(to_unix(report.at));
        match &report.fetched {
            Fetched::Failed { error, .. } => {
                entry.last_error = Some(error.clone());
                drop(status);
                tracing::warn!(source = %name, error = %error, "fetch failed; keeping the last good keys");
                return Vec::new();
            }
            Fetched::List { keys, etag } => {
                entry.last_error = None;
                entry.last_success = Some(to_unix(report.at));
                entry.has_answer = true;
                entry.key_count = keys.len();
                entry.etag.clone_from(etag);
                drop(status);
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
                entry.last_error = None;
                entry.last_success = Some(to_unix(report.at));
                drop(status);
                self.engine.unchanged(name, report.at, now);
                if self.save_is_due(name, report.at)
                    && let Some(good) = self.engine.last_good(name).cloned()
                {
                    self.persist(name, &good);
                }
            }
        }
        metrics
            .last_success
            .get_or_create(&labels)
            .set(to_unix(report.at));
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
                tracing::error!(source = %name, error = %error_chain(&e), "cannot persist last good keys");
            }
        }
    }

    /// Brings every user's files in line; returns the combined outcome.
    pub fn sync_all(&mut self, now: Instant) -> Vec<(String, SyncOutcome)> {
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
    pub fn sync_user(&mut self, name: &str, now: Instant) -> SyncOutcome {
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
                tracing::warn!(user = %name, "{note}");
                outcome.confirm = Some((at, sources));
                (keep, Some(note))
            }
        };
        self.shared
            .lock()
            .users
            .entry(name.to_string())
            .or_default()
            .pending = pending;
        if let Some(keys) = keys {
            match self.write_user(&user, &keys) {
                Ok(wrote) => outcome.wrote_home = wrote,
                Err(()) => outcome.failed = true,
            }
        }
        outcome
    }

    /// Writes the cache and the home file of one user. Errors are logged and
    /// put in status; Ok(true) when the home file changed.
    fn write_user(&mut self, user: &UserSettings, keys: &KeySet) -> Result<bool, ()> {
        let name = &user.name;
        let fail = |shared: &Shared, error: String| {
            tracing::error!(user = %name, error = %error, "cannot write keys for user; other users go on");
            shared
                .lock()
                .users
                .entry(name.clone())
                .or_default()
                .last_error = Some(error);
        };
        let account = match users::lookup(name) {
            Ok(a) => a,
            Err(e) => {
                fail(&self.shared, e.to_string());
                return Err(());
            }
        };
        let lines = render::key_lines(keys, user.options.as_deref());
        let cache = render::cache(&lines);
        let mut wrote_any = false;
        match self.state.save_cache(name, &cache) {
            Ok(Outcome::Unchanged) => {}
            Ok(_) => wrote_any = true,
            Err(e) => {
                fail(&self.shared, format!("cache: {}", error_chain(&e)));
                return Err(());
            }
        }
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
        let wrote_home = match home {
            Ok(outcome) => outcome != Outcome::Unchanged,
            Err(e) => {
                fail(&self.shared, error_chain(&e));
                return Err(());
            }
        };
        wrote_any |= wrote_home;
        self.log_changes(name, keys);
        self.engine.written(name, keys.clone());
        let labels = crate::status::UserLabels { user: name.clone() };
        self.shared
            .metrics
            .keys
            .get_or_create(&labels)
            .set(keys.len() as i64);
        if wrote_any {
            self.shared
                .metrics
                .writes_total
                .get_or_create(&labels)
                .inc();
        }
        let mut status = self.shared.lock();
        let entry: &mut UserStatus = status.users.entry(name.clone()).or_default();
        entry.last_error = None;
        entry.fingerprints = keys.fingerprints();
        entry.path = spec.map(|s| s.path);
        if wrote_any {
            entry.last_write = Some(crate::status::unix_now());
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
    pub fn count_drift_repair(&self, user: &str) {
        self.shared
            .metrics
            .drift_repairs_total
            .get_or_create(&crate::status::UserLabels {
                user: user.to_string(),
            })
            .inc();
        self.shared
            .lock()
            .users
            .entry(user.to_string())
            .or_default()
            .drift_repairs += 1;
    }

    /// Each user's home file, for the drift watch.
    pub fn watched_files(&self) -> Vec<(PathBuf, String)> {
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

    /// Users due a fail-closed removal (`max_stale`) or any other time-based change.
    pub fn has_max_stale(&self) -> bool {
        self.settings.policy.max_stale.is_some()
    }
}

// ---------------------------------------------------------------------------
// run --once

/// One sync pass: fetch every source once, confirm mass removals, write.
/// Returns true when every source answered and every user was written.
pub async fn run_once(settings: Settings) -> bool {
    let shared = Shared::new();
    let policy = settings.policy.keys.clone();
    let confirm_delay = settings.policy.confirm_delay;
    let mut syncer = Syncer::new(settings.clone(), shared);
    let mut sources: BTreeMap<String, Box<dyn KeySource>> = BTreeMap::new();
    let mut all_ok = true;
    for (name, src) in &settings.sources {
        let etag = syncer.engine.last_good(name).and_then(|g| g.etag.clone());
        match source::build(src, etag) {
            Ok(s) => {
                sources.insert(name.clone(), s);
            }
            Err(e) => {
                all_ok = false;
                tracing::error!(source = %name, error = %e.chain(), "cannot set up source");
            }
        }
    }
    let mut to_fetch: Vec<String> = sources.keys().cloned().collect();
    // A mass removal is confirmed by one more fetch; a list that keeps
    // changing under confirmation is given up on after a few rounds.
    for round in 0..4 {
        let mut round_ok = true;
        for name in &to_fetch {
            if let Some(source) = sources.get_mut(name) {
                let report = fetch(name, source.as_mut(), &policy).await;
                round_ok &= !matches!(report.fetched, Fetched::Failed { .. });
                syncer.on_fetch(&report, Instant::now());
            }
        }
        all_ok &= round_ok;
        let outcomes = tokio::task::block_in_place(|| syncer.sync_all(Instant::now()));
        let mut confirm: Option<Instant> = None;
        let mut confirm_sources = HashSet::new();
        for (_, outcome) in &outcomes {
            all_ok &= !outcome.failed;
            if let Some((at, srcs)) = &outcome.confirm {
                confirm = Some(confirm.map_or(*at, |c| c.max(*at)));
                confirm_sources.extend(srcs.iter().cloned());
            }
        }
        let Some(at) = confirm else { break };
        if round == 3 || !round_ok {
            tracing::error!("mass removal not confirmed; the previous keys stay");
            all_ok = false;
            break;
        }
        tracing::info!(delay = ?confirm_delay, "confirming a mass removal with a second fetch");
        tokio::time::sleep_until(at.into()).await;
        to_fetch = confirm_sources.into_iter().collect();
    }
    all_ok
}

// ---------------------------------------------------------------------------
// The daemon.

/// Messages to the writer task.
#[derive(Debug)]
pub enum Event {
    Fetched(FetchReport),
    /// A watched directory changed: re-assert this user's file.
    Drift(String),
    /// SIGHUP or a config file change.
    Reload,
    /// Test hook: the writer makes no progress for this long, as when it is
    /// stuck in a write; shows that the watchdog and `/healthz` notice.
    #[cfg(test)]
    Stall(Duration),
}

/// Handles shared by the daemon's tasks.
struct Daemon {
    shared: Shared,
    cancel: CancellationToken,
    tracker: TaskTracker,
    events: mpsc::Sender<Event>,
    notify: crate::agent::Notifier,
}

/// systemd notifications (sd_notify(3)); silent without `NOTIFY_SOCKET`,
/// as in a container.
///
/// The socket address and the watchdog period are read once, when the
/// notifier is made, so a test can aim one at its own datagram socket
/// without touching the process environment. That is also why the datagram
/// is sent here rather than by the sd-notify crate, which only ever sends to
/// `$NOTIFY_SOCKET` as it is at each call. Sends never block: a full socket
/// buffer drops the message (the next one carries the current state anyway).
#[derive(Clone)]
pub struct Notifier {
    target: Option<Arc<NotifyTarget>>,
    watchdog: Option<Duration>,
    ready: Arc<AtomicBool>,
}

struct NotifyTarget {
    socket: std::os::unix::net::UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// From systemd's environment: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` when
    /// `WATCHDOG_PID` is unset or names this process.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0)
            .filter(|_| {
                std::env::var("WATCHDOG_PID").map_or(true, |pid| {
                    pid.parse::<u32>().ok() == Some(std::process::id())
                })
            })
            .map(Duration::from_micros);
        Self::new(socket.as_deref(), watchdog)
    }

    /// Sends to `address`: a socket path, or `@name` for an abstract socket.
    /// `watchdog` is systemd's watchdog timeout (`WATCHDOG_USEC`).
    pub fn new(address: Option<&std::ffi::OsStr>, watchdog: Option<Duration>) -> Self {
        let target = address.filter(|a| !a.is_empty()).and_then(|address| {
            match NotifyTarget::open(address) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::warn!(socket = ?address, error = %e, "cannot use NOTIFY_SOCKET; not notifying systemd");
                    None
                }
            }
        });
        Notifier {
            watchdog: watchdog.filter(|_| target.is_some()),
            target,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else { return };
        if let Err(e) = target.socket.send_to_addr(message.as_bytes(), &target.addr) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    /// READY=1, once.
    pub fn ready(&self, status: &str) {
        if !self.ready.swap(true, Ordering::SeqCst) {
            self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
        }
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}\n", one_line(status)));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1\n");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\n");
    }

    /// Half of `WATCHDOG_USEC`, when the service manager asked for pings.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }
}

impl NotifyTarget {
    fn open(address: &std::ffi::OsStr) -> std::io::Result<Self> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let bytes = address.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(address)?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(NotifyTarget { socket, addr })
    }
}

/// A notification is newline-separated `KEY=value` lines.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// How long start-up waits for the first sync before READY=1 regardless, so
/// boot never waits on a dead network (cached keys are served meanwhile).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the daemon until SIGTERM/SIGINT. Returns an error only for start-up
/// failures.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let shared = Shared::new();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (events, events_rx) = mpsc::channel::<Event>(256);
    let notify = Notifier::from_env();
    let daemon = Daemon {
        shared: shared.clone(),
        cancel: cancel.clone(),
        tracker: tracker.clone(),
        events: events.clone(),
        notify: notify.clone(),
    };

    let health = crate::health::bind(&settings.health_socket)?;
    tracker.spawn(crate::health::serve(health, shared.clone(), cancel.clone()));

    let signals = spawn_signals(&daemon)?;
    tracker.spawn(signals);
    spawn_config_watch(&daemon, &settings.config_path);

    let syncer = tokio::task::spawn_blocking({
        let shared = shared.clone();
        let settings = settings.clone();
        move || Syncer::new(settings, shared)
    })
    .await?;
    {
        let notify = notify.clone();
        let cancel = cancel.clone();
        let shared = shared.clone();
        tracker.spawn(async move {
            tokio::select! {
                // Only when the first sync did not get there first.
                _ = tokio::time::sleep(READY_TIMEOUT) => {
                    if !notify.ready.load(Ordering::SeqCst) {
                        let summary = shared.snapshot().summary;
                        tracing::warn!("first sync not done after {READY_TIMEOUT:?}; reporting ready with cached keys");
                        notify.ready(&summary);
                    }
                }
                _ = cancel.cancelled() => {}
            }
        });
    }
    let writer = tracker.spawn(writer_loop(daemon, syncer, events_rx));
    tracker.close();
    tracing::info!(config = %settings.config_path.display(), sources = settings.sources.len(), users = settings.users.len(), "keysync started");

    cancel.cancelled().await;
    notify.stopping();
    tracing::info!("stopping");
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within 5 s");
    }
    drop(writer);
    crate::health::cleanup(&settings.health_socket);
    Ok(())
}

fn spawn_signals(daemon: &Daemon) -> anyhow::Result<impl std::future::Future<Output = ()> + use<>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let cancel = daemon.cancel.clone();
    let events = daemon.events.clone();
    Ok(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM"); cancel.cancel(); return; }
                _ = int.recv() => { tracing::info!("SIGINT"); cancel.cancel(); return; }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading config");
                    let _ = events.send(Event::Reload).await;
                }
                _ = cancel.cancelled() => return,
            }
        }
    })
}

/// Watches the config directory (the main file and `config.d/`, which may
/// appear later) and asks for a reload on changes, debounced.
fn spawn_config_watch(daemon: &Daemon, main: &Path) {
    let dir = main.parent().unwrap_or(Path::new(".")).to_path_buf();
    let dropins = config::dropin_dir(main);
    let main_name = main.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let watcher = crate::watch::Watcher::new(move |path: &Path| {
        let relevant = path.starts_with(&dropins)
            || path.file_name().map(|n| n.to_os_string()) == main_name
            || path.file_name().is_some_and(|n| n == "config.d");
        if relevant {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config directory; reload with SIGHUP");
            return;
        }
    };
    watcher.watch(&dir);
    watcher.watch(&config::dropin_dir(main));
    let events = daemon.events.clone();
    let cancel = daemon.cancel.clone();
    let main = main.to_path_buf();
    daemon.tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                got = rx.recv() => {
                    if got.is_none() { return; }
                    // Debounce an editor's burst of writes.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while rx.try_recv().is_ok() {}
                    watcher.watch(&config::dropin_dir(&main));
                    if events.send(Event::Reload).await.is_err() { return; }
                }
            }
        }
    });
}

/// A running fetch loop and its controls.
struct SourceTask {
    nudge: mpsc::Sender<()>,
    cancel: CancellationToken,
}

fn spawn_sources(daemon: &Daemon, syncer: &Syncer) -> HashMap<String, SourceTask> {
    let settings = syncer.settings();
    let mut tasks = HashMap::new();
    for (name, src) in &settings.sources {
        let (nudge, nudge_rx) = mpsc::channel(1);
        let cancel = daemon.cancel.child_token();
        let etag = syncer.engine.last_good(name).and_then(|g| g.etag.clone());
        // Whether the subscription stream is up. Without a subscription the
        // sender is dropped here and the fetch loop simply polls.
        let (stream_tx, stream_rx) = tokio::sync::watch::channel(false);
        if src.subscribe_url.is_some() {
            daemon.tracker.spawn(crate::subscribe::run(
                src.clone(),
                nudge.clone(),
                stream_tx,
                daemon.shared.clone(),
                cancel.clone(),
            ));
        }
        if let config::SourceKind::File { path } = &src.kind {
            spawn_file_watch(daemon, path, nudge.clone(), cancel.clone());
        }
        daemon.tracker.spawn(source_loop(
            src.clone(),
            settings.policy.keys.clone(),
            etag,
            daemon.events.clone(),
            nudge_rx,
            stream_rx,
            cancel.clone(),
        ));
        tasks.insert(name.clone(), SourceTask { nudge, cancel });
    }
    tasks
}

/// How long a key file must be quiet before it is re-read: an editor or
/// `echo >` truncates first and writes after, and a read in between would
/// take the half-written file for the list (and revoke keys until the next
/// read).
const FILE_QUIET: Duration = Duration::from_millis(50);
/// The longest a re-read waits for quiet after the first change, so a file
/// rewritten without pause is still re-read well within a second.
const FILE_MAX_WAIT: Duration = Duration::from_millis(300);

/// A file source is re-read as soon as its directory watch sees the file
/// change (written, replaced by a rename, created or removed), debounced on
/// the trailing edge.
fn spawn_file_watch(
    daemon: &Daemon,
    path: &Path,
    nudge: mpsc::Sender<()>,
    cancel: CancellationToken,
) {
    let target = path.to_path_buf();
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let (changed, mut changes) = mpsc::unbounded_channel::<()>();
    // Runs on notify's thread: filter and hand off, nothing more.
    let watcher = crate::watch::Watcher::new(move |path: &Path| {
        if path == target {
            let _ = changed.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the key file; it is re-read at each poll");
            return;
        }
    };
    if !watcher.watch(&dir) {
        tracing::warn!(dir = %dir.display(), "cannot watch the key file's directory; the file is re-read at each poll");
    }
    daemon.tracker.spawn(async move {
        // Owned by the task: the watch lives as long as the source.
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                got = changes.recv() => if got.is_none() { return },
            }
            let first = tokio::time::Instant::now();
            loop {
                let quiet = tokio::time::sleep(FILE_QUIET);
                let latest = first + FILE_MAX_WAIT;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = quiet => break,
                    _ = tokio::time::sleep_until(latest) => break,
                    got = changes.recv() => if got.is_none() { return },
                }
            }
            // A full channel means a fetch is already due, which reads the file.
            let _ = nudge.try_send(());
        }
    });
}

/// Full-jitter backoff after `failures` (≥ 1) failures in a row: uniform in
/// [0, cap], the cap doubling from `interval` (2·`interval` after the first
/// failure, 4·`interval` after the second, …) up to `max_backoff`. Starting
/// at 2·`interval` makes the mean wait (cap / 2) never shorter than the poll
/// interval, so an outage never raises a fleet's request rate. A server's
/// `Retry-After` is honoured by adding the jittered wait to it: as a plain
/// floor it would turn every short draw into the same wait, and agents told
/// "come back in 30 s" at the same moment would come back together.
pub fn backoff(
    settings: &SourceSettings,
    failures: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let cap = settings
        .interval
        .saturating_mul(2u32.saturating_pow(failures.min(30)))
        .min(settings.max_backoff.max(settings.interval));
    let jittered = cap.mul_f64(fastrand::f64());
    retry_after
        .unwrap_or(Duration::ZERO)
        .saturating_add(jittered)
}

/// The next poll: `base` ± uniform jitter, never under a tenth of `base`.
pub fn jittered(base: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return base;
    }
    let offset = jitter.mul_f64(fastrand::f64() * 2.0);
    (base + offset).saturating_sub(jitter).max(base / 10)
}

/// One source's fetch loop: fetches at start, then every `interval` (± jitter)
/// while polling, every `resync` while the subscription stream is up, at
/// once when nudged (a stream event, a (re)connect, a changed key file, a
/// confirmation), and with backoff after failures.
async fn source_loop(
    settings: SourceSettings,
    policy: Policy,
    etag: Option<String>,
    events: mpsc::Sender<Event>,
    mut nudge: mpsc::Receiver<()>,
    mut stream: tokio::sync::watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    let name = settings.name.clone();
    let mut source: Option<Box<dyn KeySource>> = None;
    let mut etag = etag;
    let mut failures = 0u32;
    // The first fetch after start is immediate.
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
            Some(()) = nudge.recv() => {}
            // Errs (and is skipped) when there is no subscription.
            Ok(()) = stream.changed() => {
                // The stream went down while this loop waited out `resync`:
                // from now on it polls at `interval`. A backoff in progress
                // is kept.
                if !*stream.borrow_and_update() && failures == 0 {
                    let poll = tokio::time::Instant::now() + jittered(settings.interval, settings.jitter);
                    next = next.min(poll);
                }
                continue;
            }
        }
        if source.is_none() {
            match source::build(&settings, etag.take()) {
                Ok(s) => source = Some(s),
                Err(e) => {
                    let report = FetchReport {
                        source: name.clone(),
                        fetched: Fetched::Failed {
                            error: e.chain(),
                            retry_after: None,
                        },
                        at: SystemTime::now(),
                        took: Duration::ZERO,
                    };
                    failures = failures.saturating_add(1);
                    next = tokio::time::Instant::now() + backoff(&settings, failures, None);
                    if events.send(Event::Fetched(report)).await.is_err() {
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
                backoff(&settings, failures, *retry_after)
            }
            _ => {
                failures = 0;
                let base = if *stream.borrow_and_update() {
                    settings.resync
                } else {
                    settings.interval
                };
                jittered(base, settings.jitter)
            }
        };
        next = tokio::time::Instant::now() + delay;
        if events.send(Event::Fetched(report)).await.is_err() {
            return;
        }
    }
}

async fn writer_loop(daemon: Daemon, syncer: Syncer, mut events: mpsc::Receiver<Event>) {
    let mut syncer = Some(syncer);
    let Some(s) = syncer.as_ref() else { return };
    let mut sources = spawn_sources(&daemon, s);
    let mut pending_first: HashSet<String> = s.settings().sources.keys().cloned().collect();
    let mut drift = DriftWatch::new(
        daemon.events.clone(),
        &daemon.tracker,
        daemon.cancel.clone(),
    );
    drift.update(s.watched_files());
    // The heartbeat for /healthz and systemd's WATCHDOG=1 come from this
    // loop, the one that does the work: when it hangs, both stop.
    let watchdog_every = daemon.notify.watchdog_interval();
    let beat_every = watchdog_every.unwrap_or(crate::status::DEFAULT_HEARTBEAT);
    let mut beat = tokio::time::interval(beat_every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // max_stale is checked periodically; without it this tick only refreshes STATUS=.
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut started = false;
    let mut last_status = String::new();
    if pending_first.is_empty() {
        daemon.notify.ready(&daemon.shared.snapshot().summary);
    }

    // Runs blocking work on the syncer off the async threads.
    async fn with_syncer<R: Send + 'static>(
        slot: &mut Option<Syncer>,
        f: impl FnOnce(&mut Syncer) -> R + Send + 'static,
    ) -> Option<R> {
        let mut s = slot.take()?;
        match tokio::task::spawn_blocking(move || {
            let r = f(&mut s);
            (s, r)
        })
        .await
        {
            Ok((s, r)) => {
                *slot = Some(s);
                Some(r)
            }
            Err(e) => {
                tracing::error!(error = %e, "writer task panicked");
                None
            }
        }
    }

    loop {
        let event = tokio::select! {
            _ = daemon.cancel.cancelled() => break,
            _ = beat.tick() => {
                daemon.shared.beat(beat_every);
                if watchdog_every.is_some() {
                    daemon.notify.watchdog();
                }
                continue;
            }
            _ = tick.tick() => None,
            ev = events.recv() => match ev {
                Some(ev) => Some(ev),
                None => break,
            },
        };
        let now = Instant::now();
        let outcomes: Vec<(String, SyncOutcome)> = match event {
            #[cfg(test)]
            Some(Event::Stall(how_long)) => {
                tokio::time::sleep(how_long).await;
                Vec::new()
            }
            None => {
                // Periodic: staleness (fail closed) needs no fetch to act.
                // The first tick fires at once: it writes the persisted last
                // good keys, so a start with the API down serves them.
                if !std::mem::replace(&mut started, true)
                    || syncer.as_ref().is_some_and(Syncer::has_max_stale)
                {
                    with_syncer(&mut syncer, move |s| s.sync_all(now)).await.unwrap_or_default()
                } else {
                    Vec::new()
                }
            }
            Some(Event::Fetched(report)) => {
                pending_first.remove(&report.source);
                with_syncer(&mut syncer, move |s| {
                    let users = s.on_fetch(&report, now);
                    users.into_iter().map(|u| {
                        let o = s.sync_user(&u, now);
                        (u, o)
                    }).collect()
                })
                .await
                .unwrap_or_default()
            }
            Some(Event::Drift(user)) => {
                with_syncer(&mut syncer, move |s| {
                    let o = s.sync_user(&user, now);
                    if o.wrote_home {
                        tracing::info!(user = %user, "another writer changed the file; managed block re-asserted");
                        s.count_drift_repair(&user);
                    }
                    vec![(user, o)]
                })
                .await
                .unwrap_or_default()
            }
            Some(Event::Reload) => {
                let path = syncer.as_ref().map(|s| s.settings().config_path.clone()).unwrap_or_default();
                let loaded = tokio::task::spawn_blocking(move || config::load(&path)).await;
                match loaded {
                    Ok(Ok(new)) => {
                        for (_, task) in sources.drain() {
                            task.cancel.cancel();
                        }
                        let outcomes = with_syncer(&mut syncer, move |s| {
                            s.reconfigure(new);
                            s.sync_all(now)
                        })
                        .await
                        .unwrap_or_default();
                        if let Some(s) = syncer.as_ref() {
                            sources = spawn_sources(&daemon, s);
                            drift.update(s.watched_files());
                            tracing::info!("config reloaded");
                        }
                        outcomes
                    }
                    Ok(Err(e)) => {
                        let message = e.to_string();
                        tracing::error!(error = %message, "config reload failed; the running config stays");
                        if let Some(s) = syncer.as_ref() {
                            s.reload_failed(message);
                        }
                        Vec::new()
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "config reload panicked");
                        Vec::new()
                    }
                }
            }
        };
        for (_, outcome) in &outcomes {
            if let Some((at, srcs)) = &outcome.confirm {
                for name in srcs {
                    if let Some(task) = sources.get(name) {
                        let nudge = task.nudge.clone();
                        let at = *at;
                        let cancel = task.cancel.clone();
                        daemon.tracker.spawn(async move {
                            tokio::select! {
                                _ = tokio::time::sleep_until(at.into()) => { let _ = nudge.try_send(()); }
                                _ = cancel.cancelled() => {}
                            }
                        });
                    }
                }
            }
        }
        if outcomes.iter().any(|(_, o)| o.wrote_home)
            && let Some(s) = syncer.as_ref()
        {
            drift.update(s.watched_files());
        }
        let summary = daemon.shared.snapshot().summary;
        if pending_first.is_empty() {
            daemon.notify.ready(&summary);
        }
        if summary != last_status {
            daemon.notify.status(&summary);
            last_status = summary;
        }
    }
    for (_, task) in sources {
        task.cancel.cancel();
    }
}

/// How long a user's file must be quiet before a drift repair: the repair
/// then sees another writer's finished file, not its first half.
const DRIFT_QUIET: Duration = Duration::from_millis(100);
/// The longest a repair waits for quiet after the first change, so a file
/// rewritten without pause is still repaired well within a second.
const DRIFT_MAX_WAIT: Duration = Duration::from_millis(500);

/// Watches the directories of the users' files and turns changes to those
/// files into [`Event::Drift`]. Debounced per user on the trailing edge:
/// every change re-arms the user's timer (up to [`DRIFT_MAX_WAIT`]), so the
/// last change of a burst (the rename that completes another writer's
/// replacement) is never dropped. The agent's own writes show up too; they
/// find the file already right and write nothing, so no loop starts.
struct DriftWatch {
    /// A user's file, and the directory holding it (for the directory itself
    /// being removed or moved), to the users concerned.
    targets: Arc<std::sync::Mutex<HashMap<PathBuf, Vec<String>>>>,
    watcher: Option<crate::watch::Watcher>,
}

impl DriftWatch {
    fn new(events: mpsc::Sender<Event>, tracker: &TaskTracker, cancel: CancellationToken) -> Self {
        let targets: Arc<std::sync::Mutex<HashMap<PathBuf, Vec<String>>>> = Arc::default();
        let lookup = targets.clone();
        let (changed, changes) = mpsc::unbounded_channel::<String>();
        // Runs on notify's thread: look up and hand off, nothing more.
        let watcher = crate::watch::Watcher::new(move |path: &Path| {
            let users = lookup
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(path)
                .cloned();
            for user in users.into_iter().flatten() {
                let _ = changed.send(user);
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no directory watch; drift is repaired at the next poll");
                None
            }
        };
        tracker.spawn(debounce_drift(changes, events, cancel));
        DriftWatch { targets, watcher }
    }

    fn update(&mut self, files: Vec<(PathBuf, String)>) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        // Watching again is cheap, and catches a directory that was removed
        // and made anew (a new inode) since the last update. One that does
        // not exist yet is watched after the write that creates it. Not under
        // the `targets` lock: notify's `watch` waits for its event thread,
        // which may be in the callback waiting for that lock (a deadlock).
        for (file, _) in &files {
            if let Some(dir) = file.parent() {
                watcher.watch(dir);
            }
        }
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.clear();
        for (file, user) in files {
            if let Some(dir) = file.parent() {
                targets
                    .entry(dir.to_path_buf())
                    .or_default()
                    .push(user.clone());
            }
            targets.entry(file).or_default().push(user);
        }
    }
}

/// Turns raw change notices into one [`Event::Drift`] per user once the
/// user's file has been quiet for [`DRIFT_QUIET`].
async fn debounce_drift(
    mut changes: mpsc::UnboundedReceiver<String>,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
) {
    // user -> (first change of the burst, when to repair)
    let mut due: HashMap<String, (Instant, Instant)> = HashMap::new();
    loop {
        let next = due.values().map(|(_, at)| *at).min();
        tokio::select! {
            _ = cancel.cancelled() => return,
            got = changes.recv() => {
                let Some(user) = got else { return };
                let now = Instant::now();
                let (first, at) = due.entry(user).or_insert((now, now));
                *at = (now + DRIFT_QUIET).min(*first + DRIFT_MAX_WAIT);
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now).into()), if next.is_some() => {
                let now = Instant::now();
                let ripe: Vec<String> = due.iter().filter(|(_, (_, at))| *at <= now).map(|(u, _)| u.clone()).collect();
                for user in ripe {
                    due.remove(&user);
                    if events.send(Event::Drift(user)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod service_tests {
    //! The writer loop in process, with a [`Notifier`] aimed at a datagram
    //! socket the test reads: the watchdog pings come from the loop that
    //! does the work, and stop (with `/healthz`'s heartbeat) when it stalls.

    use super::*;

    /// What the notify socket received, one datagram per entry.
    struct NotifyInbox {
        socket: tokio::net::UnixDatagram,
        seen: Vec<String>,
    }

    impl NotifyInbox {
        fn bind(path: &Path) -> Self {
            NotifyInbox {
                socket: tokio::net::UnixDatagram::bind(path).expect("bind notify socket"),
                seen: Vec::new(),
            }
        }

        /// Reads datagrams until `deadline`; returns those that arrived.
        async fn read_until(&mut self, deadline: tokio::time::Instant) -> Vec<String> {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 4096];
            while let Ok(Ok(n)) =
                tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await
            {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            self.seen.extend(got.iter().cloned());
            got
        }

        /// Reads until `count` datagrams satisfy `pred`, or `within` passes.
        async fn wait_for(
            &mut self,
            count: usize,
            within: Duration,
            pred: impl Fn(&str) -> bool,
        ) -> bool {
            let deadline = tokio::time::Instant::now() + within;
            let mut buf = vec![0u8; 4096];
            let mut matched = self.seen.iter().filter(|m| pred(m)).count();
            while matched < count {
                match tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
                    Ok(Ok(n)) => {
                        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                        matched += usize::from(pred(&msg));
                        self.seen.push(msg);
                    }
                    _ => return false,
                }
            }
            true
        }
    }

    fn is_ping(msg: &str) -> bool {
        msg.lines().any(|l| l == "WATCHDOG=1")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchdog_pings_come_from_the_writer_and_stop_while_it_stalls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "").expect("keys file");
        let config = dir.path().join("config.toml");
        let text = format!(
            "state_dir = \"{state}\"\nhealth_socket = \"{sock}\"\n\
             [sources.local]\nkind = \"file\"\npath = \"{keys}\"\n\
             [[users]]\nname = \"root\"\nsources = [\"local\"]\nwrite = \"none\"\n",
            state = dir.path().join("state").display(),
            sock = dir.path().join("health.sock").display(),
            keys = keys.display(),
        );
        let settings = config::from_texts(&[(config.as_path(), text.as_str())]).expect("config");

        let notify_path = dir.path().join("notify.sock");
        let mut inbox = NotifyInbox::bind(&notify_path);
        // WATCHDOG_USEC=200000: a ping every 100 ms.
        let notify = Notifier::new(
            Some(notify_path.as_os_str()),
            Some(Duration::from_millis(200)),
        );
        assert_eq!(notify.watchdog_interval(), Some(Duration::from_millis(100)));

        let shared = Shared::new();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (events, events_rx) = mpsc::channel::<Event>(16);
        let daemon = Daemon {
            shared: shared.clone(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
            events: events.clone(),
            notify,
        };
        let syncer = Syncer::new(settings, shared.clone());
        tracker.spawn(writer_loop(daemon, syncer, events_rx));

        // READY=1 after the first (file) fetch, then regular pings.
        assert!(
            inbox
                .wait_for(1, Duration::from_secs(10), |m| m.contains("READY=1"))
                .await,
            "no READY=1: {:?}",
            inbox.seen
        );
        let started = tokio::time::Instant::now();
        let before = inbox.seen.iter().filter(|m| is_ping(m)).count();
        assert!(
            inbox
                .wait_for(before + 5, Duration::from_secs(10), is_ping)
                .await,
            "fewer than 5 pings: {:?}",
            inbox.seen
        );
        let rate = 5.0 / started.elapsed().as_secs_f64();
        eprintln!("in-process watchdog pings: {rate:.1}/s (expected ~10/s)");
        assert!(shared.liveness().is_ok());

        // Stall the writer for 5 s. It is idle, so it takes the event at
        // once; from 0.5 s to 3 s after sending it, no ping may arrive.
        let sent = tokio::time::Instant::now();
        events
            .send(Event::Stall(Duration::from_secs(5)))
            .await
            .expect("send stall");
        inbox.read_until(sent + Duration::from_millis(500)).await;
        let during = inbox.read_until(sent + Duration::from_secs(3)).await;
        assert!(
            !during.iter().any(|m| is_ping(m)),
            "pings while the writer was stalled: {during:?}"
        );
        let why = shared
            .liveness()
            .expect_err("healthz must report the stalled writer");
        assert!(why.contains("stalled"), "{why}");
        assert!(shared.ready().is_err(), "a stalled agent is not ready");

        // Back to work: pings resume and the heartbeat is fresh again.
        let resumed = inbox.seen.iter().filter(|m| is_ping(m)).count();
        assert!(
            inbox
                .wait_for(resumed + 3, Duration::from_secs(15), is_ping)
                .await,
            "pings did not resume after the stall"
        );
        assert!(shared.liveness().is_ok());
        assert!(shared.ready().is_ok(), "{:?}", shared.ready());

        cancel.cancel();
        tracker.close();
        assert!(
            tokio::time::timeout(Duration::from_secs(10), tracker.wait())
                .await
                .is_ok(),
            "the writer's tasks did not stop"
        );
    }

    #[test]
    fn notifier_without_socket_is_silent_and_asks_for_no_pings() {
        let n = Notifier::new(None, Some(Duration::from_secs(30)));
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x");
        n.watchdog();
    }

    #[test]
    fn notifier_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("keysync-test-{}-{}", std::process::id(), fastrand::u64(..));
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let rx = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind");
        let n = Notifier::new(Some(std::ffi::OsStr::new(&format!("@{name}"))), None);
        n.status("line one\nline two");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"STATUS=line one line two\n");
    }
}

#[cfg(test)]
mod backoff_tests {
    //! The waits of the fetch loop: what a fleet's request rate depends on.

    use super::*;

    fn source(interval: Duration, max_backoff: Duration) -> SourceSettings {
        SourceSettings {
            name: "a".into(),
            kind: config::SourceKind::File {
                path: PathBuf::from("/x"),
            },
            interval,
            jitter: Duration::ZERO,
            timeout: Duration::from_secs(10),
            max_body: 1 << 20,
            max_backoff,
            subscribe_url: None,
            resync: Duration::from_secs(600),
            ca_file: None,
        }
    }

    fn draws(n: usize, mut f: impl FnMut() -> Duration) -> (Duration, Duration, Duration) {
        let v: Vec<Duration> = (0..n).map(|_| f()).collect();
        let min = v.iter().min().copied().unwrap_or_default();
        let max = v.iter().max().copied().unwrap_or_default();
        let mean = v.iter().sum::<Duration>() / n as u32;
        (min, mean, max)
    }

    #[test]
    fn full_jitter_with_a_doubling_cap() {
        let s = source(Duration::from_secs(2), Duration::from_secs(10));
        for (failures, cap) in [(1, 4), (2, 8), (3, 10), (10, 10), (u32::MAX, 10)] {
            let cap = Duration::from_secs(cap);
            let (min, mean, max) = draws(20_000, || backoff(&s, failures, None));
            assert!(
                max <= cap,
                "failures {failures}: {max:?} over the cap {cap:?}"
            );
            // Full jitter: the whole range is used, the mean is half the cap.
            assert!(min < cap / 20, "failures {failures}: min {min:?}");
            assert!(max > cap.mul_f64(0.95), "failures {failures}: max {max:?}");
            let half = cap.as_secs_f64() / 2.0;
            assert!(
                (mean.as_secs_f64() - half).abs() < half * 0.05,
                "failures {failures}: mean {mean:?}"
            );
        }
    }

    #[test]
    fn an_outage_never_raises_the_request_rate() {
        // The mean wait after any number of failures is at least the interval.
        let s = source(Duration::from_secs(60), Duration::from_secs(300));
        for failures in 1..8 {
            let (_, mean, _) = draws(20_000, || backoff(&s, failures, None));
            assert!(
                mean.as_secs_f64() >= 60.0 * 0.95,
                "failures {failures}: mean {mean:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_honoured_and_still_spread() {
        let s = source(Duration::from_secs(2), Duration::from_secs(10));
        let ra = Duration::from_secs(30);
        let (min, _, max) = draws(20_000, || backoff(&s, 1, Some(ra)));
        assert!(min >= ra, "{min:?}");
        assert!(max <= ra + Duration::from_secs(4), "{max:?}");
        // Not all at the same instant: spread over the first cap after it.
        assert!(max - min > Duration::from_secs(3), "{min:?}..{max:?}");
    }

    #[test]
    fn jitter_is_uniform_around_the_interval() {
        let (min, mean, max) = draws(20_000, || {
            jittered(Duration::from_secs(2), Duration::from_secs(1))
        });
        assert!(
            min >= Duration::from_secs(1) && max <= Duration::from_secs(3),
            "{min:?}..{max:?}"
        );
        assert!((mean.as_secs_f64() - 2.0).abs() < 0.05, "{mean:?}");
        assert_eq!(
            jittered(Duration::from_secs(2), Duration::ZERO),
            Duration::from_secs(2)
        );
        // A jitter as large as the interval never makes a zero wait.
        let (min, _, _) = draws(20_000, || {
            jittered(Duration::from_secs(1), Duration::from_secs(1))
        });
        assert!(min >= Duration::from_millis(100), "{min:?}");
    }
}
