//! The sync engine's decisions (DESIGN.md §2, §6). Pure: time is a parameter.
//!
//! It holds each source's last good keys and what was last written for each
//! user, and decides what each user's files should hold now:
//!
//! - a user is written only when every one of its sources has a known answer
//!   (fresh or persisted), so an empty state dir with the network down never
//!   wipes a file;
//! - an answer that would remove more than half of a user's managed keys (and
//!   more than one), or leave fewer than half of the most keys managed for
//!   the user at any time in the last 10 minutes (and more than one fewer),
//!   is held until every source of the user has answered again at least
//!   `confirm_delay` later with the same result, so a list shrinking step by
//!   step cannot walk around the check;
//! - with `max_stale`, a source whose last good answer is older than that
//!   contributes no keys (fail closed), without waiting for confirmation.
//!   Age is measured on the monotonic clock, so a wall clock set back or
//!   forward neither keeps nor drops keys. Only a persisted answer's age
//!   comes from the wall clock, once, when it is restored at start; one
//!   persisted with a time in the future has no knowable age and is stale.
//! - with `max_stale`, the files also say when sshd itself must stop taking
//!   the keys (`expiry-time`, [`Desired::expiry`]): the earliest time one of
//!   the user's sources turns stale, renewed only once the written time is
//!   more than `max_stale / 24` short of it (a 304 a minute does not rewrite
//!   the files a minute), and lowered at once when it lies beyond it (a wall
//!   clock set back).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Settings;
use crate::keys::KeySet;
use crate::render::Desired;
use crate::state::LastGood;

#[derive(Debug, Clone)]
struct SourceSlot {
    good: Option<LastGood>,
    /// Monotonic time of the last authoritative answer (200, 304, no-keys
    /// 404) in this run.
    answered_at: Option<Instant>,
    /// How old `good` is, for `max_stale`.
    age: Option<Age>,
}

/// The age of a source's last good answer on the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Age {
    /// The answer was `then` old at the monotonic instant `at`: (its own
    /// instant, zero) for an answer in this run; for a persisted one, its
    /// wall-clock age when it was restored.
    Known { at: Instant, then: Duration },
    /// Persisted with a wall time in the future: the clock was set back
    /// since (or ran ahead then), so its age cannot be known. Stale until the
    /// next answer.
    Unknown,
}

impl Age {
    fn fresh(now: Instant) -> Age {
        Age::Known {
            at: now,
            then: Duration::ZERO,
        }
    }

    /// A persisted answer's age, converted once, at restore.
    fn persisted(fetched_at: SystemTime, now: Instant, wall: SystemTime) -> Age {
        match wall.duration_since(fetched_at) {
            Ok(then) => Age::Known { at: now, then },
            Err(_) => Age::Unknown,
        }
    }

    /// The age at `now`; None when unknown.
    fn at(self, now: Instant) -> Option<Duration> {
        match self {
            Age::Known { at, then } => Some(now.saturating_duration_since(at).saturating_add(then)),
            Age::Unknown => None,
        }
    }
}

/// How far back a mass removal is measured from the most keys managed.
const MASS_REMOVAL_WINDOW: Duration = Duration::from_secs(600);

/// The most keys managed for a user within [`MASS_REMOVAL_WINDOW`]: a
/// sliding-window maximum over the counts seen at each plan, kept as a deque
/// of (instant, count) with counts strictly falling from front to back (a
/// count that an equal or larger later one outlasts can never be the
/// maximum again), so it holds few entries however often the count moves.
#[derive(Debug, Clone, Default)]
struct Peak(VecDeque<(Instant, usize)>);

impl Peak {
    /// Records that `count` keys are managed at `now`; returns the most
    /// managed at any time in the window up to now.
    fn observe(&mut self, now: Instant, count: usize) -> usize {
        while self.0.back().is_some_and(|&(_, c)| c <= count) {
            self.0.pop_back();
        }
        self.0.push_back((now, count));
        while self
            .0
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > MASS_REMOVAL_WINDOW)
        {
            self.0.pop_front();
        }
        self.0.front().map_or(count, |&(_, c)| c)
    }
}

#[derive(Debug, Clone)]
struct Pending {
    desired: KeySet,
    since: Instant,
}

/// How far a written expiry may lie beyond the deadline it stands for: the
/// monotonic and the wall clock are read a moment apart.
const EXPIRY_SLACK: Duration = Duration::from_secs(1);

