//! The sync engine's decisions (DESIGN.md §2, §6). Pure: time is a parameter.
//!
//! It holds each source's last good keys and what was last written for each
//! user, and decides what each user's files should hold now:
//!
//! - a user is written only when every one of its sources has a known answer
//!   (fresh or persisted), so an empty state dir with the network down never
//!   wipes a file;
//! - an answer that would remove more than half of a user's managed keys (and
//!   more than one) is held until every source of the user has answered again
//!   at least `confirm_delay` later with the same result;
//! - with `max_stale`, a source whose last good answer is older than that
//!   contributes no keys (fail closed), without waiting for confirmation.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use crate::config::Settings;
use crate::keys::KeySet;
use crate::state::LastGood;

#[derive(Debug, Clone)]
struct SourceSlot {
    good: Option<LastGood>,
    /// Monotonic time of the last authoritative answer (200, 304, no-keys 404).
    answered_at: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Pending {
    desired: KeySet,
    since: Instant,
}

/// What a user's files should hold now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Plan {
    /// Make the files hold exactly these keys (a no-op on disk when they already do).
    Write(KeySet),
    /// A mass removal waits for confirmation: keep the files as they are, and
    /// fetch the user's sources again at `at`.
    Confirm {
        keep: Option<KeySet>,
        at: Instant,
        sources: Vec<String>,
    },
    /// Some sources never answered: nothing is written for this user yet.
    Waiting { sources: Vec<String> },
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Engine {
    sources: BTreeMap<String, SourceSlot>,
    users: BTreeMap<String, Vec<String>>,
    applied: HashMap<String, KeySet>,
    pending: HashMap<String, Pending>,
    confirm_delay: Duration,
    max_stale: Option<Duration>,
}

impl Engine {
    pub(crate) fn new(settings: &Settings) -> Self {
        let mut engine = Engine::default();
        engine.configure(settings);
        engine
    }

    /// Applies a (re)loaded config, keeping what is known of sources and users.
    pub(crate) fn configure(&mut self, settings: &Settings) {
        self.confirm_delay = settings.policy.confirm_delay;
        self.max_stale = settings.policy.max_stale;
        self.sources
            .retain(|name, _| settings.sources.contains_key(name));
        for name in settings.sources.keys() {
            self.sources.entry(name.clone()).or_insert(SourceSlot {
                good: None,
                answered_at: None,
            });
        }
        self.users = settings
            .users
            .iter()
            .map(|u| (u.name.clone(), u.sources.clone()))
            .collect();
        self.pending
            .retain(|u, _| settings.users.iter().any(|s| &s.name == u));
    }

    /// Seeds a source with its persisted last good answer (at start).
    pub(crate) fn restore(&mut self, source: &str, good: LastGood) {
        if let Some(slot) = self.sources.get_mut(source) {
            slot.good = Some(good);
        }
    }

    /// Seeds what a user's files hold (read back from the cache at start).
    pub(crate) fn set_applied(&mut self, user: &str, keys: KeySet) {
        self.applied.insert(user.to_string(), keys);
    }

    pub(crate) fn applied(&self, user: &str) -> Option<&KeySet> {
        self.applied.get(user)
    }

    /// Records an authoritative answer of a source: the list is `good.keys`.
    pub(crate) fn answer(&mut self, source: &str, good: LastGood, now: Instant) {
        if let Some(slot) = self.sources.get_mut(source) {
            slot.good = Some(good);
            slot.answered_at = Some(now);
        }
    }

    /// Records a 304: the list is unchanged, confirmed now.
    pub(crate) fn unchanged(&mut self, source: &str, fetched_at: SystemTime, now: Instant) {
        if let Some(slot) = self.sources.get_mut(source) {
            if let Some(good) = &mut slot.good {
                good.fetched_at = fetched_at;
            }
            slot.answered_at = Some(now);
        }
    }

    pub(crate) fn last_good(&self, source: &str) -> Option<&LastGood> {
        self.sources.get(source).and_then(|s| s.good.as_ref())
    }

    /// The users that read a source.
    pub(crate) fn users_of(&self, source: &str) -> Vec<String> {
        self.users
            .iter()
            .filter(|(_, srcs)| srcs.iter().any(|s| s == source))
            .map(|(u, _)| u.clone())
            .collect()
    }

