//! Revocation that holds (DESIGN.md §6): the real `keysync` binary.
//!
//! - Every line keysync writes holds, for OpenSSH (`ssh-keygen -l`, which
//!   splits options with sshd's own code), the key keysync checked and
//!   reports in `/status`, also for options crafted to make the two disagree.
//! - With `max_stale`, written lines carry `expiry-time="…Z"`, which OpenSSH
//!   reads, and a real sshd refuses a line whose time has passed.
//! - `max_stale` counts on the monotonic clock: a wall clock set back or
//!   forward (libfaketime, monotonic clock left alone) neither keeps stale
//!   keys nor drops fresh ones; a persisted answer from the future is stale
//!   after a restart.
//! - A list shrinking step by step waits for the mass-removal confirmation.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::agent::Agent;
use crate::support::block::block_keys;
use crate::support::env::{TestEnv, bin};
use crate::support::fake_cp::{FakeControlPlane, fixture_keys, gen_ed25519_keys};
use crate::support::scenario::with_fake;
use crate::support::sshd::{self, Sshd, base_config, client_key};
use crate::support::users::TestUser;
use crate::support::{DEADLINE, blocking, eventually, text};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A config with one source table (`source`, without its header) and one
/// user in block mode (root writes [`TestEnv::target`], any other user its
/// own `~/.ssh/authorized_keys`), `user_extra` in its table.
fn config(env: &TestEnv, source: &str, user: &str, user_extra: &str, policy: &str) -> String {
    format!(
        r#"state_dir = "{state}"
health_socket = "{socket}"

[sources.account]
{source}

[[users]]
name = "{user}"
sources = ["account"]
write = "block"
{path}
{user_extra}

[policy]
{policy}
"#,
        state = env.state_dir().display(),
        socket = env.socket().display(),
        path = if user == "root" {
            format!("path = \"{}\"", env.target().display())
        } else {
            String::new()
        },
    )
}

/// A fresh environment whose root user follows `cp`'s account.
fn root_env(cp: &FakeControlPlane, user_extra: &str, policy: &str) -> TestEnv {
    let env = TestEnv::new();
    env.write_config(config(&env, &vast(&cp.url()), "root", user_extra, policy));
    env
}

/// The vast source table for the fake control plane at `url`.
fn vast(url: &str) -> String {
    format!(
        "kind = \"vast\"\nurl = \"{url}\"\napi_key_env = \"KEYSYNC_TEST_API_KEY\"\n\
         interval = \"200ms\"\njitter = \"0s\"\ntimeout = \"2s\"\nmax_backoff = \"1s\""
    )
}

/// `keysync run --once`, with `adjust` for the environment (libfaketime).
fn run_once(env: &TestEnv, adjust: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--once", "--config"])
        .arg(env.config_path())
        .env("KEYSYNC_TEST_API_KEY", "test-token")
        .env("KEYSYNC_LOG", "debug")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null());
    adjust(&mut cmd);
    cmd.output().expect("run keysync")
}

/// Runs the agent with its wall clock (CLOCK_REALTIME) shifted by what
/// `spec` holds (libfaketime's `+2d`, `-1h`, …, re-read at every call), its
/// monotonic clock left alone. File times from `stat` stay real: the writer
/// compares them to see whether a file changed under it.
fn fake_wall_clock(cmd: &mut Command, spec: &Path) {
    cmd.env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", spec)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("NO_FAKE_STAT", "1");
}

/// True when libfaketime is installed; otherwise says so loudly (and fails
/// under CI).
fn have_faketime(test: &str) -> bool {
    if Path::new(LIBFAKETIME).exists() {
        return true;
    }
    let why = "libfaketime is not installed (apt-get install faketime)";
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}; under CI this test must run");
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: {why} !!!!!!!!\n");
    false
}

/// `keysync status --json` against the agent's health socket.
fn status_json(env: &TestEnv) -> Option<serde_json::Value> {
    let out = Command::new(bin())
        .args(["status", "--json", "--socket"])
        .arg(env.socket())
        .output()
        .expect("run keysync status");
    serde_json::from_slice(&out.stdout).ok()
}

