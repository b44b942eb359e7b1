//! Revocation that holds (DESIGN.md §4 "Revoked keys"): the `RevokedKeys`
//! file sshd reads exists before the first fetch and after every crash
//! point, is never torn, and holds exactly the keys an authoritative answer
//! removed; other writers' copies of a revoked key are reported, and
//! removed only when the config asks for it.

use std::time::Duration;

use super::support::config::{Config, User};
use super::support::env::{TestEnv, bin};
use super::support::fake_cp::{FakeControlPlane, Fault, fixture_keys};
use super::support::{blocking, eventually, require_root};

async fn control_plane() -> FakeControlPlane {
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some("test-token"));
    cp.load_fixture();
    cp
}

/// Every line of the revoked keys file is a whole public key.
fn assert_not_torn(content: &str, when: &str) {
    for line in content.lines() {
        assert!(
            ssh_key::PublicKey::from_openssh(line).is_ok(),
            "{when}: torn or foreign line in revoked_keys: {line:?}"
        );
    }
}

fn revoked(env: &TestEnv) -> Option<String> {
    std::fs::read_to_string(env.state_dir().join("revoked_keys")).ok()
}

/// `keysync run --once` off the runtime (which serves the fake); it must succeed.
async fn run_once_ok(env: TestEnv) -> TestEnv {
    let (env, out) = blocking(move || {
        let out = env.run_once();
        (env, out)
    })
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn the_revoked_file_exists_before_the_first_fetch() {
    let cp = control_plane().await;
    // The first answer takes 5 s: the file must be there meanwhile.
    cp.set_fault(Fault::Slow(Duration::from_secs(5)), Some(1));
    let env = TestEnv::new();
    env.write_config(Config::vast(&env, &cp.url()));
    let agent = env.spawn();
    let path = env.state_dir().join("revoked_keys");
    let p = path.clone();
    assert!(
        blocking(move || eventually(Duration::from_secs(3), || p.exists())).await,
        "no revoked_keys while the first fetch is pending; log:\n{}",
        agent.log_text()
    );
    assert_eq!(revoked(&env).as_deref(), Some(""));
    assert!(env.read_target().is_none(), "the first answer already came");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_key_is_revoked_a_returning_one_is_not_and_copies_are_reported() {
    let cp = control_plane().await;
    let [alice, bob, _] = fixture_keys();
    let env = TestEnv::new();
    // Another writer's copy of alice (the platform's, outside the block).
    std::fs::create_dir_all(env.target().parent().unwrap()).unwrap();
    std::fs::write(env.target(), format!("{alice}\n")).unwrap();
    env.write_config(Config::vast(&env, &cp.url()));
    let agent = env.spawn();
    let state = env.state_dir();
    let ok = blocking(move || {
        eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(state.join("users/root.keys"))
                .is_ok_and(|c| c.lines().count() == 2)
        })
    })
    .await;
    assert!(ok, "first sync; log:\n{}", agent.log_text());
    assert_eq!(revoked(&env).as_deref(), Some(""));

    // Deleted on the account: revoked, and the copy is reported.
    assert!(cp.remove_key(alice));
    let state = env.state_dir();
    let alice_line = alice.to_string();
    let ok = blocking(move || {
        eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(state.join("revoked_keys")).is_ok_and(|c| {
                let key = alice_line.split(' ').take(2).collect::<Vec<_>>().join(" ");
                c.lines().any(|l| l == key)
            })
        })
    })
    .await;
    assert!(ok, "alice not revoked; log:\n{}", agent.log_text());
    let content = revoked(&env).unwrap();
    assert_not_torn(&content, "after a deletion");
    assert!(
        !content.contains(bob.split(' ').nth(1).unwrap()),
        "bob is still on the account: {content}"
    );
    // The other writer's line stays (reported only, by default).
    assert!(
        std::fs::read_to_string(env.target())
            .unwrap()
            .starts_with(alice)
    );
    // Published with the next status, right after the revocation is written.
    let socket = env.socket();
    let status = blocking(move || {
        let mut status = serde_json::Value::Null;
        eventually(Duration::from_secs(5), || {
            let out = std::process::Command::new(bin())
                .args(["status", "--json", "--socket", socket.to_str().unwrap()])
                .output()
                .unwrap();
            status = serde_json::from_slice(&out.stdout).unwrap_or_default();
            status["users"]["root"]["revoked_copies"] == 1
        });
        status
    })
    .await;
    assert_eq!(status["users"]["root"]["revoked_copies"], 1, "{status:#}");

    // Back on the account: no longer revoked.
    cp.add_key(alice);
    let state = env.state_dir();
    let ok = blocking(move || {
        eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(state.join("revoked_keys")).is_ok_and(|c| c.is_empty())
        })
    })
    .await;
    assert!(
        ok,
        "alice still revoked after she came back; log:\n{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_revoked_copies_takes_out_exactly_the_other_writers_copies() {
    let cp = control_plane().await;
    let [alice, bob, _] = fixture_keys();
    let env = TestEnv::new();
    std::fs::create_dir_all(env.target().parent().unwrap()).unwrap();
    let hand = "# a comment of the platform\n";
    std::fs::write(env.target(), format!("{hand}no-pty {alice}\n{bob}\n")).unwrap();
    env.write_config(Config::vast(&env, &cp.url()).policy("remove_revoked_copies", true));
    let agent = env.spawn();
    let state = env.state_dir();
    assert!(
        blocking(move || eventually(Duration::from_secs(10), || state
            .join("users/root.keys")
            .exists()))
        .await,
        "first sync; log:\n{}",
        agent.log_text()
    );
    assert!(cp.remove_key(alice));
    let target = env.target();
    let alice_blob = alice.split(' ').nth(1).unwrap().to_string();
    let ok = blocking(move || {
        eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(&target).is_ok_and(|c| !c.contains(&alice_blob))
        })
    })
    .await;
    let content = std::fs::read_to_string(env.target()).unwrap();
    assert!(
        ok,
        "the copy of alice stayed:\n{content}\nlog:\n{}",
        agent.log_text()
    );
    assert!(content.starts_with(&format!("{hand}{bob}\n")), "{content}");
}

