//! The `authorized-keys` hook (DESIGN.md §3) against real cache files: what
//! it prints, what it prints for users and state dirs that are not there,
//! the `%f` fingerprint filter, its argument forms, that it never reads the
//! config, and that a cache replaced by rename is never seen half-written.
//!
//! Fingerprints come from `ssh-keygen -l -E sha256`, the same format sshd
//! passes for `%f`, so the filter is checked against OpenSSH, not against
//! the crate the hook itself uses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::config::{Config, User};
use crate::support::env::{TestEnv, bin, keysync_cmd};
use crate::support::fake_cp::{fixture_keys, gen_ed25519_keys};
use crate::support::scenario::Scenario;
use crate::support::{current_user, output_within, text};

/// Runs the real binary as sshd would: no stdin, stdout and stderr captured.
fn hook(args: &[&str]) -> Output {
    hook_with(args, |_| {})
}

fn hook_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = keysync_cmd(&["authorized-keys"]);
    cmd.args(args);
    adjust(&mut cmd);
    cmd.output().expect("run keysync authorized-keys")
}

/// Writes `<state>/users/<user>.keys` directly, as the agent's writer
/// would end up with it.
fn write_cache(state: &Path, user: &str, content: &str) -> PathBuf {
    let users = state.join("users");
    std::fs::create_dir_all(&users).expect("mkdir users");
    let path = users.join(format!("{user}.keys"));
    std::fs::write(&path, content).expect("write cache");
    path
}

fn lines(keys: &[impl AsRef<str>]) -> String {
    keys.iter().map(|k| format!("{}\n", k.as_ref())).collect()
}

/// `SHA256:…` of a public key line, computed by OpenSSH's ssh-keygen.
fn openssh_fingerprint(dir: &Path, key_line: &str) -> String {
    let file = dir.join(format!("fpr-{}.pub", fastrand::u64(..)));
    std::fs::write(&file, format!("{key_line}\n")).expect("write key file");
    let out = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(&file)
        .output()
        .expect("ssh-keygen (openssh-client) must be installed");
    assert!(out.status.success(), "ssh-keygen -l: {}", text(&out.stderr));
    let listing = text(&out.stdout);
    // "256 SHA256:… comment (ED25519)"
    let fpr = listing
        .split_whitespace()
        .nth(1)
        .expect("fingerprint field")
        .to_string();
    assert!(
        fpr.starts_with("SHA256:"),
        "unexpected ssh-keygen output {listing:?}"
    );
    fpr
}

/// Config for one vast source and the current user in `none` mode (only the
/// cache is written), so the agent needs no root for it.
fn none_mode_config(env: &TestEnv, url: &str, user: &str, options: Option<&str>) -> Config {
    let user = User::new(user, "none");
    let user = match options {
        Some(o) => user.set("options", o),
        None => user,
    };
    Config::vast(env, url).unset("max_backoff").only_user(user)
}

