//! The agent's directory watches (DESIGN.md §4, §5, §7): the config
//! directory (reload), a file source's directory (re-read) and the
//! directories of the users' files (drift repair). All three share one
//! trailing-edge debouncer: a key is delivered once its burst of changes has
//! been quiet for `quiet`, and at the latest `max_wait` after the burst's
//! first change, so the last change of a burst (the rename that completes
//! another writer's replacement) is never dropped and a file rewritten
//! without pause is still handled within a second.
//!
//! A change may also say that another writer is still busy with a file (it
//! modified it through a descriptor it has not closed): then nothing is
//! delivered until that writer closes or renames the file (or `busy_cap`
//! passes), so a drift repair never renames over a file being written.
//!
//! Watch callbacks only hand paths off over a channel; a missed event is
//! harmless because polling stays the truth.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config;
use nix::unistd::{Gid, Uid};

use crate::watch::{Seen, UserDirWatch, Watcher};

/// How long a burst must be quiet, and the longest it is waited for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) quiet: Duration,
    pub(crate) max_wait: Duration,
    /// The longest a writer that keeps a file open is waited for.
    pub(crate) busy_cap: Duration,
}

/// An editor's burst of writes to the config.
const CONFIG: Timing = Timing {
    quiet: Duration::from_millis(200),
    max_wait: Duration::from_secs(1),
    busy_cap: Duration::from_secs(1),
};

/// A key file: an editor or `echo >` truncates first and writes after, and a
/// read in between would take the half-written file for the list (and
/// revoke keys until the next read).
const KEY_FILE: Timing = Timing {
    quiet: Duration::from_millis(50),
    max_wait: Duration::from_millis(300),
    busy_cap: Duration::from_millis(300),
};

/// A user's file: the repair then sees another writer's finished file, not
/// its first half.
const DRIFT: Timing = Timing {
    quiet: Duration::from_millis(100),
    max_wait: Duration::from_millis(500),
    busy_cap: Duration::from_secs(30),
};

