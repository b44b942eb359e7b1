//! Login latency (DESIGN.md §9): from saving a key on the account to a
//! working `ssh` login, poll mode at the default 60 s interval. Target:
//! p99 under 3 s, which only the login-triggered refresh (§3) can meet.
//!
//! A real world, as in tests/refresh.rs: a private `sshd` on 127.0.0.1
//! with the shipped drop-in's setup (`AuthorizedKeysFile
//! .ssh/authorized_keys`, `AuthorizedKeysCommand keysync authorized-keys %u
//! %f` as an unprivileged user), a real account in `block` mode, the fake
//! control plane in process and the release `keysync run`. A sample is the
//! time from just before the key is added on the fake to the exit of the
//! first `ssh` that logs in with it; a failed `ssh` is retried every 100 ms
//! (the attempts are counted: with the refresh, the first one must work).
//! Each key is new; samples are 6 s apart, so each login meets a closed
//! rate-limit window (5 s), as a login seconds after saving a key does.
//!
//! Baselines in the same run:
//! - the same measurement with `refresh_min_interval = "0s"`: the key logs
//!   in after the next poll. At 60 s that is up to a minute per sample, so
//!   the baseline polls every 20 s (no jitter) and each sample starts at a
//!   random phase of the poll; its figures are also shown scaled to 60 s
//!   (the wait is uniform over the interval; the login itself does not
//!   scale). KEYSYNC_BENCH_LOGIN_BASELINE_INTERVAL=60s measures it unscaled.
//! - `ssh` with a key that is already in `authorized_keys`: the floor.
//!
//! Run: `cargo bench --bench login` as root (KEYSYNC_BENCH_LOGIN_TRIES,
//! default 20; KEYSYNC_BENCH_LOGIN_BASELINE_TRIES, default 10). Prints
//! markdown. Without root or sshd it says so and prints no figures.

// The integration tests' support tree, for its real-sshd world.
#[path = "../tests/it/support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agents, percentile};
use support::eventually;
use support::fake_cp::FakeControlPlane;
use support::files::chmod;
use support::sshd::{self as sshd, ClientKey, HookBinary, Sshd, base_config, client_key};
use support::users::TestUser;

const TOKEN: &str = "bench-token";
/// The gap between samples with the refresh: more than its window (5 s).
const GAP: Duration = Duration::from_secs(6);
const RETRY: Duration = Duration::from_millis(100);

fn agent_config(
    dir: &Path,
    url: &str,
    user: &str,
    poll: &str,
    jitter: &str,
    refresh: &str,
) -> String {
    format!(
        r#"state_dir = "{state}"
health_socket = "{socket}"
refresh_min_interval = "{refresh}"

[sources.account]
kind = "vast"
url = "{url}"
api_key_env = "KEYSYNC_BENCH_API_KEY"
interval = "{poll}"
jitter = "{jitter}"

[[users]]
name = "{user}"
sources = ["account"]
write = "block"
"#,
        state = dir.join("state").display(),
        socket = dir.join("health.sock").display(),
    )
}

/// One sample: how long from the key's save to the first login, and how
/// many `ssh` runs it took. None when it never logged in within `give_up`.
fn sample(
    cp: &FakeControlPlane,
    sshd: &Sshd,
    user: &str,
    key: &ClientKey,
    give_up: Duration,
) -> Option<(Duration, usize)> {
    let saved = Instant::now();
    cp.add_key(&key.public);
    let mut attempts = 0;
    while saved.elapsed() < give_up {
        attempts += 1;
        let out = sshd.ssh(user, key);
        if out.status.success() {
            return Some((saved.elapsed(), attempts));
        }
        std::thread::sleep(RETRY);
    }
    None
}

struct Row {
    what: String,
    samples: Vec<Duration>,
    attempts: Vec<usize>,
    lost: usize,
    target: &'static str,
    verdict: &'static str,
}

