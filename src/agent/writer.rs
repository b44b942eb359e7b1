//! The writer task (DESIGN.md §2, §8): it owns the [`Syncer`] and with it
//! every file write, takes [`Report`]s from the fetch loops and [`Event`]s
//! from the watches and signals, and after each one publishes the status
//! projection, keeps `STATUS=` current and beats the heartbeat that
//! `/healthz` and systemd's watchdog follow. It also starts (and, on a
//! reload, restarts) the per-source tasks.
//!
//! It also runs the login-triggered refresh (DESIGN.md §3): a request from
//! `POST /refresh` starts a round (or joins the one in flight, or is
//! answered at once, see [`Gate`]); the round bumps a number that every
//! fetch loop watches, and each loop reports its part through a
//! [`Report`] after its fetch's own report, so the requests are answered
//! once the writes for the answers are done.
//!
//! The syncer's file I/O blocks; it runs in `block_in_place`, so this loop
//! is the one that does the work: when a write hangs, the beats stop.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fetch::{self, Inputs};
use super::refresh::{Asked, Gate};
use super::report::Report;
use super::syncer::{SyncOutcome, Syncer};
use super::watch::{self as watches, DriftWatch};
use crate::board::{Board, DEFAULT_HEARTBEAT};
use crate::config::{self, SourceKind};
use crate::metrics::RefreshLabels;
use crate::refresh::{self as login_refresh, Reply};
use crate::source::subscribe;
use crate::systemd::Notifier;

/// Messages to the writer besides reports.
#[derive(Debug)]
pub(crate) enum Event {
    /// A watched directory changed: re-assert this user's file.
    Drift(String),
    /// SIGHUP or a config file change.
    Reload,
    /// Test hook: the writer makes no progress for this long, as when it is
    /// stuck in a write; shows that the watchdog and `/healthz` notice.
    #[cfg(test)]
    Stall(Duration),
}

/// A running source's controls.
struct SourceTask {
    nudge: mpsc::Sender<()>,
    cancel: CancellationToken,
}

/// What the writer needs of the daemon around it.
pub(crate) struct Context {
    pub(crate) board: Board,
    pub(crate) notifier: Notifier,
    pub(crate) tracker: TaskTracker,
    pub(crate) cancel: CancellationToken,
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) reports: mpsc::Sender<Report>,
}

struct Writer {
    ctx: Context,
    syncer: Syncer,
    sources: HashMap<String, SourceTask>,
    drift: DriftWatch,
    /// Sources whose first answer (or failure) has not come yet: READY=1 waits.
    pending_first: HashSet<String>,
    last_status: String,
    /// Login-triggered refresh: the rate limit and the round in flight.
    refresh: Gate<oneshot::Sender<Reply>>,
    /// The latest refresh round's number, watched by every fetch loop.
    rounds: watch::Sender<u64>,
}

