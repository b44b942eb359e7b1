//! keysync as a service (DESIGN.md §3, §8), through the real binary: the
//! health socket's four endpoints (read with an HTTP client on hyper),
//! `keysync status`, the systemd notify protocol against a datagram socket
//! the test binds, the stale-socket takeover, and `--log-format json`. None
//! of these tests sets `NOTIFY_SOCKET` unless it reads it, so they are also
//! the container mode. Drift repair and config reload are in drift.rs and
//! reload.rs.

use std::time::{Duration, Instant};

use crate::support::agent::Agent;
use crate::support::block::block_keys;
use crate::support::env::{TestEnv, keysync, keysync_cmd};
use crate::support::eventually;
use crate::support::fake_cp::{Fault, fixture_keys};
use crate::support::files::mode;
use crate::support::http::{self, healthz};
use crate::support::metrics::FAMILIES;
use crate::support::metrics::{Exposition, Format, parse_exposition};
use crate::support::notify::{NotifyInbox, is_ping};
use crate::support::scenario::{Scenario, with_fixture};

/// An API key nothing else in the test could contain by accident.
fn unique_secret() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("ks-SECRET-{}-{nanos:09}", std::process::id())
}

/// The SHA256 fingerprint of an authorized_keys line, as OpenSSH prints it.
fn fingerprint(line: &str) -> String {
    ssh_key::PublicKey::from_openssh(line)
        .expect("public key")
        .fingerprint(ssh_key::HashAlg::Sha256)
        .to_string()
}

/// A notify message with `line` on a line of its own (`READY=1`, `STOPPING=1`).
fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

/// The first notify message with READY=1.
fn ready_message(inbox: &NotifyInbox) -> String {
    inbox
        .seen()
        .into_iter()
        .find(|m| m.contains("READY=1"))
        .unwrap()
}

/// Binds a notify socket in the env and starts the agent with it in
/// `NOTIFY_SOCKET`, after `adjust` (more env vars).
fn spawn_notified(
    env: &TestEnv,
    adjust: impl FnOnce(&mut std::process::Command),
) -> (NotifyInbox, Agent) {
    let inbox = NotifyInbox::bind(&env.path().join("notify.sock"));
    let agent = env.spawn_with(|cmd| {
        cmd.env("NOTIFY_SOCKET", inbox.path());
        adjust(cmd);
    });
    (inbox, agent)
}

/// Before the first good answer: alive, not ready, and the reason (in
/// /readyz and `status --check`) names the source; READY=1 came after the
/// first attempt, although it failed, and not from the 10 s fallback.
fn alive_not_ready(env: &TestEnv, agent: &Agent, inbox: &NotifyInbox) {
    let socket = env.socket();
    assert_eq!(http::get(&socket, "/healthz").status, 200);
    assert!(
        eventually(Duration::from_secs(10), || {
            env.status_json()["sources"]["account"]["last_error"].is_string()
        }),
        "no failed attempt recorded"
    );
    let readyz = http::get(&socket, "/readyz");
    assert_eq!(readyz.status, 503, "{}", readyz.body);
    assert!(
        readyz.body.contains("account"),
        "reason must name the source: {}",
        readyz.body
    );
    let check = env.status(&["--check"]);
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("account"),
        "{check:?}"
    );
    assert!(
        inbox.wait_for(Duration::from_secs(10), |m| has_line(m, "READY=1")),
        "no READY=1 after a failed first attempt: {:?}",
        inbox.seen()
    );
    assert!(
        !agent.log_text().contains("first sync not done"),
        "{}",
        agent.log_text()
    );
}

/// After the control plane recovered: ready, and STATUS= followed: first
/// "not ready: …" (with READY=1), then in sync.
fn ready_after_recovery(env: &TestEnv, agent: &Agent, inbox: &NotifyInbox) {
    let socket = env.socket();
    assert!(
        eventually(Duration::from_secs(15), || http::get(&socket, "/readyz")
            .status
            == 200),
        "never ready; log:\n{}",
        agent.log_text()
    );
    let check = env.status(&["--check"]);
    assert_eq!(check.status.code(), Some(0), "{check:?}");
    let ready_msg = ready_message(inbox);
    assert!(
        ready_msg.contains("STATUS=not ready: no good answer yet from source(s): account"),
        "{ready_msg:?}"
    );
    assert!(
        inbox.wait_for(Duration::from_secs(10), |m| m
            .starts_with("STATUS=in sync: 2 key(s)")),
        "STATUS= not kept current: {:?}",
        inbox.seen()
    );
}