fn print_row(r: &Row) {
    let mut v = r.samples.clone();
    v.sort();
    let (p50, p90, p99, max) = if v.is_empty() {
        ("–".into(), "–".into(), "–".into(), "–".into())
    } else {
        (
            secs(percentile(&v, 50.0)),
            secs(percentile(&v, 90.0)),
            secs(percentile(&v, 99.0)),
            secs(v[v.len() - 1]),
        )
    };
    let attempts = if r.attempts.is_empty() {
        "–".to_string()
    } else {
        let mean = r.attempts.iter().sum::<usize>() as f64 / r.attempts.len() as f64;
        let most = r.attempts.iter().max().copied().unwrap_or(0);
        format!("{mean:.1} (max {most})")
    };
    let lost = if r.lost > 0 {
        format!(" ({} never logged in)", r.lost)
    } else {
        String::new()
    };
    println!(
        "| {} | {}{lost} | {p50} | {p90} | {p99} | {max} | {attempts} | {} | {} |",
        r.what,
        r.samples.len(),
        r.target,
        r.verdict
    );
}

fn secs(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn main() {
    let is_root = nix::unistd::geteuid().is_root();
    if !is_root || !Path::new(sshd::SSHD).exists() {
        println!("### f. Login latency: key saved on the account to a working ssh login");
        println!();
        println!(
            "Not measured: this benchmark needs root (useradd, sshd) and openssh-server ({}).",
            sshd::SSHD
        );
        return;
    }
    let tries = common::env_count("KEYSYNC_BENCH_LOGIN_TRIES", 20).max(1);
    let baseline_tries = common::env_count("KEYSYNC_BENCH_LOGIN_BASELINE_TRIES", 10).max(1);
    let baseline_poll = std::env::var("KEYSYNC_BENCH_LOGIN_BASELINE_INTERVAL")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(Duration::from_secs(20));

    let rt = common::runtime();
    let cp = rt.block_on(FakeControlPlane::start());
    cp.set_token(Some(TOKEN));

    let work = tempfile::Builder::new()
        .prefix("keysync-login.")
        .tempdir()
        .expect("tempdir");
    // The hook's user reaches the caches and the socket through group root.
    chmod(work.path(), 0o750);
    let name = format!("ksl{}", std::process::id());
    let _user = TestUser::login_user(&name);
    let hook_user = TestUser::hook_user(&format!("{name}k"));
    let binary = HookBinary::install();
    let keys_dir = work.path().join("client-keys");
    std::fs::create_dir(&keys_dir).expect("mkdir");
    let first = client_key(&keys_dir, "first");
    let keys: Vec<ClientKey> = (0..tries + baseline_tries)
        .map(|i| client_key(&keys_dir, &format!("k{i}")))
        .collect();
    cp.set_keys([first.public.clone()]);

    let config = work.path().join("config.toml");
    let log = work.path().join("agent.log");
    let cache = work.path().join(format!("state/users/{name}.keys"));
    let url = cp.url();
    std::fs::write(
        &config,
        agent_config(work.path(), &url, &name, "60s", "10s", "5s"),
    )
    .expect("config");
    let mut agents = Agents::new();
    agents.spawn(&config, &log, None);
    let synced = eventually(Duration::from_secs(30), || {
        std::fs::read_to_string(&cache).is_ok_and(|c| c.contains(&first.public))
    });
    assert!(
        synced,
        "the agent did not sync: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let keys_config = format!(
        "AuthorizedKeysFile .ssh/authorized_keys\n\
         AuthorizedKeysCommand {} authorized-keys --state-dir {} --socket {} %u %f\n\
         AuthorizedKeysCommandUser {}\n",
        binary.path().display(),
        work.path().join("state").display(),
        work.path().join("health.sock").display(),
        hook_user.name,
    );
    let mut sshd = Sshd::start(work.path(), &base_config(work.path(), &name, &keys_config));

    // The floor: a key that is already in authorized_keys.
    eprintln!("== ssh with a key already in authorized_keys: {tries} logins");
    let floor: Vec<Duration> = (0..tries)
        .map(|_| sshd.assert_logs_in(&name, &first, "the synced key"))
        .collect();

    // With the refresh (the default 5 s window), poll 60 s ± 10 s.
    eprintln!("== keysync with the refresh, poll 60 s: {tries} keys, {GAP:?} apart");
    let mut with = Row {
        what: "keysync, refresh on (window 5 s), poll every 60 s ± 10 s".into(),
        samples: Vec::new(),
        attempts: Vec::new(),
        lost: 0,
        target: "p99 < 3 s",
        verdict: "",
    };
    let requests_before = cp.list_requests();
    let mut last = Instant::now() - GAP;
    for key in &keys[..tries] {
        std::thread::sleep(GAP.saturating_sub(last.elapsed()));
        last = Instant::now();
        match sample(&cp, &sshd, &name, key, Duration::from_secs(80)) {
            Some((took, attempts)) => {
                with.samples.push(took);
                with.attempts.push(attempts);
            }
            None => with.lost += 1,
        }
    }
    let refresh_requests = cp.list_requests() - requests_before;
    agents.stop(Duration::from_secs(5));
    let mut sorted = with.samples.clone();
    sorted.sort();
    with.verdict = if with.lost == 0 && percentile(&sorted, 99.0) < Duration::from_secs(3) {
        "ok"
    } else {
        "MISSED"
    };

    // Without it: the next poll brings the key.
    let poll = humantime::format_duration(baseline_poll).to_string();
    std::fs::write(
        &config,
        agent_config(work.path(), &url, &name, &poll, "0s", "0s"),
    )
    .expect("config");
    let before = cp.list_requests();
    agents.spawn(&config, &log, None);
    let started = eventually(Duration::from_secs(30), || cp.list_requests() > before);
    assert!(started, "the baseline agent did not fetch");
    eprintln!("== baseline, refresh off, poll {poll}: {baseline_tries} keys at random phases");
    let mut without = Row {
        what: format!(
            "baseline: refresh off (`refresh_min_interval = \"0s\"`), poll every {poll}, no jitter"
        ),
        samples: Vec::new(),
        attempts: Vec::new(),
        lost: 0,
        target: "",
        verdict: "",
    };
    for key in &keys[tries..] {
        std::thread::sleep(baseline_poll.mul_f64(fastrand::f64()));
        match sample(
            &cp,
            &sshd,
            &name,
            key,
            baseline_poll + Duration::from_secs(15),
        ) {
            Some((took, attempts)) => {
                without.samples.push(took);
                without.attempts.push(attempts);
            }
            None => without.lost += 1,
        }
    }
    agents.stop(Duration::from_secs(5));

    let login_floor = common::median(&floor);
    let scale = 60.0 / baseline_poll.as_secs_f64();
    let scaled = Row {
        what: format!(
            "baseline scaled to a 60 s poll: (sample − median login) × {scale:.0} + median login"
        ),
        samples: without
            .samples
            .iter()
            .map(|s| login_floor + s.saturating_sub(login_floor).mul_f64(scale))
            .collect(),
        attempts: Vec::new(),
        lost: without.lost,
        target: "",
        verdict: "",
    };
    let floor_row = Row {
        what: "floor: `ssh` with a key already in authorized_keys".into(),
        samples: floor,
        attempts: Vec::new(),
        lost: 0,
        target: "",
        verdict: "",
    };

    println!("### f. Login latency: key saved on the account to a working ssh login");
    println!();
    println!(
        "Real `sshd` (block mode and the drop-in's `AuthorizedKeysCommand … %u %f`), real `ssh`, the fake control \
         plane on loopback. A sample: from adding a new key on the fake to the exit of the first `ssh` that logs in \
         with it; a failed `ssh` is retried every {} ms. Samples with the refresh are {} s apart (each login meets \
         a closed 5 s window); baseline samples start at a random phase of the poll.",
        RETRY.as_millis(),
        GAP.as_secs()
    );
    println!();
    println!("| what | samples | p50 | p90 | p99 | max | ssh runs per sample | target | verdict |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|---|");
    print_row(&with);
    print_row(&without);
    if baseline_poll != Duration::from_secs(60) {
        print_row(&scaled);
    }
    print_row(&floor_row);
    println!();
    println!(
        "List requests at the fake while the {tries} refresh samples ran: {refresh_requests} \
         (one refresh per new key; the 60 s poll may add one)."
    );
}