/// Number of crash rounds; each kills the agent at a random moment while
/// the list flips.
const ROUNDS: usize = 20;

#[tokio::test(flavor = "multi_thread")]
async fn the_revoked_file_is_never_missing_or_torn_across_crashes() {
    let cp = control_plane().await;
    let [alice, _, _] = fixture_keys();
    let env = TestEnv::new();
    env.write_config(Config::vast(&env, &cp.url()));
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            cp.remove_key(alice);
        } else {
            cp.add_key(alice);
        }
        let agent = env.spawn();
        let wait = Duration::from_millis(fastrand::u64(20..400));
        tokio::time::sleep(wait).await;
        agent.kill();
        // Never missing (once the agent has run), never torn.
        if let Some(content) = revoked(&env) {
            assert_not_torn(&content, &format!("round {round}"));
        } else {
            assert!(
                round == 0,
                "round {round}: revoked_keys missing after a crash"
            );
        }
    }
    let content = revoked(&env).expect("revoked_keys after the crash loop");
    assert_not_torn(&content, "at the end");
    // No temporary file left beside it after a clean start.
    let agent = env.spawn();
    let state = env.state_dir();
    blocking(move || {
        eventually(Duration::from_secs(10), || {
            std::fs::read_dir(&state)
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with(".keysync."))
        })
    })
    .await;
    agent.stop(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_an_earlier_config_wrote_is_cleared_at_the_next_start() {
    let cp = control_plane().await;
    let [alice, bob, _] = fixture_keys();
    let env = TestEnv::new();
    env.write_config(Config::vast(&env, &cp.url()));
    let env = run_once_ok(env).await;
    let old = env.target();
    assert!(std::fs::read_to_string(&old).unwrap().contains(alice));
    // While the agent is stopped, the user's file moves elsewhere.
    let new = env.path().join("elsewhere/.ssh/authorized_keys");
    let text = Config::vast(&env, &cp.url())
        .only_user(User::block("root", &new))
        .to_string();
    env.write_config(&text);
    let env = run_once_ok(env).await;
    let old_content = std::fs::read_to_string(&old).unwrap_or_default();
    assert!(
        !old_content.contains(alice) && !old_content.contains(bob),
        "the old target still grants the keys:\n{old_content}"
    );
    assert!(std::fs::read_to_string(&new).unwrap().contains(alice));
    drop(env);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_that_cannot_be_rewritten_never_keeps_a_removed_key_in_the_home_file() {
    if !require_root("a_cache_that_cannot_be_rewritten_never_keeps_a_removed_key_in_the_home_file")
    {
        return;
    }
    let cp = control_plane().await;
    let [alice, bob, _] = fixture_keys();
    let env = TestEnv::new();
    env.write_config(Config::vast(&env, &cp.url()));
    let env = run_once_ok(env).await;
    // The cache directory can no longer be written (as a full or broken
    // state dir would be), then alice is deleted on the account.
    let users = env.state_dir().join("users");
    let chattr = |flag: &str| {
        let ok = std::process::Command::new("chattr")
            .args([flag, users.to_str().unwrap()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "chattr {flag}");
    };
    chattr("+i");
    assert!(cp.remove_key(alice));
    let (env, out) = blocking(move || {
        let out = env.run_once();
        (env, out)
    })
    .await;
    chattr("-i");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the cache failure is reported: {stderr}"
    );
    let home = env.read_target().unwrap();
    assert!(
        !home.contains(alice),
        "the home file still grants the deleted key:\n{home}\n{stderr}"
    );
    assert!(home.contains(bob));
}