/// Runs the writer until cancelled.
pub(crate) async fn run(
    ctx: Context,
    syncer: Syncer,
    mut reports: mpsc::Receiver<Report>,
    mut events: mpsc::Receiver<Event>,
    mut refresh_requests: mpsc::Receiver<login_refresh::Request>,
) {
    let drift = DriftWatch::new(&ctx.tracker, ctx.cancel.clone(), {
        let events = ctx.events.clone();
        move |user| {
            let events = events.clone();
            async move { events.send(Event::Drift(user)).await.is_ok() }
        }
    });
    let mut w = Writer {
        refresh: Gate::new(syncer.settings().refresh_min_interval),
        rounds: watch::Sender::new(0),
        pending_first: syncer.settings().sources.keys().cloned().collect(),
        syncer,
        sources: HashMap::new(),
        drift,
        ctx,
        last_status: String::new(),
    };
    w.spawn_sources();
    w.drift.update(w.syncer.watched_files());
    w.publish();

    let watchdog_every = w.ctx.notifier.watchdog_interval();
    let beat_every = watchdog_every.unwrap_or(DEFAULT_HEARTBEAT);
    let mut beat = tokio::time::interval(beat_every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // max_stale is checked periodically; without it this tick only refreshes STATUS=.
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut started = false;
    loop {
        let outcomes = tokio::select! {
            _ = w.ctx.cancel.cancelled() => break,
            _ = beat.tick() => {
                w.ctx.board.beat(beat_every);
                if watchdog_every.is_some() {
                    w.ctx.notifier.watchdog();
                }
                continue;
            }
            _ = tick.tick() => {
                // Periodic: staleness (fail closed) needs no fetch to act.
                // The first tick fires at once: it writes the persisted last
                // good keys, so a start with the API down serves them.
                if !std::mem::replace(&mut started, true) || w.syncer.has_max_stale() {
                    let now = Instant::now();
                    tokio::task::block_in_place(|| w.syncer.sync_all(now))
                } else {
                    Vec::new()
                }
            }
            report = reports.recv() => match report {
                Some(report) => w.on_report(report),
                None => break,
            },
            event = events.recv() => match event {
                Some(event) => w.on_event(event).await,
                None => break,
            },
            Some(request) = refresh_requests.recv() => {
                w.on_refresh_request(request);
                Vec::new()
            }
            _ = until(w.refresh.deadline()) => {
                w.end_round("its deadline passed before every source reported");
                Vec::new()
            }
        };
        w.after(&outcomes);
    }
    for (_, task) in w.sources.drain() {
        task.cancel.cancel();
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Writer {
    fn on_report(&mut self, report: Report) -> Vec<(String, SyncOutcome)> {
        if let Report::Fetched(fetch) = &report {
            self.pending_first.remove(&fetch.source);
        }
        if let Report::Refresh {
            source,
            round,
            part,
        } = &report
        {
            // The source's answer (if any) was written when its own report came.
            if let Some((waiters, reply)) = self.refresh.part(*round, source, *part, Instant::now())
            {
                self.answer_round(*round, waiters, reply);
            }
            return Vec::new();
        }
        let now = Instant::now();
        tokio::task::block_in_place(|| {
            let users = self.syncer.on_report(&report, now);
            users
                .into_iter()
                .map(|u| {
                    let o = self.syncer.sync_user(&u, now);
                    (u, o)
                })
                .collect()
        })
    }

    async fn on_event(&mut self, event: Event) -> Vec<(String, SyncOutcome)> {
        let now = Instant::now();
        match event {
            #[cfg(test)]
            Event::Stall(how_long) => {
                tokio::time::sleep(how_long).await;
                Vec::new()
            }
            Event::Drift(user) => tokio::task::block_in_place(|| {
                let o = self.syncer.sync_user(&user, now);
                if o.wrote_home {
                    tracing::info!(user = %user, "another writer changed the file of user {user}; managed block re-asserted");
                    self.syncer.count_drift_repair(&user);
                }
                vec![(user, o)]
            }),
            Event::Reload => {
                let path = self.syncer.settings().config_path.clone();
                match tokio::task::block_in_place(|| config::load(&path)) {
                    Ok(new) => {
                        // The sources of the round in flight stop here.
                        self.end_round("the config was reloaded");
                        self.refresh.set_min_interval(new.refresh_min_interval);
                        for (_, task) in self.sources.drain() {
                            task.cancel.cancel();
                        }
                        let (sources, users) = (new.sources.len(), new.users.len());
                        let outcomes = tokio::task::block_in_place(|| {
                            self.syncer.reconfigure(new);
                            self.syncer.sync_all(now)
                        });
                        self.spawn_sources();
                        self.drift.update(self.syncer.watched_files());
                        tracing::info!(
                            config = %path.display(),
                            "config reloaded from {}: {sources} source(s), {users} user(s)",
                            path.display()
                        );
                        outcomes
                    }
                    Err(e) => {
                        let message = e.to_string();
                        tracing::error!(error = %message, "config reload failed ({message}); the running config stays");
                        self.syncer.reload_failed(message);
                        Vec::new()
                    }
                }
            }
        }
    }

    /// After every event: confirmations, the drift watch, status, READY=1.
    fn after(&mut self, outcomes: &[(String, SyncOutcome)]) {
        for (_, outcome) in outcomes {
            if let Some((at, srcs)) = &outcome.confirm {
                for name in srcs {
                    if let Some(task) = self.sources.get(name) {
                        let nudge = task.nudge.clone();
                        let at = *at;
                        let cancel = task.cancel.clone();
                        self.ctx.tracker.spawn(async move {
                            tokio::select! {
                                _ = tokio::time::sleep_until(at.into()) => { let _ = nudge.try_send(()); }
                                _ = cancel.cancelled() => {}
                            }
                        });
                    }
                }
            }
        }
        if outcomes.iter().any(|(_, o)| o.wrote_home) {
            self.drift.update(self.syncer.watched_files());
        }
        self.publish();
    }

    /// A `POST /refresh`: answered at once, or queued on a round.
    fn on_refresh_request(&mut self, request: login_refresh::Request) {
        let now = Instant::now();
        let settings = self.syncer.settings();
        let sources = self.sources.keys().cloned().collect();
        // A round gives up on a source that has not reported by the time its
        // fetch must have timed out (a reload stops the round sooner).
        let slowest = settings
            .sources
            .values()
            .map(|s| s.timeout)
            .max()
            .unwrap_or_default();
        let deadline = now + slowest + Duration::from_secs(5);
        match self.refresh.ask(request.reply, now, sources, deadline) {
            Asked::Now(waiter, reply) => {
                tracing::debug!(
                    result = reply.outcome.label(),
                    "refresh request answered at once: {:?}",
                    reply.outcome
                );
                self.answer(vec![waiter], reply);
            }
            Asked::Joined => {}
            Asked::Started(round) => {
                tracing::info!(
                    round,
                    "refresh asked for on the health socket (a login offered a key not in the cache); fetching every source now, refresh round {round}"
                );
                self.rounds.send_replace(round);
            }
        }
        self.publish();
    }

    /// Ends the refresh round in flight before every source reported.
    fn end_round(&mut self, why: &str) {
        let round = self.rounds.borrow().to_owned();
        if let Some((waiters, reply)) = self.refresh.end(Instant::now()) {
            tracing::warn!(round, "refresh round {round} ended because {why}");
            self.answer_round(round, waiters, reply);
        }
    }

    fn answer_round(&mut self, round: u64, waiters: Vec<oneshot::Sender<Reply>>, reply: Reply) {
        tracing::info!(
            round,
            result = reply.outcome.label(),
            requests = waiters.len(),
            "refresh round {round} done ({}); answering {} waiting request(s)",
            reply.outcome.label(),
            waiters.len()
        );
        self.answer(waiters, reply);
    }

    /// Sends `reply` to each waiter (one that gave up meanwhile is skipped)
    /// and counts them.
    fn answer(&self, waiters: Vec<oneshot::Sender<Reply>>, reply: Reply) {
        let n = u64::try_from(waiters.len()).unwrap_or(u64::MAX);
        self.ctx
            .board
            .metrics
            .refresh_total
            .get_or_create(&RefreshLabels {
                result: reply.outcome.label().to_string(),
            })
            .inc_by(n);
        for waiter in waiters {
            let _ = waiter.send(reply);
        }
    }

    /// Publishes the status projection; READY=1 once every source answered.
    fn publish(&mut self) {
        // The syncer also publishes after each write; the refresh counts
        // are the writer's, kept by the board across those publications.
        self.ctx
            .board
            .publish_refresh(self.refresh.status(Instant::now(), SystemTime::now()));
        self.syncer.publish();
        let summary = self.ctx.board.snapshot().summary;
        if self.pending_first.is_empty() {
            self.ctx.notifier.ready(&summary);
        }
        if summary != self.last_status {
            self.ctx.notifier.status(&summary);
            self.last_status = summary;
        }
    }

    /// Starts each configured source's tasks: the fetch loop, and its
    /// subscription or key-file watch.
    fn spawn_sources(&mut self) {
        let settings = self.syncer.settings();
        let ctx = &self.ctx;
        for (name, src) in &settings.sources {
            let (nudge, nudge_rx) = mpsc::channel(1);
            let cancel = ctx.cancel.child_token();
            // Whether the subscription stream is up. Without a subscription the
            // sender is dropped here and the fetch loop simply polls.
            let (stream_tx, stream_rx) = watch::channel(false);
            // The stream's latest event id, for the fetches (DESIGN.md §5).
            let (event_tx, event_rx) = watch::channel(None);
            if src.subscribe_url.is_some() {
                ctx.tracker.spawn(subscribe::run(
                    src.clone(),
                    nudge.clone(),
                    stream_tx,
                    event_tx,
                    cancel.clone(),
                ));
            }
            if let SourceKind::File { path } = &src.kind {
                watches::key_file(path, nudge.clone(), &ctx.tracker, cancel.clone());
            }
            let inputs = Inputs {
                etag: self.syncer.etag(name),
                nudge: nudge_rx,
                stream: stream_rx,
                refresh: self.rounds.subscribe(),
                event_id: event_rx,
            };
            ctx.tracker.spawn(fetch::source_loop(
                src.clone(),
                settings.policy.keys.clone(),
                inputs,
                ctx.reports.clone(),
                cancel.clone(),
            ));
            self.sources
                .insert(name.clone(), SourceTask { nudge, cancel });
        }
    }
}
