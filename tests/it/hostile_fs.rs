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
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keysync::write::{self, FileSpec, Outcome, WriteError};
use nix::unistd::{Gid, Uid};

use crate::support::block::block_keys;
use crate::support::config::{Config, User};
use crate::support::env::TestEnv;
use crate::support::fake_cp::gen_ed25519_keys;
use crate::support::files::{chmod, lchown};
use crate::support::scenario::with_no_keys;
use crate::support::users::TestUser;
use crate::support::{DEADLINE, eventually, require_root, sorted};

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
// The zoo

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

const DEFAULT_PATH: &str = "~/.ssh/authorized_keys";

/// The users' homes, a root-owned victim next to them, and what both
/// looked like before the agent ran.
struct Zoo {
    cases: Vec<Case>,
    homes: PathBuf,
    victim: PathBuf,
    /// Where the dangling link points: it must never be created.
    nowhere: PathBuf,
    /// Where writes belong: the ordinary user's .ssh, and the newline
    /// directory (whose creation changes its home's mtime).
    writable: [PathBuf; 2],
    homes_before: BTreeMap<PathBuf, Entry>,
    victim_before: BTreeMap<PathBuf, Entry>,
    nl_home_before: Metadata,
}

impl Zoo {
    /// Makes every inhabitant in `env`, then takes the snapshots.
    fn build(env: &TestEnv) -> Zoo {
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
        let cases = Self::inhabitants(&homes, &victim, &nowhere);

        let nl = Self::find(&cases, "newline in the directory name");
        let writable = [
            Self::find(&cases, "ordinary").user.ssh(),
            nl.target().parent().expect("parent").to_path_buf(),
        ];
        let nl_home_before = std::fs::symlink_metadata(&nl.user.home).expect("home");
        let mut zoo = Zoo {
            homes_before: BTreeMap::new(),
            victim_before: snapshot(&victim, &[]),
            cases,
            homes,
            victim,
            nowhere,
            writable,
            nl_home_before,
        };
        zoo.homes_before = zoo.snap_homes();
        zoo
    }

    /// The users, each with its planted trap, and the outcome it must get.
    fn inhabitants(homes: &Path, victim: &Path, nowhere: &Path) -> Vec<Case> {
        let home = |tag: &str| homes.join(tag);
        let mkssh = |u: &TestUser, mode: u32| {
            std::fs::create_dir(u.ssh()).expect("mkdir .ssh");
            chmod(&u.ssh(), mode);
            u.chown(&u.ssh());
        };
        let case = |label, user, fails_with| Case {
            label,
            user,
            path: DEFAULT_PATH.to_string(),
            fails_with,
        };
        let symlink = |target: &Path, link: &Path| {
            std::os::unix::fs::symlink(target, link).expect("symlink");
        };
        let mut cases = Vec::new();

        let u = TestUser::create("ks-zoo", home("good"), true);
        mkssh(&u, 0o700);
        cases.push(case("ordinary", u, None));

        let u = TestUser::create("ks-zoo", home("dangling"), true);
        mkssh(&u, 0o700);
        symlink(&nowhere.join("authorized_keys"), &u.keys());
        u.chown(&u.keys());
        cases.push(case(
            "dangling link at the file",
            u,
            Some("symlink not owned by root"),
        ));

        let u = TestUser::create("ks-zoo", home("ssh-etc"), true);
        symlink(Path::new("/etc"), &u.ssh());
        u.chown(&u.ssh());
        cases.push(case(".ssh -> /etc", u, Some("symlink not owned by root")));

        let u = TestUser::create("ks-zoo", home("passwd"), true);
        mkssh(&u, 0o700);
        symlink(Path::new("/etc/passwd"), &u.keys());
        u.chown(&u.keys());
        cases.push(case(
            "authorized_keys -> /etc/passwd",
            u,
            Some("symlink not owned by root"),
        ));

        let u = TestUser::create("ks-zoo", home("ssh-victim"), true);
        symlink(victim, &u.ssh());
        u.chown(&u.ssh());
        cases.push(case(
            ".ssh -> root's directory",
            u,
            Some("symlink not owned by root"),
        ));

        let u = TestUser::create("ks-zoo", home("fifo"), true);
        mkssh(&u, 0o700);
        nix::unistd::mkfifo(&u.keys(), nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        u.chown(&u.keys());
        cases.push(case("FIFO at the file", u, Some("not a regular file")));

        let u = TestUser::create("ks-zoo", home("dir"), true);
        mkssh(&u, 0o700);
        std::fs::create_dir(u.keys()).expect("dir at the file");
        u.chown(&u.keys());
        cases.push(case("directory at the file", u, Some("not a regular file")));

        let u = TestUser::create("ks-zoo", home("ssh000"), true);
        mkssh(&u, 0o000);
        cases.push(case(".ssh mode 000", u, Some("Permission denied")));

        let u = TestUser::create("ks-zoo", home("file000"), true);
        mkssh(&u, 0o700);
        std::fs::write(u.keys(), "ssh-ed25519 AAAA the-users-own-line\n").expect("file");
        chmod(&u.keys(), 0o000);
        u.chown(&u.keys());
        cases.push(case(
            "authorized_keys mode 000",
            u,
            Some("Permission denied"),
        ));

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
            path: "~/new\nline/authorized_keys".into(),
            ..case("newline in the directory name", u, None)
        });

        let u = TestUser::create("ks-zoo", home("missing"), false);
        cases.push(case(
            "home does not exist",
            u,
            Some("No such file or directory"),
        ));

