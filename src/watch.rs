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

/// An inotify instance for tokio's reactor.
struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// A change seen by a [`UserDirWatch`]: the path, and whether another writer
/// is still writing it (modified through a descriptor not yet closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) path: std::path::PathBuf,
    pub(crate) busy: bool,
}

/// Directory watches on inotify directly, added with the directory owner's
/// filesystem ids: a hardened root without `CAP_DAC_READ_SEARCH` cannot
/// watch inside a 0700 home as itself, only as the user (DESIGN.md §8). It
/// also tells an open writer's modifications (busy) from its close or
/// rename (done), so a repair can wait for the other writer to finish.
pub(crate) struct UserDirWatch {
    inotify: std::sync::Arc<tokio::io::unix::AsyncFd<InotifyFd>>,
    dirs: std::sync::Arc<
        std::sync::Mutex<
            std::collections::HashMap<nix::sys::inotify::WatchDescriptor, std::path::PathBuf>,
        >,
    >,
}

impl UserDirWatch {
    /// The watch, and the future that reads it and calls `on_change` for
    /// every change until `cancel`; spawn the future.
    pub(crate) fn new<F: Fn(Seen) + Send + 'static>(
        cancel: tokio_util::sync::CancellationToken,
        on_change: F,
    ) -> std::io::Result<(Self, impl std::future::Future<Output = ()> + Send + use<F>)> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the Inotify owns its descriptor for as long as it lives,
        // and `InotifyFd::as_raw_fd` always returns that one descriptor.
        let inotify = unsafe { tokio::io::unix::AsyncFd::register(InotifyFd(inotify)) }
            .map_err(std::io::Error::other)?;
        let inotify = std::sync::Arc::new(inotify);
        let dirs: std::sync::Arc<
            std::sync::Mutex<std::collections::HashMap<_, std::path::PathBuf>>,
        > = std::sync::Arc::default();
        let reader = {
            let inotify = inotify.clone();
            let dirs = dirs.clone();
            async move {
                loop {
                    let guard = tokio::select! {
                        _ = cancel.cancelled() => return,
                        g = inotify.readable() => g,
                    };
                    let Ok(mut guard) = guard else { return };
                    let events = match guard.get_inner().0.read_events() {
                        Ok(events) => events,
                        Err(nix::errno::Errno::EAGAIN) => {
                            guard.clear_ready();
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read directory watch events ({e}); drift is repaired at the next poll");
                            return;
                        }
                    };
                    for event in events {
                        let dir = {
                            let mut dirs = dirs.lock().unwrap_or_else(|p| p.into_inner());
                            if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                                dirs.remove(&event.wd);
                                continue;
                            }
                            dirs.get(&event.wd).cloned()
                        };
                        let Some(dir) = dir else { continue };
                        let path = match &event.name {
                            Some(name) if !name.is_empty() => dir.join(name),
                            _ => dir,
                        };
                        let busy = event
                            .mask
                            .intersects(AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE)
                            && !event.mask.contains(AddWatchFlags::IN_ISDIR);
                        on_change(Seen { path, busy });
                    }
                }
            }
        };
        Ok((UserDirWatch { inotify, dirs }, reader))
    }

    /// Watches `dir` (not recursively), as `owner` when given. False when it
    /// cannot (it may not exist yet); the caller tries again later.
    pub(crate) fn watch(
        &self,
        dir: &std::path::Path,
        owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
    ) -> bool {
        use nix::sys::inotify::AddWatchFlags as F;
        let mask = F::IN_MODIFY
            | F::IN_CLOSE_WRITE
            | F::IN_CREATE
            | F::IN_DELETE
            | F::IN_MOVED_FROM
            | F::IN_MOVED_TO
            | F::IN_ATTRIB
            | F::IN_DELETE_SELF
            | F::IN_MOVE_SELF
            | F::IN_ONLYDIR
            | F::IN_DONT_FOLLOW;
        let add = || self.inotify.get_ref().0.add_watch(dir, mask);
        let added = match owner {
            Some((uid, gid)) => crate::write::as_user(uid, gid, dir, add)
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
            None => add().map_err(|e| e.to_string()),
        };
        match added {
            Ok(wd) => {
                self.dirs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(wd, dir.to_path_buf());
                true
            }
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch directory {} yet: {e}", dir.display());
                false
            }
        }
    }
}
