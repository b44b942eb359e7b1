//! Hostile network answers (DESIGN.md §5: "keep; retry"): the control plane
//! is untrusted input. Purpose-built servers on 127.0.0.1 (raw TCP, so they
//! can do what no well-behaved HTTP server does) drip a body at 1 byte/s,
//! stream an endless chunked body, send a 1 MB header or 10,000 headers,
//! put invalid UTF-8 in the JSON, nest it 100,000 deep, send a million
//! elements, and redirect: to another origin (refused, and the other origin
//! never sees the request, let alone the Authorization header), in a loop
//! (refused), and within the same origin (followed). Every hostile answer
//! carries keys that would change the file were it believed; the file, the
//! hook cache and the agent's memory stay as they were.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::block::block_keys;
use crate::support::config::Config;
use crate::support::env::TestEnv;
use crate::support::fake_cp::{FakeControlPlane, LIST_PATH, gen_ed25519_keys};
use crate::support::files::FileState;
use crate::support::raw_http::{RawRequest, RawServer, respond};
use crate::support::{DEADLINE, blocking, eventually, sorted};

fn list_body(keys: &[String]) -> Vec<u8> {
    let elements: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| serde_json::json!({ "key": k }))
        .collect();
    serde_json::to_vec(&elements).expect("json")
}

fn json_ok(stream: &mut TcpStream, body: &[u8]) {
    respond(
        stream,
        "200 OK",
        &[("Content-Type", "application/json".into())],
        body,
    );
}

// ---------------------------------------------------------------------------
// The hostile answers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hostile {
    /// The new list, correct Content-Length, one byte per second.
    SlowDrip,
    /// Chunked, never ending: `[` and blanks as fast as the socket takes them.
    EndlessChunked,
    /// A 1 MB header line, then the new list.
    HugeHeader,
    /// 10,000 small headers, then the new list.
    ManyHeaders,
    /// The new list with invalid UTF-8 inside a key string.
    InvalidUtf8,
    /// The new list with a 100,000-deep array inside an element.
    DeepNesting,
    /// One new key and a million `{}` elements (about 3 MB).
    MillionElements,
    /// 302 to the same path on another origin, which serves the new list to anyone.
    CrossOriginRedirect,
    /// 302 to this server under another name (`localhost`): another origin too.
    OtherNameRedirect,
    /// 302 from one path to another on the same origin, forever.
    RedirectLoop,
}

const ALL_HOSTILE: [Hostile; 10] = [
    Hostile::SlowDrip,
    Hostile::EndlessChunked,
    Hostile::HugeHeader,
    Hostile::ManyHeaders,
    Hostile::InvalidUtf8,
    Hostile::DeepNesting,
    Hostile::MillionElements,
    Hostile::CrossOriginRedirect,
    Hostile::OtherNameRedirect,
    Hostile::RedirectLoop,
];

/// What the hostile answers need to know.
struct Ctx {
    /// Keys a hostile answer offers (never to be written).
    new_keys: Vec<String>,
    /// The other origin's list URL.
    elsewhere: String,
    /// Bytes the endless body managed to send before the client hung up.
    endless_sent: AtomicUsize,
}

