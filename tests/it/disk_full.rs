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
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::support::agent::{Agent, TestEnv, bin, block_keys, blocking, eventually, require_root};
use crate::support::config::{Config, User};
use crate::support::fake_cp::{FakeControlPlane, gen_ed25519_keys};
use crate::support::http;

/// Generous deadline for "eventually" conditions on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(20);
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

/// Same bytes, inode and mtime: the file was not replaced or touched.
#[derive(Debug, PartialEq, Eq)]
struct FileState {
    bytes: Vec<u8>,
    ino: u64,
    mtime: SystemTime,
}

fn file_state(path: &Path) -> FileState {
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    FileState {
        bytes: std::fs::read(path).expect("read"),
        ino: meta.ino(),
        mtime: meta.modified().expect("mtime"),
    }
}

/// `keysync status --json`, or Null while the socket does not answer.
fn status_json(env: &TestEnv) -> serde_json::Value {
    let out = Command::new(bin())
        .args(["status", "--json", "--socket"])
        .arg(env.socket())
        .output()
        .expect("run keysync status");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// The status code of `GET /readyz` on the health socket.
fn readyz(env: &TestEnv) -> Option<u16> {
    http::readyz(&env.socket())
}

fn sorted(keys: &[String]) -> Vec<String> {
    let mut v = keys.to_vec();
    v.sort();
    v
}

fn log_tail(agent: &Agent) -> String {
    let log = agent.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Waits until the user's `last_error` contains `cause` and readyz is 503.
fn wait_failed(env: &TestEnv, agent: &Agent, cause: &str) {
    let mut status = serde_json::Value::Null;
    let reported = eventually(DEADLINE, || {
        status = status_json(env);
        status["users"]["root"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(cause))
            && readyz(env) == Some(503)
    });
    assert!(
        reported,
        "{cause:?} not reported (readyz {:?}): {status:#}\n{}",
        readyz(env),
        log_tail(agent)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn full_and_read_only_file_systems_keep_the_old_file_and_recover_without_restart() {
    if !require_root(
        "full_and_read_only_file_systems_keep_the_old_file_and_recover_without_restart",
    ) {
        return;
    }
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some("test-token"));
    blocking(move || {
        let keys = gen_ed25519_keys(40);
        // Three keys; during the outage one is revoked and many are added.
        let first = keys[..3].to_vec();
        let revoked = keys[..2].to_vec();
        let last: Vec<String> = keys[..2].iter().chain(&keys[3..]).cloned().collect();
        cp.set_keys(first.clone());

        let env = TestEnv::new();
        let state_fs = Tmpfs::mount(env.path().join("state-fs"), "64k");
        let home_fs = Tmpfs::mount(env.path().join("home-fs"), "64k");
        let state_dir = state_fs.path.join("keysync");
        let target = home_fs.path.join(".ssh/authorized_keys");
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir .ssh");
        std::fs::write(&target, FOREIGN).expect("target");
        env.write_config(
            Config::vast(&env, &cp.url())
                .top("state_dir", state_dir.display().to_string())
                .only_user(User::block("root", &target)),
        );
        let mut agent = env.spawn_with(|cmd| {
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
            log_tail(&agent)
        );
        assert!(
            eventually(DEADLINE, || readyz(&env) == Some(200)),
            "never ready:\n{}",
            log_tail(&agent)
        );
        let before = file_state(&target);

        // Full: a key revoked, nothing can be written anywhere.
        let fillers = [state_fs.fill(), home_fs.fill()];
        cp.set_keys(revoked.clone());
        wait_failed(&env, &agent, "No space left on device");
        assert_eq!(
            file_state(&target),
            before,
            "the target changed while the disk was full"
        );

        // Read-only (and still full): many keys added.
        state_fs.remount("ro");
        home_fs.remount("ro");
        cp.set_keys(last.clone());
        wait_failed(&env, &agent, "Read-only file system");
        assert_eq!(
            file_state(&target),
            before,
            "the target changed while read-only"
        );
        let status = status_json(&env);
        assert!(
            status["users"]["root"]["fingerprints"]
                .as_array()
                .is_some_and(|f| f.len() == first.len()),
            "status must show what the file holds, not what was wanted: {status:#}"
        );

        // Space returns: the agent catches up by itself.
        state_fs.remount("rw");
        home_fs.remount("rw");
        for filler in &fillers {
            std::fs::remove_file(filler).expect("remove filler");
        }
        assert!(
            eventually(DEADLINE, || holds(&last)),
            "new keys never landed after recovery:\n{}",
            log_tail(&agent)
        );
        assert!(agent.alive() && agent.pid() == pid, "the agent restarted");
        let mut status = serde_json::Value::Null;
        let recovered = eventually(DEADLINE, || {
            status = status_json(&env);
            status["users"]["root"]["last_error"].is_null() && readyz(&env) == Some(200)
        });
        assert!(
            recovered,
            "not ready after recovery: {status:#}\n{}",
            log_tail(&agent)
        );
        let cache = state_dir.join("users/root.keys");
        let cached = std::fs::read_to_string(&cache).expect("cache");
        assert_eq!(
            sorted(&cached.lines().map(str::to_string).collect::<Vec<_>>()),
            sorted(&last)
        );

        // The persisted last good answer follows too: with it stuck at the
        // old list, a restart without network would bring the revoked key
        // back at the next write.
        let persisted = state_dir.join("sources/account.json");
        let mut saved = Vec::new();
        let follows = eventually(DEADLINE, || {
            saved = std::fs::read(&persisted)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["keys"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect();
            sorted(&saved) == sorted(&last)
        });
        assert!(
            follows,
            "persisted state stuck at {} keys (want {}):\n{}",
            saved.len(),
            last.len(),
            log_tail(&agent)
        );
        assert!(
            !saved.contains(&keys[2]),
            "the revoked key is still persisted"
        );

        let (status, _) = agent.stop(Duration::from_secs(10));
        assert!(status.success(), "{status:?}");
        drop((state_fs, home_fs));
    })
    .await;
}
