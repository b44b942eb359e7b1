//! The control-plane contract under failure (DESIGN.md §5), against the real
//! `keysync` binary and the fake control plane on loopback: every transient
//! or unauthorized answer leaves the target file byte for byte as it was
//! (same bytes, inode and mtime), the daemon lives through all of them and
//! follows the next change, and `run --once` exits 1 under each. Also the
//! request headers and the conditional GET (304 keeps the file).

use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::config::Config;
use crate::support::env::TestEnv;
use crate::support::fake_cp::{Endpoint, FakeControlPlane, Fault, gen_ed25519_keys};
use crate::support::files::FileState;
use crate::support::scenario::{Scenario, TOKEN, wait_block, with_no_keys};
use crate::support::{DEADLINE, block::block_keys, eventually, http};

/// `keysync_fetch_total{source="account",result=<result>}` from /metrics,
/// 0 while nothing answers or nothing was counted yet.
fn fetch_count(env: &TestEnv, result: &str) -> u64 {
    http::try_metric(
        &env.socket(),
        "keysync_fetch_total",
        &[("source", "account"), ("result", result)],
    )
    .unwrap_or(0.0) as u64
}

/// Waits until the agent has *processed* `n` more failed fetches: the
/// counter moves before the writer finishes with a report, so one more than
/// needed proves the n-th is done with. The caller checks the file first,
/// then the returned message.
fn wait_failures(
    env: &TestEnv,
    agent: &Agent,
    from: u64,
    n: u64,
    what: &str,
) -> Result<(), String> {
    if eventually(DEADLINE * 2, || fetch_count(env, "error") > from + n) {
        return Ok(());
    }
    Err(format!(
        "{what}: the agent did not report {n} failed fetches (saw {})\nagent log:\n{}",
        fetch_count(env, "error") - from,
        agent.log_tail()
    ))
}

/// Every fault of DESIGN.md §5's "keep" rows that the fake can inject. The
/// 64 MiB body is a valid *empty* array: an agent that ignored `max_body`
/// would take it as "no keys" (and, after the confirming fetch, remove them).
fn faults() -> Vec<(&'static str, Fault)> {
    vec![
        ("500", Fault::server_error(500)),
        ("502", Fault::server_error(502)),
        ("503", Fault::server_error(503)),
        ("429 without Retry-After", Fault::rate_limited(None)),
        ("429 with Retry-After: 1", Fault::rate_limited(Some(1))),
        // Longer than the config's 2 s timeout.
        ("timeout", Fault::Slow(Duration::from_secs(3))),
        ("garbage", Fault::Garbage),
        ("truncated JSON", Fault::TruncatedJson),
        ("cut JSON", Fault::CutJson),
        ("64 MiB body", Fault::HugeBody { bytes: 64 << 20 }),
        ("401", Fault::unauthorized()),
        ("403", Fault::forbidden()),
        ("plain 404", Fault::plain_404()),
    ]
}

/// Three keys per step: two fixed, one that rotates, so every step both adds
/// and removes a key (one of three: never a mass removal).
fn step_keys(pool: &[String], step: usize) -> Vec<String> {
    vec![pool[0].clone(), pool[1].clone(), pool[2 + step % 4].clone()]
}

