//! Fleet discipline (DESIGN.md §5, issue 12: "never storm, never stall"),
//! against the real `keysync` binary and a real HTTP fake control plane on
//! loopback: a server's `Retry-After`, however large or malformed, never
//! holds up a revocation for longer than `max_backoff`; a flood of stream
//! events is coalesced into a bounded number of fetches, none while a
//! `Retry-After` runs; a hub that accepts and drops streams gets one try
//! per backoff step; `Cache-Control: max-age` spaces the polls; a policy
//! change drops the remembered ETag; loopback never goes through a proxy.
//!
//! Counts are bounds with wide margins (what the mechanism allows, plus a
//! few), never timings; deadlines are generous "eventually" conditions.

use std::time::{Duration, Instant};

use crate::support::agent::Agent;
use crate::support::config::Config;
use crate::support::env::TestEnv;
use crate::support::fake_cp::{Endpoint, FakeControlPlane, Fault, RequestRecord, gen_ed25519_keys};
use crate::support::scenario::with_fake;
use crate::support::{DEADLINE, blocking, eventually};

/// Waits until the block holds exactly `want` (in order).
fn wait_block(env: &TestEnv, agent: &Agent, want: &[String], what: &str) {
    assert!(
        eventually(DEADLINE, || env.block_keys() == want),
        "{what}: the block never became {want:#?}\nfile: {:?}\nagent log:\n{}",
        env.read_target(),
        agent.log_tail()
    );
}

fn list_requests(log: &[RequestRecord]) -> Vec<&RequestRecord> {
    log.iter()
        .filter(|r| r.endpoint == Endpoint::List)
        .collect()
}

/// A 429 carrying exactly this `Retry-After` value.
fn rate_limited_with(retry_after: &str) -> Fault {
    Fault::Status {
        code: 429,
        body: "API requests too frequent endpoint threshold=1.0\n".to_string(),
        headers: vec![
            ("Content-Type".to_string(), "text/plain".to_string()),
            ("Retry-After".to_string(), retry_after.to_string()),
        ],
    }
}

// ---------------------------------------------------------------------------
// 1. Retry-After is capped at max_backoff

#[tokio::test(flavor = "multi_thread")]
async fn no_retry_after_holds_up_a_revocation_past_max_backoff() {
    // max_backoff is 1 s (the shared test config): whatever a 429 says, the
    // deleted key is gone within seconds, and the agent lives on.
    let values = [
        "3600",
        "99999999999999999999",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "-1",
        "1.5",
        "garbage",
        "",
    ];
    let keys = gen_ed25519_keys(values.len() + 2);
    with_fake(keys.clone(), move |cp| {
        let env = TestEnv::new();
        env.write_config(Config::vast(&env, &cp.url()));
        let mut agent = env.spawn();
        let mut want = keys.clone();
        wait_block(&env, &agent, &want, "first sync");
        for value in values {
            cp.clear_requests();
            cp.set_fault(rate_limited_with(value), Some(1));
            let gone = want.remove(0);
            let asked = Instant::now();
            assert!(cp.remove_key(&gone));
            wait_block(
                &env,
                &agent,
                &want,
                &format!("after a 429 with Retry-After {value:?}"),
            );
            let took = asked.elapsed();
            let log = cp.requests();
            assert!(
                log.iter().any(|r| r.status == Some(429)),
                "the 429 with Retry-After {value:?} was never served"
            );
            assert!(agent.alive(), "the agent died on Retry-After {value:?}");
            eprintln!("Retry-After {value:?}: key removed after {took:?}");
        }
        let log = agent.log_text();
        assert!(
            log.contains("max_backoff"),
            "no log line tells that Retry-After was capped at max_backoff:\n{}",
            agent.log_tail()
        );
    })
    .await;
}

/// A polling vast source at `url`, jitter off, with this `max_backoff`.
fn poll_config(env: &TestEnv, url: &str, interval: &str, max_backoff: &str) -> String {
    Config::vast(env, url)
        .set("interval", interval)
        .set("max_backoff", max_backoff)
        .to_string()
}