/// Syncs once through the real agent against a fake control plane serving
/// `keys`; returns the env (whose state dir now holds the cache).
async fn synced_env(keys: Vec<String>, user: String, options: Option<&'static str>) -> TestEnv {
    let s = Scenario::new().await;
    s.cp.set_keys(keys);
    s.run(move |s| {
        s.env
            .write_config(none_mode_config(&s.env, &s.cp.url(), &user, options));
        let out = s.env.run_once();
        assert!(
            out.status.success(),
            "run --once failed: {}",
            text(&out.stderr)
        );
        s.env
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn prints_exactly_the_cache_the_agent_wrote() {
    let [alice, bob, _] = fixture_keys();
    let user = current_user();
    let env = synced_env(vec![alice.into(), bob.into()], user.clone(), None).await;
    let cache = env.cache(&user).expect("run --once wrote the cache");
    assert_eq!(
        cache,
        lines(&[alice, bob]),
        "the cache holds the account's keys"
    );

    let state = env.state_dir();
    let out = hook(&["--state-dir", state.to_str().expect("utf-8"), &user]);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout),
        cache,
        "the hook prints the cache byte for byte"
    );
    assert!(
        out.stderr.is_empty(),
        "nothing on stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn unknown_user_prints_nothing_and_exits_0() {
    let env = TestEnv::new();
    let state = env.state_dir();
    let [alice, ..] = fixture_keys();
    write_cache(&state, "alice", &lines(&[alice]));
    let state = state.to_str().expect("utf-8");
    let socket = env.path().join("no-agent.sock");
    let socket = socket.to_str().expect("utf-8");
    // Names that must not resolve to any cache, including ones that try to
    // leave the users directory, and one too long for a file name (DESIGN.md
    // §3: that too prints nothing and exits 0). Through both binaries, with
    // and without a fingerprint (which asks for no refresh: no cache, no
    // user the agent manages).
    let too_long = "a".repeat(300);
    let unknown_fpr = format!("SHA256:{}", "A".repeat(43));
    let front = PathBuf::from(env!("CARGO_BIN_EXE_keysync-front"));
    for binary in [bin(), front] {
        for user in [
            "nobody-here",
            "alic",
            "alice.keys",
            "../users/alice",
            ".alice",
            "users/alice",
            too_long.as_str(),
        ] {
            for fpr in [None, Some(unknown_fpr.as_str())] {
                let mut args = vec!["authorized-keys", "--state-dir", state, "--socket", socket];
                args.push(user);
                args.extend(fpr);
                let out = front_cmd(&binary, &args).output().expect("run the hook");
                let case = format!("{}, {user:.20}, {fpr:?}", binary.display());
                assert_eq!(out.status.code(), Some(0), "{case}: exit {:?}", out.status);
                assert!(
                    out.stdout.is_empty(),
                    "{case}: printed {:?}",
                    text(&out.stdout)
                );
                assert!(
                    out.stderr.is_empty(),
                    "{case}: stderr {:?}",
                    text(&out.stderr)
                );
            }
        }
    }
    // And the cache that is there is found (the loop above is not vacuous).
    let out = hook(&["--state-dir", state, "alice"]);
    assert_eq!(text(&out.stdout), lines(&[alice]));
}

#[test]
fn missing_state_dir_prints_nothing_and_exits_0_without_waiting() {
    let env = TestEnv::new();
    for state in [
        env.path().join("no-such-state"),
        env.path().join("state-without-users"),
    ] {
        if state.ends_with("state-without-users") {
            std::fs::create_dir(&state).expect("mkdir");
        }
        let mut hook = keysync_cmd(&["authorized-keys"]);
        hook.arg(format!("--state-dir={}", state.display()))
            .arg("root");
        // "Promptly" means it does not wait for anything (no network, no
        // retries): it has exited long before this generous deadline.
        let (exited, out) = output_within(&mut hook, Duration::from_secs(10));
        assert!(
            exited,
            "{}: the hook was still running after 10 s",
            state.display()
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: exit {:?}",
            state.display(),
            out.status
        );
        assert!(out.stdout.is_empty(), "printed {:?}", text(&out.stdout));
        assert!(out.stderr.is_empty(), "stderr {:?}", text(&out.stderr));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fingerprint_filter_prints_only_the_matching_key() {
    let [alice, bob, retired] = fixture_keys();
    let generated = gen_ed25519_keys(3);
    let keys: Vec<String> = [alice.to_string(), bob.to_string()]
        .into_iter()
        .chain(generated.iter().cloned())
        .collect();
    let user = current_user();
    // Per-user options are part of the cached line: the filter must match
    // the key behind them and print the whole line, options included.
    let env = synced_env(keys.clone(), user.clone(), Some("no-agent-forwarding")).await;
    let cache = env.cache(&user).expect("cache");
    let cached: Vec<&str> = cache.lines().collect();
    assert_eq!(cached.len(), keys.len(), "cache: {cache}");
    let state = env.state_dir();
    let state = state.to_str().expect("utf-8");

    for (key, line) in keys.iter().zip(&cached) {
        assert_eq!(*line, format!("no-agent-forwarding {key}"));
        let fpr = openssh_fingerprint(env.path(), key);
        let out = hook(&["--state-dir", state, &user, &fpr]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "exit {:?}: {}",
            out.status,
            text(&out.stderr)
        );
        assert_eq!(
            text(&out.stdout),
            format!("{line}\n"),
            "only the key with {fpr}"
        );
    }

    // A well-formed fingerprint of a key that is not cached: nothing.
    let absent = openssh_fingerprint(env.path(), retired);
    let out = hook(&["--state-dir", state, &user, &absent]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty(),
        "unknown fingerprint printed {:?}",
        text(&out.stdout)
    );
    // Not a fingerprint at all, and the right one in the wrong hash (MD5).
    for junk in ["SHA256:", "garbage", "MD5:00:11:22"] {
        let out = hook(&["--state-dir", state, &user, junk]);
        assert_eq!(out.status.code(), Some(0), "{junk}");
        assert!(
            out.stdout.is_empty(),
            "{junk} printed {:?}",
            text(&out.stdout)
        );
    }
    // A fingerprint for a user without a cache: nothing.
    let fpr = openssh_fingerprint(env.path(), alice);
    let out = hook(&["--state-dir", state, "no-such-user", &fpr]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

#[test]
fn state_dir_option_forms_agree() {
    let env = TestEnv::new();
    let state = env.state_dir();
    let keys = gen_ed25519_keys(5);
    let expected = lines(&keys);
    write_cache(&state, "carol", &expected);
    let dir = state.to_str().expect("utf-8");
    let joined = format!("--state-dir={dir}");
    let forms: [&[&str]; 5] = [
        &["--state-dir", dir, "carol"],
        &[&joined, "carol"],
        &["carol", "--state-dir", dir],
        &["carol", &joined],
        // `--` is not on the fast path: clap parses it, same answer.
        &["--state-dir", dir, "--", "carol"],
    ];
    for args in forms {
        let out = hook(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), expected, "{args:?}");
    }
}

#[test]
fn reads_no_config() {
    let env = TestEnv::new();
    let state = env.state_dir();
    let keys = gen_ed25519_keys(2);
    write_cache(&state, "dave", &lines(&keys));
    // A config that would exit 2 for any command that loads it.
    let broken = env.path().join("broken.toml");
    std::fs::write(
        &broken,
        "state_dir = [\nthis is not toml\n[[users]]\nname = 7\n",
    )
    .expect("write");
    let check = keysync_cmd(&["check-config", "--config"])
        .arg(&broken)
        .output()
        .expect("check-config");
    assert_eq!(
        check.status.code(),
        Some(2),
        "the broken config is really broken"
    );

    let dir = state.to_str().expect("utf-8");
    for args in [
        &["--state-dir", dir, "dave"][..],
        &["--state-dir", dir, "--", "dave"][..],
    ] {
        let out = hook_with(args, |cmd| {
            cmd.env("KEYSYNC_CONFIG", &broken);
        });
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), lines(&keys), "{args:?}");
        assert!(
            out.stderr.is_empty(),
            "{args:?}: stderr {}",
            text(&out.stderr)
        );
    }
}

/// While a writer keeps replacing the cache by rename (temp file in the same
/// directory, then rename, as the agent does), every hook run prints one of
/// the two contents whole: never a mix, never a truncated file.
#[test]
fn a_cache_replaced_by_rename_is_never_read_torn() {
    const MIN_RENAMES: usize = 2_000;
    const MIN_RUNS: usize = 400;
    let env = TestEnv::new();
    let state = env.state_dir();
    let small = lines(&gen_ed25519_keys(10));
    let big = lines(&gen_ed25519_keys(10_000));
    let target = write_cache(&state, "erin", &small);
    let users = target.parent().expect("users dir").to_path_buf();

    let stop = Arc::new(AtomicBool::new(false));
    let renames = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, renames) = (stop.clone(), renames.clone());
        let (small, big) = (small.clone(), big.clone());
        std::thread::spawn(move || {
            let temp = users.join(".keysync.torn-test");
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let content = if i.is_multiple_of(2) { &big } else { &small };
                std::fs::write(&temp, content).expect("write temp");
                std::fs::rename(&temp, &target).expect("rename");
                i += 1;
                renames.store(i, Ordering::Relaxed);
            }
        })
    };

    let dir = state.to_str().expect("utf-8").to_string();
    let (mut runs, mut saw_small, mut saw_big) = (0usize, 0usize, 0usize);
    let mut failure = None;
    // A deadline only so a broken writer cannot hang the suite; on a healthy
    // machine the counts are reached in a few seconds.
    let deadline = Instant::now() + Duration::from_secs(120);
    let enough = |runs: usize, small: usize, big: usize| {
        runs >= MIN_RUNS && renames.load(Ordering::Relaxed) >= MIN_RENAMES && small > 0 && big > 0
    };
    while !enough(runs, saw_small, saw_big) && Instant::now() < deadline {
        let out = hook(&["--state-dir", &dir, "erin"]);
        runs += 1;
        if out.status.code() != Some(0) {
            failure = Some(format!(
                "run {runs}: exit {:?}: {}",
                out.status,
                text(&out.stderr)
            ));
            break;
        }
        if out.stdout == small.as_bytes() {
            saw_small += 1;
        } else if out.stdout == big.as_bytes() {
            saw_big += 1;
        } else {
            failure = Some(format!(
                "run {runs}: torn read: {} bytes, neither {} nor {}",
                out.stdout.len(),
                small.len(),
                big.len()
            ));
            break;
        }
    }
    let done = enough(runs, saw_small, saw_big);
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    let renames = renames.load(Ordering::Relaxed);
    assert_eq!(failure, None, "after {renames} renames");
    assert!(
        done,
        "not enough overlap: {runs} runs (small {saw_small}, big {saw_big}) over {renames} renames"
    );
}

