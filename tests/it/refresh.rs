//! The login-triggered refresh (DESIGN.md §3, §8): a key saved on the
//! account a moment ago logs in at once, even where the control plane
//! cannot push and the agent polls every 60 s.
//!
//! - Real `sshd` and `ssh` (needs root): a key added on the fake control
//!   plane after the agent's last poll logs in on the first attempt; a key
//!   on neither side is refused, also when the control plane hangs (the
//!   hook gives up after 2 s); with the agent stopped, cached keys log in
//!   and unknown ones are refused without waiting.
//! - The hook and `POST /refresh` against the real agent (no root needed):
//!   50 unknown keys in 10 s cost at most 3 list requests; concurrent
//!   requests share one round; a source in backoff or Retry-After is not
//!   fetched; `"0s"` turns it off; `/status`, `keysync status` and
//!   `/metrics` count what the requests got.
//! - The hook, as the agent binary and as the front binary, against peers
//!   that are not a healthy agent: one that never answers, garbage, a
//!   closed connection, a 503. It exits 0 and prints what the cache holds,
//!   and a key that is in the cache never connects.
//!
//! No timing is asserted tightly: outcomes (logged in, refused, counts of
//! requests at the fake), and generous upper bounds only where the issue
//! is one of waiting (the hook must not wait for a control plane that hangs).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keysync::keys::{Policy, parse_entry};

use crate::support::agent::Agent;
use crate::support::config::{Config, User};
use crate::support::env::{TestEnv, bin, keysync_cmd};
use crate::support::fake_cp::{FakeControlPlane, Fault, base64_encode, fixture_keys};
use crate::support::http::{self, Response};
use crate::support::sshd::{ClientKey, HookBinary, LoginRig, Sshd, base_config, can_run};
use crate::support::users::TestUser;
use crate::support::{blocking, current_user, eventually, text};

/// The hook's whole wait for a refresh (DESIGN.md §3).
const HOOK_WAIT: Duration = Duration::from_secs(2);

/// An agent config: one vast source polled every 60 s without jitter
/// (waiting up to 30 s for an answer, backing off up to 1 s), one user in
/// `write` mode.
fn agent_config(env: &TestEnv, url: &str, user: &str, write: &str) -> Config {
    Config::vast(env, url)
        .set("interval", "60s")
        .set("timeout", "30s")
        .only_user(User::new(user, write))
}

/// `SHA256:…` of a public key line.
fn fingerprint(line: &str) -> String {
    parse_entry(line, &Policy::default())
        .expect("a valid key")
        .fingerprint
}

/// A well-formed fingerprint of no key anyone has.
fn unknown_fingerprint() -> String {
    let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    format!("SHA256:{}", base64_encode(&bytes).trim_end_matches('='))
}

/// `POST /refresh`: the answer and its JSON body.
fn post_refresh(socket: &Path) -> (Response, serde_json::Value) {
    let answer = http::post(socket, "/refresh", "");
    let json = serde_json::from_str(&answer.body).unwrap_or(serde_json::Value::Null);
    (answer, json)
}

/// The `refresh` object of `/status`.
fn refresh_status(socket: &Path) -> serde_json::Value {
    let answer = http::get(socket, "/status");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let status: serde_json::Value = serde_json::from_str(&answer.body).expect("status JSON");
    status["refresh"].clone()
}

/// The value of `keysync_refresh_total{result}`.
fn refreshes(socket: &Path, result: &str) -> u64 {
    let value = http::metrics(socket)
        .value("keysync_refresh_total", &[("result", result)])
        .unwrap_or_else(|| panic!("no keysync_refresh_total{{result=\"{result}\"}}"));
    // A counter of requests: a whole number.
    value as u64
}

/// `keysync authorized-keys --state-dir S --socket P USER FPR`, as sshd
/// runs it; and how long it took.
fn hook(state: &Path, socket: &Path, user: &str, fpr: &str) -> (Output, Duration) {
    hook_with(&bin(), state, socket, user, fpr)
}