/// The fingerprints `ssh-keygen -l` reads from a file, in order.
fn ssh_keygen_fingerprints(path: &Path) -> Vec<String> {
    let out = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen");
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_string))
        .collect()
}

/// An RSA public key line of `bits` made by ssh-keygen, and its fingerprint.
fn rsa_key(dir: &Path, name: &str, bits: u32) -> (String, String) {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "rsa",
            "-b",
            &bits.to_string(),
            "-N",
            "",
            "-C",
            name,
            "-f",
        ])
        .arg(&path)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {}", text(&out.stderr));
    let public = path.with_extension("pub");
    let line = std::fs::read_to_string(&public).expect(".pub");
    let fpr = ssh_keygen_fingerprints(&public).pop().expect("fingerprint");
    (line.trim_end().to_string(), fpr)
}

fn fingerprint_of(dir: &Path, line: &str) -> String {
    let path = dir.join("one.pub");
    std::fs::write(&path, format!("{line}\n")).expect("write key");
    ssh_keygen_fingerprints(&path).pop().expect("fingerprint")
}

fn set(items: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    items.into_iter().collect()
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `YYYYMMDDHHMMSS` (UTC) as Unix seconds.
fn parse_timespec(spec: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| spec[r].parse::<i64>().expect("digits");
    let (y, m, d) = (n(0..4), n(4..6), n(6..8));
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(8..10) * 3600 + n(10..12) * 60 + n(12..14)
}

/// The expiry time of a written line, as Unix seconds: the line must start
/// with `expiry-time="YYYYMMDDHHMMSSZ"`, then more options or the key.
fn expiry_of(line: &str) -> i64 {
    let rest = line
        .strip_prefix("expiry-time=\"")
        .unwrap_or_else(|| panic!("no expiry-time first in {line:?}"));
    let (spec, after) = rest.split_at(15);
    assert!(
        spec.ends_with('Z') && spec[..14].bytes().all(|b| b.is_ascii_digit()),
        "{line:?}"
    );
    assert!(
        after.starts_with("\",") || after.starts_with("\" "),
        "{line:?}"
    );
    parse_timespec(&spec[..14])
}

// ---------------------------------------------------------------------------
// 1. The key keysync checks is the key sshd uses

#[tokio::test(flavor = "multi_thread")]
async fn every_written_line_holds_the_key_keysync_reports() {
    let env = TestEnv::new();
    let [alice, bob, old] = fixture_keys();
    let (rsa1024, fpr1024) = rsa_key(env.path(), "short", 1024);
    let (rsa2048, fpr2048) = rsa_key(env.path(), "long", 2048);
    let entries = [
        alice.to_string(),
        // Inside quotes sshd escapes `\"` only: `x\\"` is a backslash and
        // an escaped quote, the quote stays open over the ed25519 key, and
        // sshd uses the RSA key after it.
        format!("command=\"x\\\\\" {old}\" {rsa1024}"),
        format!("command=\"y\\\\\" {bob}\" {rsa2048}"),
        format!("restrict,command=\"echo \\\"a b\\\"\" {bob}"),
    ];
    let keys_file = env.path().join("keys");
    std::fs::write(&keys_file, entries.join("\n") + "\n").expect("keys file");
    let source = format!(
        "kind = \"file\"\npath = \"{}\"\ninterval = \"200ms\"\njitter = \"0s\"",
        keys_file.display()
    );
    env.write_config(config(
        &env,
        &source,
        "root",
        "options = \"no-agent-forwarding\"",
        "allow_source_options = true\nmax_stale = \"24h\"",
    ));

    let agent = env.spawn();
    let want = set([
        fingerprint_of(env.path(), alice),
        fpr2048.clone(),
        fingerprint_of(env.path(), bob),
    ]);
    let mut reported = BTreeSet::new();
    let ok = eventually(DEADLINE, || {
        reported = status_json(&env)
            .and_then(|s| s["users"]["root"]["fingerprints"].as_array().cloned())
            .map(|a| set(a.iter().filter_map(|f| f.as_str().map(str::to_string))))
            .unwrap_or_default();
        reported.len() >= want.len() && env.read_target().is_some()
    });
    assert!(
        ok,
        "status never reported the keys: {reported:?}\n{}",
        agent.log_text()
    );
    assert!(!reported.contains(&fpr1024), "the 1024-bit key is refused");

    let cache = env.state_dir().join("users/root.keys");
    for file in [env.target(), cache] {
        let read = ssh_keygen_fingerprints(&file);
        assert_eq!(
            set(read.clone()),
            reported,
            "{}: OpenSSH reads other keys than keysync reports\n{}",
            file.display(),
            std::fs::read_to_string(&file).unwrap_or_default()
        );
        assert_eq!(read.len(), reported.len(), "one line per key");
    }
    assert_eq!(reported, want);
    drop(agent);
}

// ---------------------------------------------------------------------------
// 2. expiry-time

#[tokio::test(flavor = "multi_thread")]
async fn written_lines_carry_an_expiry_time_that_openssh_reads() {
    let [alice, bob, _] = fixture_keys();
    with_fake(
        [
            alice.to_string(),
            format!("no-pty,command=\"echo a b\" {bob}"),
        ],
        move |cp| {
            let env = root_env(
                cp,
                "options = \"restrict,port-forwarding\"",
                "allow_source_options = true\nmax_stale = \"2h\"",
            );
            let before = unix_secs(SystemTime::now());
            let out = run_once(&env, |_| {});
            let after = unix_secs(SystemTime::now());
            assert!(out.status.success(), "{}", text(&out.stderr));
            let content = env.read_target().expect("target written");
            let lines = block_keys(&content);
            assert_eq!(lines.len(), 2, "{content}");
            for line in &lines {
                // Within the second of the answer, plus two hours.
                let expiry = expiry_of(line);
                assert!(
                    (before + 7200 - 1..=after + 7200).contains(&expiry),
                    "{line}: expiry {expiry}, answer between {before} and {after}"
                );
            }
            let rest = |line: &str| line.split_once("Z\",").map(|(_, r)| r.to_string());
            assert_eq!(
                lines.iter().filter_map(|l| rest(l)).collect::<Vec<_>>(),
                [
                    format!("restrict,port-forwarding {alice}"),
                    format!("restrict,port-forwarding,no-pty,command=\"echo a b\" {bob}"),
                ],
                "the expiry first, then the user's options, then the key's"
            );
            // OpenSSH reads every line, as the key it is.
            let read = ssh_keygen_fingerprints(&env.target());
            assert_eq!(
                read,
                [
                    fingerprint_of(env.path(), alice),
                    fingerprint_of(env.path(), bob)
                ]
            );
            // The hook's cache holds the same lines.
            assert_eq!(
                block_keys(&content).join("\n") + "\n",
                env.cache("root").unwrap_or_default()
            );
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_sshd_refuses_a_line_past_its_expiry_time() {
    if !sshd::can_run("a_real_sshd_refuses_a_line_past_its_expiry_time")
        || !have_faketime("a_real_sshd_refuses_a_line_past_its_expiry_time")
    {
        return;
    }
    with_fake(Vec::<String>::new(), move |cp| {
        let url = cp.url();
        let env = TestEnv::new();
        let name = format!("ksx{}", std::process::id());
        let user = TestUser::login_user(&name);
        let key = client_key(env.path(), "client");
        cp.set_keys([key.public.clone()]);
        env.write_config(config(
            &env,
            &vast(&url),
            &user.name,
            "",
            "max_stale = \"1h\"",
        ));
        let mut sshd = Sshd::start(
            env.path(),
            &base_config(
                env.path(),
                &user.name,
                "AuthorizedKeysFile .ssh/authorized_keys\n",
            ),
        );

        // The agent's clock right: the key expires in an hour and logs in.
        let out = run_once(&env, |_| {});
        assert!(out.status.success(), "{}", text(&out.stderr));
        let target = user.home.join(".ssh/authorized_keys");
        let line = block_keys(&std::fs::read_to_string(&target).expect("written"))
            .pop()
            .expect("a line");
        assert!(expiry_of(&line) > unix_secs(SystemTime::now()), "{line}");
        sshd.assert_logs_in(
            &user.name,
            &key,
            "a line whose expiry-time is an hour ahead",
        );

        // An agent whose wall clock is two hours behind writes an expiry
        // that is an hour past for sshd: the same format, refused.
        let spec = env.path().join("faketime");
        std::fs::write(&spec, "-2h\n").expect("faketime spec");
        let out = run_once(&env, |cmd| fake_wall_clock(cmd, &spec));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let line = block_keys(&std::fs::read_to_string(&target).expect("written"))
            .pop()
            .expect("a line");
        assert!(expiry_of(&line) < unix_secs(SystemTime::now()), "{line}");
        sshd.assert_refused(&user.name, &key, "a line whose expiry-time has passed");
        assert!(
            std::fs::read_to_string(&sshd.log)
                .unwrap_or_default()
                .contains("entry expired at"),
            "sshd refused for another reason:\n{}",
            sshd.log_tail()
        );
        drop(sshd);
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. max_stale on the monotonic clock

/// An agent against its own control plane, `max_stale` set, writing its
/// keys, with the wall clock libfaketime gives it from `spec`.
struct ClockedAgent {
    env: TestEnv,
    spec: PathBuf,
    agent: Agent,
}

fn clocked_agent(cp: &FakeControlPlane, max_stale: &str) -> ClockedAgent {
    let env = TestEnv::new();
    let spec = env.path().join("faketime");
    std::fs::write(&spec, "+0\n").expect("faketime spec");
    env.write_config(config(
        &env,
        &vast(&cp.url()),
        "root",
        "",
        &format!("max_stale = \"{max_stale}\""),
    ));
    let agent = env.spawn_with(|cmd| fake_wall_clock(cmd, &spec));
    ClockedAgent { env, spec, agent }
}

fn block_of(env: &TestEnv) -> Vec<String> {
    env.read_target()
        .map(|t| block_keys(&t))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn wall_clock_jumps_neither_keep_stale_keys_nor_drop_fresh_ones() {
    if !have_faketime("wall_clock_jumps_neither_keep_stale_keys_nor_drop_fresh_ones") {
        return;
    }
    let keys = gen_ed25519_keys(2);
    let forward_cp = FakeControlPlane::start().await;
    let back_cp = FakeControlPlane::start().await;
    for cp in [&forward_cp, &back_cp] {
        cp.set_token(Some("test-token"));
        cp.set_keys(keys.clone());
    }
    blocking(move || {
        // Two agents side by side, so both wait out the writer's 30 s
        // staleness tick at once.
        let forward = clocked_agent(&forward_cp, "1h");
        let back = clocked_agent(&back_cp, "3s");
        for a in [&forward, &back] {
            assert!(
                eventually(DEADLINE, || block_of(&a.env).len() == 2),
                "keys never written\n{}",
                a.agent.log_text()
            );
        }
        // The control planes go down: the last good answers are seconds old.
        forward_cp.set_down(true);
        back_cp.set_down(true);
        // Forward two days: a wall-clock age would be 2 days > 1 h.
        std::fs::write(&forward.spec, "+2d\n").expect("jump forward");
        // Back a day: a wall-clock age would be negative, never > 3 s.
        std::fs::write(&back.spec, "-1d\n").expect("jump back");
        let jumped = Instant::now();

        // The back agent drops its keys once they are 3 s old by the
        // monotonic clock (at its next staleness tick, within 30 s).
        let dropped = eventually(Duration::from_secs(45), || block_of(&back.env).is_empty());
        assert!(
            dropped,
            "a wall clock set back kept stale keys for {:?}:\n{:?}\n{}",
            jumped.elapsed(),
            back.env.read_target(),
            back.agent.log_text()
        );
        // The forward agent kept its fresh keys all along, over a tick.
        while jumped.elapsed() < Duration::from_secs(35) {
            assert_eq!(
                block_of(&forward.env).len(),
                2,
                "a wall clock jump forward dropped fresh keys after {:?}\n{}",
                jumped.elapsed(),
                forward.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // The faked clock reached the agent: its status reports attempts
        // two days ahead.
        let attempt =
            status_json(&forward.env).expect("status")["sources"]["account"]["last_attempt"]
                .as_f64()
                .expect("last_attempt");
        let ahead = attempt - unix_secs(SystemTime::now()) as f64;
        assert!(
            ahead > 86_400.0,
            "the agent's wall clock is not faked: {ahead} s ahead"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_persisted_answer_from_the_future_is_stale_after_a_restart() {
    if !have_faketime("a_persisted_answer_from_the_future_is_stale_after_a_restart") {
        return;
    }
    with_fake(gen_ed25519_keys(2), move |cp| {
        let env = root_env(cp, "", "max_stale = \"1h\"");
        let spec = env.path().join("faketime");

        // A restart with the API down serves the last good keys while they
        // are fresh…
        assert!(run_once(&env, |_| {}).status.success());
        cp.set_down(true);
        let out = run_once(&env, |_| {});
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert_eq!(block_of(&env).len(), 2, "fresh persisted keys are served");

        // …but an answer persisted by a clock a day ahead has no knowable
        // age once the clock is right again: stale.
        cp.set_down(false);
        std::fs::write(&spec, "+1d\n").expect("faketime spec");
        let out = run_once(&env, |cmd| fake_wall_clock(cmd, &spec));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let state = std::fs::read_to_string(env.state_dir().join("sources/account.json"))
            .expect("persisted answer");
        let persisted: serde_json::Value = serde_json::from_str(&state).expect("json");
        let at = persisted["fetched_at_unix_ms"]
            .as_i64()
            .expect("fetched_at")
            / 1000;
        assert!(
            at > unix_secs(SystemTime::now()) + 80_000,
            "the faked clock did not reach the agent: {state}"
        );
        cp.set_down(true);
        let out = run_once(&env, |_| {});
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert_eq!(
            block_of(&env),
            Vec::<String>::new(),
            "keys of an answer from the future must not be served\n{}",
            text(&out.stderr)
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. Mass removal over a window

#[tokio::test(flavor = "multi_thread")]
async fn a_list_shrinking_step_by_step_waits_for_confirmation() {
    let keys = gen_ed25519_keys(4);
    with_fake(keys.clone(), move |cp| {
        let env = root_env(cp, "", "confirm_delay = \"3s\"");
        let agent = env.spawn();
        assert!(
            eventually(DEADLINE, || block_of(&env).len() == 4),
            "{}",
            agent.log_text()
        );
        // 4 -> 2: half of the keys stay; written without confirmation.
        cp.set_keys(keys[..2].to_vec());
        assert!(
            eventually(DEADLINE, || block_of(&env).len() == 2),
            "{}",
            agent.log_text()
        );
        // 2 -> 1 -> 0 half a second apart: each step removes one key, but
        // leaves fewer than half of the four managed moments ago.
        cp.set_keys(keys[..1].to_vec());
        std::thread::sleep(Duration::from_millis(500));
        cp.set_keys(Vec::<String>::new());
        let emptied = Instant::now();
        while emptied.elapsed() < Duration::from_millis(2000) {
            assert_eq!(
                block_of(&env),
                keys[..2].to_vec(),
                "the shrink was written before its confirmation ({:?} after the empty list)\n{}",
                emptied.elapsed(),
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Confirmed by a fetch confirm_delay later: obeyed.
        assert!(
            eventually(DEADLINE, || env
                .read_target()
                .is_some_and(|t| block_keys(&t).is_empty())),
            "the confirmed empty list was not written\n{}",
            agent.log_text()
        );
        drop(agent);
    })
    .await;
}