/// An agent polling every 200 ms (backing off up to `max_backoff`) while
/// every answer carries `Cache-Control: cache_control`: its first sync
/// done, the list requests the fake saw in the `window` after it.
fn polls_answered_with(
    cp: &FakeControlPlane,
    keys: &[String],
    cache_control: &str,
    max_backoff: &str,
    window: Duration,
) -> (TestEnv, Agent, Vec<Duration>) {
    cp.set_extra_headers(vec![("Cache-Control".into(), cache_control.into())]);
    let env = TestEnv::new();
    env.write_config(poll_config(&env, &cp.url(), "200ms", max_backoff));
    let agent = env.spawn();
    wait_block(&env, &agent, &keys[..2], "first sync");
    cp.clear_requests();
    std::thread::sleep(window + Duration::from_millis(200));
    let polls = polls_within(cp, window);
    (env, agent, polls)
}

/// The list requests the fake saw in the `window` after the first one.
fn polls_within(cp: &FakeControlPlane, window: Duration) -> Vec<Duration> {
    let log = cp.requests();
    let list = list_requests(&log);
    let Some(first) = list.first().map(|r| r.at) else {
        return Vec::new();
    };
    list.iter()
        .map(|r| r.at.duration_since(first))
        .filter(|at| *at <= window)
        .collect()
}

// ---------------------------------------------------------------------------
// 5. Cache-Control: max-age spaces the polls, up to max_backoff

#[tokio::test(flavor = "multi_thread")]
async fn cache_control_max_age_spaces_the_polls_up_to_max_backoff() {
    let keys = gen_ed25519_keys(3);
    with_fake(keys[..2].to_vec(), move |cp| {
        // A 200 ms interval, but the answers say they stay fresh for 3 s.
        let window = Duration::from_millis(6500);
        let (_env, agent, polls) =
            polls_answered_with(cp, &keys, "public, max-age=3", "10s", window);
        eprintln!("max-age=3, interval 200 ms: polls at {polls:?}");
        assert!(
            (1..=3).contains(&polls.len()),
            "{} polls in {window:?} although every answer said max-age=3: {polls:?}",
            polls.len()
        );
        assert!(
            polls
                .windows(2)
                .all(|w| w[1] - w[0] >= Duration::from_millis(2900)),
            "a poll sooner than max-age: {polls:?}"
        );
        drop(agent);

        // max-age beyond max_backoff (1 s): polls come every second anyway,
        // and a deleted key goes within seconds.
        let window = Duration::from_millis(4500);
        let (env, agent, polls) = polls_answered_with(cp, &keys, "max-age=3600", "1s", window);
        eprintln!("max-age=3600, max_backoff 1 s: polls at {polls:?}");
        assert!(
            (3..=6).contains(&polls.len()),
            "polls at {polls:?}: max-age=3600 must count only up to max_backoff (1 s)"
        );
        cp.remove_key(&keys[0]);
        wait_block(&env, &agent, &keys[1..2], "removal under max-age=3600");
    })
    .await;
}

// ---------------------------------------------------------------------------
// 6. A change of policy drops the remembered ETag

