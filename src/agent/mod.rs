//! The agent's tasks (DESIGN.md §2, §8) and their supervision.
//!
//! Facts flow one way: each source's fetch loop ([`fetch`]) hands the writer
//! ([`writer`]) owned, serializable [`report::Report`]s and shares nothing
//! else with it; the writer owns the [`syncer::Syncer`] (engine, state dir,
//! every file write) and publishes the status projection that the health
//! socket and systemd read. Watches ([`watch`]) and signals ([`signals`])
//! send the writer events. All tasks stop together on one
//! [`CancellationToken`] and are awaited through one [`TaskTracker`].
//! `docs/architecture.md` draws the picture.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::board::Board;
use crate::config::Settings;
use crate::source::{self, KeySource};
use crate::systemd::Notifier;

mod fetch;
mod projection;
mod reconcile;
mod refresh;
pub(crate) mod report;
mod revoke;
pub mod signals;
mod syncer;
mod watch;
mod writer;

use report::Fetched;
use syncer::Syncer;
use writer::Event;

/// How long start-up waits for the first sync before READY=1 regardless, so
/// boot never waits on a dead network (cached keys are served meanwhile).
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A started daemon: its tasks run until `cancel`.
struct Daemon {
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The status and the writer's inbox, for the in-process tests.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the in-process tests"))]
    board: Board,
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the in-process tests"))]
    events: mpsc::Sender<Event>,
}

/// Starts every task: the health socket, SIGHUP and config reloads, the
/// writer (which starts the sources), and the READY=1 deadline.
async fn start(settings: Settings, notifier: Notifier) -> anyhow::Result<Daemon> {
    let board = Board::new();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (events, events_rx) = mpsc::channel::<Event>(256);
    let (reports, reports_rx) = mpsc::channel::<report::Report>(256);
    // `POST /refresh` to the writer; a full inbox is answered 503 at once.
    let (refresh, refresh_rx) = mpsc::channel::<crate::refresh::Request>(256);

    let health = crate::health::bind(&settings.health_socket)?;
    tracker.spawn(crate::health::serve(
        health,
        board.clone(),
        refresh,
        cancel.clone(),
    ));
    crate::exporter::start(&settings, &board, &tracker, &cancel).await;
    tracker.spawn(signals::reloads(cancel.clone(), events.clone())?);
    watch::config(&settings.config_path, &tracker, cancel.clone(), {
        let events = events.clone();
        move || {
            let events = events.clone();
            async move { events.send(Event::Reload).await.is_ok() }
        }
    });

    let syncer = tokio::task::spawn_blocking({
        let settings = settings.clone();
        let board = board.clone();
        move || Syncer::new(settings, board)
    })
    .await?;
    tracker.spawn({
        let notifier = notifier.clone();
        let cancel = cancel.clone();
        let board = board.clone();
        async move {
            tokio::select! {
                // Only when the first sync did not get there first.
                _ = tokio::time::sleep(READY_TIMEOUT) => {
                    if !notifier.is_ready() {
                        tracing::warn!("first sync not done after {READY_TIMEOUT:?}; reporting ready with cached keys");
                        notifier.ready(&board.snapshot().summary);
                    }
                }
                _ = cancel.cancelled() => {}
            }
        }
    });
    let ctx = writer::Context {
        board: board.clone(),
        notifier,
        tracker: tracker.clone(),
        cancel: cancel.clone(),
        events: events.clone(),
        reports,
    };
    tracker.spawn(writer::run(ctx, syncer, reports_rx, events_rx, refresh_rx));
    let (config, sources, users) = (
        settings.config_path.display(),
        settings.sources.len(),
        settings.users.len(),
    );
    tracing::info!(%config, sources, users, "keysync started with {config}: {sources} source(s), {users} user(s)");
    Ok(Daemon {
        board,
        cancel,
        tracker,
        events,
    })
}

/// Runs the daemon until `shutdown` resolves (SIGTERM/SIGINT for `keysync
/// run`), notifying through `notifier`. Returns an error only for start-up
/// failures.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
    notifier: Notifier,
) -> anyhow::Result<()> {
    raise_open_file_limit();
    let socket = settings.health_socket.clone();
    let daemon = start(settings, notifier.clone()).await?;
    let why = tokio::select! {
        _ = shutdown => "asked to stop",
        // A task may cancel too (none does today); stop the same way.
        _ = daemon.cancel.cancelled() => "one of its tasks cancelled the agent",
    };
    notifier.stopping();
    tracing::info!("stopping: {why}");
    daemon.cancel.cancel();
    daemon.tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), daemon.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within 5 s");
    }
    crate::health::cleanup(&socket);
    Ok(())
}

/// Raises the open-file soft limit to the hard limit (DESIGN.md §8). The
/// health socket bounds its own connections, but systemd's default soft
/// limit (1024) is small for a daemon that holds sockets, watches and
/// files for many users; the hard limit (524288 under systemd) is what the
/// system grants it anyway.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(
                from = soft,
                to = hard,
                "raised the open-file soft limit from {soft} to the hard limit {hard}"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot raise the open-file soft limit from {soft} to {hard} ({e}); going on with {soft}"
            ),
        },
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit ({e}); leaving it as it is")
        }
    }
}