/// /status, fetched both raw and through `keysync status --json`, and the
/// operator's view, `keysync status`.
fn status_tells_everything(s: &Scenario) {
    let env = &s.env;
    let [alice, bob, _] = fixture_keys();
    let raw = http::get(&env.socket(), "/status");
    assert_eq!(raw.status, 200);
    assert!(
        raw.header("content-type")
            .is_some_and(|t| t.starts_with("application/json"))
    );
    let raw: serde_json::Value = serde_json::from_str(&raw.body).expect("status JSON");
    let status = env.status_json();
    assert_eq!(raw["version"], status["version"]);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        status["uptime_seconds"].as_f64().is_some_and(|u| u >= 0.0),
        "{status}"
    );
    let config = &status["config"];
    assert_eq!(config["path"], env.config_path().to_str().unwrap());
    assert!(
        config["loaded_at"].as_f64().is_some_and(|t| t > 1.0e9),
        "{config}"
    );
    assert!(config["last_reload_error"].is_null(), "{config}");
    let source = &status["sources"]["account"];
    assert_eq!(source["kind"], "vast");
    assert_eq!(source["mode"], "poll");
    assert!(
        source["last_attempt"].as_f64().is_some_and(|t| t > 1.0e9),
        "{source}"
    );
    assert!(
        source["last_success"].as_f64().is_some_and(|t| t > 1.0e9),
        "{source}"
    );
    assert!(source["last_error"].is_null(), "{source}");
    assert_eq!(source["etag"], s.cp.etag().as_str());
    assert_eq!(source["key_count"], 2);
    let user = &status["users"]["root"];
    assert_eq!(user["path"], env.target().to_str().unwrap());
    assert_eq!(user["write_mode"], "block");
    let fingerprints: Vec<&str> = user["fingerprints"]
        .as_array()
        .expect("fingerprints")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    let mut want = vec![fingerprint(alice), fingerprint(bob)];
    let mut got: Vec<String> = fingerprints.iter().map(|s| s.to_string()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(
        user["last_write"].as_f64().is_some_and(|t| t > 1.0e9),
        "{user}"
    );
    assert_eq!(user["drift_repairs"], 0);
    assert!(user["last_error"].is_null(), "{user}");

    // The operator's view.
    let human = env.status(&[]);
    assert!(human.status.success(), "{human:?}");
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    for needle in [
        "in sync: 2 key(s) for 1 user(s)",
        "account (vast, poll): 2 keys",
        &format!("root (block {}): 2 keys", env.target().display()),
        "drift repairs 0",
    ] {
        assert!(
            human.contains(needle),
            "`keysync status` lacks {needle:?}:\n{human}"
        );
    }
}