/// Public keys made with `ssh-keygen` (the private halves were discarded).
const ECDSA_KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBCoQVVxTqGrXi2qc7HYJUXCOARifg9au3HQN8+LC68iLUp5FCIp/3fJ5g9VkVWRygvypgUaTRGLsTMMQtAb19bk= ecdsa@fleet";
const RSA_1024_KEY: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDPTBEQ+8GwRvWv261LP4dfjIJJgxled8LMOWQpcEdBYBflFbRargAxUUyBb6gTvbH4rXXU5nvZ+j05p0/eAmejFe2s6VdsziT2Tn0BJQpiodjbYVw5MoE/iuLZRgpeM02eSlaGxxvMO93KTtLwgm+I29/gyZHOmvyidd6nX5p6lQ== rsa1024@fleet";

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Waits until the block holds `want` in any order.
fn wait_keys(env: &TestEnv, agent: &Agent, want: &[&str], what: &str) {
    let want = sorted(want.iter().map(|k| k.to_string()).collect());
    assert!(
        eventually(DEADLINE, || sorted(env.block_keys()) == want),
        "{what}: the block never became {want:#?}\nfile: {:?}\nagent log:\n{}",
        env.read_target(),
        agent.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_loosened_policy_brings_in_keys_of_an_unchanged_list() {
    let alice = gen_ed25519_keys(1).remove(0);
    with_fake(
        [alice.clone(), ECDSA_KEY.into(), RSA_1024_KEY.into()],
        move |cp| {
            let env = TestEnv::new();
            let config = |algorithms: &[&str], rsa_bits: u32| {
                Config::vast(&env, &cp.url())
                    .policy("allowed_algorithms", algorithms.to_vec())
                    .policy("min_rsa_bits", i64::from(rsa_bits))
                    .to_string()
            };
            let ed_rsa: &[&str] = &["ssh-ed25519", "ssh-rsa"];
            let ed_rsa_ecdsa: &[&str] = &["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256"];
            env.write_config(config(ed_rsa, 2048));
            let agent = env.spawn();
            wait_keys(&env, &agent, &[&alice], "first sync: ed25519 only");
            // The list does not change from here on: polls get 304.
            assert!(
                eventually(DEADLINE, || cp.stats().not_modified >= 2),
                "no conditional polls; log:\n{}",
                agent.log_tail()
            );

            // A reload allows ECDSA: the list is the same, the key arrives.
            cp.clear_requests();
            env.write_config(config(ed_rsa_ecdsa, 2048));
            agent.signal(nix::sys::signal::Signal::SIGHUP);
            wait_keys(
                &env,
                &agent,
                &[&alice, ECDSA_KEY],
                "after the reload allowed ECDSA",
            );
            let log = cp.requests();
            let full = list_requests(&log)
                .into_iter()
                .find(|r| r.status == Some(200))
                .expect("a whole list after the reload");
            assert!(
                !full.sent_if_none_match(),
                "the old ETag was sent after the policy changed"
            );
            drop(agent);

            // A restart with 1024-bit RSA allowed: the persisted ETag is
            // dropped too, and the RSA key arrives.
            cp.clear_requests();
            env.write_config(config(ed_rsa_ecdsa, 1024));
            let agent = env.spawn();
            wait_keys(
                &env,
                &agent,
                &[&alice, ECDSA_KEY, RSA_1024_KEY],
                "after a restart that allowed 1024-bit RSA",
            );
            let log = cp.requests();
            assert!(
                !list_requests(&log)[0].sent_if_none_match(),
                "the first fetch after a restart with another policy sent the old ETag"
            );
            drop(agent);

            // The same policy again: the ETag is kept (no whole list needed).
            cp.clear_requests();
            let agent = env.spawn();
            assert!(
                eventually(DEADLINE, || !cp.requests().is_empty()),
                "no fetch after the restart"
            );
            let first = cp.requests()[0].clone();
            assert!(
                first.sent_if_none_match() && first.status == Some(304),
                "a restart with the same policy must keep the ETag: {first:?}"
            );
            drop(agent);
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// 7. Loopback never goes through a proxy

/// A proxy that records every connection and what it was asked, and
/// answers 502: an agent that used it would get no keys.
struct FakeProxy {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeProxy {
    fn start() -> FakeProxy {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut head = String::new();
                    if let Ok(clone) = stream.try_clone() {
                        let mut reader = BufReader::new(clone);
                        let mut line = String::new();
                        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                            head.push_str(&line);
                            line.clear();
                        }
                    }
                    log.lock().expect("proxy log").push(head);
                    let _ = stream.write_all(
                        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                });
            }
        });
        FakeProxy { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("proxy log").clone()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn loopback_never_goes_through_a_proxy() {
    let keys = gen_ed25519_keys(3);
    with_fake(keys[..2].to_vec(), move |cp| {
        let proxy = FakeProxy::start();
        let port = cp.addr().port();
        for host in ["127.0.0.1", "localhost"] {
            let env = TestEnv::new();
            let config = subscribe_config(&env, cp, "200ms", "60s", "1s")
                .replace(&format!("127.0.0.1:{port}"), &format!("{host}:{port}"));
            assert!(config.contains(&format!("http://{host}:{port}/api/v0/ssh/events")));
            env.write_config(config);
            let streams_before = cp.stats().streams_opened;
            let agent = env.spawn_with(|cmd| {
                cmd.env_remove("NO_PROXY").env_remove("no_proxy");
                for var in [
                    "HTTP_PROXY",
                    "HTTPS_PROXY",
                    "ALL_PROXY",
                    "http_proxy",
                    "https_proxy",
                    "all_proxy",
                ] {
                    cmd.env(var, proxy.url());
                }
            });
            let want = if host == "localhost" {
                &keys[..3]
            } else {
                &keys[..2]
            };
            wait_block(
                &env,
                &agent,
                want,
                &format!("through {host} with a proxy set"),
            );
            assert!(
                eventually(DEADLINE, || cp.stats().streams_opened > streams_before),
                "the stream at {host} never opened; log:\n{}",
                agent.log_tail()
            );
            // An event on the stream, through the same client rules.
            if host == "127.0.0.1" {
                cp.add_key(&keys[2]);
                wait_block(&env, &agent, &keys, "after an event");
            }
            assert!(
                proxy.seen().is_empty(),
                "requests to {host} went to the proxy, with the API key: {:?}",
                proxy.seen()
            );
            drop(agent);
        }

        // Anything else still honours the proxy variables: an https URL
        // is tunnelled (CONNECT), and the API key only travels inside TLS.
        let env = TestEnv::new();
        env.write_config(Config::vast(
            &env,
            "https://keys.example.invalid/api/v0/ssh/",
        ));
        let agent = env.spawn_with(|cmd| {
            cmd.env_remove("NO_PROXY").env_remove("no_proxy");
            cmd.env("HTTPS_PROXY", proxy.url());
        });
        assert!(
            eventually(DEADLINE, || !proxy.seen().is_empty()),
            "an https source ignored HTTPS_PROXY; log:\n{}",
            agent.log_tail()
        );
        let seen = proxy.seen();
        assert!(
            seen[0].starts_with("CONNECT keys.example.invalid:443 "),
            "{seen:?}"
        );
        assert!(
            !seen[0]
                .to_ascii_lowercase()
                .contains("authorization: bearer"),
            "{seen:?}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// Subscribe mode

/// The name of the user running the tests: the agent writes a file in a
/// scratch directory for this user, so no root is needed.
fn me() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .expect("current user has a passwd entry")
}

/// A vast source at `cp` subscribed to its event stream, jitter off; the
/// user writes a managed block in the env's target.
fn subscribe_config(
    env: &TestEnv,
    cp: &FakeControlPlane,
    interval: &str,
    resync: &str,
    max_backoff: &str,
) -> String {
    format!(
        r#"state_dir = "{state}"
health_socket = "{socket}"

[sources.account]
kind = "vast"
url = "{url}"
subscribe_url = "{events}"
api_key_env = "KEYSYNC_TEST_API_KEY"
interval = "{interval}"
resync = "{resync}"
jitter = "0s"
timeout = "2s"
max_backoff = "{max_backoff}"

[[users]]
name = "{user}"
sources = ["account"]
write = "block"
path = "{target}"
"#,
        state = env.state_dir().display(),
        socket = env.socket().display(),
        target = env.target().display(),
        url = cp.url(),
        events = cp.events_url(),
        user = me(),
    )
}

fn event_requests(cp: &FakeControlPlane) -> Vec<RequestRecord> {
    cp.requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::Events)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_that_accepts_and_drops_streams_gets_one_try_per_backoff_step() {
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some("test-token"));
    cp.set_keys(gen_ed25519_keys(2));
    // Every stream is accepted (200, text/event-stream) and ends at once.
    cp.set_events_fault(
        Fault::Status {
            code: 200,
            body: String::new(),
            headers: vec![("Content-Type".into(), "text/event-stream".into())],
        },
        None,
    );
    let cp = std::sync::Arc::new(cp);
    let cp2 = cp.clone();
    blocking(move || {
        let cp = cp2;
        let env = TestEnv::new();
        // Reconnects back off from 1 s (doubling, full jitter) up to 5 min.
        env.write_config(subscribe_config(&env, &cp, "1s", "60s", "5m"));
        let agent = env.spawn();
        assert!(
            eventually(DEADLINE, || !event_requests(&cp).is_empty()),
            "the agent never opened the stream; log:\n{}",
            agent.log_tail()
        );
        let first = event_requests(&cp)[0].at;
        let window = Duration::from_secs(15);
        std::thread::sleep(window.saturating_sub(first.elapsed()));
        let tries: Vec<Duration> = event_requests(&cp)
            .iter()
            .map(|r| r.at.duration_since(first))
            .filter(|at| *at <= window)
            .collect();
        eprintln!("stream opened at {tries:?}");
        // One try per step (waits drawn from [0, 2 s], [0, 4 s], [0, 8 s],
        // …): about 5 in 15 s, rarely more than 7. Reset after every
        // accepted stream it would be about one a second.
        assert!(
            tries.len() <= 8,
            "{} stream connections in {window:?}: a storm ({tries:?}); log:\n{}",
            tries.len(),
            agent.log_tail()
        );
        assert!(agent_alive(agent));
    })
    .await;
}

fn agent_alive(mut agent: Agent) -> bool {
    agent.alive()
}

/// Starts the agent and waits for the first write and an open stream.
fn start_subscribed(env: &TestEnv, cp: &FakeControlPlane, want: &[String]) -> Agent {
    let agent = env.spawn();
    wait_block(env, &agent, want, "first sync");
    assert!(
        eventually(DEADLINE, || cp.open_streams() >= 1),
        "stream not connected; log:\n{}",
        agent.log_tail()
    );
    agent
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_every_millisecond_is_coalesced_into_few_fetches() {
    let keys = gen_ed25519_keys(3);
    with_fake(keys.clone(), move |cp| {
        let env = TestEnv::new();
        // Polls and resyncs are a minute away: every fetch here is an event's.
        env.write_config(subscribe_config(&env, cp, "60s", "60s", "5s"));
        let mut agent = start_subscribed(&env, cp, &keys);
        std::thread::sleep(Duration::from_millis(500));
        cp.clear_requests();

        // Every change of the list is one event on the stream: one a
        // millisecond for 10 s, the list flipping between two and three keys.
        let (two, three) = (keys[..2].to_vec(), keys.clone());
        let flood = Duration::from_secs(10);
        let started = Instant::now();
        let mut events = 0usize;
        while started.elapsed() < flood {
            cp.set_keys(
                if events.is_multiple_of(2) {
                    &two
                } else {
                    &three
                }
                .clone(),
            );
            events += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        let last = if events.is_multiple_of(2) {
            &three
        } else {
            &two
        };
        // The events of the last moments are served after the flood, too.
        wait_block(&env, &agent, last, "after the flood");
        std::thread::sleep(Duration::from_millis(500));
        let log = cp.requests();
        let fetches = list_requests(&log).len();
        let took = started.elapsed();
        eprintln!("{events} events in {flood:?}: {fetches} list requests in {took:?}");
        // At least 100 ms between two event-triggered fetches: at most
        // took / 100 ms of them, plus a few.
        let bound = (took.as_millis() / 100) as usize + 5;
        assert!(
            fetches <= bound,
            "{fetches} list requests for {events} events in {took:?}, over {bound}: not coalesced"
        );
        // And the events are served meanwhile, not only when they stop.
        assert!(fetches >= 20, "only {fetches} list requests in {took:?}");
        assert!(agent.alive());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_during_a_retry_after_wait_for_it_to_end() {
    let keys = gen_ed25519_keys(12);
    with_fake(keys[..2].to_vec(), move |cp| {
        let env = TestEnv::new();
        // interval 1 s (the backoff's base), max_backoff 5 s: a 429 with
        // Retry-After: 3 makes the agent wait 3 to 5 s.
        env.write_config(subscribe_config(&env, cp, "1s", "60s", "5s"));
        let agent = start_subscribed(&env, cp, &keys[..2]);
        std::thread::sleep(Duration::from_millis(500));
        cp.clear_requests();
        cp.set_fault(Fault::rate_limited(Some(3)), Some(1));
        // An event: its fetch gets the 429.
        cp.add_key(&keys[2]);
        assert!(
            eventually(DEADLINE, || cp
                .requests()
                .iter()
                .any(|r| r.status == Some(429))),
            "the event's fetch never came; log:\n{}",
            agent.log_tail()
        );
        let limited = cp
            .requests()
            .iter()
            .find(|r| r.status == Some(429))
            .map(|r| r.at)
            .expect("the 429");
        // More events while the Retry-After runs: none may cause a fetch.
        for key in &keys[3..] {
            std::thread::sleep(Duration::from_millis(250));
            cp.add_key(key);
        }
        wait_block(&env, &agent, &keys, "after the Retry-After");
        let log = cp.requests();
        let after: Vec<Duration> = list_requests(&log)
            .iter()
            .filter(|r| r.at > limited)
            .map(|r| r.at.duration_since(limited))
            .collect();
        eprintln!("list requests after the 429, at {after:?}");
        assert!(
            after
                .first()
                .is_some_and(|d| *d >= Duration::from_millis(2900)),
            "a fetch during the 3 s Retry-After: {after:?}; log:\n{}",
            agent.log_tail()
        );
    })
    .await;
}
