//! `POST /refresh`, the login-triggered refresh (DESIGN.md §3, §8), as the
//! health socket sees it: a [`Request`] carrying a reply channel goes to the
//! writer, which runs (or joins, or refuses) a round of fetches and answers
//! with a [`Reply`]; this module turns that into HTTP.
//!
//! The answers:
//! - `200 {"refreshed": true, "age_ms": N}`: a round of fetches started
//!   after the request ended and its writes are done; the cache is as new
//!   as the sources could make it.
//! - `200 {"refreshed": false, …}`: a round was run but no source answered:
//!   every one was in backoff or `Retry-After` (nothing was fetched), or the
//!   fetches failed.
//! - `429 {"refreshed": false, "age_ms": N, "retry_after_ms": M}` with
//!   `Retry-After`: inside `refresh_min_interval` of the last round, answered
//!   at once with that round's age (§3: "answered at once with the result of
//!   the last one"; §8: "429 inside the rate-limit window").
//! - `404`: the feature is off (`refresh_min_interval = "0s"`).
//! - `503`: the writer did not take or answer the request (shutting down,
//!   or stuck), so the caller falls back to the cache as it is.
//!
//! `age_ms` is the time since the round being reported on ended.

use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, oneshot};

/// One `POST /refresh`, on its way to the writer.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) reply: oneshot::Sender<Reply>,
}

/// The writer's inbox for refresh requests.
pub(crate) type Requests = mpsc::Sender<Request>;

/// What a request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A round of fetches ended, and at least one source answered.
    Served,
    /// Inside the window of the last round; the next one is possible in `retry_in`.
    RateLimited { retry_in: Duration },
    /// Every source was in backoff or Retry-After: nothing was fetched.
    Backoff,
    /// Fetched, but no source answered (or the round timed out).
    Failed,
    /// `refresh_min_interval` is 0.
    Off,
}

impl Outcome {
    /// The `result` label of `keysync_refresh_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::RateLimited { .. } => "rate_limited",
            Outcome::Backoff => "backoff",
            Outcome::Failed => "failed",
            Outcome::Off => "off",
        }
    }
}

/// The writer's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) outcome: Outcome,
    /// Since the round reported on ended; None when there was none.
    pub(crate) age: Option<Duration>,
}

/// How long the handler waits for the writer. A round ends by itself
/// within the sources' timeouts (the writer's deadline); this only bounds a
/// writer that is stuck, which `/healthz` reports on its own.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Handles one `POST /refresh`.
pub(crate) async fn handle(requests: Requests) -> Response {
    let (reply, answer) = oneshot::channel();
    // Never queue behind a full inbox: the hook gives up after 2 s anyway.
    if requests.try_send(Request { reply }).is_err() {
        return unavailable("the agent cannot take a refresh request now");
    }
    match tokio::time::timeout(ANSWER_WITHIN, answer).await {
        Ok(Ok(reply)) => respond(reply),
        Ok(Err(_)) => unavailable("the agent is stopping"),
        Err(_) => unavailable("the agent did not answer in time"),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The HTTP answer for a reply.
pub(crate) fn respond(reply: Reply) -> Response {
    let age_ms = reply.age.map(millis);
    let body = |refreshed: bool| serde_json::json!({ "refreshed": refreshed, "age_ms": age_ms });
    match reply.outcome {
        Outcome::Served => (StatusCode::OK, axum::Json(body(true))).into_response(),
        Outcome::Backoff | Outcome::Failed => {
            (StatusCode::OK, axum::Json(body(false))).into_response()
        }
        Outcome::RateLimited { retry_in } => {
            let mut json = body(false);
            json["retry_after_ms"] = millis(retry_in).into();
            // Whole seconds, rounded up, as Retry-After takes them.
            let seconds = retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, seconds.to_string())],
                axum::Json(json),
            )
                .into_response()
        }
        Outcome::Off => (
            StatusCode::NOT_FOUND,
            "login-triggered refresh is off (refresh_min_interval = \"0s\")\n",
        )
            .into_response(),
    }
}

fn unavailable(why: &str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn parts(r: Response) -> (u16, Option<String>, String) {
        let code = r.status().as_u16();
        let retry = r
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (code, retry, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn each_outcome_has_its_answer() {
        let served = Reply {
            outcome: Outcome::Served,
            age: Some(Duration::from_millis(3)),
        };
        assert_eq!(
            parts(respond(served)).await,
            (200, None, r#"{"age_ms":3,"refreshed":true}"#.into())
        );
        let backoff = Reply {
            outcome: Outcome::Backoff,
            age: None,
        };
        assert_eq!(
            parts(respond(backoff)).await,
            (200, None, r#"{"age_ms":null,"refreshed":false}"#.into())
        );
        let limited = Reply {
            outcome: Outcome::RateLimited {
                retry_in: Duration::from_millis(4_200),
            },
            age: Some(Duration::from_millis(800)),
        };
        assert_eq!(
            parts(respond(limited)).await,
            (
                429,
                Some("5".into()),
                r#"{"age_ms":800,"refreshed":false,"retry_after_ms":4200}"#.into()
            )
        );
        let off = Reply {
            outcome: Outcome::Off,
            age: None,
        };
        assert_eq!(parts(respond(off)).await.0, 404);
    }

    #[tokio::test]
    async fn a_full_inbox_or_a_dropped_request_is_a_503() {
        let (tx, mut rx) = mpsc::channel(1);
        // Taken and dropped unanswered: the writer is stopping.
        let dropper = tokio::spawn(async move {
            let req: Option<Request> = rx.recv().await;
            drop(req);
            rx
        });
        assert_eq!(parts(handle(tx.clone()).await).await.0, 503);
        let _rx = dropper.await.unwrap();
        // Nobody reads and the inbox is full: refused at once.
        let (reply, _answer) = oneshot::channel();
        tx.try_send(Request { reply }).unwrap();
        assert_eq!(parts(handle(tx).await).await.0, 503);
    }
}
