//! The `http` and `file` source kinds (DESIGN.md §2, §5) end to end, through
//! the real `keysync run`.
//!
//! - `http`: a tiny HTTP/1.1 server (support/raw_http.rs) serves a body in
//!   authorized_keys format at a GitHub-style `/<user>.keys` path, with a
//!   weak ETag as GitHub sends; the agent must send `If-None-Match`, take
//!   304 as "unchanged", and treat 404 as an error that keeps the keys.
//! - `file`: the authorized_keys format and the JSON forms, picked up by the
//!   directory watch (the poll interval is 60 s, so only the watch can
//!   explain a sync), also when the file is replaced by a rename; a missing
//!   file keeps the last good keys.
//!
//! Latencies are printed (`cargo test --test it sources:: -- --nocapture`), never
//! asserted beyond generous "eventually" deadlines.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::config::{Config, User};
use crate::support::env::TestEnv;
use crate::support::fake_cp::{fixture_keys, gen_ed25519_keys};
use crate::support::raw_http::{RawRequest, RawServer, respond};
use crate::support::{blocking, current_user, eventually};

const WAIT: Duration = Duration::from_secs(15);

/// A config with one source `team` of this kind (its fields set by the
/// caller) and the current user writing a managed block in the env's target.
fn config(env: &TestEnv, kind: &str) -> Config {
    Config::new(env)
        .source("team", kind)
        .user(User::block(&current_user(), env.target()).set("sources", vec!["team"]))
        .policy("confirm_delay", "300ms")
}

// ---------------------------------------------------------------------------
// A tiny HTTP server for the `http` kind.

/// One request as the server saw it, with the status it got.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    if_none_match: Option<String>,
    status: u16,
}

#[derive(Debug)]
struct Served {
    path: String,
    body: String,
    etag: String,
    /// Answer every request with this status and no body instead.
    status_override: Option<u16>,
    log: Vec<Seen>,
}

/// Serves one path like `https://github.com/<user>.keys`: `text/plain`, a
/// weak ETag, 304 when `If-None-Match` matches, 404 for any other path.
struct KeysServer {
    server: RawServer,
    state: Arc<Mutex<Served>>,
}

impl KeysServer {
    fn start(path: &str, body: &str, etag: &str) -> Self {
        let state = Arc::new(Mutex::new(Served {
            path: path.to_string(),
            body: body.to_string(),
            etag: etag.to_string(),
            status_override: None,
            log: Vec::new(),
        }));
        let shared = state.clone();
        let server = RawServer::start(Arc::new(move |req: &RawRequest, stream: &mut TcpStream| {
            answer(req, stream, &shared)
        }));
        KeysServer { server, state }
    }

    fn url(&self) -> String {
        self.server.url(&self.state.lock().expect("lock").path)
    }

    fn set(&self, body: &str, etag: &str) {
        let mut s = self.state.lock().expect("lock");
        s.body = body.to_string();
        s.etag = etag.to_string();
    }

    fn set_status(&self, status: Option<u16>) {
        self.state.lock().expect("lock").status_override = status;
    }

    fn log(&self) -> Vec<Seen> {
        self.state.lock().expect("lock").log.clone()
    }
}

fn answer(req: &RawRequest, stream: &mut TcpStream, state: &Mutex<Served>) {
    let if_none_match = req.header("if-none-match").map(str::to_string);
    let (status, etag, body) = {
        let mut s = state.lock().expect("lock");
        let (status, body) = if let Some(code) = s.status_override {
            (format!("{code} Override"), String::new())
        } else if req.path != s.path {
            ("404 Not Found".to_string(), "Not Found".to_string())
        } else if if_none_match.as_deref() == Some(s.etag.as_str()) {
            ("304 Not Modified".to_string(), String::new())
        } else {
            ("200 OK".to_string(), s.body.clone())
        };
        let code = status[..3].parse().expect("status code");
        s.log.push(Seen {
            path: req.path.clone(),
            if_none_match,
            status: code,
        });
        let etag = (code == 200 || code == 304).then(|| s.etag.clone());
        (status, etag, body)
    };
    let mut headers = vec![("Content-Type", "text/plain; charset=utf-8".to_string())];
    headers.extend(etag.map(|e| ("ETag", e)));
    respond(stream, &status, &headers, body.as_bytes());
}

