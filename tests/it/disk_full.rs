//! Disk full and read-only (DESIGN.md §4, §8): the state dir and the home
//! each live on a 64 KiB tmpfs. Filled to the last byte, then remounted
//! read-only, they make every write fail: the old target file stays intact
//! byte for byte, `keysync status --json` names the cause in the user's
//! `last_error`, `/readyz` answers 503, and once space returns (filler
//! removed, remounted read-write) the agent catches up by itself, without a
//! restart: the new keys land, the persisted last-good state follows (so a
//! restart without network cannot resurrect a key revoked meanwhile), and
//! the agent is ready again. Needs root (mount).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::block::block_keys;
use crate::support::config::{Config, User};
use crate::support::env::TestEnv;
use crate::support::fake_cp::gen_ed25519_keys;
use crate::support::files::FileState;
use crate::support::http;
use crate::support::scenario::with_no_keys;
use crate::support::{DEADLINE, eventually, require_root, sorted};

const FOREIGN: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi platform@host\n";

/// A small tmpfs, unmounted on drop (lazily if still busy), also when the
/// test fails half way.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).expect("mount point");
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
                path_str(&path),
            ],
        );
        Tmpfs { path }
    }

    fn remount(&self, how: &str) {
        run(
            "mount",
            &["-o", &format!("remount,{how}"), path_str(&self.path)],
        );
    }

    /// Fills the file system to the last byte with `<mount>/filler`.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let chunk = [0x5au8; 4096];
        // Whole pages, then single bytes, until the file system refuses.
        while file.write_all(&chunk).is_ok() {}
        while file.write_all(&chunk[..1]).is_ok() {}
        let _ = file.sync_all();
        let probe = std::fs::write(self.path.join("probe"), b"x");
        assert!(probe.is_err(), "{} is not full", self.path.display());
        let _ = std::fs::remove_file(self.path.join("probe"));
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = Command::new("umount").arg(&self.path).status();
        if !plain.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The two file systems the agent writes to: its state dir's and the home's.
struct Disks {
    state: Tmpfs,
    home: Tmpfs,
}

impl Disks {
    fn mount(env: &TestEnv) -> Disks {
        Disks {
            state: Tmpfs::mount(env.path().join("state-fs"), "64k"),
            home: Tmpfs::mount(env.path().join("home-fs"), "64k"),
        }
    }

    /// Fills both; returns the fillers.
    fn fill(&self) -> [PathBuf; 2] {
        [self.state.fill(), self.home.fill()]
    }

    fn remount(&self, how: &str) {
        self.state.remount(how);
        self.home.remount(how);
    }
}

/// The status code of `GET /readyz` on the health socket.
fn readyz(env: &TestEnv) -> Option<u16> {
    http::readyz(&env.socket())
}

/// The keys of the persisted last good answer (none while unreadable).
fn persisted_keys(path: &Path) -> Vec<String> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["keys"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect()
}