/// One sync pass: fetch every source once, confirm mass removals, write.
/// Returns true when every source answered and every user was written.
pub async fn run_once(settings: Settings) -> bool {
    let board = Board::new();
    let policy = settings.policy.keys.clone();
    let confirm_delay = settings.policy.confirm_delay;
    let mut syncer = Syncer::new(settings.clone(), board.clone());
    let mut sources: BTreeMap<String, Box<dyn KeySource>> = BTreeMap::new();
    let mut all_ok = true;
    for (name, src) in &settings.sources {
        match source::build(src, syncer.etag(name)) {
            Ok(s) => {
                sources.insert(name.clone(), s);
            }
            Err(e) => {
                all_ok = false;
                let error = e.chain();
                tracing::error!(source = %name, error = %error, "cannot set up source {name}: {error}");
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
                let report = fetch::fetch(name, source.as_mut(), &policy).await;
                round_ok &= !matches!(report.fetched, Fetched::Failed { .. });
                syncer.on_report(&report::Report::Fetched(report), Instant::now());
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
        tracing::info!(delay = ?confirm_delay, "confirming a mass removal with a second fetch in {confirm_delay:?}");
        tokio::time::sleep_until(at.into()).await;
        to_fetch = confirm_sources.into_iter().collect();
    }
    all_ok
}

#[cfg(test)]
mod tests {
    //! The real daemon in process, with a recording notifier: the watchdog
    //! pings come from the loop that does the work, and stop (with
    //! `/healthz`'s heartbeat) when it stalls.

    use std::sync::{Arc, Mutex};

    use super::*;

    fn is_ping(msg: &str) -> bool {
        msg.lines().any(|l| l == "WATCHDOG=1")
    }

    fn count(seen: &Arc<Mutex<Vec<String>>>, pred: impl Fn(&str) -> bool) -> usize {
        seen.lock().unwrap().iter().filter(|m| pred(m)).count()
    }

    /// Waits (on the real clock: the loop does real file I/O) until `n`
    /// messages satisfy `pred`.
    async fn wait_for(
        seen: &Arc<Mutex<Vec<String>>>,
        n: usize,
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if count(seen, &pred) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
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
        let settings =
            crate::config::from_texts(&[(config.as_path(), text.as_str())]).expect("config");

        // WATCHDOG_USEC=200000: a ping every 100 ms.
        let (notifier, seen) = Notifier::recording(Some(Duration::from_millis(200)));
        assert_eq!(
            notifier.watchdog_interval(),
            Some(Duration::from_millis(100))
        );
        let daemon = start(settings, notifier).await.expect("start");

        // READY=1 after the first (file) fetch, then regular pings.
        assert!(
            wait_for(&seen, 1, Duration::from_secs(10), |m| m.contains("READY=1")).await,
            "no READY=1: {:?}",
            seen.lock().unwrap()
        );
        let started = tokio::time::Instant::now();
        let before = count(&seen, is_ping);
        assert!(
            wait_for(&seen, before + 5, Duration::from_secs(10), is_ping).await,
            "fewer than 5 pings: {:?}",
            seen.lock().unwrap()
        );
        let rate = 5.0 / started.elapsed().as_secs_f64();
        eprintln!("in-process watchdog pings: {rate:.1}/s (expected ~10/s)");
        assert!(daemon.board.liveness().is_ok());

        // Stall the writer for 5 s. It is idle, so it takes the event at
        // once; from 0.5 s to 3 s after sending it, no ping may arrive.
        let sent = tokio::time::Instant::now();
        daemon
            .events
            .send(Event::Stall(Duration::from_secs(5)))
            .await
            .expect("send stall");
        tokio::time::sleep_until(sent + Duration::from_millis(500)).await;
        let at_half = count(&seen, is_ping);
        tokio::time::sleep_until(sent + Duration::from_secs(3)).await;
        assert_eq!(
            count(&seen, is_ping),
            at_half,
            "pings while the writer was stalled: {:?}",
            seen.lock().unwrap()
        );
        let why = daemon
            .board
            .liveness()
            .expect_err("healthz must report the stalled writer");
        assert!(why.contains("stalled"), "{why}");
        assert!(
            daemon.board.ready().is_err(),
            "a stalled agent is not ready"
        );

        // Back to work: pings resume and the heartbeat is fresh again.
        let resumed = count(&seen, is_ping);
        assert!(
            wait_for(&seen, resumed + 3, Duration::from_secs(15), is_ping).await,
            "pings did not resume after the stall"
        );
        assert!(daemon.board.liveness().is_ok());
        assert!(daemon.board.ready().is_ok(), "{:?}", daemon.board.ready());

        daemon.cancel.cancel();
        daemon.tracker.close();
        assert!(
            tokio::time::timeout(Duration::from_secs(10), daemon.tracker.wait())
                .await
                .is_ok(),
            "the writer's tasks did not stop"
        );
    }
}