/// One fault, for as long as it takes the daemon to meet it `n` times
/// (and the list changes meanwhile to `next`): the file stays as it was
/// and the daemon lives; once the fault is cleared, `next` lands.
fn daemon_rides_out(s: &Scenario, agent: &mut Agent, name: &str, fault: Fault, next: &[String]) {
    let (cp, env) = (&s.cp, &s.env);
    let before = FileState::of(&env.target());
    let errors = fetch_count(env, "error");
    let seen = cp.request_count();
    cp.set_fault(fault, None);
    // The list changes during the outage: only a wrongly accepted answer (a
    // slow one past the timeout) could bring it in now.
    cp.set_keys(next.to_vec());
    // Slow and Retry-After faults take a second or more per request.
    let n = if name.starts_with("timeout") || name.contains("Retry-After") {
        2
    } else {
        4
    };
    let counted = wait_failures(env, agent, errors, n, name);
    assert_eq!(
        FileState::of(&env.target()),
        before,
        "{name}: the target changed"
    );
    counted.unwrap_or_else(|e| panic!("{e}"));
    let faulted = cp.requests()[seen..]
        .iter()
        .filter(|r| r.endpoint == Endpoint::List && r.fault.is_some())
        .count();
    assert!(
        faulted as u64 > n,
        "{name}: only {faulted} requests met the fault"
    );
    assert_eq!(
        FileState::of(&env.target()),
        before,
        "{name}: the target changed"
    );
    assert!(
        agent.alive(),
        "{name}: the daemon died\n{}",
        agent.log_tail()
    );
    cp.clear_fault();
    wait_block(&env.target(), agent, next, &format!("after {name} cleared"));
}

