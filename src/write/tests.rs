//! Real files, modes, owners and symlinks in temp dirs; these tests run as
//! root (they chown, lchown and switch fsuid). The unprivileged user is a
//! bare uid/gid: setfsuid and chown need no passwd entry.

use super::ids::{current_fsgid, current_fsuid};
use super::temp::in_flight;
use super::*;
use nix::sys::stat::Mode;
use nix::unistd;
use std::fs::File;
use std::fs::{self, Permissions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, lchown, symlink};
use std::os::unix::net::UnixListener;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};
use tempfile::TempDir;

const USER: u32 = 61_234;
const GROUP: u32 = 61_234;
const OTHER: u32 = 61_235;

fn user() -> (Uid, Gid) {
    (Uid::from_raw(USER), Gid::from_raw(GROUP))
}

/// A temp dir with `home/` owned by the test user, mode 0755.
struct Fixture {
    tmp: TempDir,
    home: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        Self::with_home_owner(USER, GROUP)
    }

    /// Like /root: home owned by root, 0700.
    fn root_home() -> Self {
        let fx = Self::with_home_owner(0, 0);
        chmod(&fx.home, 0o700);
        fx
    }

    fn with_home_owner(uid: u32, gid: u32) -> Self {
        assert!(
            unistd::geteuid().is_root(),
            "write.rs tests need root (chown, setfsuid)"
        );
        let tmp = TempDir::new().unwrap();
        let home = tmp.path().join("home");
        mkdir(&home, 0o755, uid, gid);
        Fixture { tmp, home }
    }

    /// A path outside the home, in the same temp dir.
    fn outside(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn ssh(&self) -> PathBuf {
        self.home.join(".ssh")
    }

    fn keys(&self) -> PathBuf {
        self.home.join(".ssh/authorized_keys")
    }

    /// authorized_keys for the test user, acting as them (the daemon's setup
    /// for a non-root user).
    fn user_spec(&self) -> FileSpec {
        FileSpec {
            path: self.keys(),
            base: self.home.clone(),
            owner: Some(user()),
            act_as: Some(user()),
            file_mode: 0o600,
            dir_mode: 0o700,
        }
    }

    /// authorized_keys for root (no fsuid switch).
    fn root_spec(&self) -> FileSpec {
        FileSpec {
            owner: Some((Uid::from_raw(0), Gid::from_raw(0))),
            act_as: None,
            ..self.user_spec()
        }
    }
}

fn mkdir(path: &Path, mode: u32, uid: u32, gid: u32) {
    fs::create_dir(path).unwrap();
    chown(path, Some(uid), Some(gid)).unwrap();
    chmod(path, mode);
}

fn put(path: &Path, bytes: &[u8], mode: u32, uid: u32) {
    fs::write(path, bytes).unwrap();
    chown(path, Some(uid), Some(uid)).unwrap();
    chmod(path, mode);
}

/// Modes are always set explicitly: the umask test changes the process umask.
fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn set_to(bytes: &'static [u8]) -> impl FnMut(Option<&[u8]>) -> Option<Vec<u8>> {
    move |_| Some(bytes.to_vec())
}

/// What block mode does: keep every line, add ours if missing.
fn add_line(line: &'static str) -> impl FnMut(Option<&[u8]>) -> Option<Vec<u8>> {
    move |current| {
        let mut text = String::from_utf8(current.unwrap_or_default().to_vec()).unwrap();
        if !text.lines().any(|l| l == line) {
            text.push_str(line);
            text.push('\n');
        }
        Some(text.into_bytes())
    }
}

/// Another writer (the platform) replaces the file atomically.
fn replace_as_platform(keys: &Path, bytes: &[u8]) {
    let other = keys.with_file_name("platform.tmp");
    put(&other, bytes, 0o600, USER);
    fs::rename(&other, keys).unwrap();
}

fn temps(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".keysync."))
        .collect()
}

fn assert_no_temps(dirs: &[&Path]) {
    for dir in dirs {
        assert_eq!(
            temps(dir),
            Vec::<String>::new(),
            "temp files left in {dir:?}"
        );
    }
}

