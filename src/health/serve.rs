//! The bounded HTTP/1.1 server under the health socket and `metrics_listen`
//! (DESIGN.md §8): no client can exhaust the agent's file descriptors,
//! stall its sync, or keep `/healthz` from answering a new client.
//!
//! - At most [`MAX_CONNECTIONS`] connections are served at once. One over
//!   the bound is accepted and closed at once, so the listen backlog never
//!   queues a fresh client behind idle ones and no descriptor stays taken.
//! - A connection has [`REQUEST_DEADLINE`] from its accept to send a whole
//!   request (head and body); then it is closed.
//! - One request per connection (no keep-alive: every client of this socket
//!   asks one thing), and its answer is abandoned after [`ANSWER_DEADLINE`],
//!   so not even a stuck handler holds a slot for good.
//!
//! `axum::serve` has none of these bounds, so this is a small accept loop
//! with a semaphore, serving the axum `Router` on each connection with
//! hyper's http1 server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// From accept to a whole request.
pub(crate) const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// From a whole request to the end of its answer.
pub(crate) const ANSWER_DEADLINE: Duration = Duration::from_secs(30);
/// The largest request body read (no route takes more than a few bytes).
const MAX_BODY: usize = 64 * 1024;
/// How often the accept loop may log that it turns clients away.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A listening socket: the health socket's Unix listener, or the TCP
/// listener of `metrics_listen`.
pub(crate) trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Serves `app` on `listener` until cancelled. `what` names the socket in
/// log lines.
pub(crate) async fn serve<L: Listener>(
    listener: L,
    app: Router,
    what: &'static str,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = tokio_util::task::TaskTracker::new();
    let mut turned_away = 0u64;
    let mut logged: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or a connection reset
                // before it was taken: the listener stays readable, so
                // breathe instead of spinning, and go on.
                tracing::warn!(socket = what, error = %e, "cannot accept a connection on the {what} ({e}); retrying in 100 ms");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the bound: closed at once, so its descriptor is free
            // again and the backlog moves on to the next client.
            drop(io);
            turned_away += 1;
            if logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                tracing::warn!(
                    socket = what,
                    turned_away,
                    "the {what} has {MAX_CONNECTIONS} connections open; closed a new one at once ({turned_away} so far), so that idle clients cannot hold the agent's descriptors or queue others behind them"
                );
                logged = Some(Instant::now());
            }
            continue;
        };
        connections.spawn(connection(io, app.clone(), cancel.clone(), slot));
    }
    connections.close();
    // Answers in flight get a moment; the rest are cut.
    let _ = tokio::time::timeout(Duration::from_secs(1), connections.wait()).await;
}

/// Serves one request on one connection, within the deadlines.
async fn connection<I>(
    io: I,
    app: Router,
    cancel: CancellationToken,
    _slot: tokio::sync::OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + REQUEST_DEADLINE;
    // Told by the service once the whole request is read.
    let read = Arc::new(Notify::new());
    let service = hyper::service::service_fn({
        let read = read.clone();
        move |request: Request<Incoming>| {
            let (app, read) = (app.clone(), read.clone());
            async move {
                let (parts, body) = request.into_parts();
                let body = Limited::new(body, MAX_BODY).collect();
                let body = match tokio::time::timeout_at(deadline, body).await {
                    Ok(Ok(collected)) => collected.to_bytes(),
                    Ok(Err(_)) => return Ok(plain(StatusCode::BAD_REQUEST)),
                    Err(_) => return Ok(plain(StatusCode::REQUEST_TIMEOUT)),
                };
                read.notify_one();
                let request = Request::from_parts(parts, Body::from(body));
                app.oneshot(request).await
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        // The deadline below covers the head and the body; hyper's own
        // would need a timer and cover only the head.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    // Errors of a connection are the client's doing (it went away, it sent
    // garbage); hyper answers what it can, and there is nothing to report.
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = read.notified() => {}
        // No whole request in time: dropping the connection closes it.
        _ = tokio::time::sleep_until(deadline) => return,
        _ = cancel.cancelled() => return,
    }
    tokio::select! {
        _ = tokio::time::timeout(ANSWER_DEADLINE, conn.as_mut()) => {}
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

fn plain(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}