        let u = TestUser::create("ks-zoo", home("foreign-home"), true);
        let owner = &cases[0].user;
        lchown(&u.home, owner.uid, owner.gid);
        chmod(&u.home, 0o755);
        cases.push(case(
            "home owned by another user",
            u,
            Some("Permission denied"),
        ));
        cases
    }

    fn find<'a>(cases: &'a [Case], label: &str) -> &'a Case {
        cases
            .iter()
            .find(|c| c.label == label)
            .unwrap_or_else(|| panic!("no case {label:?}"))
    }

    /// The config: the standard one, plus every inhabitant in block mode.
    fn config(&self, url: &str, env: &TestEnv) -> Config {
        self.cases.iter().fold(Config::vast(env, url), |config, c| {
            config.user(User::block(&c.user.name, &c.path))
        })
    }

    /// Everything a write could touch, except where writes belong.
    fn snap_homes(&self) -> BTreeMap<PathBuf, Entry> {
        let mut s = snapshot(&self.homes, &self.writable);
        s.remove(
            &Self::find(&self.cases, "newline in the directory name")
                .user
                .home,
        );
        s
    }

    /// Whether `status` shows every inhabitant's outcome reached.
    fn settled(&self, status: &serde_json::Value) -> bool {
        self.cases.iter().all(|c| {
            let u = &status["users"][&c.user.name];
            match c.fails_with {
                None => {
                    u["last_error"].is_null()
                        && u["fingerprints"].as_array().is_some_and(|f| f.len() == 2)
                }
                Some(cause) => u["last_error"].as_str().is_some_and(|e| e.contains(cause)),
            }
        })
    }

    /// Every user has its outcome (the good ones hold `want`, the others are
    /// reported failed in `status` with their cause), and nothing outside
    /// the users' .ssh changed.
    fn check(&self, what: &str, want: &[String], status: Option<&serde_json::Value>) {
        for case in &self.cases {
            match case.fails_with {
                None => Self::check_written(case, what, want, status),
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
        assert_same(
            &format!("{what}: homes"),
            &self.homes_before,
            &self.snap_homes(),
        );
        assert_same(
            &format!("{what}: victim"),
            &self.victim_before,
            &snapshot(&self.victim, &[]),
        );
        assert_etc_untouched(what);
        assert!(
            !self.nowhere.exists(),
            "{what}: the dangling link's target was created"
        );
        let nl = Self::find(&self.cases, "newline in the directory name");
        let nl_home = std::fs::symlink_metadata(&nl.user.home).expect("home");
        assert_eq!(
            (nl_home.uid(), nl_home.mode()),
            (self.nl_home_before.uid(), self.nl_home_before.mode()),
            "{what}"
        );
        assert!(
            !Self::find(&self.cases, "home does not exist")
                .user
                .home
                .exists(),
            "{what}: the missing home was created"
        );
        assert!(
            !Self::find(&self.cases, "home owned by another user")
                .user
                .ssh()
                .exists(),
            "{what}: .ssh created in a home owned by another user"
        );
    }

    /// A good user's file: the keys, the user's 0600 file in its 0700 dir.
    fn check_written(case: &Case, what: &str, want: &[String], status: Option<&serde_json::Value>) {
        let target = case.target();
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

    fn good(&self) -> impl Iterator<Item = &Case> {
        self.cases.iter().filter(|c| c.fails_with.is_none())
    }

    fn failing(&self) -> impl Iterator<Item = &Case> {
        self.cases.iter().filter(|c| c.fails_with.is_some())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn zoo_of_hostile_homes_each_gets_its_defined_outcome_and_nothing_lands_elsewhere() {
    if !require_root(
        "zoo_of_hostile_homes_each_gets_its_defined_outcome_and_nothing_lands_elsewhere",
    ) {
        return;
    }
    with_no_keys(|s| {
        let (cp, env) = (&s.cp, &s.env);
        let keys = gen_ed25519_keys(4);
        cp.set_keys(keys[..2].to_vec());
        let zoo = Zoo::build(env);
        env.write_config(zoo.config(&cp.url(), env));

        // The daemon: every user reported, the good ones written.
        let agent = env.spawn();
        let mut status = serde_json::Value::Null;
        let settled = eventually(DEADLINE, || {
            status = env.try_status_json();
            zoo.settled(&status)
        });
        assert!(
            settled,
            "outcomes not reached: {status:#}\n{}",
            agent.log_text()
        );
        zoo.check("daemon", &keys[..2], Some(&status));

        // Nothing hangs: a change still reaches the good users.
        cp.set_keys(keys[1..].to_vec());
        let followed = eventually(DEADLINE, || {
            zoo.good().all(|c| {
                std::fs::read_to_string(c.target())
                    .is_ok_and(|t| sorted(&block_keys(&t)) == sorted(&keys[1..]))
            })
        });
        assert!(
            followed,
            "the good users stopped following the list:\n{}",
            agent.log_text()
        );
        let status = env.try_status_json();
        zoo.check("daemon after a change", &keys[1..], Some(&status));
        let (exit, _) = agent.stop(Duration::from_secs(10));
        assert!(exit.success(), "{exit:?}");

        // run --once: the same outcomes, exit 1 because users failed.
        cp.set_keys(keys[2..].to_vec());
        let once = env.run_once_watched();
        assert_eq!(once.code, 1, "{}", once.stderr);
        for case in zoo.failing() {
            assert!(
                once.stderr.contains(&case.user.name),
                "run --once did not report {}:\n{}",
                case.label,
                once.stderr
            );
        }
        zoo.check("run --once", &keys[2..], None);
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