fn assert_root_ids() {
    assert_eq!(current_fsuid().as_raw(), 0, "fsuid not restored");
    assert_eq!(current_fsgid(), unistd::getegid(), "fsgid not restored");
}

fn permission_denied(err: &WriteError) -> bool {
    matches!(err, WriteError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied)
}

#[test]
fn creates_ssh_dir_and_file_as_the_user() {
    let fx = Fixture::new();
    let out = apply(&fx.user_spec(), &mut set_to(b"ssh-ed25519 AAAA k\n")).unwrap();
    assert_eq!(out, Outcome::Written);
    assert_eq!(fs::read(fx.keys()).unwrap(), b"ssh-ed25519 AAAA k\n");
    for (path, mode) in [(fx.ssh(), 0o700), (fx.keys(), 0o600)] {
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (USER, GROUP), "{path:?}");
        assert_eq!(meta.mode() & 0o7777, mode, "{path:?}");
    }
    assert_no_temps(&[&fx.ssh()]);
    assert_root_ids();
}

#[test]
fn as_root_chowns_created_dir_and_file_to_the_owner() {
    let fx = Fixture::new();
    let spec = FileSpec {
        act_as: None,
        ..fx.user_spec()
    };
    assert_eq!(apply(&spec, &mut set_to(b"k\n")).unwrap(), Outcome::Written);
    for path in [fx.ssh(), fx.keys()] {
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (USER, GROUP), "{path:?}");
    }
    assert_eq!(mode_of(&fx.ssh()), 0o700);
    assert_eq!(mode_of(&fx.keys()), 0o600);
}

#[test]
fn identical_bytes_touch_nothing() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    put(&fx.keys(), b"k\n", 0o600, USER);
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(fx.keys())
        .unwrap()
        .set_modified(old)
        .unwrap();
    let before = fs::metadata(fx.keys()).unwrap();

    let mut seen = None;
    let out = apply(&fx.user_spec(), &mut |cur| {
        seen = cur.map(<[u8]>::to_vec);
        Some(b"k\n".to_vec())
    })
    .unwrap();

    assert_eq!(out, Outcome::Unchanged);
    assert_eq!(seen.as_deref(), Some(&b"k\n"[..]));
    let after = fs::metadata(fx.keys()).unwrap();
    assert_eq!(after.modified().unwrap(), old);
    assert_eq!(
        (after.ino(), after.ctime(), after.ctime_nsec()),
        (before.ino(), before.ctime(), before.ctime_nsec())
    );
    assert_no_temps(&[&fx.ssh()]);
}

#[test]
fn empty_content_creates_an_empty_file() {
    let fx = Fixture::new();
    assert_eq!(
        apply(&fx.user_spec(), &mut set_to(b"")).unwrap(),
        Outcome::Written
    );
    assert_eq!(fs::read(fx.keys()).unwrap(), b"");
    assert_eq!(
        apply(&fx.user_spec(), &mut set_to(b"")).unwrap(),
        Outcome::Unchanged
    );
}

#[test]
fn none_removes_an_existing_file() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    put(&fx.keys(), b"k\n", 0o600, USER);
    assert_eq!(
        apply(&fx.user_spec(), &mut |_| None).unwrap(),
        Outcome::Removed
    );
    assert!(!fx.keys().exists());
    assert!(fx.ssh().is_dir());
    assert_no_temps(&[&fx.ssh()]);
    assert_root_ids();
}

#[test]
fn absent_and_none_is_unchanged_and_creates_nothing() {
    let fx = Fixture::new();
    let mut calls = 0;
    let out = apply(&fx.user_spec(), &mut |cur| {
        calls += 1;
        assert_eq!(cur, None);
        None
    })
    .unwrap();
    assert_eq!((out, calls), (Outcome::Unchanged, 1));
    assert!(
        !fx.ssh().exists(),
        "no .ssh for a file that should not exist"
    );
}

#[test]
fn fifo_at_target_is_refused_promptly() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    unistd::mkfifo(&fx.keys(), Mode::from_bits_truncate(0o600)).unwrap();
    let spec = fx.user_spec();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(apply(&spec, &mut set_to(b"k\n")));
    });
    // A blocking open of the FIFO would hang here forever.
    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("apply blocked on a FIFO");
    assert!(
        matches!(result, Err(WriteError::NotARegularFile { .. })),
        "{result:?}"
    );
    assert_eq!(file_type_at(&fx.keys()), SFlag::S_IFIFO);
    assert_no_temps(&[&fx.ssh()]);
}