/// /metrics in both formats, parsed strictly, with the families and values
/// of one failed and then good fetch history.
fn metrics_in_both_formats(env: &TestEnv) {
    let socket = env.socket();
    let prom = http::get(&socket, "/metrics");
    assert_eq!(prom.status, 200);
    assert_eq!(
        prom.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let prom = parse_exposition(&prom.body, Format::Prometheus).expect("Prometheus text");
    let om = http::get_accepting(
        &socket,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert_eq!(om.status, 200);
    assert!(
        om.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        om.headers
    );
    let om = parse_exposition(&om.body, Format::OpenMetrics).expect("OpenMetrics text");
    // A counter family is named after its samples in Prometheus text,
    // without the _total in OpenMetrics.
    assert_eq!(prom.family_type("keysync_fetch_total"), Some("counter"));
    assert_eq!(om.family_type("keysync_fetch"), Some("counter"));
    for m in [&prom, &om] {
        fetch_history_in(m);
    }
    // The exact family names a Prometheus user writes queries against.
    for name in FAMILIES {
        assert!(
            prom.family_type(name).is_some(),
            "no family {name} in Prometheus text"
        );
    }
}

/// The samples after failed fetches, then good ones: in either format.
fn fetch_history_in(m: &Exposition) {
    assert!(
        m.value(
            "keysync_fetch_total",
            &[("source", "account"), ("result", "ok")]
        ) >= Some(1.0)
    );
    assert!(
        m.value(
            "keysync_fetch_total",
            &[("source", "account"), ("result", "error")]
        ) >= Some(1.0)
    );
    let last = m.value(
        "keysync_last_success_timestamp_seconds",
        &[("source", "account")],
    );
    assert!(last.is_some_and(|t| t > 1.0e9), "{last:?}");
    assert_eq!(m.value("keysync_keys", &[("user", "root")]), Some(2.0));
    assert!(m.value("keysync_writes_total", &[("user", "root")]) >= Some(1.0));
    assert_eq!(
        m.value("keysync_drift_repairs_total", &[("user", "root")]),
        Some(0.0)
    );
    assert_eq!(
        m.family_type("keysync_fetch_duration_seconds"),
        Some("histogram")
    );
    let count = m.value(
        "keysync_fetch_duration_seconds_count",
        &[("source", "account")],
    );
    assert!(count >= Some(2.0), "{count:?}");
    assert_eq!(
        m.value(
            "keysync_fetch_duration_seconds_bucket",
            &[("source", "account"), ("le", "+Inf")]
        ),
        count
    );
}

/// The API key is in no output: status, metrics, logs (debug), check-config.
fn no_output_shows_the_secret(s: &Scenario, agent: &Agent, inbox: &NotifyInbox, secret: &str) {
    let env = &s.env;
    let socket = env.socket();
    s.cp.set_fault(Fault::unauthorized(), Some(2));
    assert!(eventually(Duration::from_secs(10), || {
        env.status_json()["sources"]["account"]["last_error"].is_string()
    }));
    let check_config = env
        .command(&[
            "check-config",
            "--config",
            env.config_path().to_str().unwrap(),
        ])
        .env("KEYSYNC_TEST_API_KEY", secret)
        .env_remove("KEYSYNC_LOG")
        .output()
        .expect("check-config");
    assert!(check_config.status.success(), "{check_config:?}");
    let outputs = [
        ("/status", http::get(&socket, "/status").body),
        ("/metrics", http::get(&socket, "/metrics").body),
        ("/readyz", http::get(&socket, "/readyz").body),
        (
            "keysync status",
            String::from_utf8_lossy(&env.status(&[]).stdout).into_owned(),
        ),
        ("agent log", agent.log_text()),
        (
            "check-config stdout",
            String::from_utf8_lossy(&check_config.stdout).into_owned(),
        ),
        (
            "check-config stderr",
            String::from_utf8_lossy(&check_config.stderr).into_owned(),
        ),
        ("notify messages", inbox.seen().join("")),
    ];
    for (what, text) in outputs {
        assert!(
            !text.is_empty() || what.ends_with("stderr"),
            "{what} is empty"
        );
        assert!(
            !text.contains(secret),
            "the API key leaks into {what}:\n{text}"
        );
    }
    // The key did reach the control plane: the check above is not vacuous.
    assert!(
        s.cp.requests()
            .iter()
            .any(|r| r.authorization.as_deref() == Some(&format!("Bearer {secret}")))
    );
}

/// Everything on the socket, before and after the first good answer; and
/// nothing anywhere shows the API key.
#[tokio::test(flavor = "multi_thread")]
async fn health_socket_endpoints_and_status_command() {
    let s = Scenario::with_fixture().await;
    let secret = unique_secret();
    s.cp.set_token(Some(&secret));
    // Until the fault is cleared the control plane answers 503: no good answer yet.
    s.cp.set_fault(Fault::server_error(503), None);
    s.run(move |s| {
        let env = &s.env;
        env.write_config(s.config());
        let (inbox, agent) = spawn_notified(env, |cmd| {
            cmd.env("KEYSYNC_TEST_API_KEY", &secret);
        });
        let socket = env.socket();
        assert!(
            eventually(Duration::from_secs(10), || socket.exists()),
            "no health socket; log:\n{}",
            agent.log_text()
        );
        let socket_mode = mode(&socket);
        assert_eq!(socket_mode, 0o660, "health socket mode {socket_mode:o}");

        alive_not_ready(env, &agent, &inbox);
        // The control plane recovers: ready.
        s.cp.clear_fault();
        ready_after_recovery(env, &agent, &inbox);
        status_tells_everything(&s);
        metrics_in_both_formats(env);
        no_output_shows_the_secret(&s, &agent, &inbox, &secret);

        let (status, _) = agent.stop(Duration::from_secs(10));
        assert!(status.success(), "{status:?}");
        assert!(!socket.exists(), "the socket is removed at a clean stop");
    })
    .await;
}

/// The health socket only reads: a POST to any endpoint is refused with
/// 405 and `Allow: GET,HEAD`, and the agent goes on as before.
#[tokio::test(flavor = "multi_thread")]
async fn health_socket_refuses_writes() {
    with_fixture(|s| {
        s.env.write_config(s.config().set("interval", "60s"));
        let mut agent = s.env.spawn();
        let socket = s.env.socket();
        assert!(eventually(Duration::from_secs(10), || healthz(&socket) == Some(200)));
        for path in ["/healthz", "/readyz", "/status", "/metrics"] {
            let answer = http::post(&socket, path, "ready=1\n");
            assert_eq!(answer.status, 405, "POST {path}: {answer:?}");
            assert_eq!(answer.header("allow"), Some("GET,HEAD"), "POST {path}");
        }
        assert!(agent.alive());
        assert_eq!(healthz(&socket), Some(200));
    })
    .await;
}

/// A socket left by a SIGKILLed agent is taken over at the next start; a
/// live agent's socket is not.
#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_is_replaced_and_a_live_one_is_not() {
    with_fixture(|s| {
        let env = &s.env;
        env.write_config(s.config().set("interval", "60s"));
        let socket = env.socket();
        let first = env.spawn();
        assert!(eventually(Duration::from_secs(10), || healthz(&socket) == Some(200)));
        first.kill();
        assert!(
            std::fs::symlink_metadata(&socket).is_ok(),
            "SIGKILL leaves the socket behind (the premise of this test)"
        );
        assert_eq!(healthz(&socket), None, "nobody listens on the stale socket");

        let mut second = env.spawn();
        assert!(
            eventually(Duration::from_secs(10), || healthz(&socket) == Some(200)),
            "the second agent did not take over the stale socket; log:\n{}",
            second.log_text()
        );
        assert_eq!(mode(&socket), 0o660);

        // A third agent must not steal the socket of the live second one:
        // on the same state dir it stops at the lock (DESIGN.md §4: exit 2,
        // naming the running agent).
        let third = env
            .command(&["run", "--config", env.config_path().to_str().unwrap()])
            .output()
            .expect("third agent");
        assert_eq!(third.status.code(), Some(2), "{third:?}");
        assert!(
            String::from_utf8_lossy(&third.stderr)
                .contains(&format!("another keysync agent (pid {})", second.pid())),
            "{third:?}"
        );
        assert!(second.alive());
        assert_eq!(healthz(&socket), Some(200));
    })
    .await;
}

/// The systemd protocol: READY=1 once the first sync attempt is done (the
/// keys are already on disk), STATUS=, WATCHDOG=1 at half of WATCHDOG_USEC,
/// STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn notify_ready_status_watchdog_stopping() {
    with_fixture(|s| {
        let env = &s.env;
        env.write_config(s.config().set("interval", "60s"));
        let (inbox, agent) = spawn_notified(env, |cmd| {
            // 400 ms: a ping about every 200 ms.
            cmd.env("WATCHDOG_USEC", "400000");
        });
        assert!(
            inbox.wait_for(Duration::from_secs(10), |m| has_line(m, "READY=1")),
            "no READY=1: {:?}; log:\n{}",
            inbox.seen(),
            agent.log_text()
        );
        // READY=1 follows the first sync: the keys are already written.
        let [alice, bob, _] = fixture_keys();
        assert_eq!(env.block_keys(), [alice, bob]);
        let ready = ready_message(&inbox);
        assert!(
            ready
                .lines()
                .any(|l| l.starts_with("STATUS=in sync: 2 key(s)")),
            "READY=1 carries the status line: {ready:?}"
        );

        // At least 10 pings; the rate is reported, not asserted.
        let start = Instant::now();
        let before = inbox.count(is_ping);
        assert!(
            inbox.wait_for_count(before + 10, Duration::from_secs(20), is_ping),
            "fewer than 10 WATCHDOG=1 pings: {:?}",
            inbox.seen()
        );
        let rate = 10.0 / start.elapsed().as_secs_f64();
        println!(
            "measured: WATCHDOG=1 pings at {rate:.2}/s with WATCHDOG_USEC=400000 (expected 5/s)"
        );

        let (status, _) = agent.stop(Duration::from_secs(10));
        assert!(status.success(), "{status:?}");
        assert!(
            inbox.wait_for(Duration::from_secs(5), |m| has_line(m, "STOPPING=1")),
            "no STOPPING=1 on SIGTERM: {:?}",
            inbox.seen()
        );
        for msg in inbox.seen() {
            for line in msg.lines() {
                assert!(
                    ["READY=1", "WATCHDOG=1", "STOPPING=1"].contains(&line)
                        || line.starts_with("STATUS="),
                    "unexpected notify line {line:?}"
                );
            }
        }
    })
    .await;
}