fn answer_hostile(kind: Hostile, req: &RawRequest, stream: &mut TcpStream, ctx: &Ctx) {
    let body = list_body(&ctx.new_keys);
    match kind {
        Hostile::SlowDrip => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if stream.write_all(head.as_bytes()).is_err() {
                return;
            }
            for b in &body {
                if stream.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Hostile::EndlessChunked => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\n";
            if stream.write_all(head.as_bytes()).is_err() {
                return;
            }
            let mut chunk = b"4000\r\n".to_vec();
            chunk.extend(std::iter::repeat_n(b' ', 0x4000));
            chunk.extend_from_slice(b"\r\n");
            // Bounded, so a client that never hangs up cannot keep this
            // thread forever (1 GiB is far over any max_body).
            let mut sent = 0usize;
            while sent < 1 << 30 {
                if stream.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
            ctx.endless_sent.fetch_max(sent, Ordering::Relaxed);
        }
        Hostile::HugeHeader => {
            let filler = "a".repeat(1 << 20);
            respond(stream, "200 OK", &[("X-Filler", filler)], &body);
        }
        Hostile::ManyHeaders => {
            let headers: Vec<(&str, String)> =
                (0..10_000).map(|i| ("X-Many", i.to_string())).collect();
            respond(stream, "200 OK", &headers, &body);
        }
        Hostile::InvalidUtf8 => {
            let mut bad = body.clone();
            // Inside the first key's comment: `…keysync-test-N\xff\xfe"`.
            let at = bad.iter().position(|&b| b == b'}').expect("an element") - 1;
            bad.splice(at..at, [0xff, 0xfe]);
            json_ok(stream, &bad);
        }
        Hostile::DeepNesting => {
            let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
            let text = format!("[{{\"key\":{:?},\"extra\":{deep}}}]", ctx.new_keys[0]);
            json_ok(stream, text.as_bytes());
        }
        Hostile::MillionElements => {
            let mut text = format!("[{{\"key\":{:?}}}", ctx.new_keys[0]);
            text.reserve(3_000_001);
            for _ in 0..1_000_000 {
                text.push_str(",{}");
            }
            text.push(']');
            json_ok(stream, text.as_bytes());
        }
        Hostile::CrossOriginRedirect => {
            respond(
                stream,
                "302 Found",
                &[("Location", ctx.elsewhere.clone())],
                b"",
            );
        }
        Hostile::OtherNameRedirect => {
            let port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
            respond(
                stream,
                "302 Found",
                &[("Location", format!("http://localhost:{port}{LIST_PATH}"))],
                b"",
            );
        }
        Hostile::RedirectLoop => {
            let next = if req.path.ends_with("/a") { "b" } else { "a" };
            respond(
                stream,
                "302 Found",
                &[("Location", format!("{LIST_PATH}{next}"))],
                b"",
            );
        }
    }
}

/// What the raw server answers now: the good list, or a hostile answer.
struct Behaviour {
    good: Vec<u8>,
    hostile: Option<Hostile>,
}

type Mode = Arc<Mutex<Behaviour>>;

fn set_mode(mode: &Mode, hostile: Option<Hostile>) {
    mode.lock().expect("mode").hostile = hostile;
}

/// The raw server, answering as `mode` says at each request.
fn hostile_server(good_keys: &[String], ctx: Arc<Ctx>) -> (RawServer, Mode) {
    let mode = Arc::new(Mutex::new(Behaviour {
        good: list_body(good_keys),
        hostile: None,
    }));
    let current = mode.clone();
    let server = RawServer::start(Arc::new(move |req: &RawRequest, stream: &mut TcpStream| {
        let (good, hostile) = {
            let m = current.lock().expect("mode");
            (m.good.clone(), m.hostile)
        };
        match hostile {
            None => json_ok(stream, &good),
            Some(kind) => answer_hostile(kind, req, stream, &ctx),
        }
    }));
    (server, mode)
}

// ---------------------------------------------------------------------------
// Running the agent

fn keys_pair() -> (Vec<String>, Vec<String>) {
    let all = gen_ed25519_keys(6);
    (all[..3].to_vec(), all[3..].to_vec())
}

/// The other origin: a fake control plane that serves the new keys to
/// anyone (no token), so a followed redirect would change the file.
async fn elsewhere(new_keys: &[String]) -> FakeControlPlane {
    let other = FakeControlPlane::start().await;
    other.set_token(None);
    other.set_keys(new_keys.to_vec());
    other
}

/// The hostile server (serving `old_keys` until told otherwise), what its
/// answers need to know, and an env whose config points at it, with
/// `max_body` at 8 MiB so that the million elements reach the parser.
fn hostiles(
    old_keys: &[String],
    new_keys: &[String],
    elsewhere: String,
) -> (Arc<Ctx>, RawServer, Mode, TestEnv) {
    let ctx = Arc::new(Ctx {
        new_keys: new_keys.to_vec(),
        elsewhere,
        endless_sent: AtomicUsize::new(0),
    });
    let (server, mode) = hostile_server(old_keys, ctx.clone());
    let env = TestEnv::new();
    env.write_config(Config::vast(&env, &server.url(LIST_PATH)).set("max_body", "8MiB"));
    (ctx, server, mode, env)
}

/// No redirect was followed to the other origin.
fn assert_never_asked(other: &FakeControlPlane) {
    let seen = other.requests();
    assert!(
        seen.is_empty(),
        "the other origin was asked (redirect followed): {seen:?}"
    );
}

/// For each hostile answer: a good `run --once` writes the old keys, then a
/// `run --once` against the hostile answer exits 1 with the expected error,
/// in bounded time and memory, and leaves the target and cache untouched.
#[tokio::test(flavor = "multi_thread")]
async fn run_once_keeps_the_keys_through_every_hostile_answer() {
    let (old_keys, new_keys) = keys_pair();
    let other = elsewhere(&new_keys).await;
    let other_url = other.url();
    blocking(move || {
        let (ctx, server, mode, env) = hostiles(&old_keys, &new_keys, other_url);
        let first = env.run_once_watched();
        assert_eq!(first.code, 0, "{}", first.stderr);
        assert_eq!(
            sorted(&block_keys(&env.read_target().expect("target"))),
            sorted(&old_keys)
        );
        let cache = env.state_dir().join("users/root.keys");
        let target_before = FileState::of(&env.target());
        let cache_before = FileState::of(&cache);

        let expected_error = |kind: Hostile| match kind {
            Hostile::SlowDrip => "timed out",
            Hostile::EndlessChunked => "max_body",
            Hostile::HugeHeader | Hostile::ManyHeaders => "request failed",
            Hostile::InvalidUtf8 | Hostile::DeepNesting => "bad JSON",
            Hostile::MillionElements => "no key text",
            Hostile::CrossOriginRedirect | Hostile::OtherNameRedirect => "redirect",
            Hostile::RedirectLoop => "redirect",
        };
        for kind in ALL_HOSTILE {
            set_mode(&mode, Some(kind));
            let out = env.run_once_watched();
            eprintln!(
                "{kind:?}: exit {}, peak RSS {} KiB",
                out.code, out.max_rss_kib
            );
            assert_eq!(out.code, 1, "{kind:?} must fail the run:\n{}", out.stderr);
            assert!(
                out.stderr.contains(expected_error(kind)),
                "{kind:?}: expected {:?} in the error:\n{}",
                expected_error(kind),
                out.stderr
            );
            assert_eq!(
                FileState::of(&env.target()),
                target_before,
                "{kind:?} changed the target"
            );
            assert_eq!(
                FileState::of(&cache),
                cache_before,
                "{kind:?} changed the hook cache"
            );
            assert!(
                out.max_rss_kib < 256 * 1024,
                "{kind:?}: peak RSS {} KiB, over 256 MiB",
                out.max_rss_kib
            );
        }
        let sent = ctx.endless_sent.load(Ordering::Relaxed);
        eprintln!("endless body: {sent} bytes sent before the agent hung up");
        assert!(
            sent < 1 << 30,
            "the agent read the endless body to the server's own limit"
        );
        for r in server.requests() {
            assert_eq!(
                r.header("authorization"),
                Some("Bearer test-token"),
                "{r:?}"
            );
        }
        assert_never_asked(&other);
    })
    .await;
}

/// A redirect within the same origin is followed, with the Authorization
/// header, to the new list.
#[tokio::test(flavor = "multi_thread")]
async fn same_origin_redirect_is_followed_with_the_credentials() {
    let (old_keys, new_keys) = keys_pair();
    blocking(move || {
        let moved = Arc::new(AtomicBool::new(false));
        let (old, new) = (list_body(&old_keys), list_body(&new_keys));
        let flag = moved.clone();
        let server = RawServer::start(Arc::new(move |req: &RawRequest, stream: &mut TcpStream| {
            if !flag.load(Ordering::Relaxed) {
                json_ok(stream, &old);
            } else if req.path == LIST_PATH {
                respond(
                    stream,
                    "301 Moved Permanently",
                    &[("Location", format!("{LIST_PATH}v2?page=1"))],
                    b"",
                );
            } else {
                json_ok(stream, &new);
            }
        }));
        let env = TestEnv::new();
        env.write_config(Config::vast(&env, &server.url(LIST_PATH)));
        let first = env.run_once_watched();
        assert_eq!(first.code, 0, "{}", first.stderr);
        moved.store(true, Ordering::Relaxed);
        let out = env.run_once_watched();
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(
            sorted(&block_keys(&env.read_target().expect("target"))),
            sorted(&new_keys)
        );
        let requests = server.requests();
        let followed: Vec<&RawRequest> = requests.iter().filter(|r| r.path != LIST_PATH).collect();
        assert!(!followed.is_empty(), "redirect not followed: {requests:?}");
        for r in &requests {
            assert_eq!(
                r.header("authorization"),
                Some("Bearer test-token"),
                "{r:?}"
            );
        }
        assert!(
            followed
                .iter()
                .all(|r| r.path == format!("{LIST_PATH}v2?page=1")),
            "{followed:?}"
        );
    })
    .await;
}

/// The daemon through every hostile answer in turn: the file never changes,
/// the source reports the error, the agent stays within sane memory, and
/// when the server behaves again the next change lands without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn daemon_rides_out_every_hostile_answer_and_follows_the_next_good_one() {
    let (old_keys, new_keys) = keys_pair();
    let other = elsewhere(&new_keys).await;
    let other_url = other.url();
    blocking(move || {
        let (_, server, mode, env) = hostiles(&old_keys, &new_keys, other_url);
        let mut agent = env.spawn_with(|cmd| {
            cmd.env("KEYSYNC_LOG", "info");
        });
        let ok = eventually(DEADLINE, || {
            env.read_target()
                .is_some_and(|t| sorted(&block_keys(&t)) == sorted(&old_keys))
        });
        assert!(ok, "old keys never written:\n{}", agent.log_text());
        let before = FileState::of(&env.target());

        for kind in ALL_HOSTILE {
            let seen = server.requests().len();
            set_mode(&mode, Some(kind));
            // Two hostile answers taken in (the second after a backoff).
            let answered = eventually(DEADLINE, || server.requests().len() >= seen + 2);
            assert!(
                answered,
                "{kind:?}: the agent stopped asking:\n{}",
                agent.log_text()
            );
            assert!(
                agent.alive(),
                "{kind:?} killed the agent:\n{}",
                agent.log_text()
            );
            assert_eq!(
                FileState::of(&env.target()),
                before,
                "{kind:?} changed the target"
            );
        }
        let pid = agent.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let hwm_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        eprintln!("daemon peak RSS after all hostile answers: {hwm_kib} KiB");
        assert!(
            hwm_kib < 256 * 1024,
            "daemon peak RSS {hwm_kib} KiB, over 256 MiB"
        );

        // Good again, with the new keys: they land without a restart.
        {
            let mut m = mode.lock().expect("mode");
            m.good = list_body(&new_keys);
            m.hostile = None;
        }
        let ok = eventually(DEADLINE, || {
            env.read_target()
                .is_some_and(|t| sorted(&block_keys(&t)) == sorted(&new_keys))
        });
        assert!(
            ok,
            "new keys never written after the hostile answers:\n{}",
            agent.log_text()
        );
        assert!(agent.alive());
        let (status, _) = agent.stop(Duration::from_secs(10));
        assert!(status.success(), "{status:?}");
        assert_never_asked(&other);
        drop(server);
    })
    .await;
}