fn file_type_at(path: &Path) -> SFlag {
    let st = stat::lstat(path).unwrap();
    file_type(&st)
}

#[test]
fn directory_at_target_is_refused() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    mkdir(&fx.keys(), 0o700, USER, GROUP);
    let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
    assert!(matches!(err, WriteError::NotARegularFile { .. }), "{err:?}");
    assert!(fx.keys().is_dir());
    assert_no_temps(&[&fx.ssh()]);
}

#[test]
fn socket_at_target_is_refused() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    let _listener = UnixListener::bind(fx.keys()).unwrap();
    let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
    assert!(matches!(err, WriteError::NotARegularFile { .. }), "{err:?}");
    assert_eq!(file_type_at(&fx.keys()), SFlag::S_IFSOCK);
}

#[test]
fn regular_file_at_ssh_is_not_a_directory() {
    let fx = Fixture::new();
    put(&fx.ssh(), b"", 0o600, USER);
    let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
    assert!(
        matches!(err, WriteError::NotADirectory { ref path } if *path == fx.ssh()),
        "{err:?}"
    );
    assert_eq!(fs::read(fx.ssh()).unwrap(), b"");
}

#[test]
fn dangling_user_symlink_at_target_is_refused() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    let dest = fx.outside("planted");
    symlink(&dest, fx.keys()).unwrap();
    lchown(fx.keys(), Some(USER), Some(GROUP)).unwrap();
    for spec in [fx.user_spec(), fx.root_spec()] {
        let err = apply(&spec, &mut set_to(b"k\n")).unwrap_err();
        assert!(
            matches!(err, WriteError::SymlinkRefused { ref path } if *path == fx.keys()),
            "{err:?}"
        );
    }
    assert!(!dest.exists(), "wrote through the user's link");
    assert_eq!(fs::read_link(fx.keys()).unwrap(), dest);
    assert_no_temps(&[&fx.ssh(), fx.tmp.path()]);
}