    fn is_stale(&self, good: &LastGood, wall: SystemTime) -> bool {
        match self.max_stale {
            Some(max) => wall
                .duration_since(good.fetched_at)
                .is_ok_and(|age| age > max),
            None => false,
        }
    }

    /// The sources whose keys are dropped for staleness.
    #[cfg(test)]
    pub(crate) fn stale_sources(&self, wall: SystemTime) -> Vec<String> {
        self.sources
            .iter()
            .filter(|(_, s)| s.good.as_ref().is_some_and(|g| self.is_stale(g, wall)))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Decides what `user`'s files should hold now.
    pub(crate) fn plan(&mut self, user: &str, now: Instant, wall: SystemTime) -> Plan {
        let Some(sources) = self.users.get(user).cloned() else {
            return Plan::Waiting {
                sources: Vec::new(),
            };
        };
        let mut sets = Vec::new();
        let mut waiting = Vec::new();
        let mut any_stale = false;
        for name in &sources {
            match self.sources.get(name).and_then(|s| s.good.as_ref()) {
                Some(good) if self.is_stale(good, wall) => any_stale = true,
                Some(good) => sets.push(&good.keys),
                None => waiting.push(name.clone()),
            }
        }
        if !waiting.is_empty() {
            return Plan::Waiting { sources: waiting };
        }
        let desired = KeySet::union(sets);
        let Some(applied) = self.applied.get(user) else {
            self.pending.remove(user);
            return Plan::Write(desired);
        };
        let removed = applied.removed_in(&desired);
        let mass = removed > 1 && removed * 2 > applied.len();
        if !mass || any_stale {
            self.pending.remove(user);
            return Plan::Write(desired);
        }
        let keep = Some(applied.clone());
        match self.pending.get(user) {
            Some(p) if p.desired.same_as(&desired) => {
                let due = p.since + self.confirm_delay;
                let confirmed = sources.iter().all(|name| {
                    self.sources
                        .get(name)
                        .and_then(|s| s.answered_at)
                        .is_some_and(|t| t >= due)
                });
                if confirmed {
                    self.pending.remove(user);
                    Plan::Write(desired)
                } else {
                    Plan::Confirm {
                        keep,
                        at: due,
                        sources,
                    }
                }
            }
            _ => {
                let at = now + self.confirm_delay;
                self.pending.insert(
                    user.to_string(),
                    Pending {
                        desired,
                        since: now,
                    },
                );
                Plan::Confirm { keep, at, sources }
            }
        }
    }

    /// Records a successful write of `keys` for `user`.
    pub(crate) fn written(&mut self, user: &str, keys: KeySet) {
        self.applied.insert(user.to_string(), keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PolicySettings, SourceKind, SourceSettings, UserSettings, WriteMode};
    use crate::keys::{Key, KeySet};
    use std::path::PathBuf;

    fn key(i: usize) -> Key {
        Key {
            options: None,
            algorithm: "ssh-ed25519".into(),
            blob: format!("BLOB{i}"),
            comment: String::new(),
            fingerprint: format!("SHA256:{i}"),
        }
    }

    fn set(ids: &[usize]) -> KeySet {
        KeySet::from_keys(ids.iter().map(|&i| key(i)))
    }

    fn good(ids: &[usize], at: SystemTime) -> LastGood {
        LastGood {
            keys: set(ids),
            etag: None,
            fetched_at: at,
        }
    }

    fn settings(max_stale: Option<Duration>) -> Settings {
        let source = |name: &str| SourceSettings {
            name: name.into(),
            kind: SourceKind::File {
                path: PathBuf::from("/x"),
            },
            interval: Duration::from_secs(60),
            jitter: Duration::ZERO,
            timeout: Duration::from_secs(10),
            max_body: 1 << 20,
            max_backoff: Duration::from_secs(300),
            subscribe_url: None,
            resync: Duration::from_secs(600),
            ca_file: None,
        };
        Settings {
            config_path: PathBuf::new(),
            files: vec![],
            state_dir: PathBuf::from("/tmp"),
            health_socket: PathBuf::from("/tmp/s"),
            refresh_min_interval: Duration::from_secs(5),
            sources: [
                ("a".to_string(), source("a")),
                ("b".to_string(), source("b")),
            ]
            .into(),
            users: vec![UserSettings {
                name: "u".into(),
                sources: vec!["a".into(), "b".into()],
                write: WriteMode::Block,
                path: None,
                options: None,
            }],
            policy: PolicySettings {
                max_stale,
                ..PolicySettings::default()
            },
        }
    }

    #[test]
    fn waits_for_every_source_then_writes_the_union() {
        let mut e = Engine::new(&settings(None));
        let (t, w) = (Instant::now(), SystemTime::now());
        e.answer("a", good(&[1, 2], w), t);
        assert_eq!(
            e.plan("u", t, w),
            Plan::Waiting {
                sources: vec!["b".into()]
            }
        );
        e.answer("b", good(&[2, 3], w), t);
        assert_eq!(e.plan("u", t, w), Plan::Write(set(&[1, 2, 3])));
    }

    #[test]
    fn mass_removal_needs_a_later_answer_with_the_same_list() {
        let mut e = Engine::new(&settings(None));
        let (t0, w) = (Instant::now(), SystemTime::now());
        e.set_applied("u", set(&[1, 2, 3, 4]));
        e.answer("a", good(&[1], w), t0);
        e.answer("b", good(&[], w), t0);
        let Plan::Confirm { keep, at, .. } = e.plan("u", t0, w) else {
            panic!()
        };
        assert_eq!(keep, Some(set(&[1, 2, 3, 4])));
        assert_eq!(at, t0 + Duration::from_secs(5));
        // Asking again before the second fetch changes nothing.
        let t1 = t0 + Duration::from_secs(6);
        assert!(matches!(e.plan("u", t1, w), Plan::Confirm { .. }));
        // Only one source answered again: still not confirmed.
        e.unchanged("a", w, t1);
        assert!(matches!(e.plan("u", t1, w), Plan::Confirm { .. }));
        e.answer("b", good(&[], w), t1);
        assert_eq!(e.plan("u", t1, w), Plan::Write(set(&[1])));
    }

    #[test]
    fn a_different_second_answer_restarts_confirmation() {
        let mut e = Engine::new(&settings(None));
        let (t0, w) = (Instant::now(), SystemTime::now());
        e.set_applied("u", set(&[1, 2, 3, 4]));
        e.answer("a", good(&[], w), t0);
        e.answer("b", good(&[], w), t0);
        assert!(matches!(e.plan("u", t0, w), Plan::Confirm { .. }));
        let t1 = t0 + Duration::from_secs(6);
        e.answer("a", good(&[1, 2, 3, 4], w), t1);
        e.answer("b", good(&[], w), t1);
        // Back to the full list: written (nothing removed).
        assert_eq!(e.plan("u", t1, w), Plan::Write(set(&[1, 2, 3, 4])));
    }

    #[test]
    fn small_removals_and_a_single_key_are_immediate() {
        let mut e = Engine::new(&settings(None));
        let (t, w) = (Instant::now(), SystemTime::now());
        e.set_applied("u", set(&[1, 2, 3]));
        e.answer("a", good(&[1, 2], w), t);
        e.answer("b", good(&[], w), t);
        assert_eq!(e.plan("u", t, w), Plan::Write(set(&[1, 2])));
        e.written("u", set(&[1]));
        e.answer("a", good(&[], w), t);
        // Removing the only key is not "more than one".
        assert_eq!(e.plan("u", t, w), Plan::Write(set(&[])));
    }

    #[test]
    fn stale_sources_fail_closed_without_confirmation() {
        let mut e = Engine::new(&settings(Some(Duration::from_secs(3600))));
        let t = Instant::now();
        let old = SystemTime::now() - Duration::from_secs(7200);
        let w = SystemTime::now();
        e.set_applied("u", set(&[1, 2, 3]));
        e.restore("a", good(&[1, 2, 3], old));
        e.answer("b", good(&[], w), t);
        assert_eq!(e.plan("u", t, w), Plan::Write(set(&[])));
        assert_eq!(e.stale_sources(w), ["a"]);
    }
}