/// A control plane that never answers does not hold boot: READY=1 comes
/// from the 10 s fallback, while /readyz (the real readiness) stays 503.
#[tokio::test(flavor = "multi_thread")]
async fn ready_even_when_the_control_plane_never_answers() {
    let s = Scenario::with_fixture().await;
    s.cp.set_fault(Fault::Slow(Duration::from_secs(120)), None);
    s.run(|s| {
        let env = &s.env;
        // A timeout longer than the READY fallback: the first attempt is
        // still hanging when READY=1 is due.
        env.write_config(s.config().set("interval", "60s").set("timeout", "60s"));
        let started = Instant::now();
        let (inbox, agent) = spawn_notified(env, |_| {});
        assert!(
            inbox.wait_for(Duration::from_secs(30), |m| has_line(m, "READY=1")),
            "no READY=1 while the control plane hangs: {:?}; log:\n{}",
            inbox.seen(),
            agent.log_text()
        );
        println!(
            "measured: READY=1 {:.1}s after start with a hanging control plane",
            started.elapsed().as_secs_f64()
        );
        assert!(
            agent.log_text().contains("first sync not done"),
            "{}",
            agent.log_text()
        );
        let readyz = http::get(&env.socket(), "/readyz");
        assert_eq!(readyz.status, 503);
        assert!(readyz.body.contains("account"), "{}", readyz.body);
        assert!(
            s.cp.request_count() >= 1,
            "the first fetch is hanging, not missing"
        );
        let (status, _) = agent.stop(Duration::from_secs(10));
        assert!(
            status.success(),
            "a hanging fetch must not block the stop: {status:?}"
        );
    })
    .await;
}

