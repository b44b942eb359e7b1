//! Config reload without a restart (DESIGN.md §7): a drop-in in a
//! `config.d/` that appears after start adds a user; SIGHUP reloads; a
//! broken edit is reported in /status and the running config stays.

use std::time::Duration;

use crate::support::agent::{TestEnv, block_keys, eventually};
use crate::support::config::{Config, User};
use crate::support::fake_cp::{FakeControlPlane, fixture_keys, gen_ed25519_keys};
use crate::support::service::*;
use nix::sys::signal::Signal;

/// A user that exists on every Debian-like system (base-passwd).
const SECOND_USER: &str = "daemon";

#[tokio::test(flavor = "multi_thread")]
async fn dropin_dir_created_after_start_adds_a_user_and_sighup_reloads() {
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some("test-token"));
    cp.load_fixture();
    let cp = blocking(move || {
        let [alice, bob, _] = fixture_keys();
        let env = TestEnv::new();
        env.write_config(Config::vast(&env, &cp.url()).set("interval", "60s"));
        let mut agent = env.spawn();
        assert!(
            eventually(Duration::from_secs(10), || block_keys(
                &env.read_target().unwrap_or_default()
            ) == [alice, bob]),
            "no first sync; log:\n{}",
            agent.log_text()
        );
        assert!(!env.path().join("config.d").exists());
        let loaded_at = status_json(&env)["config"]["loaded_at"].as_f64().unwrap();

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
        let status = status_json(&env);
        assert!(status["users"][SECOND_USER].is_object(), "{status}");
        assert!(status["config"]["loaded_at"].as_f64().unwrap() > loaded_at);
        assert!(status["config"]["last_reload_error"].is_null());
        assert!(agent.alive(), "no restart: the same process");

        // SIGHUP reloads with no file change at all.
        let loaded_at = status["config"]["loaded_at"].as_f64().unwrap();
        agent.signal(Signal::SIGHUP);
        assert!(
            eventually(Duration::from_secs(10), || {
                status_json(&env)["config"]["loaded_at"]
                    .as_f64()
                    .unwrap_or(0.0)
                    > loaded_at
            }),
            "SIGHUP did not reload; log:\n{}",
            agent.log_text()
        );
        assert!(agent.alive());
        assert!(agent.log_text().contains("SIGHUP"));
        cp
    })
    .await;
    drop(cp);
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_edit_keeps_the_running_config() {
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some("test-token"));
    cp.load_fixture();
    let cp = blocking(move || {
        let [alice, bob, _] = fixture_keys();
        let env = TestEnv::new();
        env.write_config(Config::vast(&env, &cp.url()));
        std::fs::create_dir(env.path().join("config.d")).unwrap();
        let mut agent = env.spawn();
        assert!(eventually(Duration::from_secs(10), || {
            block_keys(&env.read_target().unwrap_or_default()) == [alice, bob]
        }));
        let loaded_at = status_json(&env)["config"]["loaded_at"].as_f64().unwrap();

        // An unknown key in a drop-in: reported, and the old config stays.
        let bad = env.path().join("config.d/60-bad.toml");
        std::fs::write(&bad, "bogus_setting = 1\n").unwrap();
        assert!(
            eventually(Duration::from_secs(10), || {
                status_json(&env)["config"]["last_reload_error"].is_string()
            }),
            "the broken reload is not reported; log:\n{}",
            agent.log_text()
        );
        let status = status_json(&env);
        let error = status["config"]["last_reload_error"].as_str().unwrap();
        assert!(
            error.contains("bogus_setting"),
            "the error names the field: {error}"
        );
        assert!(
            error.contains("60-bad.toml"),
            "the error names the file: {error}"
        );
        assert_eq!(status["config"]["loaded_at"].as_f64(), Some(loaded_at));
        let human = String::from_utf8_lossy(&human_status(&env).stdout).into_owned();
        assert!(human.contains("last reload FAILED"), "{human}");
        assert!(agent.alive());

        // The old config still runs: a key added on the account arrives.
        let new_key = gen_ed25519_keys(1).remove(0);
        cp.add_key(&new_key);
        assert!(
            eventually(Duration::from_secs(10), || {
                block_keys(&env.read_target().unwrap_or_default()).contains(&new_key)
            }),
            "the running config stopped syncing; log:\n{}",
            agent.log_text()
        );

        // Fixing the edit clears the error.
        std::fs::remove_file(&bad).unwrap();
        assert!(
            eventually(Duration::from_secs(10), || {
                status_json(&env)["config"]["last_reload_error"].is_null()
            }),
            "the error stays after the fix; log:\n{}",
            agent.log_text()
        );
        assert!(agent.alive());
        cp
    })
    .await;
    drop(cp);
}