#[tokio::test(flavor = "multi_thread")]
async fn daemon_keeps_the_file_through_every_fault_and_follows_the_next_change() {
    let handle = tokio::runtime::Handle::current();
    with_no_keys(move |s| {
        let addr = s.cp.addr();
        let pool = gen_ed25519_keys(6);
        let mut step = 0;
        s.cp.set_keys(step_keys(&pool, step));
        let mut agent = s.start(s.config(), &step_keys(&pool, step));
        for (name, fault) in faults() {
            step += 1;
            daemon_rides_out(&s, &mut agent, name, fault, &step_keys(&pool, step));
        }

        // Connection refused: the control plane's port is closed.
        let Scenario { cp, env } = s;
        let before = FileState::of(&env.target());
        let generation = cp.generation();
        handle.block_on(cp.shutdown());
        let errors = fetch_count(&env, "error");
        let counted = wait_failures(&env, &agent, errors, 3, "connection refused");
        assert_eq!(
            FileState::of(&env.target()),
            before,
            "connection refused: the target changed"
        );
        counted.unwrap_or_else(|e| panic!("{e}"));
        assert!(agent.alive(), "connection refused: the daemon died");
        assert!(
            agent.log_text().to_ascii_lowercase().contains("refused"),
            "the log does not say the connection was refused:\n{}",
            agent.log_tail()
        );
        // Back on the same port, with a list the agent has not seen. The new
        // fake counts generations from 1 again: move past the agent's ETag.
        let restarted = (0..50).find_map(|_| {
            handle
                .block_on(FakeControlPlane::start_on(addr))
                .ok()
                .or_else(|| {
                    std::thread::sleep(Duration::from_millis(100));
                    None
                })
        });
        let cp = restarted.expect("rebind the fake control plane on its old port");
        cp.set_token(Some(TOKEN));
        step += 1;
        while cp.generation() <= generation {
            cp.set_keys(step_keys(&pool, step));
        }
        wait_block(
            &env.target(),
            &agent,
            &step_keys(&pool, step),
            "after the port reopened",
        );

        let (status, took) = agent.stop(Duration::from_secs(5));
        assert!(
            status.success(),
            "daemon exit status {status:?} after {took:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_once_under_every_fault_exits_1_and_keeps_the_file() {
    with_no_keys(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let pool = gen_ed25519_keys(6);
        cp.set_keys(step_keys(&pool, 0));
        let config = s.config();
        env.write_config(&config);
        let (code, stderr) = env.run_once_exit();
        assert_eq!(code, 0, "baseline run --once failed:\n{stderr}");
        assert_eq!(
            block_keys(&env.read_target().expect("target")),
            step_keys(&pool, 0)
        );
        // A different list on the API: nothing a faulted run does may bring it in.
        cp.set_keys(step_keys(&pool, 1));

        for (name, fault) in faults() {
            let before = FileState::of(&env.target());
            let seen = cp.request_count();
            cp.set_fault(fault, None);
            let (code, stderr) = env.run_once_exit();
            cp.clear_fault();
            assert_eq!(code, 1, "{name}: run --once exit code\n{stderr}");
            assert_eq!(
                FileState::of(&env.target()),
                before,
                "{name}: the target changed\n{stderr}"
            );
            assert!(
                cp.requests()[seen..].iter().any(|r| r.fault.is_some()),
                "{name}: the fault was never met"
            );
        }

        // Connection refused: a port nobody listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a port");
        let url = format!("http://{closed}/api/v0/ssh/");
        env.write_config(Config::vast(env, &url));
        let before = FileState::of(&env.target());
        let (code, stderr) = env.run_once_exit();
        assert_eq!(
            code, 1,
            "connection refused: run --once exit code\n{stderr}"
        );
        assert_eq!(
            FileState::of(&env.target()),
            before,
            "connection refused: the target changed"
        );

        // And with the API back, the new list arrives: the faults above did not
        // leave the state dir in a state that blocks a later good answer.
        env.write_config(&config);
        let (code, stderr) = env.run_once_exit();
        assert_eq!(code, 0, "run --once after the faults:\n{stderr}");
        assert_eq!(
            block_keys(&env.read_target().expect("target")),
            step_keys(&pool, 1)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_carry_the_contract_headers_and_304_keeps_the_file() {
    with_no_keys(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let pool = gen_ed25519_keys(3);
        cp.set_keys(pool.clone());
        let agent = s.start(s.config(), &pool);
        let before = FileState::of(&env.target());
        let etag = cp.etag();
        // Several polls of an unchanged list: conditional, answered 304.
        let ok = eventually(DEADLINE, || {
            cp.requests()
                .iter()
                .filter(|r| r.status == Some(304))
                .count()
                >= 4
        });
        assert!(ok, "no 304s: {:#?}", cp.requests());
        assert_eq!(
            FileState::of(&env.target()),
            before,
            "a 304 changed the target"
        );
        let (status, _) = agent.stop(Duration::from_secs(5));
        assert!(status.success());

        let requests = cp.requests();
        let list: Vec<_> = requests
            .iter()
            .filter(|r| r.endpoint == Endpoint::List)
            .collect();
        let version = env!("CARGO_PKG_VERSION");
        for r in &list {
            assert_eq!(r.method, "GET");
            assert_eq!(
                r.authorization.as_deref(),
                Some("Bearer test-token"),
                "{r:?}"
            );
            assert_eq!(r.accept.as_deref(), Some("application/json"), "{r:?}");
            assert_eq!(
                r.user_agent.as_deref(),
                Some(format!("keysync/{version}").as_str()),
                "{r:?}"
            );
        }
        // A fresh state dir: the first request is unconditional; every one
        // after the first 200 names the ETag it carried.
        assert_eq!(list[0].if_none_match, None, "{:?}", list[0]);
        assert_eq!(list[0].status, Some(200));
        for r in &list[1..] {
            assert_eq!(r.if_none_match.as_deref(), Some(etag.as_str()), "{r:?}");
        }

        // The ETag is persisted: a restarted agent's very first request is conditional.
        cp.clear_requests();
        let agent = env.spawn();
        let ok = eventually(DEADLINE, || cp.request_count() >= 1);
        assert!(ok, "the restarted agent sent no request");
        let first = cp.requests()[0].clone();
        assert_eq!(
            first.if_none_match.as_deref(),
            Some(etag.as_str()),
            "{first:?}"
        );
        assert_eq!(first.status, Some(304));
        assert_eq!(
            FileState::of(&env.target()),
            before,
            "a restart with a 304 changed the target"
        );
        let (status, _) = agent.stop(Duration::from_secs(5));
        assert!(status.success());
        // The token is a secret: not in the log, even at debug level.
        let log = std::fs::read_to_string(env.path().join("agent.log")).expect("log");
        assert!(!log.contains("test-token"), "the API key is in the log");
    })
    .await;
}
