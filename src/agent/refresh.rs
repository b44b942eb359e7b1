//! The writer's side of the login-triggered refresh (DESIGN.md §3): which
//! requests start a round of fetches, which join the round in flight, which
//! are answered at once, and when a round is over. Pure: time is a
//! parameter, and the waiters are whatever the caller queues (the reply
//! channels of `POST /refresh`).
//!
//! A round starts when a request comes and no round ran within
//! `refresh_min_interval`; it asks every source for one conditional fetch
//! (the writer bumps a round number the fetch loops watch), and it ends
//! when each source has reported its part ([`RoundPart`]) after the writes
//! for its answer, or at a deadline (a source that stopped on a reload
//! never reports). Requests while it runs wait for it; requests after it,
//! inside the window, are answered at once with its age (429).

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use super::report::RoundPart;
use crate::refresh::{Outcome, Reply};
use crate::status::{RefreshStatus, to_unix};

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Asked<W> {
    /// Answer it now.
    Now(W, Reply),
    /// It waits for the round in flight.
    Joined,
    /// It waits for a new round: ask every source to fetch for this round.
    Started(u64),
}

/// A round in flight.
#[derive(Debug)]
struct Round<W> {
    id: u64,
    started: Instant,
    deadline: Instant,
    /// Sources whose part is not reported yet.
    waiting: BTreeSet<String>,
    answered: bool,
    failed: bool,
    waiters: Vec<W>,
}

/// Rate limit, coalescing and counts of login-triggered refreshes.
#[derive(Debug)]
pub(crate) struct Gate<W> {
    min_interval: Duration,
    /// Start and end of the last round.
    last: Option<(Instant, Instant)>,
    round: Option<Round<W>>,
    /// The last round number handed out.
    rounds: u64,
    counts: RefreshStatus,
}

impl<W> Gate<W> {
    /// A gate allowing one round per `min_interval`; zero: the feature is off.
    pub(crate) fn new(min_interval: Duration) -> Self {
        Gate {
            min_interval,
            last: None,
            round: None,
            rounds: 0,
            counts: RefreshStatus::default(),
        }
    }

    /// After a reload.
    pub(crate) fn set_min_interval(&mut self, min_interval: Duration) {
        self.min_interval = min_interval;
    }

    /// Takes a request at `now`. `sources` are those a new round would wait
    /// for; the round gives up on them at `deadline`.
    pub(crate) fn ask(
        &mut self,
        waiter: W,
        now: Instant,
        sources: BTreeSet<String>,
        deadline: Instant,
    ) -> Asked<W> {
        self.counts.asked += 1;
        if self.min_interval.is_zero() {
            return self.now(waiter, Outcome::Off, None);
        }
        if let Some(round) = &mut self.round {
            round.waiters.push(waiter);
            return Asked::Joined;
        }
        if let Some((started, ended)) = self.last {
            let since = now.saturating_duration_since(started);
            if since < self.min_interval {
                let outcome = Outcome::RateLimited {
                    retry_in: self.min_interval - since,
                };
                return self.now(waiter, outcome, Some(now.saturating_duration_since(ended)));
            }
        }
        if sources.is_empty() {
            // Nothing to fetch (no source configured): a round that ends at once.
            self.last = Some((now, now));
            return self.now(waiter, Outcome::Failed, Some(Duration::ZERO));
        }
        self.rounds += 1;
        self.round = Some(Round {
            id: self.rounds,
            started: now,
            deadline,
            waiting: sources,
            answered: false,
            failed: false,
            waiters: vec![waiter],
        });
        Asked::Started(self.rounds)
    }

    fn now(&mut self, waiter: W, outcome: Outcome, age: Option<Duration>) -> Asked<W> {
        self.count(outcome, 1);
        Asked::Now(waiter, Reply { outcome, age })
    }

    fn count(&mut self, outcome: Outcome, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        let c = &mut self.counts;
        let counter = match outcome {
            Outcome::Served => &mut c.served,
            Outcome::RateLimited { .. } => &mut c.rate_limited,
            Outcome::Backoff => &mut c.backoff,
            Outcome::Failed => &mut c.failed,
            Outcome::Off => &mut c.off,
        };
        *counter = counter.saturating_add(n);
    }

    /// A source reported its part in round `round`. When that was the last
    /// part, the round ends: its waiters and their reply.
    pub(crate) fn part(
        &mut self,
        round: u64,
        source: &str,
        part: RoundPart,
        now: Instant,
    ) -> Option<(Vec<W>, Reply)> {
        let current = self.round.as_mut().filter(|r| r.id == round)?;
        if !current.waiting.remove(source) {
            return None;
        }
        match part {
            RoundPart::Answered => current.answered = true,
            RoundPart::Failed => current.failed = true,
            RoundPart::InBackoff => {}
        }
        if current.waiting.is_empty() {
            self.end(now)
        } else {
            None
        }
    }

