//! Config reload without a restart (DESIGN.md §7): a drop-in in a
//! `config.d/` that appears after start adds a user; SIGHUP reloads; a
//! broken edit is reported in /status and the running config stays.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::block::block_keys;
use crate::support::config::{Config, User};
use crate::support::env::TestEnv;
use crate::support::eventually;
use crate::support::fake_cp::{fixture_keys, gen_ed25519_keys};
use crate::support::scenario::with_fixture;

/// A user that exists on every Debian-like system (base-passwd).
const SECOND_USER: &str = "daemon";

/// When the agent last loaded its config, from /status.
fn loaded_at(env: &TestEnv) -> f64 {
    env.status_json()["config"]["loaded_at"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn dropin_dir_created_after_start_adds_a_user_and_sighup_reloads() {
    with_fixture(|s| {
        let [alice, bob, _] = fixture_keys();
        let env = &s.env;
        let mut agent = s.start(s.config().set("interval", "60s"), &[alice, bob]);
        assert!(!env.path().join("config.d").exists());
        let loaded = loaded_at(env);

        // config.d/ does not exist at start; create it and a drop-in at once.
        let theirs = env.path().join("second/authorized_keys");
        std::fs::create_dir(env.path().join("config.d")).unwrap();
        std::fs::write(
            env.path().join("config.d/50-second.toml"),
            Config::default()
                .user(User::block(SECOND_USER, &theirs))
                .to_string(),
        )
        .unwrap();
        assert!(
            eventually(Duration::from_secs(10), || {
                block_keys(&std::fs::read_to_string(&theirs).unwrap_or_default()) == [alice, bob]
            }),
            "the drop-in's user was not synced; log:\n{}",
            agent.log_text()
        );
        assert_eq!(
            env.cache(SECOND_USER).as_deref(),
            Some(format!("{alice}\n{bob}\n").as_str()),
            "the hook's cache for the new user"
        );
        let status = env.status_json();
        assert!(status["users"][SECOND_USER].is_object(), "{status}");
        assert!(status["config"]["loaded_at"].as_f64().unwrap() > loaded);
        assert!(status["config"]["last_reload_error"].is_null());
        assert!(agent.alive(), "no restart: the same process");

        // SIGHUP reloads with no file change at all.
        let loaded = status["config"]["loaded_at"].as_f64().unwrap();
        agent.signal(Signal::SIGHUP);
        assert!(
            eventually(Duration::from_secs(10), || {
                env.status_json()["config"]["loaded_at"]
                    .as_f64()
                    .unwrap_or(0.0)
                    > loaded
            }),
            "SIGHUP did not reload; log:\n{}",
            agent.log_text()
        );
        assert!(agent.alive());
        assert!(agent.log_text().contains("SIGHUP"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_edit_keeps_the_running_config() {
    with_fixture(|s| {
        let [alice, bob, _] = fixture_keys();
        let env = &s.env;
        std::fs::create_dir(env.path().join("config.d")).unwrap();
        let mut agent = s.start(s.config(), &[alice, bob]);
        let loaded = loaded_at(env);

        // An unknown key in a drop-in: reported, and the old config stays.
        let bad = env.path().join("config.d/60-bad.toml");
        std::fs::write(&bad, "bogus_setting = 1\n").unwrap();
        assert!(
            eventually(Duration::from_secs(10), || {
                env.status_json()["config"]["last_reload_error"].is_string()
            }),
            "the broken reload is not reported; log:\n{}",
            agent.log_text()
        );
        let status = env.status_json();
        let error = status["config"]["last_reload_error"].as_str().unwrap();
        assert!(
            error.contains("bogus_setting"),
            "the error names the field: {error}"
        );
        assert!(
            error.contains("60-bad.toml"),
            "the error names the file: {error}"
        );
        assert_eq!(status["config"]["loaded_at"].as_f64(), Some(loaded));
        let human = String::from_utf8_lossy(&env.status(&[]).stdout).into_owned();
        assert!(human.contains("last reload FAILED"), "{human}");
        assert!(agent.alive());

        // The old config still runs: a key added on the account arrives.
        let new_key = gen_ed25519_keys(1).remove(0);
        s.cp.add_key(&new_key);
        assert!(
            eventually(Duration::from_secs(10), || env
                .block_keys()
                .contains(&new_key)),
            "the running config stopped syncing; log:\n{}",
            agent.log_text()
        );

        // Fixing the edit clears the error.
        std::fs::remove_file(&bad).unwrap();
        assert!(
            eventually(Duration::from_secs(10), || {
                env.status_json()["config"]["last_reload_error"].is_null()
            }),
            "the error stays after the fix; log:\n{}",
            agent.log_text()
        );
        assert!(agent.alive());
    })
    .await;
}