/// The front binary (what the packages install as /usr/bin/keysync), run
/// from cargo's target directory, where the agent binary is beside it.
fn front_cmd(front: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(front);
    cmd.args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(std::process::Stdio::null());
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn the_front_binary_answers_as_the_agent_binary_does() {
    let [alice, bob, carol] = fixture_keys();
    let user = current_user();
    let env = synced_env(vec![alice.into(), bob.into()], user.clone(), None).await;
    let state = env.state_dir();
    let state = state.to_str().expect("utf-8");
    let socket = env.dir.path().join("no-agent.sock");
    let socket = socket.to_str().expect("utf-8");
    let bob_fpr = openssh_fingerprint(env.dir.path(), bob);
    let carol_fpr = openssh_fingerprint(env.dir.path(), carol);
    let front = PathBuf::from(env!("CARGO_BIN_EXE_keysync-front"));
    let hook = |extra: &[&str]| {
        let mut args = vec!["authorized-keys", "--state-dir", state, "--socket", socket];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("all keys", hook(&[&user])),
        ("a cached key, from the index", hook(&[&user, &bob_fpr])),
        (
            "an unknown key: a refresh asked for, no agent",
            hook(&[&user, &carol_fpr]),
        ),
        ("not a SHA256 fingerprint", hook(&[&user, "MD5:00:11"])),
        ("an unknown user", hook(&["nobody-here", &bob_fpr])),
        ("clap's usage error", vec!["authorized-keys".into()]),
        ("another command", vec!["--version".into()]),
    ];
    let run_cases = |label: &str| {
        for (case, args) in &cases {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let agent = keysync_cmd(&args).output().expect("run the agent binary");
            let fronted = front_cmd(&front, &args)
                .output()
                .expect("run the front binary");
            assert_eq!(
                fronted.status.code(),
                agent.status.code(),
                "{label}, {case}: exit code"
            );
            assert_eq!(
                text(&fronted.stdout),
                text(&agent.stdout),
                "{label}, {case}: stdout"
            );
        }
    };
    run_cases("with the index");
    let front_out = front_cmd(
        &front,
        &hook(&[&user, &bob_fpr])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .output()
    .expect("run the front binary");
    assert_eq!(
        text(&front_out.stdout),
        lines(&[bob]),
        "the cached key's line"
    );
    // The front binary alone (a copy with no agent binary beside it):
    // every answer the cache and its index give is still given, other
    // commands fail with a clear message.
    let alone = env.dir.path().join("alone");
    std::fs::create_dir(&alone).expect("mkdir");
    let copy = alone.join("keysync");
    std::fs::copy(&front, &copy).expect("copy the front binary");
    let run_copy = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = front_cmd(&copy, &args).output().expect("run the copy");
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, _, err) = run_copy(&["status".to_string()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the agent binary is not installed"), "{err}");
    let (code, out, err) = run_copy(&hook(&[&user]));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        lines(&[alice, bob]),
        "the whole cache, by the front alone"
    );
    let (code, out, err) = run_copy(&hook(&[&user, &bob_fpr]));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, lines(&[bob]), "a cached key, by the front alone");
    // An unknown key: the front itself asks for the refresh (no agent
    // here), looks again, and prints no key.
    let (code, out, err) = run_copy(&hook(&[&user, &carol_fpr]));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "", "no key for an unknown fingerprint");
    assert!(
        err.contains("is not in the cache") && err.contains("cannot reach the agent"),
        "{err}"
    );

    // A stale or missing index: the agent binary reads the whole cache.
    std::fs::remove_file(env.state_dir().join(format!("users/{user}.fpr")))
        .expect("remove the index");
    run_cases("without the index");
    // And without the agent binary the front prints the whole cache, which
    // answers any key sshd offers, and says why.
    let (code, out, err) = run_copy(&hook(&[&user, &bob_fpr]));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        lines(&[alice, bob]),
        "the whole cache for a cached key"
    );
    assert!(
        err.contains("index is stale or missing") && err.contains("not installed"),
        "{err}"
    );
}
