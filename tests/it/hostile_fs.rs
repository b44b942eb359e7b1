//! Homes that users control are hostile (DESIGN.md §4 "safety rules").
//!
//! The zoo: real users (useradd) whose homes hold a dangling symlink at
//! `authorized_keys`, `.ssh` linked to /etc, `authorized_keys` linked to
//! /etc/passwd, `.ssh` linked to a root-owned victim directory, a FIFO or a
//! directory where the file should be, `.ssh` or the file at mode 000, a
//! newline in the target's directory name (useradd refuses one in the home
//! itself), a home that does not exist, and a home owned by another user,
//! next to one ordinary user. Through the real daemon and `run --once`, each
//! gets its defined outcome: written correctly, or reported failed with the
//! specific cause while the others go on (nothing hangs on the FIFO). A
//! snapshot of every home and of the victim (bytes, modes, owners, mtimes)
//! shows no write ever lands outside the users' own `.ssh`.
//!
//! The race: a thread swaps `.ssh` (or `authorized_keys`) between the real
//! thing and a symlink to a root-owned victim with `renameat2(RENAME_EXCHANGE)`
//! while `write::apply` writes as fast as it can. The victim never gets a
//! file and is never modified; the real directory gets the writes.
//!
//! Needs root (useradd, chown, setfsuid).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::agent::{TestEnv, bin, block_keys, blocking, eventually, require_root};
use crate::support::config::{Config, User};
use crate::support::fake_cp::{FakeControlPlane, gen_ed25519_keys};
use crate::support::users::TestUser;
use keysync::write::{self, FileSpec, Outcome, WriteError};
use nix::unistd::{Gid, Uid};

/// Generous deadline for "eventually" conditions on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(20);
/// A `run --once` that has not exited by then hangs.
const HANG: Duration = Duration::from_secs(60);

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn lchown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("lchown {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------
// Real users

// ---------------------------------------------------------------------------
// Snapshots: everything about a tree that a write could change

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    /// File bytes, or a link's text.
    content: Vec<u8>,
}

/// Every entry below `root` (not following links), minus the `skip` subtrees.
fn snapshot(root: &Path, skip: &[PathBuf]) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        if skip.iter().any(|s| path.starts_with(s)) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let ft = meta.file_type();
        let (kind, content) = if ft.is_symlink() {
            (
                "link",
                std::fs::read_link(&path)
                    .map(|t| t.as_os_str().as_bytes().to_vec())
                    .unwrap_or_default(),
            )
        } else if ft.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                todo.extend(entries.flatten().map(|e| e.path()));
            }
            ("dir", Vec::new())
        } else if ft.is_file() {
            // Read as root (mode 000 files too); never opens a FIFO.
            ("file", std::fs::read(&path).unwrap_or_default())
        } else {
            ("other", Vec::new())
        };
        out.insert(
            path,
            Entry {
                kind,
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                content,
            },
        );
    }
    out
}

