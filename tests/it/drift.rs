//! Drift repair (DESIGN.md §4): another writer replaces or rewrites
//! `authorized_keys` behind the agent's back; the directory watch brings the
//! managed block back, keeps the other writer's lines, and counts the repair
//! in /status and /metrics. The poll interval is 60 s so that only the watch
//! can be what repairs. And with nothing changing, nothing is written: the
//! agent's own writes do not start a loop.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::block::{block_keys, outside_block};
use crate::support::env::TestEnv;
use crate::support::eventually;
use crate::support::fake_cp::{fixture_keys, gen_ed25519_keys};
use crate::support::http;
use crate::support::scenario::with_fixture;

/// Polls (every 2 ms, to measure) until the block holds `want`; returns how long that took.
fn repaired_within(target: &Path, want: &[&str], timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        let content = std::fs::read_to_string(target).unwrap_or_default();
        if block_keys(&content) == want {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn drift_repairs(env: &TestEnv) -> u64 {
    env.status_json()["users"]["root"]["drift_repairs"]
        .as_u64()
        .unwrap_or(0)
}

fn metric(env: &TestEnv, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    http::metrics(&env.socket()).value(name, labels)
}

/// Another writer changes the file with `write`; the watch must restore the
/// block around exactly their lines and count the repair, `repairs` in all.
/// Returns how long the repair took.
fn drift_and_repair(
    env: &TestEnv,
    agent: &crate::support::agent::Agent,
    want: &[&str],
    what: &str,
    write: impl FnOnce(&Path),
    theirs: &str,
    repairs: u64,
) -> Duration {
    let target = env.target();
    write(&target);
    let latency = repaired_within(&target, want, Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "block not restored after {what}; log:\n{}",
            agent.log_text()
        )
    });
    let content = std::fs::read_to_string(&target).unwrap();
    assert_eq!(
        outside_block(&content),
        theirs.lines().collect::<Vec<_>>(),
        "{content}"
    );
    assert!(eventually(Duration::from_secs(10), || drift_repairs(env) == repairs));
    latency
}

#[tokio::test(flavor = "multi_thread")]
async fn replaced_or_rewritten_file_gets_its_block_back() {
    with_fixture(|s| {
        let [alice, bob, _] = fixture_keys();
        let want = [alice, bob];
        let env = &s.env;
        let agent = s.start(s.config().set("interval", "60s"), &want);
        // Let the watch settle on the agent's own first write.
        assert!(eventually(Duration::from_secs(10), || {
            env.status_json()["users"]["root"]["last_write"].is_number()
        }));
        std::thread::sleep(Duration::from_millis(300));
        let requests = s.cp.request_count();
        let intruder = gen_ed25519_keys(2);

        // 1. Another tool replaces the file atomically (write + rename over),
        //    as the platform does, with only its own lines.
        let theirs = format!("# added by the platform\n{} platform@host\n", intruder[0]);
        let rename_over = |target: &Path| {
            let tmp = target.with_file_name("authorized_keys.platform-tmp");
            std::fs::write(&tmp, &theirs).unwrap();
            std::fs::rename(&tmp, target).unwrap();
        };
        let rename_latency = drift_and_repair(env, &agent, &want, "rename-over", rename_over, &theirs, 1);
        let content = env.read_target().unwrap();
        assert!(content.starts_with(&theirs), "their lines are kept byte for byte:\n{content}");

        // 2. Someone edits in place: truncate and write.
        let edited = format!("{} hand@edit\n# a comment\n", intruder[1]);
        let in_place = |target: &Path| std::fs::write(target, &edited).unwrap();
        let inplace_latency = drift_and_repair(env, &agent, &want, "in-place edit", in_place, &edited, 2);
        assert_eq!(metric(env, "keysync_drift_repairs_total", &[("user", "root")]), Some(2.0));

        // Only the watch can have done it: no fetch happened meanwhile.
        assert_eq!(s.cp.request_count(), requests, "a poll ran during the test");
        println!(
            "measured: drift repair latency {:.0} ms after rename-over, {:.0} ms after in-place edit",
            rename_latency.as_secs_f64() * 1000.0,
            inplace_latency.as_secs_f64() * 1000.0
        );
        assert!(agent.log_text().contains("managed block re-asserted"), "{}", agent.log_text());
    })
    .await;
}

/// Polls keep coming (200 ms) but the list does not change: the file is
/// never rewritten (same inode and mtime), no write and no repair is
/// counted, in spite of the watch seeing the agent's own first write.
#[tokio::test(flavor = "multi_thread")]
async fn nothing_changes_nothing_is_written() {
    with_fixture(|s| {
        let [alice, bob, _] = fixture_keys();
        let (cp, env) = (&s.cp, &s.env);
        let _agent = s.start(s.config(), &[alice, bob]);
        // A few polls so the agent is in its steady state.
        let settled = cp.request_count() + 3;
        assert!(eventually(Duration::from_secs(10), || cp.request_count() >= settled));
        let meta = std::fs::metadata(env.target()).unwrap();
        let (ino, mtime, mtime_ns) = (meta.ino(), meta.mtime(), meta.mtime_nsec());
        let writes = metric(env, "keysync_writes_total", &[("user", "root")]);
        let last_write = env.status_json()["users"]["root"]["last_write"].clone();
        let requests = cp.request_count();

        // At least 5 s and at least 10 more polls.
        let started = Instant::now();
        assert!(eventually(Duration::from_secs(30), || {
            started.elapsed() >= Duration::from_secs(5) && cp.request_count() >= requests + 10
        }));
        let meta = std::fs::metadata(env.target()).unwrap();
        assert_eq!(
            (meta.ino(), meta.mtime(), meta.mtime_nsec()),
            (ino, mtime, mtime_ns),
            "the file was rewritten"
        );
        assert_eq!(
            metric(env, "keysync_writes_total", &[("user", "root")]),
            writes
        );
        assert_eq!(env.status_json()["users"]["root"]["last_write"], last_write);
        assert_eq!(drift_repairs(env), 0);
        assert!(
            cp.stats().not_modified >= 10,
            "polls were conditional: {:?}",
            cp.stats()
        );
    })
    .await;
}
