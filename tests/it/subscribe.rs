//! Subscribe mode (DESIGN.md §5) end to end: the real `keysync run` against
//! the fake control plane's Server-Sent Events stream.
//!
//! Each test picks its `interval` and `resync` so that only the mechanism
//! under test can explain what the fake sees: a long interval when an event
//! must be what triggered a fetch, a long resync when polls must come from
//! the stream being down. Timings are only ever "eventually" conditions with
//! generous deadlines; measured latencies are printed, never asserted.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::support::agent::Agent;
use crate::support::config::User;
use crate::support::current_user;
use crate::support::env::TestEnv;
use crate::support::eventually;
use crate::support::fake_cp::{
    Endpoint, FakeControlPlane, Fault, RequestRecord, fixture_keys, gen_ed25519_keys,
};
use crate::support::scenario::{Scenario, TOKEN, with_fixture};

const WAIT: Duration = Duration::from_secs(15);

fn source_status(env: &TestEnv) -> serde_json::Value {
    env.try_status_json()["sources"]["account"].clone()
}

fn stream_connected(env: &TestEnv) -> bool {
    source_status(env)["stream_connected"] == serde_json::Value::Bool(true)
}

/// A request log in one short line: `events:503 list:304 …`.
fn brief(log: &[RequestRecord]) -> String {
    let items: Vec<String> = log
        .iter()
        .map(|r| {
            let route = match r.endpoint {
                Endpoint::List => "list",
                Endpoint::Events => "events",
                Endpoint::Other => "other",
            };
            format!(
                "{route}:{}",
                r.status.map_or("closed".to_string(), |s| s.to_string())
            )
        })
        .collect();
    format!("{} requests [{}]", items.len(), items.join(" "))
}

fn list_requests(log: &[RequestRecord]) -> Vec<&RequestRecord> {
    log.iter()
        .filter(|r| r.endpoint == Endpoint::List)
        .collect()
}

/// Starts the agent on the fixture list with a vast source subscribed to
/// the events of `streams` (jitter off, failures retried within a second;
/// the user writes a managed block in the env's target), and waits for the
/// first write and an open stream.
fn subscribed(s: &Scenario, streams: &FakeControlPlane, interval: &str, resync: &str) -> Agent {
    let config = s
        .config()
        .set("subscribe_url", streams.events_url())
        .set("interval", interval)
        .set("resync", resync)
        .only_user(User::block(&current_user(), s.env.target()))
        .no_policy();
    let [alice, bob, _] = fixture_keys();
    let agent = s.start(config, &[alice, bob]);
    assert!(
        eventually(WAIT, || streams.open_streams() >= 1
            && stream_connected(&s.env)),
        "stream not connected; log:\n{}",
        agent.log_tail()
    );
    agent
}

/// The requests that opened (or tried to open) an event stream.
fn stream_requests(cp: &FakeControlPlane) -> Vec<RequestRecord> {
    cp.requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::Events)
        .collect()
}

/// Once the agent has settled, a second passes without a list request.
fn assert_no_polls(cp: &FakeControlPlane, what: &str) {
    settle(cp, Duration::from_millis(800));
    cp.clear_requests();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        list_requests(&cp.requests()).is_empty(),
        "{what}: {}",
        brief(&cp.requests())
    );
}

/// Waits for at least `n` list requests since the log was last cleared.
fn wait_polls(cp: &FakeControlPlane, agent: &Agent, n: usize, what: &str) {
    assert!(
        eventually(WAIT, || list_requests(&cp.requests()).len() >= n),
        "{what}: {}\nlog:\n{}",
        brief(&cp.requests()),
        agent.log_tail()
    );
}

/// Waits until exactly one stream is open again and status shows it.
fn wait_reconnected(cp: &FakeControlPlane, env: &TestEnv, agent: &Agent, what: &str) {
    assert!(
        eventually(WAIT, || cp.open_streams() == 1 && stream_connected(env)),
        "{what}; log:\n{}",
        agent.log_tail()
    );
}

/// Waits until the agent has made no list request for `quiet`.
fn settle(cp: &FakeControlPlane, quiet: Duration) {
    let mut seen = cp.request_count();
    let mut since = Instant::now();
    let deadline = Instant::now() + WAIT;
    while since.elapsed() < quiet && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = cp.request_count();
        if now != seen {
            seen = now;
            since = Instant::now();
        }
    }
}