    /// When the round in flight gives up on sources that did not report.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.round.as_ref().map(|r| r.deadline)
    }

    /// Ends the round in flight now (its deadline passed, or a reload
    /// stopped its sources): sources that did not report count as failed.
    pub(crate) fn end(&mut self, now: Instant) -> Option<(Vec<W>, Reply)> {
        let round = self.round.take()?;
        let outcome = if round.answered {
            Outcome::Served
        } else if round.failed || !round.waiting.is_empty() {
            Outcome::Failed
        } else {
            Outcome::Backoff
        };
        self.last = Some((round.started, now));
        self.count(outcome, round.waiters.len());
        Some((
            round.waiters,
            Reply {
                outcome,
                age: Some(Duration::ZERO),
            },
        ))
    }

    /// The counts for `/status`; `now` and `wall` are the same moment on
    /// the two clocks.
    pub(crate) fn status(&self, now: Instant, wall: SystemTime) -> RefreshStatus {
        RefreshStatus {
            min_interval_ms: u64::try_from(self.min_interval.as_millis()).unwrap_or(u64::MAX),
            last_round: self.last.and_then(|(_, ended)| {
                wall.checked_sub(now.saturating_duration_since(ended))
                    .map(to_unix)
            }),
            ..self.counts.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(5);

    fn sources(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_round_per_window_shared_by_everyone_who_asks_meanwhile() {
        let t0 = Instant::now();
        let mut gate = Gate::new(WINDOW);
        let all = || sources(&["a", "b"]);
        let deadline = t0 + Duration::from_secs(30);
        assert_eq!(gate.ask(1, t0, all(), deadline), Asked::Started(1));
        assert_eq!(gate.ask(2, t0 + ms(10), all(), deadline), Asked::Joined);
        assert_eq!(gate.deadline(), Some(deadline));
        // A part for another round, or twice the same part, changes nothing.
        assert_eq!(gate.part(7, "a", RoundPart::Answered, t0 + ms(20)), None);
        assert_eq!(gate.part(1, "a", RoundPart::Answered, t0 + ms(30)), None);
        assert_eq!(gate.part(1, "a", RoundPart::Answered, t0 + ms(31)), None);
        let (waiters, reply) = gate
            .part(1, "b", RoundPart::InBackoff, t0 + ms(40))
            .expect("the last part ends the round");
        assert_eq!(waiters, [1, 2]);
        assert_eq!(reply.outcome, Outcome::Served);
        assert_eq!(gate.deadline(), None);

        // Inside the window (counted from the round's start): at once.
        match gate.ask(3, t0 + ms(1_040), all(), deadline) {
            Asked::Now(3, reply) => {
                assert_eq!(
                    reply.outcome,
                    Outcome::RateLimited {
                        retry_in: ms(3_960)
                    }
                );
                assert_eq!(reply.age, Some(ms(1_000)));
            }
            other => panic!("{other:?}"),
        }
        // After it: a new round.
        assert_eq!(gate.ask(4, t0 + WINDOW, all(), deadline), Asked::Started(2));

        let status = gate.status(t0 + WINDOW, SystemTime::now());
        assert_eq!(
            (status.asked, status.served, status.rate_limited),
            (4, 2, 1)
        );
        assert_eq!(status.min_interval_ms, 5_000);
        assert!(status.last_round.is_some());
    }

    #[test]
    fn sources_in_backoff_make_a_round_that_fetched_nothing() {
        let t0 = Instant::now();
        let mut gate = Gate::new(WINDOW);
        let deadline = t0 + Duration::from_secs(30);
        assert_eq!(
            gate.ask((), t0, sources(&["a"]), deadline),
            Asked::Started(1)
        );
        let (_, reply) = gate.part(1, "a", RoundPart::InBackoff, t0).unwrap();
        assert_eq!(reply.outcome, Outcome::Backoff);
        // Failed fetches, and sources that never report, are "failed".
        let t1 = t0 + WINDOW;
        assert_eq!(
            gate.ask((), t1, sources(&["a", "b"]), t1 + ms(100)),
            Asked::Started(2)
        );
        assert_eq!(gate.part(2, "a", RoundPart::InBackoff, t1), None);
        let (_, reply) = gate.end(t1 + ms(100)).unwrap();
        assert_eq!(reply.outcome, Outcome::Failed);
        let t2 = t1 + WINDOW;
        assert_eq!(
            gate.ask((), t2, sources(&["a"]), t2 + ms(100)),
            Asked::Started(3)
        );
        let (_, reply) = gate.part(3, "a", RoundPart::Failed, t2).unwrap();
        assert_eq!(reply.outcome, Outcome::Failed);
        let status = gate.status(t2, SystemTime::now());
        assert_eq!((status.backoff, status.failed, status.served), (1, 2, 0));
    }

    #[test]
    fn zero_turns_it_off_and_a_reload_can_turn_it_on() {
        let t0 = Instant::now();
        let mut gate = Gate::new(Duration::ZERO);
        match gate.ask((), t0, sources(&["a"]), t0) {
            Asked::Now((), reply) => assert_eq!(reply.outcome, Outcome::Off),
            other => panic!("{other:?}"),
        }
        gate.set_min_interval(WINDOW);
        assert_eq!(gate.ask((), t0, sources(&["a"]), t0), Asked::Started(1));
        let status = gate.status(t0, SystemTime::now());
        assert_eq!((status.asked, status.off), (2, 1));
    }

    #[test]
    fn no_sources_is_answered_at_once() {
        let t0 = Instant::now();
        let mut gate = Gate::new(WINDOW);
        match gate.ask((), t0, BTreeSet::new(), t0) {
            Asked::Now((), reply) => assert_eq!(reply.outcome, Outcome::Failed),
            other => panic!("{other:?}"),
        }
        assert_eq!(gate.deadline(), None);
    }
}
