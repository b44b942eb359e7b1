//! The agent's directory watches (DESIGN.md §4, §5, §7): the config
//! directory (reload), a file source's directory (re-read) and the
//! directories of the users' files (drift repair). All three share one
//! trailing-edge debouncer: a key is delivered once its burst of changes has
//! been quiet for `quiet`, and at the latest `max_wait` after the burst's
//! first change, so the last change of a burst (the rename that completes
//! another writer's replacement) is never dropped and a file rewritten
//! without pause is still handled within a second.
//!
//! notify's callbacks run on its own thread and only hand paths off over a
//! channel; a missed event is harmless because polling stays the truth.

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
use crate::watch::Watcher;

/// How long a burst must be quiet, and the longest it is waited for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) quiet: Duration,
    pub(crate) max_wait: Duration,
}

/// An editor's burst of writes to the config.
const CONFIG: Timing = Timing {
    quiet: Duration::from_millis(200),
    max_wait: Duration::from_secs(1),
};

/// A key file: an editor or `echo >` truncates first and writes after, and a
/// read in between would take the half-written file for the list (and
/// revoke keys until the next read).
const KEY_FILE: Timing = Timing {
    quiet: Duration::from_millis(50),
    max_wait: Duration::from_millis(300),
};

/// A user's file: the repair then sees another writer's finished file, not
/// its first half.
const DRIFT: Timing = Timing {
    quiet: Duration::from_millis(100),
    max_wait: Duration::from_millis(500),
};

/// Delivers each key of `changes` once its burst is over (see the module
/// docs). Stops when cancelled, when `changes` closes, or when `deliver`
/// answers false.
pub(crate) async fn debounce<K, F, Fut>(
    mut changes: mpsc::UnboundedReceiver<K>,
    timing: Timing,
    cancel: CancellationToken,
    mut deliver: F,
) where
    K: Eq + Hash + Clone,
    F: FnMut(K) -> Fut,
    Fut: Future<Output = bool>,
{
    // key -> (first change of the burst, when to deliver)
    let mut due: HashMap<K, (Instant, Instant)> = HashMap::new();
    loop {
        let next = due.values().map(|(_, at)| *at).min();
        tokio::select! {
            _ = cancel.cancelled() => return,
            got = changes.recv() => {
                let Some(key) = got else { return };
                let now = Instant::now();
                let (first, at) = due.entry(key).or_insert((now, now));
                *at = (now + timing.quiet).min(*first + timing.max_wait);
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                let ripe: Vec<K> = due.iter().filter(|(_, (_, at))| *at <= now).map(|(k, _)| k.clone()).collect();
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
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let watcher = Watcher::new({
        let dropins = dropins.clone();
        move |path: &Path| {
            let relevant = path.starts_with(&dropins)
                || path.file_name().map(|n| n.to_os_string()) == main_name
                || path.file_name().is_some_and(|n| n == "config.d");
            if relevant {
                let _ = tx.send(());
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
    let (changed, changes) = mpsc::unbounded_channel::<()>();
    let watcher = Watcher::new(move |path: &Path| {
        if path == target {
            let _ = changed.send(());
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

/// Watches the directories of the users' files and turns changes to those
/// files into drift repairs of the users concerned. The agent's own writes
/// show up too; they find the file already right and write nothing, so no
/// loop starts.
pub(crate) struct DriftWatch {
    /// A user's file, and the directory holding it (for the directory itself
    /// being removed or moved), to the users concerned.
    targets: Arc<Mutex<HashMap<PathBuf, Vec<String>>>>,
    watcher: Option<Watcher>,
}

impl DriftWatch {
    pub(crate) fn new<F, Fut>(tracker: &TaskTracker, cancel: CancellationToken, repair: F) -> Self
    where
        F: FnMut(String) -> Fut + Send + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let targets: Arc<Mutex<HashMap<PathBuf, Vec<String>>>> = Arc::default();
        let lookup = targets.clone();
        let (changed, changes) = mpsc::unbounded_channel::<String>();
        let watcher = Watcher::new(move |path: &Path| {
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
                tracing::warn!(error = %e, "no directory watch ({e}); drift is repaired at the next poll");
                None
            }
        };
        tracker.spawn(debounce(changes, DRIFT, cancel, repair));
        DriftWatch { targets, watcher }
    }

    /// Follows the users' current files.
    pub(crate) fn update(&mut self, files: Vec<(PathBuf, String)>) {
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

#[cfg(test)]
mod tests {
    //! The debouncer on tokio's paused clock: exact times, no waiting.

    use super::*;

    const T: Timing = Timing {
        quiet: Duration::from_millis(100),
        max_wait: Duration::from_millis(500),
    };

    /// Runs the debouncer over `changes` (key, at ms) and returns what was
    /// delivered, with the time in ms since the start.
    async fn run(changes: &[(&'static str, u64)]) -> Vec<(&'static str, u64)> {
        let start = Instant::now();
        let (tx, rx) = mpsc::unbounded_channel();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(debounce(rx, T, cancel.clone(), move |k| {
            let _ = out_tx.send((k, start.elapsed().as_millis() as u64));
            async { true }
        }));
        for (key, at) in changes {
            tokio::time::sleep_until(start + Duration::from_millis(*at)).await;
            tx.send(*key).unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
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
}