/// An event leads to a fetch and a write. The interval is 60 s and resync
/// 10 min, so after the start-up fetches only the event can explain either.
/// The stream to the list's own origin carries the API key.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_triggers_a_fetch_and_a_write() {
    with_fixture(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let [alice, bob, _] = fixture_keys();
        let agent = subscribed(&s, cp, "60s", "10m");
        let source = source_status(env);
        assert_eq!(source["mode"], "subscribe", "{source}");
        assert_eq!(source["stream_connected"], true, "{source}");
        settle(cp, Duration::from_millis(500));

        // Same origin as `url`: the stream request carries the API key.
        let streams = stream_requests(cp);
        assert!(!streams.is_empty());
        for r in &streams {
            assert_eq!(
                r.authorization.as_deref(),
                Some("Bearer test-token"),
                "{r:?}"
            );
            assert_eq!(r.accept.as_deref(), Some("text/event-stream"), "{r:?}");
        }

        for round in 0..3 {
            cp.clear_requests();
            let new = gen_ed25519_keys(round + 1).pop().expect("a key");
            let changed = Instant::now();
            cp.set_keys([alice, bob, new.as_str()]);
            assert!(
                eventually(WAIT, || env.block_keys() == [alice, bob, new.as_str()]),
                "event did not lead to a write; log:\n{}",
                agent.log_tail()
            );
            let took = changed.elapsed();
            let log = cp.requests();
            let fetches = list_requests(&log);
            assert!(
                fetches
                    .iter()
                    .any(|r| r.status == Some(200) && r.at >= changed),
                "no fetch after the event: {}",
                brief(&log)
            );
            println!(
                "measured: event to written file {:.1} ms (round {round})",
                took.as_secs_f64() * 1e3
            );
        }
        assert_eq!(
            cp.stats().streams_opened,
            1,
            "the stream stayed open throughout"
        );
    })
    .await;
}

/// Reads the event stream raw for `window` and counts heartbeat comments.
fn count_heartbeats(cp: &FakeControlPlane, window: Duration) -> usize {
    let mut s = std::net::TcpStream::connect(cp.addr()).expect("connect to the fake");
    write!(
        s,
        "GET /api/v0/ssh/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("send");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < window {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&seen)
        .matches(": heartbeat")
        .count()
}

/// `: comment` lines are heartbeats: a stream that carries only heartbeats
/// (every 100 ms here) triggers no fetch and stays open.
#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_alone_trigger_nothing() {
    let s = Scenario::with_fixture().await;
    s.cp.set_heartbeat(Duration::from_millis(100));
    s.run(move |s| {
        let (cp, env) = (&s.cp, &s.env);
        let agent = subscribed(&s, cp, "60s", "10m");
        settle(cp, Duration::from_millis(500));
        cp.clear_requests();
        // A second reader of the same stream proves the heartbeats flow.
        let heartbeats = count_heartbeats(cp, Duration::from_secs(2));
        assert!(
            heartbeats >= 5,
            "the fake sent only {heartbeats} heartbeats in 2 s"
        );
        let log = cp.requests();
        assert!(
            list_requests(&log).is_empty(),
            "heartbeats triggered fetches: {}",
            brief(&log)
        );
        assert_eq!(
            cp.stats().streams_opened,
            2,
            "the agent's stream and ours, no reconnect"
        );
        assert!(stream_connected(env));
        assert!(
            agent
                .log_text()
                .contains("subscription stream of source account connected")
        );
    })
    .await;
}