/// A list padded with 100,000 entries that fail the key policy keeps its
/// good keys, and the rejections are summarised instead of flooding the
/// log (or the journal) with a line each.
#[test]
fn a_flood_of_invalid_entries_is_summarised_not_logged_line_by_line() {
    let (old_keys, _) = keys_pair();
    let mut elements: Vec<serde_json::Value> = old_keys
        .iter()
        .map(|k| serde_json::json!({ "key": k }))
        .collect();
    elements.extend(
        (0..100_000)
            .map(|i| serde_json::json!({ "key": format!("ssh-ed25519 AAAAnot-a-key-{i}") })),
    );
    let body = serde_json::to_vec(&elements).expect("json");
    let server = RawServer::start(Arc::new(move |_: &RawRequest, stream: &mut TcpStream| {
        json_ok(stream, &body)
    }));
    let env = TestEnv::new();
    env.write_config(Config::vast(&env, &server.url(LIST_PATH)).set("max_body", "16MiB"));
    let out = env.run_once_watched();
    assert_eq!(out.code, 0, "{}", &out.stderr[..out.stderr.len().min(2000)]);
    assert_eq!(
        sorted(&block_keys(&env.read_target().expect("target"))),
        sorted(&old_keys)
    );
    let lines = out.stderr.lines().count();
    eprintln!(
        "100,000 invalid entries: {lines} log lines, peak RSS {} KiB",
        out.max_rss_kib
    );
    assert!(
        lines < 200,
        "{lines} log lines for one fetch:\n{}",
        &out.stderr[..out.stderr.len().min(2000)]
    );
    assert!(
        out.stderr.contains("100000"),
        "the number of rejected entries is not reported:\n{}",
        out.stderr
    );
}