/// `run --once --log-format <format>` with a fresh state dir and target, so
/// that every run adds the keys; its stderr. `adjust` sets the environment.
fn run_once_logging(
    env: &TestEnv,
    format: &str,
    adjust: impl FnOnce(&mut std::process::Command),
) -> String {
    let _ = std::fs::remove_dir_all(env.state_dir());
    let _ = std::fs::remove_file(env.target());
    let config = env.config_path();
    let mut cmd = env.command(&[
        "run",
        "--once",
        "--config",
        config.to_str().unwrap(),
        "--log-format",
        format,
    ]);
    adjust(&mut cmd);
    let out = cmd.output().expect("run --once");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `--log-format json`: every stderr line is a JSON object, and the "key
/// added" events carry user, source and the SHA256 fingerprint as fields.
/// The default human format is not JSON but carries the same facts.
#[tokio::test(flavor = "multi_thread")]
async fn log_formats_json_and_human() {
    with_fixture(|s| {
        let [alice, bob, _] = fixture_keys();
        let env = &s.env;
        env.write_config(s.config().set("interval", "60s"));
        let info = |cmd: &mut std::process::Command| {
            cmd.env("KEYSYNC_LOG", "info");
        };

        let json = run_once_logging(env, "json", info);
        let mut added = Vec::new();
        for line in json.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            assert!(
                v["level"].is_string() && v["timestamp"].is_string(),
                "{line}"
            );
            if v["fields"]["event"] == "key_added" {
                let message = v["fields"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("added for user root")
                        && message.contains(v["fields"]["fingerprint"].as_str().unwrap_or("?")),
                    "the text says what happened: {line}"
                );
                assert_eq!(v["fields"]["user"], "root", "{line}");
                assert_eq!(v["fields"]["source"], "account", "{line}");
                added.push(
                    v["fields"]["fingerprint"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
        added.sort();
        let mut want = vec![fingerprint(alice), fingerprint(bob)];
        want.sort();
        assert_eq!(added, want, "key added events in:\n{json}");

        // An inherited JOURNAL_STREAM that is not this stderr (say,
        // `keysync run 2>file` typed in a shell of some unit) must not send
        // the logs away from stderr.
        let inherited = run_once_logging(env, "json", |cmd| {
            cmd.env("JOURNAL_STREAM", "1:1").env_remove("KEYSYNC_LOG");
        });
        assert!(inherited.contains("\"key_added\""), "{inherited}");

        let human = run_once_logging(env, "human", info);
        let line = human
            .lines()
            .find(|l| l.contains("added for user root") && l.contains(&fingerprint(alice)))
            .unwrap_or_else(|| panic!("no key added line for alice:\n{human}"));
        assert!(serde_json::from_str::<serde_json::Value>(line).is_err());
        assert!(
            line.contains("user=\"root\"") || line.contains("user=root"),
            "{line}"
        );
        assert!(
            line.contains("source=\"account\"") || line.contains("source=account"),
            "{line}"
        );
    })
    .await;
}

#[test]
fn status_check_without_an_agent_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = keysync(&[
        "status",
        "--check",
        "--socket",
        dir.path().join("none.sock").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );
}

/// The strict parser used above catches what it claims to.
#[test]
fn the_exposition_parser_rejects_what_it_must() {
    let good_prom = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2\n";
    assert!(parse_exposition(good_prom, Format::Prometheus).is_ok());
    assert!(parse_exposition(good_prom, Format::OpenMetrics).is_err());
    let good_om = "# HELP a A.\n# TYPE a counter\na_total{x=\"1\"} 2\n# EOF\n";
    assert!(parse_exposition(good_om, Format::OpenMetrics).is_ok());
    // Counter family named like the sample in OpenMetrics: a_total_total expected.
    assert!(
        parse_exposition(
            "# TYPE a_total counter\na_total 1\n# EOF\n",
            Format::OpenMetrics
        )
        .is_err()
    );
    // Undeclared, malformed, duplicated, interleaved.
    assert!(parse_exposition("b 1\n", Format::Prometheus).is_err());
    assert!(parse_exposition("# TYPE g gauge\ng{x=1} 1\n", Format::Prometheus).is_err());
    assert!(parse_exposition("# TYPE g gauge\ng 1\ng 2\n", Format::Prometheus).is_err());
    assert!(parse_exposition("# TYPE g gauge\ng one\n", Format::Prometheus).is_err());
    assert!(
        parse_exposition(
            "# TYPE g gauge\n# TYPE h gauge\ng 1\nh 1\ng{a=\"b\"} 1\n",
            Format::Prometheus
        )
        .is_err()
    );
    // Histograms must be cumulative and end at +Inf == _count.
    let hist = |buckets: &str, count: u32| {
        format!("# TYPE h histogram\n{buckets}h_sum 1\nh_count {count}\n")
    };
    assert!(
        parse_exposition(
            &hist("h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n", 2),
            Format::Prometheus
        )
        .is_ok()
    );
    assert!(
        parse_exposition(
            &hist("h_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\n", 2),
            Format::Prometheus
        )
        .is_err()
    );
    assert!(parse_exposition(&hist("h_bucket{le=\"1\"} 1\n", 1), Format::Prometheus).is_err());
    assert!(
        parse_exposition(
            &hist("h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n", 3),
            Format::Prometheus
        )
        .is_err()
    );
}

/// The unit's `LoadCredential=api-key:…` path: with no `api_key_file` and
/// the `api_key_env` variable unset, the key comes from
/// `$CREDENTIALS_DIRECTORY/api-key`.
#[tokio::test(flavor = "multi_thread")]
async fn api_key_from_a_systemd_credential() {
    let s = Scenario::with_fixture().await;
    let secret = unique_secret();
    s.cp.set_token(Some(&secret));
    s.run(move |s| {
        let env = &s.env;
        env.write_config(
            s.config()
                .set("interval", "60s")
                .set("api_key_env", "KEYSYNC_TEST_UNSET_API_KEY"),
        );
        let creds = env.path().join("credentials");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join("api-key"), format!("{secret}\n")).unwrap();
        let out = keysync_cmd(&[
            "run",
            "--once",
            "--config",
            env.config_path().to_str().unwrap(),
        ])
        .env_remove("KEYSYNC_TEST_UNSET_API_KEY")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .expect("run --once");
        assert!(out.status.success(), "{out:?}");
        let [alice, bob, _] = fixture_keys();
        assert_eq!(block_keys(&env.read_target().unwrap()), [alice, bob]);
        assert!(
            s.cp.requests()
                .iter()
                .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {secret}")))
        );
        assert!(!String::from_utf8_lossy(&out.stderr).contains(&secret));
    })
    .await;
}
