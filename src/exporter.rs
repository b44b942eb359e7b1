//! The metrics out of the process (DESIGN.md §8): Prometheus cannot scrape
//! a Unix socket, so the text of `/metrics` is also
//!
//! - written to `metrics_textfile` for node_exporter's textfile collector:
//!   atomically (a dotfile in the same directory, renamed over the target;
//!   the collector reads only `*.prom`, so it never sees a half-written
//!   file), at each change of the status (at most once a second) and at
//!   least every 60 s, so the file's mtime shows the agent is alive;
//! - served on `metrics_listen`: plain HTTP, `GET /metrics` only, anything
//!   else 404, with the health socket's bounds on connections.
//!
//! Both are read at start; both are off by default. A failure here is
//! logged and never stops the agent: keys matter more than metrics.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::board::Board;
use crate::config::Settings;

/// The textfile is rewritten at least this often.
const REWRITE_EVERY: Duration = Duration::from_secs(60);
/// And at most this often, however fast the status changes.
const AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Starts the exporters the settings ask for.
pub(crate) async fn start(
    settings: &Settings,
    board: &Board,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    if let Some(path) = &settings.metrics_textfile {
        tracker.spawn(textfile(path.clone(), board.clone(), cancel.clone()));
    }
    if let Some(addr) = settings.metrics_listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(%addr, "serving /metrics on http://{addr}");
                tracker.spawn(crate::health::serve::serve(
                    listener,
                    router(board.clone()),
                    "metrics listener",
                    cancel.clone(),
                ));
            }
            Err(e) => tracing::error!(
                %addr,
                error = %e,
                "cannot listen on metrics_listen {addr} ({e}); the metrics stay on the health socket, and the agent goes on"
            ),
        }
    }
}

/// `GET /metrics`, and 404 for everything else (other paths and methods).
fn router(board: Board) -> Router {
    let not_found = || async { (StatusCode::NOT_FOUND, "not found: only GET /metrics\n") };
    Router::new()
        .route(
            "/metrics",
            get(move |headers: HeaderMap| async move { crate::health::metrics(&board, &headers) })
                .fallback(not_found),
        )
        .fallback(not_found)
}

/// Keeps `path` holding the metrics until cancelled.
async fn textfile(path: PathBuf, board: Board, cancel: CancellationToken) {
    let mut changes = board.subscribe();
    let mut failing: Option<String> = None;
    loop {
        let text = board.metrics_text(false);
        let result = tokio::task::spawn_blocking({
            let path = path.clone();
            move || write_atomically(&path, text.as_bytes())
        })
        .await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        // One line when it starts failing (or fails differently), one when
        // it recovers: not one a second.
        match (&error, &failing) {
            (Some(e), last) if last.as_ref() != Some(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot write metrics_textfile {} ({e}); node_exporter shows the previous metrics until a write succeeds",
                path.display()
            ),
            (None, Some(_)) => {
                tracing::info!(path = %path.display(), "metrics_textfile {} written again", path.display());
            }
            _ => {}
        }
        failing = error;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(AT_MOST_EVERY) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(REWRITE_EVERY - AT_MOST_EVERY) => {}
        }
    }
}

/// Writes `bytes` to `path` by a rename over it: a temporary dotfile in the
/// same directory (not `*.prom`, so node_exporter ignores it), mode 0644
/// (node_exporter runs as its own user), created exclusively and without
/// following a link.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.keysync.{}.tmp", std::process::id()));
    // A leftover of a crash has this very name: out of the way first.
    let _ = std::fs::remove_file(&temp);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&temp)?;
        file.write_all(bytes)?;
        // The umask may have taken bits the collector's user needs.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        file.sync_data()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_textfile_is_replaced_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keysync.prom");
        write_atomically(&path, b"a 1\n").unwrap();
        write_atomically(&path, b"a 2\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a 2\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        // Nothing left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["keysync.prom"]);
        // A missing directory is an error, not a panic.
        assert!(write_atomically(&dir.path().join("nope/k.prom"), b"").is_err());
    }
}