#[test]
fn user_symlink_to_a_file_elsewhere_is_never_read_or_written() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    let dest = fx.outside("shadow");
    put(&dest, b"secret\n", 0o600, 0);
    let before = fs::metadata(&dest).unwrap();
    symlink(&dest, fx.keys()).unwrap();
    lchown(fx.keys(), Some(USER), Some(GROUP)).unwrap();
    // As root too: running as root is exactly when following would hurt.
    for spec in [fx.user_spec(), fx.root_spec()] {
        let mut calls = 0;
        let err = apply(&spec, &mut |_| {
            calls += 1;
            Some(b"k\n".to_vec())
        })
        .unwrap_err();
        assert!(matches!(err, WriteError::SymlinkRefused { .. }), "{err:?}");
        assert_eq!(calls, 0, "the link's target was read");
    }
    let after = fs::metadata(&dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), b"secret\n");
    assert_eq!(
        (after.ino(), after.mtime(), after.mtime_nsec()),
        (before.ino(), before.mtime(), before.mtime_nsec())
    );
    assert!(
        fs::symlink_metadata(fx.keys())
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn user_symlink_at_ssh_dir_is_refused() {
    let fx = Fixture::new();
    let elsewhere = fx.outside("elsewhere");
    mkdir(&elsewhere, 0o700, 0, 0);
    symlink(&elsewhere, fx.ssh()).unwrap();
    lchown(fx.ssh(), Some(USER), Some(GROUP)).unwrap();
    for spec in [fx.user_spec(), fx.root_spec()] {
        let err = apply(&spec, &mut set_to(b"k\n")).unwrap_err();
        assert!(
            matches!(err, WriteError::SymlinkRefused { ref path } if *path == fx.ssh()),
            "{err:?}"
        );
    }
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn user_symlink_at_ssh_dir_to_nowhere_is_refused_not_created() {
    let fx = Fixture::new();
    let dest = fx.outside("nowhere");
    symlink(&dest, fx.ssh()).unwrap();
    lchown(fx.ssh(), Some(USER), Some(GROUP)).unwrap();
    let err = apply(&fx.root_spec(), &mut set_to(b"k\n")).unwrap_err();
    assert!(matches!(err, WriteError::SymlinkRefused { .. }), "{err:?}");
    assert!(!dest.exists());
}

#[test]
fn root_symlink_at_ssh_to_root_dir_is_followed() {
    let fx = Fixture::root_home();
    let elsewhere = fx.outside("root-ssh");
    mkdir(&elsewhere, 0o700, 0, 0);
    symlink(&elsewhere, fx.ssh()).unwrap();
    let out = apply(&fx.root_spec(), &mut set_to(b"k\n")).unwrap();
    assert_eq!(out, Outcome::Written);
    assert_eq!(fs::read(elsewhere.join("authorized_keys")).unwrap(), b"k\n");
    assert_eq!(mode_of(&elsewhere.join("authorized_keys")), 0o600);
    assert_eq!(
        fs::read_link(fx.ssh()).unwrap(),
        elsewhere,
        "the link is kept"
    );
    assert_no_temps(&[&elsewhere]);
}

#[test]
fn root_symlink_at_ssh_to_the_users_own_dir_is_followed_as_the_user() {
    let fx = Fixture::new();
    let elsewhere = fx.outside("user-ssh");
    mkdir(&elsewhere, 0o700, USER, GROUP);
    // Relative link text resolves from the link's directory, as the kernel does.
    symlink("../user-ssh", fx.ssh()).unwrap();
    assert_eq!(
        apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap(),
        Outcome::Written
    );
    let meta = fs::metadata(elsewhere.join("authorized_keys")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (USER, 0o600));
}

#[test]
fn dangling_root_symlink_at_ssh_is_an_error_and_creates_nothing() {
    let fx = Fixture::root_home();
    let dest = fx.outside("missing");
    symlink(&dest, fx.ssh()).unwrap();
    let err = apply(&fx.root_spec(), &mut set_to(b"k\n")).unwrap_err();
    assert!(matches!(err, WriteError::Io { .. }), "{err:?}");
    assert!(!dest.exists());
}

#[test]
fn chain_of_root_symlinks_at_target_is_followed() {
    let fx = Fixture::root_home();
    let dest = root_keys_link(&fx, 0o600);
    // authorized_keys -> authorized_keys2 -> ../../keys/root
    fs::rename(fx.keys(), fx.ssh().join("authorized_keys2")).unwrap();
    symlink("authorized_keys2", fx.keys()).unwrap();
    assert_eq!(
        apply(&fx.root_spec(), &mut add_line("ours")).unwrap(),
        Outcome::Written
    );
    assert_eq!(fs::read(&dest).unwrap(), b"platform-key\nours\n");
    assert!(
        fs::symlink_metadata(fx.ssh().join("authorized_keys2"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn root_symlink_at_ssh_to_group_writable_dir_is_bad_permissions() {
    let fx = Fixture::root_home();
    let elsewhere = fx.outside("shared");
    mkdir(&elsewhere, 0o775, 0, 0);
    symlink(&elsewhere, fx.ssh()).unwrap();
    let err = apply(&fx.root_spec(), &mut set_to(b"k\n")).unwrap_err();
    assert!(matches!(err, WriteError::BadPermissions { .. }), "{err:?}");
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn root_symlink_at_ssh_to_someone_elses_dir_is_bad_permissions() {
    let fx = Fixture::new();
    let elsewhere = fx.outside("other");
    // 0755, so the user can open it and the rule (not the kernel) refuses.
    mkdir(&elsewhere, 0o755, OTHER, OTHER);
    symlink(&elsewhere, fx.ssh()).unwrap();
    let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
    assert!(matches!(err, WriteError::BadPermissions { .. }), "{err:?}");
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
}

/// A root home whose authorized_keys is a root-owned link to /<tmp>/keys/root.
fn root_keys_link(fx: &Fixture, file_mode: u32) -> PathBuf {
    mkdir(&fx.ssh(), 0o700, 0, 0);
    let keys_dir = fx.outside("keys");
    mkdir(&keys_dir, 0o700, 0, 0);
    let dest = keys_dir.join("root");
    put(&dest, b"platform-key\n", file_mode, 0);
    symlink("../../keys/root", fx.keys()).unwrap();
    dest
}

#[test]
fn root_symlink_at_target_is_written_through_and_kept() {
    let fx = Fixture::root_home();
    let dest = root_keys_link(&fx, 0o600);
    let out = apply(&fx.root_spec(), &mut add_line("ours")).unwrap();
    assert_eq!(out, Outcome::Written);
    assert_eq!(fs::read(&dest).unwrap(), b"platform-key\nours\n");
    assert_eq!(mode_of(&dest), 0o600);
    assert_eq!(
        fs::read_link(fx.keys()).unwrap(),
        Path::new("../../keys/root")
    );
    assert_no_temps(&[&fx.ssh(), dest.parent().unwrap()]);
    // And reading through it sees our line: nothing more to do.
    assert_eq!(
        apply(&fx.root_spec(), &mut add_line("ours")).unwrap(),
        Outcome::Unchanged
    );
}

#[test]
fn root_symlink_at_target_in_the_same_dir_is_followed() {
    let fx = Fixture::root_home();
    mkdir(&fx.ssh(), 0o700, 0, 0);
    symlink("authorized_keys.real", fx.keys()).unwrap();
    assert_eq!(
        apply(&fx.root_spec(), &mut set_to(b"k\n")).unwrap(),
        Outcome::Written
    );
    assert_eq!(
        fs::read(fx.ssh().join("authorized_keys.real")).unwrap(),
        b"k\n"
    );
    assert!(
        fs::symlink_metadata(fx.keys())
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn root_symlink_at_target_to_world_writable_file_is_bad_permissions() {
    let fx = Fixture::root_home();
    let dest = root_keys_link(&fx, 0o666);
    let err = apply(&fx.root_spec(), &mut add_line("ours")).unwrap_err();
    assert!(
        matches!(err, WriteError::BadPermissions { ref path, .. } if path.ends_with("keys/root")),
        "{err:?}"
    );
    assert_eq!(fs::read(&dest).unwrap(), b"platform-key\n");
}

#[test]
fn root_symlink_at_target_removal_removes_the_destination_and_keeps_the_link() {
    let fx = Fixture::root_home();
    let dest = root_keys_link(&fx, 0o600);
    assert_eq!(
        apply(&fx.root_spec(), &mut |_| None).unwrap(),
        Outcome::Removed
    );
    assert!(!dest.exists());
    assert!(
        fs::symlink_metadata(fx.keys())
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn change_before_rename_is_reread_and_the_foreign_line_survives() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    put(&fx.keys(), b"a\n", 0o600, USER);
    let keys = fx.keys();
    let mut hooks = 0;
    let mut seen = Vec::new();
    let mut merge = add_line("ours");
    let out = apply_with_hook(
        &fx.user_spec(),
        &mut |cur| {
            seen.push(cur.map(<[u8]>::to_vec));
            merge(cur)
        },
        &mut || {
            hooks += 1;
            if hooks == 1 {
                replace_as_platform(&keys, b"a\nforeign\n");
            }
        },
    )
    .unwrap();
    assert_eq!(out, Outcome::Written);
    assert_eq!(fs::read(fx.keys()).unwrap(), b"a\nforeign\nours\n");
    assert_eq!(
        seen,
        vec![Some(b"a\n".to_vec()), Some(b"a\nforeign\n".to_vec())]
    );
    assert_eq!(hooks, 2);
    assert_eq!(mode_of(&fx.keys()), 0o600);
    assert_no_temps(&[&fx.ssh()]);
}

#[test]
fn in_place_append_before_rename_is_noticed() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    put(&fx.keys(), b"a\n", 0o600, USER);
    let keys = fx.keys();
    let mut first = true;
    let out = apply_with_hook(&fx.user_spec(), &mut add_line("ours"), &mut || {
        if std::mem::take(&mut first) {
            // `echo foreign >> authorized_keys`: same inode, new size and mtime.
            let mut f = File::options().append(true).open(&keys).unwrap();
            f.write_all(b"foreign\n").unwrap();
        }
    })
    .unwrap();
    assert_eq!(out, Outcome::Written);
    assert_eq!(fs::read(fx.keys()).unwrap(), b"a\nforeign\nours\n");
}

#[test]
fn target_that_never_stops_changing_gives_up() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    let keys = fx.keys();
    let mut n = 0;
    let mut calls = 0;
    let err = apply_with_hook(
        &fx.user_spec(),
        &mut |cur| {
            calls += 1;
            add_line("ours")(cur)
        },
        &mut || {
            n += 1;
            replace_as_platform(&keys, format!("foreign {n}\n").as_bytes());
        },
    )
    .unwrap_err();
    assert!(matches!(err, WriteError::Raced { .. }), "{err:?}");
    assert_eq!(calls, MAX_RETRIES + 1);
    assert_eq!(
        fs::read_to_string(fx.keys()).unwrap(),
        format!("foreign {n}\n")
    );
    assert_no_temps(&[&fx.ssh()]);
    assert_root_ids();
}

#[test]
fn change_before_removal_is_reread() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    put(&fx.keys(), b"ours\n", 0o600, USER);
    let keys = fx.keys();
    let mut first = true;
    // Drop our line; remove the file when nothing else is left.
    let mut drop_ours = |cur: Option<&[u8]>| {
        let text = String::from_utf8(cur?.to_vec()).unwrap();
        let rest: String = text
            .lines()
            .filter(|l| *l != "ours")
            .map(|l| format!("{l}\n"))
            .collect();
        (!rest.is_empty()).then(|| rest.into_bytes())
    };
    let out = apply_with_hook(&fx.user_spec(), &mut drop_ours, &mut || {
        if std::mem::take(&mut first) {
            replace_as_platform(&keys, b"ours\nforeign\n");
        }
    })
    .unwrap();
    assert_eq!(out, Outcome::Written);
    assert_eq!(fs::read(fx.keys()).unwrap(), b"foreign\n");
}

#[test]
fn user_cannot_write_into_a_root_owned_ssh_dir() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o755, 0, 0);
    let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
    assert!(permission_denied(&err), "{err:?}");
    assert!(!fx.keys().exists());
    assert_no_temps(&[&fx.ssh()]);
    assert_root_ids();
    // The same as root succeeds: the refusal came from acting as the user.
    let spec = FileSpec {
        act_as: None,
        ..fx.user_spec()
    };
    assert_eq!(apply(&spec, &mut set_to(b"k\n")).unwrap(), Outcome::Written);
}

#[test]
fn user_cannot_create_ssh_in_a_home_they_cannot_write() {
    let fx = Fixture::with_home_owner(0, 0);
    let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
    assert!(permission_denied(&err), "{err:?}");
    assert!(!fx.ssh().exists());
    assert_root_ids();
}

#[test]
fn callbacks_run_with_normal_credentials_and_a_panic_cleans_up() {
    let fx = Fixture::new();
    let mut fsuid_in_desired = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        apply_with_hook(
            &fx.user_spec(),
            &mut |_| {
                fsuid_in_desired = Some(current_fsuid().as_raw());
                Some(b"k\n".to_vec())
            },
            &mut || {
                assert_eq!(current_fsuid().as_raw(), 0);
                panic!("hook panics after the temp file is written");
            },
        )
    }));
    assert!(result.is_err());
    assert_eq!(fsuid_in_desired, Some(0));
    assert_root_ids();
    assert!(!fx.keys().exists());
    assert_no_temps(&[&fx.ssh()]);
}

#[test]
fn stale_temp_files_are_removed_and_nothing_else() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    let ssh = fx.ssh();
    put(&ssh.join(".keysync.x"), b"half", 0o600, USER);
    mkdir(&ssh.join(".keysync.dir"), 0o700, USER, GROUP);
    put(&ssh.join(".keysyncx"), b"", 0o600, USER);
    put(&ssh.join("id_ed25519"), b"", 0o600, USER);
    symlink("/etc/passwd", ssh.join(".keysync.link")).unwrap();
    // A temp another thread is writing right now is not stale.
    in_flight().insert(b".keysync.busy".to_vec());
    put(&ssh.join(".keysync.busy"), b"", 0o600, USER);

    assert_eq!(
        apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap(),
        Outcome::Written
    );

    in_flight().remove(&b".keysync.busy"[..]);
    assert!(!ssh.join(".keysync.x").exists());
    let mut left = temps(&ssh);
    left.sort();
    assert_eq!(left, [".keysync.busy", ".keysync.dir", ".keysync.link"]);
    assert!(ssh.join(".keysyncx").exists() && ssh.join("id_ed25519").exists());
}

#[test]
fn umask_does_not_change_the_modes() {
    for mask in [0o077, 0o022] {
        let fx = Fixture::new();
        let spec = FileSpec {
            path: fx.home.join("a/b/file"),
            file_mode: 0o664,
            dir_mode: 0o775,
            ..fx.user_spec()
        };
        let old = stat::umask(Mode::from_bits_truncate(mask));
        let result = apply(&spec, &mut set_to(b"k\n"));
        stat::umask(old);
        assert_eq!(result.unwrap(), Outcome::Written, "umask {mask:o}");
        assert_eq!(mode_of(&fx.home.join("a")), 0o775, "umask {mask:o}");
        assert_eq!(mode_of(&fx.home.join("a/b")), 0o775, "umask {mask:o}");
        assert_eq!(mode_of(&spec.path), 0o664, "umask {mask:o}");
    }
}

#[test]
fn cache_file_in_the_state_dir_gets_its_group_and_mode() {
    let fx = Fixture::with_home_owner(0, 0);
    let spec = FileSpec {
        path: fx.home.join("users/alice.keys"),
        base: fx.home.clone(),
        owner: Some((Uid::from_raw(0), Gid::from_raw(GROUP))),
        act_as: None,
        file_mode: 0o640,
        dir_mode: 0o750,
    };
    assert_eq!(apply(&spec, &mut set_to(b"")).unwrap(), Outcome::Written);
    for (path, mode) in [(fx.home.join("users"), 0o750), (spec.path.clone(), 0o640)] {
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (0, GROUP, mode),
            "{path:?}"
        );
    }
}

