//! Real OpenSSH logins through each write mode (DESIGN.md §4): a private
//! `sshd` on 127.0.0.1, a real unprivileged user made with `useradd -m`,
//! client keys from `ssh-keygen`, the key list served by the fake control
//! plane and synced with `keysync run --once`.
//!
//! In every mode a key added on the account logs in after the next sync, and
//! a key deleted on the account is refused after the next one (ssh exits 255
//! with "Permission denied"): first proved to work, then deleted, so the
//! refusal cannot pass vacuously. In `block` and `fragment` mode a key the
//! user put into `~/.ssh/authorized_keys` by hand keeps working throughout.
//! In `none` mode sshd has no AuthorizedKeysFile at all and every login goes
//! through `keysync authorized-keys`, run by sshd as an unprivileged
//! AuthorizedKeysCommandUser, with `%u` (as the shipped drop-in) and `%u %f`.
//!
//! Needs root (useradd, sshd, the agent's fsuid switch). Without root the
//! tests say so loudly and pass, except under CI=true, where they fail.

use std::path::Path;

use crate::support::block::block_keys;
use crate::support::config::{Config, User};
use crate::support::env::TestEnv;
use crate::support::scenario::{Scenario, with_no_keys};
use crate::support::sshd::{ClientKey, LoginRig, Sshd, base_config, can_run as sshd_can_run};
use crate::support::text;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Block,
    Fragment,
    /// `none`, keys only through the hook; `fingerprint` adds `%f`.
    None {
        fingerprint: bool,
    },
}

impl Mode {
    fn write(self) -> &'static str {
        match self {
            Mode::Block => "block",
            Mode::Fragment => "fragment",
            Mode::None { .. } => "none",
        }
    }

    /// A short tag for unique user names.
    fn tag(self) -> &'static str {
        match self {
            Mode::Block => "b",
            Mode::Fragment => "f",
            Mode::None { fingerprint: false } => "n",
            Mode::None { fingerprint: true } => "nf",
        }
    }
}

/// Polls only when told (`run --once` here); the user in the mode under test,
/// at the mode's default path.
fn agent_config(env: &TestEnv, url: &str, user: &str, mode: Mode) -> Config {
    Config::vast(env, url)
        .set("interval", "60s")
        .set("timeout", "5s")
        .unset("max_backoff")
        .only_user(User::new(user, mode.write()))
}

/// sshd's key lines for `mode`; in none mode the hook of `rig`, reading `state`.
fn sshd_config(dir: &Path, rig: &LoginRig, mode: Mode, state: &Path) -> String {
    let keys = match mode {
        Mode::Block => "AuthorizedKeysFile .ssh/authorized_keys\n".to_string(),
        Mode::Fragment => {
            "AuthorizedKeysFile .ssh/authorized_keys .ssh/authorized_keys.d/keysync\n".to_string()
        }
        Mode::None { fingerprint } => format!(
            "AuthorizedKeysFile none\n{}",
            rig.hook_lines(state, None, fingerprint)
        ),
    };
    base_config(dir, &rig.user.name, &keys)
}

/// One `keysync run --once`; it must succeed.
fn sync(env: &TestEnv, what: &str) {
    let out = env.run_once();
    assert!(
        out.status.success(),
        "run --once ({what}) exited {:?}:\n{}",
        out.status,
        text(&out.stderr)
    );
}

fn scenario(s: &Scenario, mode: Mode) {
    let (cp, env) = (&s.cp, &s.env);
    let rig = LoginRig::new(
        env.path(),
        &format!("kst{}{}", std::process::id(), mode.tag()),
    );
    let user = &rig.user;
    let added_first = rig.key("first");
    let added_later = rig.key("later");
    let foreign = rig.key("foreign");

    // In block and fragment mode the user's own authorized_keys holds a key
    // keysync knows nothing about.
    let has_foreign = !matches!(mode, Mode::None { .. });
    let by_hand = format!("# put here by hand\n{}\n", foreign.public);
    if has_foreign {
        user.write_by_hand("authorized_keys", &by_hand);
    }

    cp.set_keys([added_first.public.clone()]);
    env.write_config(agent_config(env, &cp.url(), &user.name, mode));
    let state = env.state_dir();
    let mut sshd = Sshd::start(env.path(), &sshd_config(env.path(), &rig, mode, &state));
    let name = &user.name;
    // The key put into authorized_keys by hand logs in throughout (block and fragment mode).
    let foreign_logs_in = |sshd: &mut Sshd, when: &str| {
        if has_foreign {
            let why = format!("the key put into authorized_keys by hand, {when}");
            sshd.assert_logs_in(name, &foreign, &why);
        }
    };

    // Before any sync, the account's key is not known to sshd: this sshd
    // does not let just any key in.
    sshd.assert_refused(name, &added_first, "before the first sync");
    foreign_logs_in(&mut sshd, "before any sync");

    sync(env, "first key on the account");
    sshd.assert_logs_in(name, &added_first, "the account's key after the first sync");
    sshd.assert_refused(name, &added_later, "a key not yet on the account");

    cp.add_key(&added_later.public);
    sync(env, "second key added on the account");
    sshd.assert_logs_in(
        name,
        &added_later,
        "the key added on the account, after the sync",
    );
    sshd.assert_logs_in(name, &added_first, "the first key, still on the account");

    assert!(
        cp.remove_key(&added_first.public),
        "the fake had the first key"
    );
    sync(env, "first key deleted on the account");
    sshd.assert_refused(
        name,
        &added_first,
        "the key deleted on the account must be refused after the sync (ssh exit 255)",
    );
    sshd.assert_logs_in(name, &added_later, "the key still on the account");
    foreign_logs_in(&mut sshd, "after the syncs");

    // What ended up on disk, for each mode.
    let ssh_dir = user.home.join(".ssh");
    let read =
        |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    match mode {
        Mode::Block => {
            let content = read(&ssh_dir.join("authorized_keys"));
            assert!(
                content.starts_with(&by_hand),
                "hand-made lines kept byte for byte:\n{content}"
            );
            assert_eq!(
                block_keys(&content),
                [added_later.public.as_str()],
                "{content}"
            );
        }
        Mode::Fragment => {
            assert_eq!(
                read(&ssh_dir.join("authorized_keys")),
                by_hand,
                "authorized_keys untouched"
            );
            let fragment = read(&ssh_dir.join("authorized_keys.d/keysync"));
            assert_eq!(fragment, format!("{}\n", added_later.public));
        }
        Mode::None { .. } => {
            assert!(!ssh_dir.exists(), "none mode writes nothing in the home");
        }
    }
    assert_eq!(
        env.cache(name).as_deref(),
        Some(format!("{}\n", added_later.public).as_str())
    );
    drop(sshd);
}