fn assert_same(what: &str, before: &BTreeMap<PathBuf, Entry>, after: &BTreeMap<PathBuf, Entry>) {
    let mut diffs = Vec::new();
    for (path, entry) in before {
        match after.get(path) {
            None => diffs.push(format!("removed: {}", path.display())),
            Some(now) if now != entry => {
                diffs.push(format!("changed: {}: {entry:?} -> {now:?}", path.display()))
            }
            _ => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        diffs.push(format!("created: {}", path.display()));
    }
    assert!(
        diffs.is_empty(),
        "{what}: writes outside the users' .ssh:\n{}",
        diffs.join("\n")
    );
}

/// /etc is shared with other tests (useradd), so it is not snapshotted; what
/// an agent following a planted link there would leave behind is checked.
fn assert_etc_untouched(what: &str) {
    assert!(
        !Path::new("/etc/authorized_keys").exists(),
        "{what}: /etc/authorized_keys was created"
    );
    let leftovers: Vec<_> = std::fs::read_dir("/etc")
        .expect("ls /etc")
        .flatten()
        .filter(|e| e.file_name().as_bytes().starts_with(b".keysync."))
        .map(|e| e.path())
        .collect();
    assert!(
        leftovers.is_empty(),
        "{what}: temp files in /etc: {leftovers:?}"
    );
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    assert!(
        !passwd.contains("keysync managed keys"),
        "{what}: /etc/passwd was written"
    );
    assert!(
        !passwd.contains("ssh-ed25519"),
        "{what}: a key landed in /etc/passwd"
    );
}

// ---------------------------------------------------------------------------
// Running the agent

fn status_json(env: &TestEnv) -> serde_json::Value {
    let out = Command::new(bin())
        .args(["status", "--json", "--socket"])
        .arg(env.socket())
        .output()
        .expect("run keysync status");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// `run --once`, killed and reported if it hangs.
fn run_once(env: &TestEnv) -> (i32, String) {
    let log = env.path().join("once.log");
    let mut child = Command::new(bin())
        .args(["run", "--once", "--config"])
        .arg(env.config_path())
        .env("KEYSYNC_TEST_API_KEY", "test-token")
        .env("KEYSYNC_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn keysync");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (
                status.code().unwrap_or(-1),
                std::fs::read_to_string(&log).unwrap_or_default(),
            );
        }
        if started.elapsed() > HANG {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "run --once hung:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sorted(keys: &[String]) -> Vec<String> {
    let mut v = keys.to_vec();
    v.sort();
    v
}

/// One inhabitant of the zoo and what must happen to it.
struct Case {
    label: &'static str,
    user: TestUser,
    /// The configured path (`~/…`).
    path: String,
    /// None: written correctly. Some: reported failed with this in the error.
    fails_with: Option<&'static str>,
}

impl Case {
    fn target(&self) -> PathBuf {
        match self.path.strip_prefix("~/") {
            Some(rest) => self.user.home.join(rest),
            None => PathBuf::from(&self.path),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn zoo_of_hostile_homes_each_gets_its_defined_outcome_and_nothing_lands_elsewhere() {
    if !require_root(
        "zoo_of_hostile_homes_each_gets_its_defined_outcome_and_nothing_lands_elsewhere",
    ) {
        return;
    }
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some("test-token"));
    blocking(move || {
        let keys = gen_ed25519_keys(4);
        cp.set_keys(keys[..2].to_vec());
        let env = TestEnv::new();
        // Users must be able to reach their homes below the test dir.
        chmod(env.path(), 0o755);
        let homes = env.path().join("homes");
        std::fs::create_dir(&homes).expect("homes");
        chmod(&homes, 0o755);
        // A root-owned directory standing in for /etc, with files to protect.
        let victim = env.path().join("victim");
        std::fs::create_dir(&victim).expect("victim");
        chmod(&victim, 0o755);
        std::fs::write(victim.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n")
            .expect("victim file");
        std::fs::write(
            victim.join("authorized_keys"),
            "ssh-ed25519 AAAA root-only\n",
        )
        .expect("victim file");
        let nowhere = env.path().join("nowhere");

        let home = |tag: &str| homes.join(tag);
        let default_path = "~/.ssh/authorized_keys".to_string();
        let mkssh = |u: &TestUser, mode: u32| {
            std::fs::create_dir(u.ssh()).expect("mkdir .ssh");
            chmod(&u.ssh(), mode);
            u.chown(&u.ssh());
        };
        let mut cases = Vec::new();

        let u = TestUser::create("ks-zoo", home("good"), true);
        mkssh(&u, 0o700);
        cases.push(Case {
            label: "ordinary",
            user: u,
            path: default_path.clone(),
            fails_with: None,
        });

        let u = TestUser::create("ks-zoo", home("dangling"), true);
        mkssh(&u, 0o700);
        std::os::unix::fs::symlink(nowhere.join("authorized_keys"), u.keys()).expect("symlink");
        u.chown(&u.keys());
        cases.push(Case {
            label: "dangling link at the file",
            user: u,
            path: default_path.clone(),
            fails_with: Some("symlink not owned by root"),
        });

        let u = TestUser::create("ks-zoo", home("ssh-etc"), true);
        std::os::unix::fs::symlink("/etc", u.ssh()).expect("symlink");
        u.chown(&u.ssh());
        cases.push(Case {
            label: ".ssh -> /etc",
            user: u,
            path: default_path.clone(),
            fails_with: Some("symlink not owned by root"),
        });

        let u = TestUser::create("ks-zoo", home("passwd"), true);
        mkssh(&u, 0o700);
        std::os::unix::fs::symlink("/etc/passwd", u.keys()).expect("symlink");
        u.chown(&u.keys());
        cases.push(Case {
            label: "authorized_keys -> /etc/passwd",
            user: u,
            path: default_path.clone(),
            fails_with: Some("symlink not owned by root"),
        });

        let u = TestUser::create("ks-zoo", home("ssh-victim"), true);
        std::os::unix::fs::symlink(&victim, u.ssh()).expect("symlink");
        u.chown(&u.ssh());
        cases.push(Case {
            label: ".ssh -> root's directory",
            user: u,
            path: default_path.clone(),
            fails_with: Some("symlink not owned by root"),
        });

        let u = TestUser::create("ks-zoo", home("fifo"), true);
        mkssh(&u, 0o700);
        nix::unistd::mkfifo(&u.keys(), nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        u.chown(&u.keys());
        cases.push(Case {
            label: "FIFO at the file",
            user: u,
            path: default_path.clone(),
            fails_with: Some("not a regular file"),
        });

        let u = TestUser::create("ks-zoo", home("dir"), true);
        mkssh(&u, 0o700);
        std::fs::create_dir(u.keys()).expect("dir at the file");
        u.chown(&u.keys());
        cases.push(Case {
            label: "directory at the file",
            user: u,
            path: default_path.clone(),
            fails_with: Some("not a regular file"),
        });

        let u = TestUser::create("ks-zoo", home("ssh000"), true);
        mkssh(&u, 0o000);
        cases.push(Case {
            label: ".ssh mode 000",
            user: u,
            path: default_path.clone(),
            fails_with: Some("Permission denied"),
        });

        let u = TestUser::create("ks-zoo", home("file000"), true);
        mkssh(&u, 0o700);
        std::fs::write(u.keys(), "ssh-ed25519 AAAA the-users-own-line\n").expect("file");
        chmod(&u.keys(), 0o000);
        u.chown(&u.keys());
        cases.push(Case {
            label: "authorized_keys mode 000",
            user: u,
            path: default_path.clone(),
            fails_with: Some("Permission denied"),
        });

        // useradd refuses a newline in the home (shadow's VALID()), so the
        // newline goes into the target's directory below the home.
        let nl_name = format!("ks-zoo-nl-{:08x}", fastrand::u32(..));
        let refused = Command::new("useradd")
            .args(["-M", "-d"])
            .arg(OsStr::from_bytes(
                format!("{}/new\nline", homes.display()).as_bytes(),
            ))
            .arg(&nl_name)
            .output()
            .expect("useradd");
        if refused.status.success() {
            let _ = Command::new("userdel").arg(&nl_name).output();
            panic!("useradd accepted a newline in a home; extend the test to use it");
        }
        let u = TestUser::create("ks-zoo", home("newline"), true);
        cases.push(Case {
            label: "newline in the directory name",
            user: u,
            path: "~/new\nline/authorized_keys".into(),
            fails_with: None,
        });

        let u = TestUser::create("ks-zoo", home("missing"), false);
        cases.push(Case {
            label: "home does not exist",
            user: u,
            path: default_path.clone(),
            fails_with: Some("No such file or directory"),
        });

        let u = TestUser::create("ks-zoo", home("foreign-home"), true);
        let owner = &cases[0].user;
        lchown(&u.home, owner.uid, owner.gid);
        chmod(&u.home, 0o755);
        cases.push(Case {
            label: "home owned by another user",
            user: u,
            path: default_path.clone(),
            fails_with: Some("Permission denied"),
        });

        let config = cases
            .iter()
            .fold(Config::vast(&env, &cp.url()), |config, c| {
                config.user(User::block(&c.user.name, &c.path))
            });
        env.write_config(config);

        // Everything a write could touch, except where writes belong: the
        // ordinary user's .ssh, and the newline directory (whose creation
        // changes its home's mtime).
        let nl = &cases[9];
        let writable = [
            cases[0].user.ssh(),
            nl.target().parent().expect("parent").to_path_buf(),
        ];
        let nl_home = nl.user.home.clone();
        let snap_homes = || {
            let mut s = snapshot(&homes, &writable);
            s.remove(&nl_home);
            s
        };
        let homes_before = snap_homes();
        let victim_before = snapshot(&victim, &[]);
        let nl_home_before = std::fs::symlink_metadata(&nl.user.home).expect("home");

        let check = |what: &str, want: &[String], status: Option<&serde_json::Value>| {
            for case in &cases {
                let target = case.target();
                match case.fails_with {
                    None => {
                        let text = std::fs::read_to_string(&target)
                            .unwrap_or_else(|e| panic!("{what}: {}: {e}", case.label));
                        assert_eq!(
                            sorted(&block_keys(&text)),
                            sorted(want),
                            "{what}: {}",
                            case.label
                        );
                        let meta = std::fs::metadata(&target).expect("meta");
                        assert_eq!(
                            (meta.uid(), meta.mode() & 0o7777),
                            (case.user.uid, 0o600),
                            "{what}: {}",
                            case.label
                        );
                        let dir = std::fs::metadata(target.parent().expect("dir")).expect("meta");
                        assert_eq!(
                            (dir.uid(), dir.mode() & 0o7777),
                            (case.user.uid, 0o700),
                            "{what}: {}",
                            case.label
                        );
                        if let Some(s) = status {
                            assert!(
                                s["users"][&case.user.name]["last_error"].is_null(),
                                "{what}: {} failed: {s:#}",
                                case.label
                            );
                        }
                    }
                    Some(cause) => {
                        if let Some(s) = status {
                            let error = s["users"][&case.user.name]["last_error"]
                                .as_str()
                                .unwrap_or_default();
                            assert!(
                                error.contains(cause),
                                "{what}: {}: expected {cause:?}, got {error:?}",
                                case.label
                            );
                        }
                    }
                }
            }
            assert_same(&format!("{what}: homes"), &homes_before, &snap_homes());
            assert_same(
                &format!("{what}: victim"),
                &victim_before,
                &snapshot(&victim, &[]),
            );
            assert_etc_untouched(what);
            assert!(
                !nowhere.exists(),
                "{what}: the dangling link's target was created"
            );
            let nl_home = std::fs::symlink_metadata(&nl.user.home).expect("home");
            assert_eq!(
                (nl_home.uid(), nl_home.mode()),
                (nl_home_before.uid(), nl_home_before.mode()),
                "{what}"
            );
            assert!(
                !cases[10].user.home.exists(),
                "{what}: the missing home was created"
            );
            assert!(
                !cases[11].user.ssh().exists(),
                "{what}: .ssh created in a home owned by another user"
            );
        };

        // The daemon: every user reported, the good ones written.
        let agent = env.spawn();
        let mut status = serde_json::Value::Null;
        let settled = eventually(DEADLINE, || {
            status = status_json(&env);
            cases.iter().all(|c| {
                let u = &status["users"][&c.user.name];
                match c.fails_with {
                    None => {
                        u["last_error"].is_null()
                            && u["fingerprints"].as_array().is_some_and(|f| f.len() == 2)
                    }
                    Some(cause) => u["last_error"].as_str().is_some_and(|e| e.contains(cause)),
                }
            })
        });
        assert!(
            settled,
            "outcomes not reached: {status:#}\n{}",
            agent.log_text()
        );
        check("daemon", &keys[..2], Some(&status));

        // Nothing hangs: a change still reaches the good users.
        cp.set_keys(keys[1..].to_vec());
        let followed = eventually(DEADLINE, || {
            cases.iter().filter(|c| c.fails_with.is_none()).all(|c| {
                std::fs::read_to_string(c.target())
                    .is_ok_and(|t| sorted(&block_keys(&t)) == sorted(&keys[1..]))
            })
        });
        assert!(
            followed,
            "the good users stopped following the list:\n{}",
            agent.log_text()
        );
        let status = status_json(&env);
        check("daemon after a change", &keys[1..], Some(&status));
        let (exit, _) = agent.stop(Duration::from_secs(10));
        assert!(exit.success(), "{exit:?}");

        // run --once: the same outcomes, exit 1 because users failed.
        cp.set_keys(keys[2..].to_vec());
        let (code, stderr) = run_once(&env);
        assert_eq!(code, 1, "{stderr}");
        for case in cases.iter().filter(|c| c.fails_with.is_some()) {
            assert!(
                stderr.contains(&case.user.name),
                "run --once did not report {}:\n{stderr}",
                case.label
            );
        }
        check("run --once", &keys[2..], None);
        drop(cases);
    })
    .await;
}

// ---------------------------------------------------------------------------
// The race: a symlink swapped in while the writer works

const USER: u32 = 61_417;
const GROUP: u32 = 61_417;

/// Swaps `a` and `b` (in `dir`) atomically, over and over, until `stop`.
fn swapper(
    dir: PathBuf,
    a: &'static str,
    b: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let dir_fd = std::fs::File::open(&dir).expect("open dir");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dir_fd);
        let mut swaps = 0u64;
        while !stop.load(Ordering::Relaxed) {
            nix::fcntl::renameat2(
                Some(fd),
                a,
                Some(fd),
                b,
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
            .expect("renameat2");
            swaps += 1;
            // Short pauses between bursts: the writer sees stable states
            // (writes and refusals) as well as the race itself.
            // (A write with its two fsyncs takes milliseconds.)
            if swaps.is_multiple_of(128) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        swaps
    })
}

/// Lists `victim` in a loop until `stop`; returns any name that was not there at the start.
fn watcher(victim: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("ls victim")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let original = names(&victim);
    std::thread::spawn(move || {
        let mut strangers = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            for name in names(&victim) {
                if !original.contains(&name) && !strangers.contains(&name) {
                    strangers.push(name);
                }
            }
            std::thread::yield_now();
        }
        strangers
    })
}

/// Writes through `spec` while `.ssh`/the file is being swapped, until at
/// least `min_calls` calls were made and both a write and a refusal were seen
/// (the race really happened). A rename may also replace the planted link
/// itself (it lands on the name between the check and the rename, and
/// rename never follows it): then no refusal can come any more, and
/// `link_present` says so. Returns (written, refused, raced).
fn hammer(spec: &FileSpec, min_calls: u64, link_present: &dyn Fn() -> bool) -> (u64, u64, u64) {
    let (mut written, mut refused, mut raced) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut i = 0u64;
    while i < min_calls || written == 0 || (refused == 0 && link_present()) {
        assert!(
            started.elapsed() < DEADLINE,
            "race never seen both ways: {written} written, {refused} refused"
        );
        i += 1;
        let line = format!("ssh-ed25519 AAAA write-{i}\n");
        match write::apply(spec, &mut |_| Some(line.clone().into_bytes())) {
            Ok(Outcome::Written) => written += 1,
            Ok(other) => panic!("call {i}: {other:?}"),
            Err(WriteError::SymlinkRefused { .. }) => refused += 1,
            Err(WriteError::Raced { .. }) => raced += 1,
            Err(e) => panic!("call {i}: unexpected error {e:?}"),
        }
    }
    (written, refused, raced)
}

#[test]
fn a_symlink_swapped_in_during_writes_never_reaches_the_victim() {
    if !require_root("a_symlink_swapped_in_during_writes_never_reaches_the_victim") {
        return;
    }
    // (what is swapped, acting as the user or as plain root)
    for (swap_file, act_as_user) in [(false, true), (false, false), (true, false), (true, true)] {
        let what = format!(
            "swap {}, {}",
            if swap_file { "authorized_keys" } else { ".ssh" },
            if act_as_user {
                "as the user"
            } else {
                "as root"
            }
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        chmod(tmp.path(), 0o755);
        let home = tmp.path().join("home");
        std::fs::create_dir(&home).expect("home");
        chmod(&home, 0o755);
        lchown(&home, USER, GROUP);
        // The victim: root-owned, like /etc. As root the writer could write
        // there; only not following the user's link keeps it out.
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).expect("victim");
        chmod(&victim, 0o755);
        std::fs::write(victim.join("passwd"), "root:x:0:0::/root:/bin/sh\n").expect("victim file");
        let ssh = home.join(".ssh");
        std::fs::create_dir(&ssh).expect(".ssh");
        chmod(&ssh, 0o700);
        lchown(&ssh, USER, GROUP);
        let (swap_dir, a, b) = if swap_file {
            std::fs::write(ssh.join("authorized_keys"), "").expect("file");
            lchown(&ssh.join("authorized_keys"), USER, GROUP);
            std::os::unix::fs::symlink(victim.join("passwd"), ssh.join("swap")).expect("symlink");
            lchown(&ssh.join("swap"), USER, GROUP);
            (ssh.clone(), "authorized_keys", "swap")
        } else {
            std::os::unix::fs::symlink(&victim, home.join("swap")).expect("symlink");
            lchown(&home.join("swap"), USER, GROUP);
            (home.clone(), ".ssh", "swap")
        };
        let victim_before = snapshot(&victim, &[]);

        let stop = Arc::new(AtomicBool::new(false));
        let watch = watcher(victim.clone(), stop.clone());
        let swaps = swapper(swap_dir, a, b, stop.clone());
        let ids = (Uid::from_raw(USER), Gid::from_raw(GROUP));
        let spec = FileSpec {
            path: home.join(".ssh/authorized_keys"),
            base: home.clone(),
            owner: Some(ids),
            act_as: act_as_user.then_some(ids),
            file_mode: 0o600,
            dir_mode: 0o700,
        };
        let names = [
            home.join(".ssh"),
            home.join("swap"),
            ssh.join("authorized_keys"),
            ssh.join("swap"),
        ];
        let link_present = || names.iter().any(|p| p.is_symlink());
        let (written, refused, raced) = hammer(&spec, 2000, &link_present);
        stop.store(true, Ordering::Relaxed);
        let swaps = swaps.join().expect("swapper");
        let strangers = watch.join().expect("watcher");
        eprintln!(
            "{what}: {swaps} swaps, {written} written, {refused} refused, {raced} gave up racing"
        );

        assert!(
            strangers.is_empty(),
            "{what}: files appeared in the victim: {strangers:?}"
        );
        assert_same(&what, &victim_before, &snapshot(&victim, &[]));
        // The writes landed in the user's real directory or file, whatever its
        // name is after the last swap, as the user's 0600 file.
        let real_dir = if swap_file {
            ssh.clone()
        } else if home.join(".ssh").is_symlink() {
            home.join("swap")
        } else {
            home.join(".ssh")
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&real_dir).expect("ls").flatten() {
            let meta = entry.metadata().expect("meta");
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(".keysync."),
                "{what}: temp file left: {name}"
            );
            if meta.is_file() {
                let text = std::fs::read_to_string(entry.path()).expect("read");
                if !text.is_empty() {
                    assert!(
                        text.starts_with("ssh-ed25519 AAAA write-"),
                        "{what}: {name}: {text:?}"
                    );
                    assert_eq!(
                        (meta.uid(), meta.mode() & 0o7777),
                        (USER, 0o600),
                        "{what}: {name}"
                    );
                    files.push(name);
                }
            }
        }
        assert!(
            !files.is_empty(),
            "{what}: no write landed in the real place"
        );
    }
}