/// GitHub's `.keys` answer: one key per line, no comments, final newline.
fn github_body(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| {
            let mut fields = k.split_whitespace();
            format!(
                "{} {}\n",
                fields.next().unwrap_or(""),
                fields.next().unwrap_or("")
            )
        })
        .collect()
}

/// Key text without the comment (GitHub drops comments).
fn bare(key: &str) -> String {
    key.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// An `http` source at a GitHub-style `/alice.keys` URL: the keys land, later
/// polls are conditional and answered 304 (the file is not rewritten), a
/// new body with a new ETag lands, and a 404 is an error that keeps the keys.
#[tokio::test(flavor = "multi_thread")]
async fn http_source_follows_a_github_style_keys_url() {
    blocking(|| {
        let [alice, bob, _] = fixture_keys();
        let server = KeysServer::start("/alice.keys", &github_body(&[alice, bob]), "W/\"gh-1\"");
        let env = TestEnv::new();
        env.write_config(
            config(&env, "http")
                .set("url", server.url())
                .set("interval", "300ms")
                .set("jitter", "0s")
                .set("max_backoff", "1s"),
        );
        let agent = env.spawn();
        assert!(
            eventually(WAIT, || env.block_keys() == [bare(alice), bare(bob)]),
            "no first sync; log:\n{}",
            agent.log_text()
        );
        // Conditional polls: If-None-Match with the weak ETag, answered 304.
        assert!(
            eventually(WAIT, || server
                .log()
                .iter()
                .filter(|s| s.status == 304)
                .count()
                >= 3),
            "{:?}",
            server.log()
        );
        let log = server.log();
        assert_eq!(log[0].path, "/alice.keys");
        assert_eq!(log[0].if_none_match, None);
        assert!(
            log[1..]
                .iter()
                .all(|s| s.if_none_match.as_deref() == Some("W/\"gh-1\"")),
            "{log:?}"
        );
        let source = env.try_status_json()["sources"]["team"].clone();
        assert_eq!(source["kind"], "http", "{source}");
        assert_eq!(source["mode"], "poll", "{source}");
        assert_eq!(source["etag"], "W/\"gh-1\"", "{source}");
        assert_eq!(source["key_count"], 2, "{source}");
        assert!(source["last_error"].is_null(), "{source}");

        // A new key on the account: a new body and ETag.
        let carol = gen_ed25519_keys(1).pop().expect("a key");
        server.set(&github_body(&[alice, bob, &carol]), "W/\"gh-2\"");
        assert!(
            eventually(WAIT, || env.block_keys()
                == [bare(alice), bare(bob), bare(&carol)]),
            "new body not synced; log:\n{}",
            agent.log_text()
        );

        // The user is gone (404): an error, the keys stay.
        server.set_status(Some(404));
        let before = server.log().len();
        assert!(
            eventually(WAIT, || {
                env.try_status_json()["sources"]["team"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("404"))
            }),
            "404 not reported: {}",
            env.try_status_json()
        );
        assert!(eventually(WAIT, || server.log().len() >= before + 3));
        assert_eq!(
            env.block_keys(),
            [bare(alice), bare(bob), bare(&carol)],
            "keys kept through the 404"
        );
        assert_eq!(env.try_status_json()["sources"]["team"]["key_count"], 3);

        // Back: the ETag still matches, a 304 clears the error.
        server.set_status(None);
        assert!(
            eventually(WAIT, || {
                env.try_status_json()["sources"]["team"]["last_error"].is_null()
            }),
            "error not cleared: {}",
            env.try_status_json()
        );
        assert_eq!(server.log().last().map(|s| s.status), Some(304));
    })
    .await;
}

/// The body is authorized_keys format: comments, blank lines, CRLF and
/// surrounding whitespace are fine; a bad line or a key with options is
/// dropped on its own and the rest of the list is kept.
#[tokio::test(flavor = "multi_thread")]
async fn http_source_reads_authorized_keys_format() {
    blocking(|| {
        let [alice, bob, _] = fixture_keys();
        let body = format!(
            "# team keys\r\n\r\n{alice}\r\n   \nnot a key at all\ncommand=\"/bin/true\" {bob}\n\t{bob}\n"
        );
        let server = KeysServer::start("/team/authorized_keys", &body, "\"t1\"");
        let env = TestEnv::new();
        env.write_config(
            config(&env, "http")
                .set("url", server.url())
                .set("interval", "60s"),
        );
        let agent = env.spawn();
        assert!(
            eventually(WAIT, || env.block_keys() == [alice, bob]),
            "keys not synced: {:?}; log:\n{}",
            env.block_keys(),
            agent.log_text()
        );
        let log = agent.log_text();
        assert!(log.contains("dropping key"), "{log}");
    })
    .await;
}

// ---------------------------------------------------------------------------
// The `file` kind.

/// Polls every 2 ms until the block holds `want`; returns how long that took.
fn synced_within(env: &TestEnv, want: &[String], timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if env.block_keys() == want {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Writes `content` to a temporary file beside `path` and renames it over.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, content).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

fn file_env(interval: &str) -> (TestEnv, PathBuf) {
    let env = TestEnv::new();
    let keys_dir = env.path().join("keys.d");
    std::fs::create_dir_all(&keys_dir).expect("mkdir");
    let path = keys_dir.join("team.keys");
    env.write_config(
        config(&env, "file")
            .set("path", path.display().to_string())
            .set("interval", interval)
            .set("jitter", "0s"),
    );
    (env, path)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// A key file in authorized_keys format and in each JSON form, edited in
/// place and replaced by a rename, is synced within a second of the edit.
/// The interval is 60 s: only the directory watch can explain each sync.
#[tokio::test(flavor = "multi_thread")]
async fn file_source_follows_edits_in_every_format() {
    blocking(|| {
        let [alice, bob, retired] = fixture_keys();
        let more = gen_ed25519_keys(6);
        let (env, path) = file_env("60s");
        std::fs::write(&path, format!("# team\n\n{alice}\n")).expect("write");
        let agent = env.spawn();
        assert!(
            eventually(WAIT, || env.block_keys() == [alice]),
            "no first sync; log:\n{}",
            agent.log_text()
        );
        // Let the agent settle on its first read before editing.
        std::thread::sleep(Duration::from_millis(300));

        // Each step removes at most one key of three or more, so no step
        // waits for the confirmation of a mass removal (DESIGN.md §6).
        let m = |i: usize| more[i].clone();
        let array_key = format!(
            r#"[{{"id": 1, "key": "{alice}", "deleted_at": null}},
               {{"id": 2, "key": "{retired}", "deleted_at": "2026-01-01T00:00:00Z"}},
               {{"id": 3, "key": "{bob}", "deleted_at": null}},
               {{"id": 4, "key": "{}", "deleted_at": null}}]"#,
            more[0]
        );
        let array_public_key = format!(
            r#"[{{"id": 1, "public_key": "{alice}"}}, {{"id": 3, "public_key": "{bob}"}},
               {{"id": 4, "public_key": "{}"}}, {{"id": 5, "public_key": "{}"}}]"#,
            more[0], more[1]
        );
        let object = format!(
            r#"{{"ssh_keys": [{{"id": 1, "ssh_key": "{alice}"}}, {{"id": 3, "ssh_key": "{bob}"}},
                              {{"id": 5, "ssh_key": "{}"}}, {{"id": 6, "ssh_key": "{}"}}]}}"#,
            more[1], more[2]
        );
        let lines = format!("{alice}\n# comment\n\n{bob}\n{}\n{}\n", more[2], more[3]);
        let (a, b) = (alice.to_string(), bob.to_string());
        let steps: Vec<(&str, bool, String, Vec<String>)> = vec![
            (
                "authorized_keys, in place",
                false,
                format!("{alice}\n{bob}\n"),
                vec![a.clone(), b.clone()],
            ),
            (
                "JSON array `key` + deleted_at, in place",
                false,
                array_key,
                vec![a.clone(), b.clone(), m(0)],
            ),
            (
                "JSON array `public_key`, renamed over",
                true,
                array_public_key,
                vec![a.clone(), b.clone(), m(0), m(1)],
            ),
            (
                "JSON object `ssh_keys`, in place",
                false,
                object,
                vec![a.clone(), b.clone(), m(1), m(2)],
            ),
            (
                "authorized_keys, renamed over",
                true,
                lines,
                vec![a.clone(), b.clone(), m(2), m(3)],
            ),
        ];
        let mut latencies = Vec::new();
        for (what, rename, content, want) in steps {
            if rename {
                replace(&path, &content);
            } else {
                std::fs::write(&path, &content).expect("write");
            }
            let took = synced_within(&env, &want, Duration::from_secs(10)).unwrap_or_else(|| {
                panic!(
                    "{what}: not synced, have {:?}; log:\n{}",
                    env.block_keys(),
                    agent.log_text()
                )
            });
            println!(
                "measured: file source, {what}: synced {} after the edit",
                ms(took)
            );
            latencies.push(took);
            std::thread::sleep(Duration::from_millis(200));
        }
        latencies.sort();
        println!(
            "measured: file edit to written block: min {}, median {}, max {} (interval 60 s)",
            ms(latencies[0]),
            ms(latencies[latencies.len() / 2]),
            ms(latencies[latencies.len() - 1])
        );
        let source = env.try_status_json()["sources"]["team"].clone();
        assert_eq!(source["kind"], "file", "{source}");
        assert_eq!(source["key_count"], 4, "{source}");
    })
    .await;
}

