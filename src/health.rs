//! The health socket (DESIGN.md §8): HTTP/1.1 on a Unix socket, mode 0660,
//! group `keysync` when it exists. `/healthz`, `/readyz`, `/status` (JSON),
//! `/metrics` (Prometheus text) and `POST /refresh` (src/refresh.rs). `/healthz` reports on the writer loop's
//! heartbeat (the loop that does the work), so a hung agent answers 503
//! although this server still runs. Nothing it serves holds a secret: the
//! status carries no API key and URLs are not part of it.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::board::Board;
use crate::refresh::Requests;

pub(crate) mod serve;

#[derive(Debug, thiserror::Error)]
pub(crate) enum HealthError {
    #[error("cannot create the directory of health socket {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("health socket {path}: something that is not a socket is in the way")]
    InTheWay { path: String },
    #[error("cannot bind health socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket, replacing a stale one left by a crash. A live agent
/// already listening there is not displaced.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, HealthError> {
    let shown = path.display().to_string();
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|source| HealthError::Dir {
            path: shown.clone(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(HealthError::Bind {
                    path: shown,
                    source: std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another agent is listening there",
                    ),
                });
            }
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => return Err(HealthError::InTheWay { path: shown }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| HealthError::Bind {
        path: shown.clone(),
        source,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    if nix::unistd::geteuid().is_root()
        && let Ok(Some(group)) = nix::unistd::Group::from_name(crate::state::GROUP)
        && let Err(e) = nix::unistd::chown(path, None, Some(group.gid))
    {
        tracing::warn!(path = %shown, error = %e, "cannot give the health socket {shown} to group keysync ({e}); the hook, running as user keysync, cannot ask for a refresh");
    }
    Ok(listener)
}

/// Removes the socket at shutdown.
pub(crate) fn cleanup(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// The routes, over the shared status; `POST /refresh` asks the writer.
pub(crate) fn router(shared: Board, refresh: Requests) -> Router {
    Router::new()
        .route(
            "/refresh",
            post(move || crate::refresh::handle(refresh.clone())),
        )
        .route(
            "/healthz",
            get({
                let shared = shared.clone();
                move || async move {
                    match shared.liveness() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("unhealthy: {why}\n"),
                        ),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get({
                let shared = shared.clone();
                move || async move {
                    match shared.ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        )
        .route(
            "/status",
            get({
                let shared = shared.clone();
                move || async move { axum::Json(shared.snapshot()) }
            }),
        )
        .route(
            "/metrics",
            get(move |headers: HeaderMap| async move { metrics(&shared, &headers) }),
        )
}

/// OpenMetrics for a scraper that asks for it (Prometheus does), the classic
/// Prometheus text format otherwise.
pub(crate) fn metrics(shared: &Board, headers: &HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    (
        [(header::CONTENT_TYPE, content_type)],
        shared.metrics_text(openmetrics),
    )
        .into_response()
}

/// Serves until cancelled, within the bounds of [`serve::serve`].
pub(crate) async fn serve(
    listener: UnixListener,
    shared: Board,
    refresh: Requests,
    cancel: CancellationToken,
) {
    serve::serve(listener, router(shared, refresh), "health socket", cancel).await;
}