/// Runs a scenario on a blocking thread (ssh, sshd and the agent block)
/// while the fake control plane is served by the test's runtime.
async fn run(mode: Mode) {
    with_no_keys(move |s| scenario(&s, mode)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn block_mode_logins_follow_the_account() {
    if sshd_can_run("block_mode_logins_follow_the_account") {
        run(Mode::Block).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fragment_mode_logins_follow_the_account() {
    if sshd_can_run("fragment_mode_logins_follow_the_account") {
        run(Mode::Fragment).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn none_mode_logins_go_through_the_hook() {
    if sshd_can_run("none_mode_logins_go_through_the_hook") {
        run(Mode::None { fingerprint: false }).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn none_mode_with_fingerprint_argument() {
    if sshd_can_run("none_mode_with_fingerprint_argument") {
        run(Mode::None { fingerprint: true }).await;
    }
}

/// DESIGN.md §4 "Revoked keys": a key the platform copied into the user's
/// own `authorized_keys` (outside the block) and that is also on the
/// account is refused by a real sshd with the shipped `RevokedKeys` line
/// once it is deleted on the account, through `AuthorizedKeysFile` and
/// through the hook, while the other key logs in; re-added, it logs in
/// again.
fn revocation_scenario(s: &Scenario) {
    let (cp, env) = (&s.cp, &s.env);
    let rig = LoginRig::new(env.path(), &format!("ksv{}", std::process::id()));
    let user = &rig.user;
    let copied = rig.key("copied");
    let other = rig.key("other");
    // The platform's copy, outside keysync's block.
    user.write_by_hand("authorized_keys", &format!("{}\n", copied.public));
    cp.set_keys([copied.public.clone(), other.public.clone()]);
    env.write_config(agent_config(env, &cp.url(), &user.name, Mode::Block));
    sync(env, "both keys on the account");

    let state = env.state_dir();
    let revoked = format!("RevokedKeys {}\n", state.join("revoked_keys").display());
    let start = |name: &str, keys: String| {
        let dir = env.path().join(name);
        std::fs::create_dir(&dir).expect("sshd dir");
        Sshd::start(
            &dir,
            &base_config(&dir, &user.name, &format!("{keys}{revoked}")),
        )
    };
    let by_file = start(
        "by-file",
        "AuthorizedKeysFile .ssh/authorized_keys\n".into(),
    );
    let by_hook = start(
        "by-hook",
        format!(
            "AuthorizedKeysFile none\n{}",
            rig.hook_lines(&state, None, true)
        ),
    );
    let name = &user.name;
    let mut both = [(by_file, "authorized_keys"), (by_hook, "the hook")];
    // Every check runs through both: the file, and the hook alone.
    let mut check = |key: &ClientKey, logs_in: bool, what: &str| {
        for (sshd, how) in &mut both {
            let what = format!("{what}, through {how}");
            if logs_in {
                sshd.assert_logs_in(name, key, &what);
            } else {
                sshd.assert_refused(name, key, &what);
            }
        }
    };
    check(&copied, true, "the copied key on the account");
    check(&other, true, "the other key");

    assert!(cp.remove_key(&copied.public), "the fake had the key");
    sync(env, "the copied key deleted on the account");
    let content = std::fs::read_to_string(user.home.join(".ssh/authorized_keys")).expect("read");
    assert!(
        content.starts_with(&format!("{}\n", copied.public)),
        "the platform's line is the platform's: kept\n{content}"
    );
    check(&copied, false, "the deleted key, copied outside the block");
    check(&other, true, "the key still on the account");

    cp.add_key(&copied.public);
    sync(env, "the copied key back on the account");
    check(&copied, true, "the key back on the account");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_key_is_refused_everywhere_also_where_another_tool_copied_it() {
    if sshd_can_run("a_deleted_key_is_refused_everywhere_also_where_another_tool_copied_it") {
        with_no_keys(move |s| revocation_scenario(&s)).await;
    }
}