#[test]
fn paths_not_below_base_are_refused() {
    let fx = Fixture::new();
    let cases = [
        fx.home.join("../etc/passwd"),
        fx.home.join(".ssh/../../x"),
        fx.outside("elsewhere/authorized_keys"),
        fx.home.clone(),
        PathBuf::from("relative/authorized_keys"),
    ];
    for path in cases {
        let spec = FileSpec {
            path: path.clone(),
            ..fx.user_spec()
        };
        let err = apply(&spec, &mut set_to(b"k\n")).unwrap_err();
        assert!(
            matches!(err, WriteError::PathOutsideBase { .. }),
            "{path:?}: {err:?}"
        );
    }
    assert_eq!(
        fs::read_dir(fx.tmp.path()).unwrap().count(),
        1,
        "only home/"
    );
}

#[test]
fn oversized_file_is_refused_not_read() {
    let fx = Fixture::new();
    mkdir(&fx.ssh(), 0o700, USER, GROUP);
    put(&fx.keys(), b"", 0o600, USER);
    // Sparse: no 16 MiB actually written.
    File::options()
        .write(true)
        .open(fx.keys())
        .unwrap()
        .set_len(MAX_FILE_SIZE + 1)
        .unwrap();
    let mut calls = 0;
    let err = apply(&fx.user_spec(), &mut |_| {
        calls += 1;
        None
    })
    .unwrap_err();
    assert!(
        matches!(err, WriteError::TooLarge { size, .. } if size == MAX_FILE_SIZE + 1),
        "{err:?}"
    );
    assert_eq!(calls, 0);
    assert_eq!(fs::metadata(fx.keys()).unwrap().len(), MAX_FILE_SIZE + 1);
}

#[test]
fn missing_base_is_an_io_error() {
    let fx = Fixture::new();
    let spec = FileSpec {
        base: fx.outside("gone"),
        path: fx.outside("gone/.ssh/authorized_keys"),
        ..fx.user_spec()
    };
    let err = apply(&spec, &mut set_to(b"k\n")).unwrap_err();
    assert!(
        matches!(
            err,
            WriteError::Io {
                op: "open base directory",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!fx.outside("gone").exists());
}