/// [`hook`] run by `binary`: the agent binary, or the front binary the
/// packages install as `/usr/bin/keysync`.
fn hook_with(
    binary: &Path,
    state: &Path,
    socket: &Path,
    user: &str,
    fpr: &str,
) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(binary)
        .arg("authorized-keys")
        .arg("--state-dir")
        .arg(state)
        .arg("--socket")
        .arg(socket)
        .args([user, fpr])
        .stdin(Stdio::null())
        .output()
        .expect("run the hook");
    (out, started.elapsed())
}

/// Starts the agent and waits for its first sync (the cache holds `first`).
fn start_agent(env: &TestEnv, user: &str, first: &str) -> Agent {
    let mut agent = env.spawn();
    let synced = eventually(Duration::from_secs(30), || {
        env.cache(user).is_some_and(|c| c.contains(first)) && env.socket().exists()
    });
    assert!(
        synced && agent.alive(),
        "the agent did not sync:\n{}",
        agent.log_text()
    );
    agent
}

// ---------------------------------------------------------------------------
// Real logins.

/// What the login tests share: a login user, the hook's user and binary,
/// client keys, an agent that has synced `first`, and sshd.
struct World {
    env: TestEnv,
    user: TestUser,
    _hook_user: TestUser,
    _binary: HookBinary,
    first: ClientKey,
    later: ClientKey,
    stranger: ClientKey,
    agent: Option<Agent>,
    sshd: Sshd,
}

/// Keys reach sshd as the shipped drop-in has it: `block` writes the
/// managed block (AuthorizedKeysFile) and the hook runs with `%u %f`;
/// `none`: the hook is the only way in.
fn world(cp: &FakeControlPlane, tag: &str, write: &str) -> World {
    let env = TestEnv::new();
    let rig = LoginRig::new(env.path(), &format!("ksr{}{tag}", std::process::id()));
    let first = rig.key("first");
    let later = rig.key("later");
    let stranger = rig.key("stranger");

    cp.set_keys([first.public.clone()]);
    env.write_config(agent_config(&env, &cp.url(), &rig.user.name, write));
    let agent = start_agent(&env, &rig.user.name, &first.public);

    let files = if write == "none" {
        "none"
    } else {
        ".ssh/authorized_keys"
    };
    let keys_config = format!(
        "AuthorizedKeysFile {files}\n{}",
        rig.hook_lines(&env.state_dir(), Some(&env.socket()), true),
    );
    let sshd = Sshd::start(
        env.path(),
        &base_config(env.path(), &rig.user.name, &keys_config),
    );
    let LoginRig {
        user,
        hook_user,
        binary,
        ..
    } = rig;
    World {
        env,
        user,
        _hook_user: hook_user,
        _binary: binary,
        first,
        later,
        stranger,
        agent: Some(agent),
        sshd,
    }
}

/// Runs a login scenario on a blocking thread while the fake control plane
/// is served by the test's runtime.
async fn with_fake(scenario: impl FnOnce(&FakeControlPlane) + Send + 'static) {
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some("test-token"));
    let cp = std::sync::Arc::new(cp);
    let shared = cp.clone();
    blocking(move || scenario(&shared)).await;
}

