//! The writer's last races (DESIGN.md §4 safety rules): a second agent on
//! one state dir, an `.ssh` that sshd's StrictModes refuses, and a drift
//! repair racing a slow writer that still has the file open.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use super::support::block::block_keys;
use super::support::config::{Config, User};
use super::support::env::{TestEnv, bin, keysync_cmd};
use super::support::eventually;
use super::support::fake_cp::{FakeControlPlane, fixture_keys};

async fn control_plane() -> FakeControlPlane {
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some("test-token"));
    cp.load_fixture();
    cp
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_on_the_same_state_dir_exits_2_naming_the_first() {
    let cp = control_plane().await;
    let env = TestEnv::new();
    env.write_config(Config::vast(&env, &cp.url()));
    let first = env.spawn();
    let target = env.target();
    assert!(
        tokio::task::spawn_blocking(move || eventually(Duration::from_secs(10), || target.exists()))
            .await
            .unwrap(),
        "first agent never wrote; log:\n{}",
        first.log_text()
    );
    // Another config and another socket, the same state dir.
    let other = env.path().join("other.toml");
    let text = Config::vast(&env, &cp.url())
        .top(
            "health_socket",
            env.path().join("other.sock").to_str().unwrap(),
        )
        .to_string();
    std::fs::write(&other, text).unwrap();
    let second = tokio::task::spawn_blocking(move || {
        keysync_cmd(&["run", "--config", other.to_str().unwrap()])
            .env("KEYSYNC_TEST_API_KEY", "test-token")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.pid())),
        "the message names the running agent's pid: {stderr}"
    );
    // The first one is untouched by the attempt.
    assert!(env.socket().exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ssh_dir_that_strict_modes_refuses_is_reported_not_ready() {
    let cp = control_plane().await;
    let env = TestEnv::new();
    env.write_config(Config::vast(&env, &cp.url()));
    let ssh = env.target().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&ssh).unwrap();
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (env, out) = tokio::task::spawn_blocking(move || {
        let out = env.run_once();
        (env, out)
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The keys are written (a removal must land whatever the modes), but
    // the user is not ready, and says why.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("StrictModes") && stderr.contains("group- or world-writable"),
        "{stderr}"
    );
    let [alice, bob, _] = fixture_keys();
    assert_eq!(block_keys(&env.read_target().unwrap()), [alice, bob]);
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_repair_waits_for_a_slow_writer_to_close_the_file() {
    let cp = control_plane().await;
    let env = TestEnv::new();
    // Polling at 60 s: only the drift watch can repair within the test.
    env.write_config(Config::vast(&env, &cp.url()).set("interval", "60s"));
    let agent = env.spawn();
    let target = env.target();
    let t = target.clone();
    assert!(
        tokio::task::spawn_blocking(move || eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(&t).is_ok_and(|c| block_keys(&c).len() == 2)
        }))
        .await
        .unwrap(),
        "no block; log:\n{}",
        agent.log_text()
    );
    // Another writer replaces the file and writes 40 lines through one open
    // descriptor, slowly (2 s in all, well past the quiet and wait times of
    // a repair), then closes it.
    let t = target.clone();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::create(&t).unwrap();
        for i in 0..40 {
            writeln!(file, "# line {i} of a slow writer").unwrap();
            file.flush().unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    // After the close: the block comes back and every line stays.
    let t = target.clone();
    let repaired = tokio::task::spawn_blocking(move || {
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(&t).is_ok_and(|c| block_keys(&c).len() == 2)
        })
    })
    .await
    .unwrap();
    let content = std::fs::read_to_string(&target).unwrap();
    assert!(
        repaired,
        "block not re-asserted:\n{content}\nlog:\n{}",
        agent.log_text()
    );
    for i in 0..40 {
        assert!(
            content.contains(&format!("# line {i} of a slow writer\n")),
            "line {i} of the slow writer lost:\n{content}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_supplementary_groups_never_reach_a_users_home() {
    use super::support::require_root;
    use super::support::users::TestUser;
    use std::os::unix::fs::MetadataExt;
    if !require_root("the_agents_supplementary_groups_never_reach_a_users_home") {
        return;
    }
    let cp = control_plane().await;
    let env = TestEnv::new();
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let user = TestUser::create("ks-groups", env.path().join("home-groups"), true);
    // A file only group `group` may read, and a hard link to it planted at
    // the user's authorized_keys (as a user could where hard links to
    // readable files are allowed).
    let group = format!("ks-sec-{:08x}", fastrand::u32(..));
    assert!(
        Command::new("groupadd")
            .arg(&group)
            .status()
            .unwrap()
            .success()
    );
    let gid = nix::unistd::Group::from_name(&group).unwrap().unwrap().gid;
    let secret = env.path().join("secret");
    std::fs::write(&secret, "# secret-of-the-group\n").unwrap();
    std::os::unix::fs::chown(&secret, Some(0), Some(gid.as_raw())).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::create_dir_all(user.ssh()).unwrap();
    user.chown(&user.ssh());
    std::fs::set_permissions(user.ssh(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::hard_link(&secret, user.keys()).unwrap();

    let text = Config::vast(&env, &cp.url())
        .only_user(User::new(&user.name, "block"))
        .to_string();
    env.write_config(&text);
    let config = env.config_path();
    let group_arg = gid.as_raw().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("setpriv")
            .args(["--groups", &group_arg, "--"])
            .arg(bin())
            .args(["run", "--once", "--config", config.to_str().unwrap()])
            .env("KEYSYNC_TEST_API_KEY", "test-token")
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let _ = Command::new("groupdel").arg(&group).status();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let meta = std::fs::metadata(user.keys()).unwrap();
    let content = std::fs::read_to_string(user.keys()).unwrap();
    assert!(
        !(meta.uid() == user.uid && content.contains("secret-of-the-group")),
        "the group's file was copied into the user's home:\n{content}\n{stderr}"
    );
}