/// Waits until the user's `last_error` contains `cause` and readyz is 503.
fn wait_failed(env: &TestEnv, agent: &Agent, cause: &str) {
    let mut status = serde_json::Value::Null;
    let reported = eventually(DEADLINE, || {
        status = env.try_status_json();
        status["users"]["root"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(cause))
            && readyz(env) == Some(503)
    });
    assert!(
        reported,
        "{cause:?} not reported (readyz {:?}): {status:#}\n{}",
        readyz(env),
        agent.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn full_and_read_only_file_systems_keep_the_old_file_and_recover_without_restart() {
    if !require_root(
        "full_and_read_only_file_systems_keep_the_old_file_and_recover_without_restart",
    ) {
        return;
    }
    with_no_keys(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let keys = gen_ed25519_keys(40);
        // Three keys; during the outage one is revoked and many are added.
        let first = keys[..3].to_vec();
        let revoked = keys[..2].to_vec();
        let last: Vec<String> = keys[..2].iter().chain(&keys[3..]).cloned().collect();
        cp.set_keys(first.clone());

        let disks = Disks::mount(env);
        let state_dir = disks.state.path.join("keysync");
        let target = disks.home.path.join(".ssh/authorized_keys");
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir .ssh");
        std::fs::write(&target, FOREIGN).expect("target");
        env.write_config(
            Config::vast(env, &cp.url())
                .top("state_dir", state_dir.display().to_string())
                .only_user(User::block("root", &target)),
        );
        let agent = env.spawn_with(|cmd| {
            cmd.env("KEYSYNC_LOG", "info");
        });
        let pid = agent.pid();
        let holds = |want: &[String]| {
            std::fs::read_to_string(&target)
                .is_ok_and(|t| t.starts_with(FOREIGN) && sorted(&block_keys(&t)) == sorted(want))
        };
        assert!(
            eventually(DEADLINE, || holds(&first)),
            "first keys never written:\n{}",
            agent.log_tail()
        );
        assert!(
            eventually(DEADLINE, || readyz(env) == Some(200)),
            "never ready:\n{}",
            agent.log_tail()
        );
        let before = FileState::of(&target);
        // The list changes while no write can succeed: the cause is
        // reported, and the target stays as it was.
        let change_fails = |keys: &[String], cause: &str, when: &str| {
            cp.set_keys(keys.to_vec());
            wait_failed(env, &agent, cause);
            assert_eq!(
                FileState::of(&target),
                before,
                "the target changed while {when}"
            );
        };

        // Full: a key revoked, nothing can be written anywhere.
        let fillers = disks.fill();
        change_fails(&revoked, "No space left on device", "the disk was full");

        // Read-only (and still full): many keys added.
        disks.remount("ro");
        change_fails(&last, "Read-only file system", "read-only");
        let status = env.try_status_json();
        assert!(
            status["users"]["root"]["fingerprints"]
                .as_array()
                .is_some_and(|f| f.len() == first.len()),
            "status must show what the file holds, not what was wanted: {status:#}"
        );

        // Space returns: the agent catches up by itself.
        disks.remount("rw");
        for filler in &fillers {
            std::fs::remove_file(filler).expect("remove filler");
        }
        caught_up(env, agent, pid, &state_dir, &last, &keys[2], holds);
        drop(disks);
    })
    .await;
}

/// After the space came back: the new keys land without a restart, the
/// agent is ready, and the hook cache and the persisted last good answer
/// follow (with the latter stuck at the old list, a restart without network
/// would bring the revoked key back at the next write). Then a clean stop.
fn caught_up(
    env: &TestEnv,
    mut agent: Agent,
    pid: i32,
    state_dir: &Path,
    last: &[String],
    revoked: &str,
    holds: impl Fn(&[String]) -> bool,
) {
    assert!(
        eventually(DEADLINE, || holds(last)),
        "new keys never landed after recovery:\n{}",
        agent.log_tail()
    );
    assert!(agent.alive() && agent.pid() == pid, "the agent restarted");
    let mut status = serde_json::Value::Null;
    let recovered = eventually(DEADLINE, || {
        status = env.try_status_json();
        status["users"]["root"]["last_error"].is_null() && readyz(env) == Some(200)
    });
    assert!(
        recovered,
        "not ready after recovery: {status:#}\n{}",
        agent.log_tail()
    );
    let cache = state_dir.join("users/root.keys");
    let cached = std::fs::read_to_string(&cache).expect("cache");
    assert_eq!(
        sorted(&cached.lines().map(str::to_string).collect::<Vec<_>>()),
        sorted(last)
    );

    let persisted = state_dir.join("sources/account.json");
    let mut saved = Vec::new();
    let follows = eventually(DEADLINE, || {
        saved = persisted_keys(&persisted);
        sorted(&saved) == sorted(last)
    });
    assert!(
        follows,
        "persisted state stuck at {} keys (want {}):\n{}",
        saved.len(),
        last.len(),
        agent.log_tail()
    );
    assert!(
        !saved.iter().any(|k| k == revoked),
        "the revoked key is still persisted"
    );
    let (status, _) = agent.stop(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}
