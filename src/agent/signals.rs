//! Signals (DESIGN.md §8): SIGTERM and SIGINT stop the agent ([`shutdown`],
//! the future `keysync run` hands [`super::run`]), SIGHUP asks the writer for
//! a reload ([`reloads`]). Each stream is made once, at start.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::writer::Event;

/// Resolves at the first SIGTERM or SIGINT.
pub fn shutdown() -> std::io::Result<impl Future<Output = ()> + Send + use<>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
}

/// The task that turns SIGHUP into reload events until cancelled.
pub(crate) fn reloads(
    cancel: CancellationToken,
    events: mpsc::Sender<Event>,
) -> std::io::Result<impl Future<Output = ()> + use<>> {
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading config");
                    let _ = events.send(Event::Reload).await;
                }
                _ = cancel.cancelled() => return,
            }
        }
    })
}
