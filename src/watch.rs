//! A thin bridge from `notify` to the agent: watch directories (not files,
//! since atomic renames replace inodes), report changed paths to a callback.
//! The callback runs on notify's thread and must only hand work off.

use std::path::Path;

use notify::{EventKind, RecursiveMode, Watcher as _};

pub(crate) struct Watcher {
    inner: notify::RecommendedWatcher,
}

impl Watcher {
    /// `on_change` gets the path of each created, modified, renamed or removed entry.
    pub(crate) fn new(on_change: impl Fn(&Path) + Send + 'static) -> notify::Result<Self> {
        let inner = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            for path in &event.paths {
                on_change(path);
            }
        })?;
        Ok(Watcher { inner })
    }

    /// Watches one directory (not recursively). False when it cannot (it may
    /// not exist yet); the caller tries again later.
    pub(crate) fn watch(&mut self, dir: &Path) -> bool {
        match self.inner.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch directory yet");
                false
            }
        }
    }
}