/// Delivers each key of `changes` once its burst is over (see the module
/// docs). Stops when cancelled, when `changes` closes, or when `deliver`
/// answers false.
pub(crate) async fn debounce<K, F, Fut>(
    mut changes: mpsc::UnboundedReceiver<(K, bool)>,
    timing: Timing,
    cancel: CancellationToken,
    mut deliver: F,
) where
    K: Eq + Hash + Clone,
    F: FnMut(K) -> Fut,
    Fut: Future<Output = bool>,
{
    // key -> (first change of the burst, when to deliver, a writer is busy)
    let mut due: HashMap<K, (Instant, Instant, bool)> = HashMap::new();
    loop {
        let next = due.values().map(|(_, at, _)| *at).min();
        tokio::select! {
            _ = cancel.cancelled() => return,
            got = changes.recv() => {
                let Some((key, busy)) = got else { return };
                let now = Instant::now();
                let (first, at, was_busy) = due.entry(key).or_insert((now, now, false));
                if busy {
                    // Wait for the close (or rename), but not forever.
                    *at = *first + timing.busy_cap;
                } else if *was_busy {
                    // The other writer is done: a fresh, short burst.
                    *first = now;
                    *at = now + timing.quiet;
                } else {
                    *at = (now + timing.quiet).min(*first + timing.max_wait);
                }
                *was_busy = busy;
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                let ripe: Vec<K> = due.iter().filter(|(_, (_, at, _))| *at <= now).map(|(k, _)| k.clone()).collect();
                for key in ripe {
                    due.remove(&key);
                    if !deliver(key).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Watches the config directory (the main file and `config.d/`, which may
/// appear later) and calls for a reload on changes.
pub(crate) fn config<F, Fut>(
    main: &Path,
    tracker: &TaskTracker,
    cancel: CancellationToken,
    mut reload: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let dir = main.parent().unwrap_or(Path::new(".")).to_path_buf();
    let dropins = config::dropin_dir(main);
    let main_name = main.file_name().map(|n| n.to_os_string());
    let (tx, rx) = mpsc::unbounded_channel::<((), bool)>();
    let watcher = Watcher::new({
        let dropins = dropins.clone();
        move |path: &Path| {
            let relevant = path.starts_with(&dropins)
                || path.file_name().map(|n| n.to_os_string()) == main_name
                || path.file_name().is_some_and(|n| n == "config.d");
            if relevant {
                let _ = tx.send(((), false));
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config directory ({e}); reload with SIGHUP");
            return;
        }
    };
    watcher.watch(&dir);
    watcher.watch(&dropins);
    tracker.spawn(debounce(rx, CONFIG, cancel, move |()| {
        // config.d/ may have been made since the last look.
        watcher.watch(&dropins);
        reload()
    }));
}

/// A file source is re-read as soon as its directory watch sees the file
/// change (written, replaced by a rename, created or removed).
pub(crate) fn key_file(
    path: &Path,
    nudge: mpsc::Sender<()>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let target = path.to_path_buf();
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let (changed, changes) = mpsc::unbounded_channel::<((), bool)>();
    let watcher = Watcher::new(move |path: &Path| {
        if path == target {
            let _ = changed.send(((), false));
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the key file ({e}); it is re-read at each poll");
            return;
        }
    };
    if !watcher.watch(&dir) {
        tracing::warn!(dir = %dir.display(), "cannot watch the key file's directory {}; the file is re-read at each poll", dir.display());
    }
    tracker.spawn(debounce(changes, KEY_FILE, cancel, move |()| {
        // Owned by the task: the watch lives as long as the source.
        let _ = &watcher;
        // A full channel means a fetch is already due, which reads the file.
        let _ = nudge.try_send(());
        async { true }
    }));
}

/// Watches the directories of the users' files, each as its owner, and
/// turns changes to those files into drift repairs of the users concerned.
/// The agent's own writes show up too; they find the file already right and
/// write nothing, so no loop starts.
pub(crate) struct DriftWatch {
    /// A user's file, and the directory holding it (for the directory itself
    /// being removed or moved), to the users concerned.
    targets: Arc<Mutex<HashMap<PathBuf, Vec<String>>>>,
    watch: Option<UserDirWatch>,
}

/// A file to watch for drift: its path, its user, and the ids to watch as.
pub(crate) type DriftTarget = (PathBuf, String, Option<(Uid, Gid)>);

impl DriftWatch {
    pub(crate) fn new<F, Fut>(tracker: &TaskTracker, cancel: CancellationToken, repair: F) -> Self
    where
        F: FnMut(String) -> Fut + Send + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let targets: Arc<Mutex<HashMap<PathBuf, Vec<String>>>> = Arc::default();
        let lookup = targets.clone();
        let (changed, changes) = mpsc::unbounded_channel::<(String, bool)>();
        let watch = UserDirWatch::new(cancel.clone(), move |seen: Seen| {
            let users = lookup
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&seen.path)
                .cloned();
            for user in users.into_iter().flatten() {
                let _ = changed.send((user, seen.busy));
            }
        });
        let watch = match watch {
            Ok((watch, reader)) => {
                tracker.spawn(reader);
                Some(watch)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no directory watch ({e}); drift is repaired at the next poll");
                None
            }
        };
        tracker.spawn(debounce(changes, DRIFT, cancel, repair));
        DriftWatch { targets, watch }
    }

    /// Follows the users' current files.
    pub(crate) fn update(&mut self, files: Vec<DriftTarget>) {
        let Some(watch) = self.watch.as_ref() else {
            return;
        };
        // Watching again is cheap, and catches a directory that was removed
        // and made anew (a new inode) since the last update. One that does
        // not exist yet is watched after the write that creates it.
        for (file, user, owner) in &files {
            if let Some(dir) = file.parent()
                && !watch.watch(dir, *owner)
                && dir.exists()
            {
                tracing::warn!(user = %user, dir = %dir.display(), "cannot watch {} for user {user}; drift there is repaired at the next poll", dir.display());
            }
        }
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.clear();
        for (file, user, _) in files {
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

#[cfg(test)]
mod tests {
    //! The debouncer on tokio's paused clock: exact times, no waiting.

    use super::*;

    const T: Timing = Timing {
        quiet: Duration::from_millis(100),
        max_wait: Duration::from_millis(500),
        busy_cap: Duration::from_secs(10),
    };

    /// Runs the debouncer over `changes` (key, at ms) and returns what was
    /// delivered, with the time in ms since the start.
    async fn run(changes: &[(&'static str, u64)]) -> Vec<(&'static str, u64)> {
        let changes: Vec<_> = changes.iter().map(|(k, at)| (*k, *at, false)).collect();
        run_busy(&changes).await
    }

    /// Like [`run`], with (key, at ms, the writer is busy).
    async fn run_busy(changes: &[(&'static str, u64, bool)]) -> Vec<(&'static str, u64)> {
        let start = Instant::now();
        let (tx, rx) = mpsc::unbounded_channel();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(debounce(rx, T, cancel.clone(), move |k| {
            let _ = out_tx.send((k, start.elapsed().as_millis() as u64));
            async { true }
        }));
        for (key, at, busy) in changes {
            tokio::time::sleep_until(start + Duration::from_millis(*at)).await;
            tx.send((*key, *busy)).unwrap();
        }
        tokio::time::sleep(Duration::from_secs(20)).await;
        cancel.cancel();
        task.await.unwrap();
        let mut out = Vec::new();
        while let Ok(x) = out_rx.try_recv() {
            out.push(x);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_delivered_once_after_it_went_quiet() {
        let got = run(&[("a", 0), ("a", 50), ("a", 120)]).await;
        assert_eq!(got, [("a", 220)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_burst_is_delivered_at_the_latest_after_max_wait() {
        let changes: Vec<(&str, u64)> = (0..20).map(|i| ("a", i * 60)).collect();
        let got = run(&changes).await;
        // 0..1140 ms of changes every 60 ms: delivered at 500, then the next
        // burst (from 540) at 1040, then 1140 + 100 after the last one.
        assert_eq!(got, [("a", 500), ("a", 1040), ("a", 1240)]);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_debounced_apart() {
        let got = run(&[("a", 0), ("b", 30), ("a", 60)]).await;
        assert_eq!(got, [("b", 130), ("a", 160)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_writer_is_waited_for_until_it_closes() {
        // A slow writer modifies the file for 3 s through one descriptor,
        // then closes it: nothing before the close, one delivery after.
        let mut changes: Vec<(&str, u64, bool)> = (0..30).map(|i| ("a", i * 100, true)).collect();
        changes.push(("a", 3_000, false));
        assert_eq!(run_busy(&changes).await, [("a", 3_100)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_never_closes_is_waited_for_at_most_busy_cap() {
        assert_eq!(run_busy(&[("a", 0, true)]).await, [("a", 10_000)]);
    }
}