fn first_try(cp: &FakeControlPlane, tag: &str, write: &str) {
    let mut w = world(cp, tag, write);
    let name = w.user.name.clone();
    w.sshd
        .assert_logs_in(&name, &w.first, "the key the agent synced at start");
    w.sshd.assert_refused(
        &name,
        &w.later,
        "a key not yet on the account (this sshd does not let any key in)",
    );
    // The refusal above asked for a refresh: let its window pass, so the
    // login below is the first since the key was saved, not a rate-limited one.
    std::thread::sleep(Duration::from_millis(5_200));

    let polls = cp.list_requests();
    cp.add_key(&w.later.public);
    // The agent's next poll is a minute away: only the refresh can do it.
    w.sshd.assert_logs_in(
        &name,
        &w.later,
        "a key saved on the account after the agent's last poll, on the FIRST ssh attempt",
    );
    assert!(
        cp.list_requests() > polls,
        "the login asked the control plane"
    );
    let socket = w.env.socket();
    let counts = refresh_status(&socket);
    assert!(counts["served"].as_u64() >= Some(2), "{counts}");
    assert!(
        w.env
            .cache(&name)
            .is_some_and(|c| c.contains(&w.later.public)),
        "the refresh wrote the cache"
    );
    if write == "block" {
        let file = std::fs::read_to_string(w.user.home.join(".ssh/authorized_keys"))
            .expect("authorized_keys");
        assert!(
            file.contains(&w.later.public),
            "and the managed block:\n{file}"
        );
    }
    w.sshd
        .assert_refused(&name, &w.stranger, "a key on neither side");
    drop(w.agent.take());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_saved_a_moment_ago_logs_in_on_the_first_try() {
    if can_run("a_key_saved_a_moment_ago_logs_in_on_the_first_try") {
        with_fake(|cp| first_try(cp, "b", "block")).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_saved_a_moment_ago_logs_in_on_the_first_try_through_the_hook_alone() {
    if can_run("a_key_saved_a_moment_ago_logs_in_on_the_first_try_through_the_hook_alone") {
        with_fake(|cp| first_try(cp, "n", "none")).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_on_neither_side_is_refused_after_about_2s_even_when_the_control_plane_hangs() {
    if !can_run("a_key_on_neither_side_is_refused_after_about_2s_even_when_the_control_plane_hangs")
    {
        return;
    }
    with_fake(|cp| {
        // The agent waits up to 30 s for an answer; the control plane takes 10.
        let mut w = world(cp, "h", "block");
        let name = w.user.name.clone();
        cp.set_fault(Fault::Slow(Duration::from_secs(10)), None);
        let took = w
            .sshd
            .assert_refused(&name, &w.stranger, "a key on neither side");
        // A hook that waited for the fetch would take the control plane's
        // 10 s; the bound is generous for a loaded machine.
        assert!(
            took < Duration::from_secs(9),
            "the refusal took {took:?}: the hook waited for the control plane"
        );
        assert!(
            cp.list_requests() >= 2,
            "the refusal did ask the control plane"
        );
        w.sshd
            .assert_logs_in(&name, &w.first, "a cached key, while the fetch hangs");
        drop(w.agent.take());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_agent_stopped_cached_keys_log_in_and_unknown_keys_are_refused_at_once() {
    if !can_run("with_the_agent_stopped_cached_keys_log_in_and_unknown_keys_are_refused_at_once") {
        return;
    }
    with_fake(|cp| {
        let mut w = world(cp, "s", "none");
        let name = w.user.name.clone();
        let socket = w.env.socket();
        let state = w.env.state_dir();
        // SIGKILL leaves the socket file behind (connections are refused);
        // a clean stop removes it.
        w.agent.take().expect("agent").kill();
        assert!(socket.exists(), "a killed agent leaves its socket");
        for case in ["killed (stale socket)", "stopped (no socket)"] {
            w.sshd
                .assert_logs_in(&name, &w.first, &format!("a cached key, agent {case}"));
            w.sshd
                .assert_refused(&name, &w.stranger, &format!("an unknown key, agent {case}"));
            // The hook itself: no agent means no wait. A hook that waited
            // would take its whole 2 s.
            let (out, took) = hook(&state, &socket, &name, &fingerprint(&w.stranger.public));
            assert_eq!(out.status.code(), Some(0), "{case}: {}", text(&out.stderr));
            assert!(out.stdout.is_empty(), "{case}: {}", text(&out.stdout));
            let stderr = text(&out.stderr);
            assert!(
                stderr.contains("cannot reach the agent"),
                "{case}: {stderr}"
            );
            assert!(took < HOOK_WAIT, "{case}: the hook took {took:?}");
            std::fs::remove_file(&socket).ok();
        }
        assert_eq!(cp.list_requests(), 1, "only the agent's first fetch");
    })
    .await;
}

// ---------------------------------------------------------------------------
// The rate limit, backoff and the counts, against the real agent.

/// An agent syncing the current user in `none` mode (no root needed), its
/// config changed by `adjust`.
fn hook_world(
    cp: &FakeControlPlane,
    adjust: impl FnOnce(Config) -> Config,
) -> (TestEnv, Agent, String) {
    let env = TestEnv::new();
    let user = current_user();
    let [alice, ..] = fixture_keys();
    cp.set_keys([alice]);
    env.write_config(adjust(agent_config(&env, &cp.url(), &user, "none")));
    let agent = start_agent(&env, &user, alice);
    (env, agent, user)
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_unknown_keys_in_ten_seconds_cost_at_most_three_list_requests() {
    with_fake(|cp| {
        let (env, agent, user) = hook_world(cp, |c| c);
        let (state, socket) = (env.state_dir(), env.socket());
        let before = cp.list_requests();
        let started = Instant::now();
        let mut outs = Vec::new();
        // Five logins with unknown keys every second for ten seconds.
        for second in 0..10u32 {
            let batch: Vec<_> = (0..5)
                .map(|_| {
                    let (state, socket, user) = (state.clone(), socket.clone(), user.clone());
                    std::thread::spawn(move || hook(&state, &socket, &user, &unknown_fingerprint()))
                })
                .collect();
            outs.extend(batch.into_iter().map(|t| t.join().expect("hook thread")));
            let next = started + Duration::from_secs(u64::from(second) + 1);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        for (out, _) in &outs {
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
        }
        let asked = cp.list_requests() - before;
        assert!(
            (1..=3).contains(&asked),
            "50 unknown keys in 10 s made {asked} list requests (window 5 s: at most 3)\n{}",
            agent.log_text()
        );
        let counts = refresh_status(&socket);
        assert_eq!(counts["asked"], 50, "{counts}");
        assert_eq!(counts["min_interval_ms"], 5_000, "{counts}");
        let served = counts["served"].as_u64().expect("served");
        let limited = counts["rate_limited"].as_u64().expect("rate_limited");
        assert_eq!(served + limited, 50, "{counts}");
        assert_eq!(refreshes(&socket, "served"), served);
        assert_eq!(refreshes(&socket, "rate_limited"), limited);
        assert_eq!(refreshes(&socket, "backoff"), 0);
        let out = Command::new(bin())
            .args(["status", "--socket"])
            .arg(&socket)
            .output()
            .expect("keysync status");
        let screen = text(&out.stdout);
        assert!(
            screen.contains(&format!(
                "50 asked, {served} served, {limited} rate limited, 0 while in backoff, 0 failed"
            )),
            "{screen}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_one_round_and_the_window_answers_429() {
    with_fake(|cp| {
        let (env, _agent, _) = hook_world(cp, |c| c);
        let socket = env.socket();
        let before = cp.list_requests();
        // A slow control plane, so that every request comes while the round runs.
        cp.set_fault(Fault::Slow(Duration::from_millis(1_500)), Some(1));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(10));
        let posts: Vec<_> = (0..10)
            .map(|_| {
                let (socket, barrier) = (socket.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    post_refresh(&socket)
                })
            })
            .collect();
        for post in posts {
            let (answer, body) = post.join().expect("post");
            assert_eq!(answer.status, 200, "{body}");
            assert_eq!(body["refreshed"], true, "{body}");
        }
        assert_eq!(cp.list_requests() - before, 1, "ten requests, one round");

        let (answer, body) = post_refresh(&socket);
        assert_eq!(answer.status, 429, "inside the window: {answer:?}");
        assert!(answer.header("retry-after").is_some(), "{answer:?}");
        assert_eq!(body["refreshed"], false, "{body}");
        assert!(body["age_ms"].as_u64().is_some(), "{body}");
        assert!(body["retry_after_ms"].as_u64() <= Some(5_000), "{body}");
        assert_eq!(cp.list_requests() - before, 1, "answered without a fetch");
        let counts = refresh_status(&socket);
        assert_eq!(
            (&counts["asked"], &counts["served"], &counts["rate_limited"]),
            (&11.into(), &10.into(), &1.into()),
            "{counts}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_never_shortens_a_backoff_or_a_retry_after() {
    for (what, fault) in [
        ("Retry-After", Fault::rate_limited(Some(3_600))),
        ("backoff after a 503", Fault::server_error(503)),
    ] {
        with_fake(move |cp| {
            let (env, agent, _) = hook_world(cp, |c| {
                c.top("refresh_min_interval", "1s").set("max_backoff", "2h")
            });
            let socket = env.socket();
            // The refresh's fetch meets the fault: the source backs off.
            cp.set_fault(fault, None);
            let before = cp.list_requests();
            let (answer, body) = post_refresh(&socket);
            assert_eq!(
                (answer.status, &body["refreshed"]),
                (200, &false.into()),
                "{what}: {body}"
            );
            assert_eq!(cp.list_requests() - before, 1, "{what}: one fetch, failed");

            std::thread::sleep(Duration::from_millis(1_200));
            let before = cp.list_requests();
            let (answer, body) = post_refresh(&socket);
            let after = cp.list_requests();
            assert_eq!(
                (answer.status, &body["refreshed"]),
                (200, &false.into()),
                "{what}: {body}"
            );
            assert_eq!(
                after, before,
                "{what}: a refresh during the backoff fetched"
            );
            let counts = refresh_status(&socket);
            assert_eq!(
                (&counts["failed"], &counts["backoff"]),
                (&1.into(), &1.into()),
                "{what}: {counts}\n{}",
                agent.log_text()
            );
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_turns_the_refresh_off() {
    with_fake(|cp| {
        let (env, _agent, user) = hook_world(cp, |c| c.top("refresh_min_interval", "0s"));
        let socket = env.socket();
        let before = cp.list_requests();
        let (answer, _) = post_refresh(&socket);
        assert_eq!(answer.status, 404, "{answer:?}");
        let (out, took) = hook(&env.state_dir(), &socket, &user, &unknown_fingerprint());
        assert_eq!(out.status.code(), Some(0));
        assert!(out.stdout.is_empty());
        assert!(
            text(&out.stderr).contains("answered 404"),
            "{}",
            text(&out.stderr)
        );
        assert!(took < HOOK_WAIT, "answered at once, took {took:?}");
        assert_eq!(cp.list_requests(), before, "nothing fetched");
        let counts = refresh_status(&socket);
        assert_eq!(
            (&counts["min_interval_ms"], &counts["off"]),
            (&0.into(), &2.into()),
            "{counts}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// The hook against peers that are not a healthy agent.

/// A cache written by hand (no index: the hook reads it whole).
fn hand_cache(dir: &Path, user: &str, lines: &[&str]) -> PathBuf {
    let users = dir.join("state/users");
    std::fs::create_dir_all(&users).expect("mkdir");
    let path = users.join(format!("{user}.keys"));
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).expect("write cache");
    path
}

/// How a peer answers a connection.
type Answer = Box<dyn FnOnce(UnixStream) + Send>;

/// A peer on `socket` that accepts one connection and hands it to `answer`.
fn peer(
    socket: &Path,
    answer: impl FnOnce(UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            answer(stream);
        }
    })
}

/// Reads the request's head.
fn read_request(stream: &mut UnixStream) -> String {
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Makes the real agent (`run --once`, a file source, write "none") write
/// `user`'s cache of `lines` and its fingerprint index in `dir/state`, as
/// in production.
fn agent_cache(dir: &Path, user: &str, lines: &[&str]) {
    let keys = dir.join("keys.pub");
    let content: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&keys, content).expect("write the key file");
    let config = dir.join("cache.toml");
    let text_of = |p: PathBuf| p.display().to_string();
    let settings = Config::default()
        .top("state_dir", text_of(dir.join("state")))
        .top("health_socket", text_of(dir.join("once.sock")))
        .source("account", "file")
        .set("path", text_of(keys))
        .user(User::new(user, "none"));
    std::fs::write(&config, settings.to_string()).expect("write the config");
    let config = config.to_str().expect("utf-8 path");
    let out = keysync_cmd(&["run", "--once", "--config", config])
        .env("KEYSYNC_LOG", "warn")
        .output()
        .expect("run keysync run --once");
    assert!(out.status.success(), "run --once: {}", text(&out.stderr));
    let index = dir.join(format!("state/users/{user}.fpr"));
    assert!(
        index.exists(),
        "run --once wrote no index at {}",
        index.display()
    );
}

#[test]
fn the_hook_falls_back_to_the_cache_whatever_the_socket_does() {
    // The agent binary, and the front binary, which asks for the refresh
    // itself when the index says the key is not cached.
    the_hook_falls_back_with(&bin());
    the_hook_falls_back_with(Path::new(env!("CARGO_BIN_EXE_keysync-front")));
}

fn the_hook_falls_back_with(binary: &Path) {
    let label = binary.display();
    let env = TestEnv::new();
    let [alice, bob, _] = fixture_keys();
    let user = current_user();
    agent_cache(env.path(), &user, &[alice]);
    let state = env.state_dir();
    let socket = env.path().join("peer.sock");
    let fpr_bob = fingerprint(bob);
    let cases: Vec<(&str, Answer, &str)> = vec![
        (
            "garbage",
            Box::new(|mut s| {
                read_request(&mut s);
                let _ = s.write_all(b"hello there\r\n\r\n");
            }),
            "not HTTP/1.1",
        ),
        (
            "closed",
            Box::new(|mut s| {
                read_request(&mut s);
                drop(s);
            }),
            "closed the connection",
        ),
        (
            "503",
            Box::new(|mut s| {
                read_request(&mut s);
                let _ =
                    s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
            }),
            "answered 503",
        ),
        (
            "silent",
            Box::new(|s| {
                // Holds the connection, never answers.
                std::thread::sleep(HOOK_WAIT + Duration::from_secs(3));
                drop(s);
            }),
            "did not answer within",
        ),
    ];
    for (case, answer, why) in cases {
        let _ = std::fs::remove_file(&socket);
        let peer = peer(&socket, answer);
        let (out, took) = hook_with(binary, &state, &socket, &user, &fpr_bob);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{label}, {case}: {}",
            text(&out.stderr)
        );
        assert!(
            out.stdout.is_empty(),
            "{label}, {case}: {}",
            text(&out.stdout)
        );
        let stderr = text(&out.stderr);
        assert!(stderr.contains(why), "{label}, {case}: {stderr}");
        assert!(
            took < HOOK_WAIT + Duration::from_secs(3),
            "{label}, {case}: the hook took {took:?}"
        );
        if case == "silent" {
            assert!(
                took >= HOOK_WAIT - Duration::from_millis(100),
                "{label}, {case}: {took:?}"
            );
        }
        peer.join().expect("peer");
    }

    // A peer that has the agent write the key into the cache (and its
    // index) before it answers: the hook looks again and prints it.
    let _ = std::fs::remove_file(&socket);
    let peer = {
        let env_path = env.path().to_path_buf();
        let user = user.clone();
        peer(&socket, move |mut s| {
            let request = read_request(&mut s);
            assert!(
                request.starts_with("POST /refresh HTTP/1.1\r\n"),
                "{request}"
            );
            agent_cache(&env_path, &user, &[alice, bob]);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 29\r\n\r\n{\"age_ms\":0,\"refreshed\":true}",
            );
        })
    };
    let (out, _) = hook_with(binary, &state, &socket, &user, &fpr_bob);
    peer.join().expect("peer");
    assert_eq!(
        text(&out.stdout),
        format!("{bob}\n"),
        "{label}: {}",
        text(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "{label}: {}", text(&out.stderr));
}

#[test]
fn a_key_in_the_cache_never_asks_and_neither_does_an_unknown_user() {
    let env = TestEnv::new();
    let [alice, bob, _] = fixture_keys();
    hand_cache(env.path(), "zoe", &[alice, bob]);
    let state = env.state_dir();
    let socket = env.path().join("peer.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let (out, _) = hook(&state, &socket, "zoe", &fingerprint(bob));
    assert_eq!(text(&out.stdout), format!("{bob}\n"));
    // A user without a cache (not managed by the agent), and a fingerprint
    // that is not SHA256 (sshd's FingerprintHash md5): nothing to refresh.
    for (user, fpr) in [
        ("nobody-here", unknown_fingerprint()),
        ("zoe", "MD5:00:11:22:33".to_string()),
    ] {
        let (out, _) = hook(&state, &socket, user, &fpr);
        assert_eq!(out.status.code(), Some(0));
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "{user} {fpr}"
        );
    }
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the hook connected: {other:?}"),
    }
}