/// What a user's files should hold now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Plan {
    /// Make the files hold exactly this (a no-op on disk when they already do).
    Write(Desired),
    /// A mass removal waits for confirmation: keep the keys the files hold,
    /// and fetch the user's sources again at `at`.
    Confirm {
        keep: Option<Desired>,
        at: Instant,
        sources: Vec<String>,
    },
    /// Some sources never answered: nothing is written for this user yet.
    Waiting { sources: Vec<String> },
}

/// `t + d`, saturating a century ahead: `Instant + Duration` panics on
/// overflow, and `confirm_delay` is whatever the config says.
fn later(t: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    t.checked_add(d)
        .or_else(|| t.checked_add(CENTURY))
        .unwrap_or(t)
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Engine {
    sources: BTreeMap<String, SourceSlot>,
    users: BTreeMap<String, Vec<String>>,
    applied: HashMap<String, KeySet>,
    /// The expiry the files of each user hold (when written in this run).
    expiries: HashMap<String, SystemTime>,
    /// Per user, the most keys managed lately (see [`Peak`]).
    peaks: HashMap<String, Peak>,
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
                age: None,
            });
        }
        self.users = settings
            .users
            .iter()
            .map(|u| (u.name.clone(), u.sources.clone()))
            .collect();
        self.pending
            .retain(|u, _| settings.users.iter().any(|s| &s.name == u));
        self.peaks
            .retain(|u, _| settings.users.iter().any(|s| &s.name == u));
        self.expiries
            .retain(|u, _| settings.users.iter().any(|s| &s.name == u));
    }

    /// Seeds a source with its persisted last good answer (at start, and
    /// again at a reload, revalidated with the new policy). Its age is taken
    /// from the wall clock only the first time: after that it is known on
    /// the monotonic clock.
    pub(crate) fn restore(&mut self, source: &str, good: LastGood, now: Instant, wall: SystemTime) {
        if let Some(slot) = self.sources.get_mut(source) {
            slot.age = slot
                .age
                .or_else(|| Some(Age::persisted(good.fetched_at, now, wall)));
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
            slot.age = Some(Age::fresh(now));
        }
    }

    /// Records a 304: the list is unchanged, confirmed now.
    pub(crate) fn unchanged(&mut self, source: &str, fetched_at: SystemTime, now: Instant) {
        if let Some(slot) = self.sources.get_mut(source) {
            if let Some(good) = &mut slot.good {
                good.fetched_at = fetched_at;
                slot.age = Some(Age::fresh(now));
            }
            slot.answered_at = Some(now);
        }
    }

    /// Drops every source's ETag (the key policy changed): the next fetch
    /// is unconditional. The keys stay until it answers.
    pub(crate) fn forget_etags(&mut self) {
        for good in self.sources.values_mut().filter_map(|s| s.good.as_mut()) {
            good.etag = None;
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

    fn is_stale(&self, slot: &SourceSlot, now: Instant) -> bool {
        match (self.max_stale, slot.age) {
            (Some(max), Some(age)) => age.at(now).is_none_or(|age| age > max),
            _ => false,
        }
    }

    /// When a source's keys turn stale, on the wall clock as it reads now.
    fn deadline(&self, slot: &SourceSlot, now: Instant, wall: SystemTime) -> Option<SystemTime> {
        let left = self.max_stale?.saturating_sub(slot.age?.at(now)?);
        // Only a max_stale of centuries overflows; then fail closed.
        Some(wall.checked_add(left).unwrap_or(wall))
    }

    /// The expiry to write for `user`, whose keys turn stale at `deadline`:
    /// the one written already while it is no more than `max_stale / 24`
    /// short of the deadline and not beyond it, else the deadline to the
    /// second (rounded down, so never beyond it).
    fn expiry(&self, user: &str, deadline: Option<SystemTime>) -> Option<SystemTime> {
        let (deadline, max) = (deadline?, self.max_stale?);
        if let Some(&written) = self.expiries.get(user) {
            let recent = written
                .checked_add(max / 24)
                .is_none_or(|renew_at| renew_at >= deadline);
            let within = deadline
                .checked_add(EXPIRY_SLACK)
                .is_none_or(|limit| written <= limit);
            if recent && within {
                return Some(written);
            }
        }
        Some(whole_seconds(deadline))
    }

    /// The sources whose keys are dropped for staleness.
    #[cfg(test)]
    pub(crate) fn stale_sources(&self, now: Instant) -> Vec<String> {
        self.sources
            .iter()
            .filter(|(_, s)| s.good.is_some() && self.is_stale(s, now))
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
        // The earliest time a source that gives keys turns stale.
        let mut deadline: Option<SystemTime> = None;
        for name in &sources {
            match self
                .sources
                .get(name)
                .and_then(|s| Some((s, s.good.as_ref()?)))
            {
                Some((slot, _)) if self.is_stale(slot, now) => any_stale = true,
                Some((slot, good)) => {
                    sets.push(&good.keys);
                    if let Some(d) = self.deadline(slot, now, wall) {
                        deadline = Some(deadline.map_or(d, |e| e.min(d)));
                    }
                }
                None => waiting.push(name.clone()),
            }
        }
        if !waiting.is_empty() {
            return Plan::Waiting { sources: waiting };
        }
        let desired = KeySet::union(sets);
        let expiry = self.expiry(user, deadline);
        let Some(applied) = self.applied.get(user) else {
            self.pending.remove(user);
            return Plan::Write(Desired {
                keys: desired,
                expiry,
            });
        };
        // What is managed now counts as managed in the window: sampled at
        // every plan, and every write follows a plan, so each count the
        // files held is seen at least at the plan that replaced it.
        let peak = self
            .peaks
            .entry(user.to_string())
            .or_default()
            .observe(now, applied.len());
        let removed = applied.removed_in(&desired);
        let left = desired.len();
        let mass = (removed > 1 && removed * 2 > applied.len())
            || (removed > 0 && peak.saturating_sub(left) > 1 && left * 2 < peak);
        if !mass || any_stale {
            self.pending.remove(user);
            return Plan::Write(Desired {
                keys: desired,
                expiry,
            });
        }
        let keep = Some(Desired {
            keys: applied.clone(),
            expiry,
        });
        match self.pending.get(user) {
            Some(p) if p.desired.same_as(&desired) => {
                let due = later(p.since, self.confirm_delay);
                let confirmed = sources.iter().all(|name| {
                    self.sources
                        .get(name)
                        .and_then(|s| s.answered_at)
                        .is_some_and(|t| t >= due)
                });
                if confirmed {
                    // The shrink is believed: what came before it no longer
                    // counts against the next answer.
                    self.pending.remove(user);
                    self.peaks.remove(user);
                    Plan::Write(Desired {
                        keys: desired,
                        expiry,
                    })
                } else {
                    Plan::Confirm {
                        keep,
                        at: due,
                        sources,
                    }
                }
            }
            _ => {
                let at = later(now, self.confirm_delay);
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

    /// Records a successful write for `user`.
    pub(crate) fn written(&mut self, user: &str, desired: Desired) {
        match desired.expiry {
            Some(t) => self.expiries.insert(user.to_string(), t),
            None => self.expiries.remove(user),
        };
        self.applied.insert(user.to_string(), desired.keys);
    }
}

/// `t` rounded down to a whole second (sshd's expiry-time has seconds).
fn whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
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

    fn desired(ids: &[usize]) -> Desired {
        Desired {
            keys: set(ids),
            expiry: None,
        }
    }

    /// The plan to write these keys, without max_stale.
    fn write(ids: &[usize]) -> Plan {
        Plan::Write(desired(ids))
    }

    /// The keys a plan writes (with max_stale, whatever their expiry).
    fn keys(plan: Plan) -> KeySet {
        match plan {
            Plan::Write(d) => d.keys,
            other => panic!("not a write: {other:?}"),
        }
    }

    fn good(ids: &[usize], at: SystemTime) -> LastGood {
        LastGood {
            keys: set(ids),
            etag: None,
            fetched_at: at,
        }
    }

    fn settings(max_stale: Option<Duration>) -> Settings {
        let source = |name: &str| {
            SourceSettings::for_tests(
                name,
                SourceKind::File {
                    path: PathBuf::from("/x"),
                },
            )
        };
        Settings {
            config_path: PathBuf::new(),
            files: vec![],
            state_dir: PathBuf::from("/tmp"),
            health_socket: PathBuf::from("/tmp/s"),
            metrics_textfile: None,
            metrics_listen: None,
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
    fn a_huge_confirm_delay_never_panics() {
        let t = Instant::now();
        assert!(later(t, Duration::MAX) > t);
        assert_eq!(later(t, Duration::from_secs(5)), t + Duration::from_secs(5));
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
        assert_eq!(e.plan("u", t, w), write(&[1, 2, 3]));
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
        assert_eq!(keep, Some(desired(&[1, 2, 3, 4])));
        assert_eq!(at, t0 + Duration::from_secs(5));
        // Asking again before the second fetch changes nothing.
        let t1 = t0 + Duration::from_secs(6);
        assert!(matches!(e.plan("u", t1, w), Plan::Confirm { .. }));
        // Only one source answered again: still not confirmed.
        e.unchanged("a", w, t1);
        assert!(matches!(e.plan("u", t1, w), Plan::Confirm { .. }));
        e.answer("b", good(&[], w), t1);
        assert_eq!(e.plan("u", t1, w), write(&[1]));
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
        assert_eq!(e.plan("u", t1, w), write(&[1, 2, 3, 4]));
    }

    #[test]
    fn small_removals_and_a_single_key_are_immediate() {
        let mut e = Engine::new(&settings(None));
        let (t, w) = (Instant::now(), SystemTime::now());
        e.set_applied("u", set(&[1, 2, 3]));
        e.answer("a", good(&[1, 2], w), t);
        e.answer("b", good(&[], w), t);
        assert_eq!(e.plan("u", t, w), write(&[1, 2]));
        // Removing the only key is not "more than one" (once the three
        // managed before are out of the mass-removal window).
        let later = t + MASS_REMOVAL_WINDOW + Duration::from_secs(1);
        e.written("u", desired(&[1]));
        e.answer("a", good(&[], w), later);
        assert_eq!(e.plan("u", later, w), write(&[]));
    }

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn a_wall_clock_set_back_does_not_keep_stale_keys() {
        let mut e = Engine::new(&settings(Some(HOUR)));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        e.set_applied("u", set(&[1, 2]));
        e.answer("a", good(&[1], w0), t0);
        e.answer("b", good(&[2], w0), t0);
        // Two hours on, the wall clock set back a day meanwhile: b kept
        // answering, a went silent and is stale by the monotonic clock.
        let t1 = t0 + 2 * HOUR;
        let w1 = w0 - DAY + 2 * HOUR;
        e.unchanged("b", w1, t1);
        assert_eq!(keys(e.plan("u", t1, w1)), set(&[2]));
        assert_eq!(e.stale_sources(t1), ["a"]);
    }

    #[test]
    fn a_wall_clock_jump_forward_does_not_drop_fresh_keys() {
        let mut e = Engine::new(&settings(Some(HOUR)));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        e.set_applied("u", set(&[1, 2]));
        e.answer("a", good(&[1], w0), t0);
        e.answer("b", good(&[2], w0), t0);
        // A minute later by the monotonic clock, two days by the wall clock.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(keys(e.plan("u", t1, w0 + 2 * DAY)), set(&[1, 2]));
        assert!(e.stale_sources(t1).is_empty());
        // The age still counts on the monotonic clock, whatever the wall says.
        let t2 = t0 + HOUR + Duration::from_secs(1);
        assert_eq!(keys(e.plan("u", t2, w0)), set(&[]));
    }

    #[test]
    fn a_persisted_time_in_the_future_is_stale() {
        let mut e = Engine::new(&settings(Some(HOUR)));
        let (t, w) = (Instant::now(), SystemTime::now());
        e.set_applied("u", set(&[1, 2]));
        // Persisted before a restart by a clock that ran ahead of today's.
        e.restore("a", good(&[1], w + Duration::from_secs(600)), t, w);
        e.restore("b", good(&[2], w - Duration::from_secs(600)), t, w);
        assert_eq!(keys(e.plan("u", t, w)), set(&[2]));
        // Until its next answer, which is fresh.
        e.unchanged("a", w, t);
        assert_eq!(keys(e.plan("u", t, w)), set(&[1, 2]));
    }

    #[test]
    fn a_persisted_past_time_becomes_a_monotonic_deadline() {
        let mut e = Engine::new(&settings(Some(HOUR)));
        let (t, w) = (Instant::now(), SystemTime::now());
        e.set_applied("u", set(&[1, 2]));
        e.restore("a", good(&[1], w - Duration::from_secs(30 * 60)), t, w);
        e.restore("b", good(&[2], w), t, w);
        // The wall clock is set back a day after the restore: the age of
        // a's answer (30 min at the restore) goes on counting monotonically.
        let back = w - DAY;
        let t1 = t + Duration::from_secs(20 * 60);
        e.unchanged("b", back, t1);
        assert_eq!(keys(e.plan("u", t1, back)), set(&[1, 2]));
        let t2 = t + Duration::from_secs(31 * 60);
        e.unchanged("b", back, t2);
        assert_eq!(keys(e.plan("u", t2, back)), set(&[2]));
    }

    #[test]
    fn a_step_by_step_shrink_needs_confirmation() {
        let mut e = Engine::new(&settings(None));
        let (t0, w) = (Instant::now(), SystemTime::now());
        let half = Duration::from_millis(500);
        e.set_applied("u", set(&[1, 2, 3, 4]));
        e.answer("b", good(&[], w), t0);
        // 4 -> 2: half of the keys stay, written at once.
        e.answer("a", good(&[1, 2], w), t0);
        assert_eq!(e.plan("u", t0, w), write(&[1, 2]));
        e.written("u", desired(&[1, 2]));
        // 2 -> 1 half a second later removes one key only, but leaves
        // fewer than half of the 4 managed moments ago.
        let t1 = t0 + half;
        e.answer("a", good(&[1], w), t1);
        let Plan::Confirm { keep, .. } = e.plan("u", t1, w) else {
            panic!("2 -> 1 after 4 must be confirmed")
        };
        assert_eq!(keep, Some(desired(&[1, 2])));
        // 1 -> 0: a new list restarts the confirmation.
        let t2 = t1 + half;
        e.answer("a", good(&[], w), t2);
        let Plan::Confirm { at, .. } = e.plan("u", t2, w) else {
            panic!("the empty list must be confirmed")
        };
        assert_eq!(at, t2 + Duration::from_secs(5));
        // Confirmed by answers after the delay: obeyed.
        let t3 = at + half;
        e.answer("a", good(&[], w), t3);
        e.answer("b", good(&[], w), t3);
        assert_eq!(e.plan("u", t3, w), write(&[]));
    }

    #[test]
    fn the_mass_removal_window_is_ten_minutes_of_managed_keys() {
        let mut e = Engine::new(&settings(None));
        let (t0, w) = (Instant::now(), SystemTime::now());
        e.answer("b", good(&[], w), t0);
        e.set_applied("u", set(&[1, 2, 3, 4]));
        e.answer("a", good(&[1, 2, 3, 4], w), t0);
        assert_eq!(e.plan("u", t0, w), write(&[1, 2, 3, 4]));
        // Four keys managed until 15 min, then two: at 20 min the four
        // were managed less than ten minutes ago.
        let t1 = t0 + Duration::from_secs(15 * 60);
        e.answer("a", good(&[1, 2], w), t1);
        assert_eq!(e.plan("u", t1, w), write(&[1, 2]));
        e.written("u", desired(&[1, 2]));
        let t2 = t0 + Duration::from_secs(20 * 60);
        e.answer("a", good(&[1], w), t2);
        assert!(matches!(e.plan("u", t2, w), Plan::Confirm { .. }));
        // Back to two; eleven minutes after the four were last managed,
        // 2 -> 1 is a single removal again.
        e.answer("a", good(&[1, 2], w), t2);
        assert_eq!(e.plan("u", t2, w), write(&[1, 2]));
        let t3 = t1 + Duration::from_secs(11 * 60);
        e.answer("a", good(&[1], w), t3);
        assert_eq!(e.plan("u", t3, w), write(&[1]));
    }

    fn expiry_of(plan: Plan) -> Option<SystemTime> {
        match plan {
            Plan::Write(d) => d.expiry,
            Plan::Confirm { keep, .. } => keep.and_then(|d| d.expiry),
            Plan::Waiting { .. } => panic!("waiting"),
        }
    }

    #[test]
    fn lines_expire_when_the_keys_would_turn_stale() {
        let mut e = Engine::new(&settings(Some(DAY)));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        e.answer("a", good(&[1], w0), t0);
        e.answer("b", good(&[2], w0), t0);
        let Plan::Write(d) = e.plan("u", t0, w0) else {
            panic!()
        };
        assert_eq!(d.keys, set(&[1, 2]));
        assert_eq!(d.expiry, Some(whole_seconds(w0 + DAY)));
        // Without max_stale, no expiry.
        let mut off = Engine::new(&settings(None));
        off.answer("a", good(&[1], w0), t0);
        off.answer("b", good(&[2], w0), t0);
        assert_eq!(off.plan("u", t0, w0), write(&[1, 2]));
    }

    #[test]
    fn the_expiry_is_renewed_once_per_twenty_fourth_of_max_stale() {
        let mut e = Engine::new(&settings(Some(DAY)));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        let first = whole_seconds(w0 + DAY);
        e.answer("a", good(&[1], w0), t0);
        e.answer("b", good(&[2], w0), t0);
        let Plan::Write(d) = e.plan("u", t0, w0) else {
            panic!()
        };
        e.written("u", d);
        let minutes = |m: u64| Duration::from_secs(m * 60);
        // A 304 a minute for 59 minutes: the files keep their expiry.
        for m in 1..60 {
            let (t, w) = (t0 + minutes(m), w0 + minutes(m));
            e.unchanged("a", w, t);
            e.unchanged("b", w, t);
            let Plan::Write(d) = e.plan("u", t, w) else {
                panic!()
            };
            assert_eq!(d.expiry, Some(first), "minute {m}");
            e.written("u", d);
        }
        // Past an hour (a day / 24) short of the deadline: renewed.
        let (t, w) = (t0 + minutes(61), w0 + minutes(61));
        e.unchanged("a", w, t);
        e.unchanged("b", w, t);
        assert_eq!(expiry_of(e.plan("u", t, w)), Some(whole_seconds(w + DAY)));
    }

    #[test]
    fn the_expiry_is_the_earliest_of_the_users_sources() {
        let mut e = Engine::new(&settings(Some(DAY)));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        e.answer("a", good(&[1], w0), t0);
        let (t1, w1) = (t0 + 2 * HOUR, w0 + 2 * HOUR);
        e.answer("b", good(&[2], w1), t1);
        // a answered two hours before b: its keys turn stale first.
        assert_eq!(
            expiry_of(e.plan("u", t1, w1)),
            Some(whole_seconds(w0 + DAY))
        );
    }

    #[test]
    fn the_expiry_follows_the_wall_clock_sshd_reads() {
        let mut e = Engine::new(&settings(Some(DAY)));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        e.answer("a", good(&[1], w0), t0);
        e.answer("b", good(&[2], w0), t0);
        let Plan::Write(d) = e.plan("u", t0, w0) else {
            panic!()
        };
        e.written("u", d.clone());
        let t1 = t0 + Duration::from_secs(60);
        // Set back a day: the written time lies a day beyond the deadline
        // for sshd's clock; lowered at once.
        let back = w0 - DAY + Duration::from_secs(60);
        let Plan::Write(lowered) = e.plan("u", t1, back) else {
            panic!()
        };
        assert_eq!(lowered.expiry, Some(whole_seconds(w0)));
        assert_eq!(lowered.keys, set(&[1, 2]));
        // Forward two days: the written time would come too early; renewed.
        let ahead = w0 + 2 * DAY + Duration::from_secs(60);
        assert_eq!(
            expiry_of(e.plan("u", t1, ahead)),
            Some(whole_seconds(w0 + 3 * DAY))
        );
    }

    #[test]
    fn keys_kept_for_confirmation_keep_an_expiry() {
        let mut e = Engine::new(&settings(Some(DAY)));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        e.set_applied("u", set(&[1, 2, 3, 4]));
        e.answer("a", good(&[], w0), t0);
        e.answer("b", good(&[], w0), t0);
        let Plan::Confirm { keep, .. } = e.plan("u", t0, w0) else {
            panic!("a mass removal")
        };
        assert_eq!(
            keep,
            Some(Desired {
                keys: set(&[1, 2, 3, 4]),
                expiry: Some(whole_seconds(w0 + DAY)),
            })
        );
    }

    #[test]
    fn stale_sources_fail_closed_without_confirmation() {
        let mut e = Engine::new(&settings(Some(Duration::from_secs(3600))));
        let t = Instant::now();
        let old = SystemTime::now() - Duration::from_secs(7200);
        let w = SystemTime::now();
        e.set_applied("u", set(&[1, 2, 3]));
        e.restore("a", good(&[1, 2, 3], old), t, w);
        e.answer("b", good(&[], w), t);
        assert_eq!(keys(e.plan("u", t, w)), set(&[]));
        assert_eq!(e.stale_sources(t), ["a"]);
    }
}