/// A stream that drops falls back to polling at `interval` (300 ms; resync
/// is 60 s, so polls while the stream is down come only from the
/// fallback), a change made meanwhile arrives by polling, and the agent
/// reconnects with `Last-Event-ID` and stops polling. Then the same through
/// a whole outage (`set_down`): polls go on (with backoff) while the stream
/// is cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_stream_falls_back_to_polling_and_resumes_with_last_event_id() {
    with_fixture(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let [alice, bob, _] = fixture_keys();
        let extra = gen_ed25519_keys(3);
        let agent = subscribed(&s, cp, "300ms", "60s");

        // An event the agent sees: its Last-Event-ID becomes this generation.
        cp.set_keys([alice, bob, extra[0].as_str()]);
        let seen_generation = cp.generation();
        assert!(eventually(WAIT, || env.block_keys() == [alice, bob, extra[0].as_str()]));
        assert_no_polls(cp, "polls while the stream is up");

        // 1. The stream ends and reconnecting fails; the list still answers.
        cp.set_events_fault(Fault::server_error(503), None);
        cp.drop_streams();
        assert!(
            eventually(WAIT, || !stream_connected(env)),
            "status still shows the stream connected; log:\n{}",
            agent.log_tail()
        );
        cp.clear_requests();
        wait_polls(cp, &agent, 4, "no polling while the stream is down");
        assert_eq!(cp.open_streams(), 0);
        assert_eq!(source_status(env)["mode"], "subscribe");
        // A change while the stream is down arrives by polling.
        cp.set_keys([alice, bob, extra[1].as_str()]);
        assert!(
            eventually(WAIT, || env.block_keys() == [alice, bob, extra[1].as_str()]),
            "polling did not deliver the change; log:\n{}",
            agent.log_tail()
        );

        // The stream comes back: reconnect with the last ID seen, then no more polls.
        cp.clear_requests();
        cp.clear_fault();
        wait_reconnected(cp, env, &agent, "no reconnect");
        let ids = cp.last_event_ids();
        assert_eq!(
            ids.last().cloned().flatten(),
            Some(seen_generation.to_string()),
            "reconnect without the right Last-Event-ID: {ids:?}"
        );
        assert_no_polls(cp, "still polling after the reconnect");

        // 2. A whole outage: the stream is cut and the list answers 503.
        let generation = cp.generation();
        cp.set_down(true);
        assert!(eventually(WAIT, || !stream_connected(env)));
        cp.clear_requests();
        assert!(
            eventually(WAIT, || list_requests(&cp.requests())
                .iter()
                .filter(|r| r.status == Some(503))
                .count()
                >= 3),
            "no polls during the outage: {}\nlog:\n{}",
            brief(&cp.requests()),
            agent.log_tail()
        );
        assert_eq!(
            env.block_keys(),
            [alice, bob, extra[1].as_str()],
            "last good keys kept"
        );
        cp.set_down(false);
        wait_reconnected(cp, env, &agent, "no reconnect after the outage");
        assert_eq!(
            cp.last_event_ids().last().cloned().flatten(),
            Some(generation.to_string()),
            "{:?}",
            cp.last_event_ids()
        );
        // And events work again.
        cp.set_keys([alice, bob, extra[2].as_str()]);
        assert!(eventually(WAIT, || env.block_keys() == [alice, bob, extra[2].as_str()]));
    })
    .await;
}

/// A healthy stream that says nothing (heartbeats every 15 s, no events)
/// does not stop the periodic re-fetch: with resync 500 ms and interval 60 s,
/// fetches keep coming, and the quiet stream is not mistaken for a dead one.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_stream_still_resyncs() {
    with_fixture(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let agent = subscribed(&s, cp, "60s", "500ms");
        cp.clear_requests();
        let started = Instant::now();
        wait_polls(cp, &agent, 4, "no resync fetches");
        let took = started.elapsed();
        let log = cp.requests();
        let fetches = list_requests(&log);
        assert!(
            fetches
                .iter()
                .all(|r| r.if_none_match.is_some() && r.status == Some(304)),
            "resyncs are conditional: {fetches:?}"
        );
        println!(
            "measured: {} resync fetches in {:.2} s (resync 500 ms)",
            fetches.len(),
            took.as_secs_f64()
        );
        assert_eq!(
            cp.stats().streams_opened,
            1,
            "the quiet stream was reopened"
        );
        assert!(stream_connected(env));
    })
    .await;
}

/// `subscribe_url` on another origin (another port) gets no Authorization
/// header; its events still trigger fetches of `url`, which does.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_key_goes_to_the_stream_only_on_the_same_origin() {
    let s = Scenario::with_fixture().await;
    // The hub: another port, no token required.
    let hub = FakeControlPlane::start().await;
    s.run(move |s| {
        let (cp, env) = (&s.cp, &s.env);
        let [alice, bob, _] = fixture_keys();
        let carol = gen_ed25519_keys(1).pop().expect("a key");
        let agent = subscribed(&s, &hub, "60s", "10m");
        settle(cp, Duration::from_millis(500));

        let streams = stream_requests(&hub);
        assert!(!streams.is_empty());
        for r in &streams {
            assert_eq!(
                r.authorization, None,
                "the API key went to another origin: {r:?}"
            );
        }
        assert!(
            cp.requests().iter().all(|r| r.endpoint == Endpoint::List),
            "{}",
            brief(&cp.requests())
        );

        // The list changes on the control plane; the hub announces something.
        cp.set_keys([alice, bob, carol.as_str()]);
        cp.clear_requests();
        hub.set_keys(["anything"]);
        assert!(
            eventually(WAIT, || env.block_keys() == [alice, bob, carol.as_str()]),
            "the hub's event did not lead to a fetch; log:\n{}",
            agent.log_tail()
        );
        let log = cp.requests();
        assert!(!log.is_empty());
        for r in &log {
            assert_eq!(
                r.authorization.as_deref(),
                Some("Bearer test-token"),
                "{r:?}"
            );
        }
        assert!(
            hub.requests()
                .iter()
                .all(|r| r.authorization.is_none() && r.endpoint == Endpoint::Events),
            "{}",
            brief(&hub.requests())
        );
    })
    .await;
}