/// A missing file is an error, not an empty list: the last good keys stay
/// (also across a restart, from the state dir), and the file coming back
/// is picked up by the watch.
#[tokio::test(flavor = "multi_thread")]
async fn file_source_missing_file_keeps_last_good_keys() {
    blocking(|| {
        let [alice, bob, _] = fixture_keys();
        let (env, path) = file_env("60s");
        std::fs::write(&path, format!("{alice}\n{bob}\n")).expect("write");
        let agent = env.spawn();
        assert!(
            eventually(WAIT, || env.block_keys() == [alice, bob]),
            "log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));

        std::fs::remove_file(&path).expect("remove");
        assert!(
            eventually(WAIT, || {
                env.try_status_json()["sources"]["team"]["last_error"].is_string()
            }),
            "a missing file is not reported: {}",
            env.try_status_json()
        );
        assert_eq!(
            env.block_keys(),
            [alice, bob],
            "keys kept while the file is missing"
        );
        assert_eq!(
            env.cache(&current_user()).unwrap_or_default(),
            format!("{alice}\n{bob}\n")
        );

        // Restarted while the file is still missing: the persisted keys stay.
        drop(agent);
        let agent = env.spawn();
        assert!(eventually(WAIT, || {
            env.try_status_json()["sources"]["team"]["last_error"].is_string()
        }));
        assert_eq!(
            env.block_keys(),
            [alice, bob],
            "keys kept across the restart"
        );
        assert_eq!(env.try_status_json()["sources"]["team"]["key_count"], 2);

        // It comes back (atomically): the watch picks it up.
        replace(&path, &format!("{bob}\n"));
        let want = vec![bob.to_string()];
        let took = synced_within(&env, &want, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("recreated file not synced; log:\n{}", agent.log_text()));
        println!(
            "measured: recreated key file synced {} after the rename",
            ms(took)
        );
        assert!(eventually(WAIT, || {
            env.try_status_json()["sources"]["team"]["last_error"].is_null()
        }));
    })
    .await;
}
