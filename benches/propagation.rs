//! Propagation latency (DESIGN.md §9): from the change on the control plane
//! (`set_keys` on the fake) to the renamed `authorized_keys`, on loopback.
//! Targets: subscribe mode p99 under 250 ms; poll mode within
//! `interval + jitter`.
//!
//! The rename is seen through inotify on the target's directory (the
//! `notify` crate, timestamped in its callback); the file is then read to
//! check it holds the sample's key, so a write for an older change never
//! counts. Each mode is measured for the real `keysync run` and for a
//! baseline in the same run, measured the same way:
//! - subscribe: a minimal SSE client (reqwest) that on each event GETs the
//!   list and writes it (temp file, fsync, rename, directory fsync: the same
//!   durability as the agent). The instant that client receives the event is
//!   also recorded: the raw SSE delivery latency, the floor of any push.
//! - poll: the same minimal client polling at the same interval and jitter.
//!
//! Run: `cargo bench --bench propagation` (counts via KEYSYNC_BENCH_SUB_SAMPLES,
//! default 200, and KEYSYNC_BENCH_POLL_SAMPLES, default 50). Prints markdown.

#[path = "../tests/it/support/fake_cp.rs"]
mod fake_cp;

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use common::{Agents, percentile};
use fake_cp::{FakeControlPlane, fixture_keys, gen_ed25519_keys};
use notify::Watcher as _;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-token";
/// Poll mode: interval and jitter, for the agent and the baseline alike.
const POLL_INTERVAL: Duration = Duration::from_millis(1000);
const POLL_JITTER: Duration = Duration::from_millis(250);

/// Renames into the target's directory, timestamped as inotify reports them.
struct RenameWatch {
    events: std_mpsc::Receiver<Instant>,
    _watcher: notify::RecommendedWatcher,
}

impl RenameWatch {
    fn new(target: &Path) -> RenameWatch {
        let (tx, events) = std_mpsc::channel();
        let want = target.to_path_buf();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let at = Instant::now();
            if let Ok(ev) = res
                && matches!(
                    ev.kind,
                    notify::EventKind::Create(_) | notify::EventKind::Modify(_)
                )
                && ev.paths.iter().any(|p| p == &want)
            {
                let _ = tx.send(at);
            }
        })
        .expect("inotify watcher");
        watcher
            .watch(
                target.parent().expect("target dir"),
                notify::RecursiveMode::NonRecursive,
            )
            .expect("watch target dir");
        RenameWatch {
            events,
            _watcher: watcher,
        }
    }
}

/// The blob (second field) of a key line: what every writer keeps verbatim.
fn blob(key: &str) -> &str {
    key.split_whitespace().nth(1).unwrap_or(key)
}

struct Samples {
    file: Vec<Duration>,
    /// When the baseline client got the SSE event (subscribe baseline only).
    event: Vec<Duration>,
    lost: usize,
}

/// Changes the list `n` times; for each change waits (≤ 10 s) for a rename
/// of `target` whose content holds the new key. `gap` spaces the changes
/// (uniform in the range, so changes land at random phases of a poll).
fn measure(
    cp: &FakeControlPlane,
    target: &Path,
    keys: &mut impl Iterator<Item = String>,
    n: usize,
    gap: (Duration, Duration),
    sse_events: Option<&std_mpsc::Receiver<Instant>>,
) -> Samples {
    let [alice, bob, _] = fixture_keys();
    let watch = RenameWatch::new(target);
    let mut out = Samples {
        file: Vec::new(),
        event: Vec::new(),
        lost: 0,
    };
    for _ in 0..n {
        let key = keys.next().expect("enough keys");
        while watch.events.try_recv().is_ok() {}
        if let Some(ev) = sse_events {
            while ev.try_recv().is_ok() {}
        }
        let t0 = Instant::now();
        cp.set_keys([alice, bob, key.as_str()]);
        let deadline = t0 + Duration::from_secs(10);
        let mut got = None;
        while got.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match watch.events.recv_timeout(left) {
                Ok(at) => {
                    if std::fs::read_to_string(target).is_ok_and(|c| c.contains(blob(&key))) {
                        got = Some(at.saturating_duration_since(t0));
                    }
                }
                Err(_) => break,
            }
        }
        match got {
            Some(d) => out.file.push(d),
            None => out.lost += 1,
        }
        if let Some(ev) = sse_events
            && let Ok(at) = ev.recv_timeout(Duration::from_millis(100))
        {
            out.event.push(at.saturating_duration_since(t0));
        }
        let spread = gap.1.saturating_sub(gap.0);
        std::thread::sleep(gap.0 + spread.mul_f64(fastrand::f64()));
    }
    out
}

fn config(dir: &Path, cp: &FakeControlPlane, subscribe: bool) -> String {
    let mode = if subscribe {
        format!(
            "subscribe_url = \"{}\"\ninterval = \"60s\"\njitter = \"0s\"\nresync = \"10m\"",
            cp.events_url()
        )
    } else {
        format!(
            "interval = \"{}ms\"\njitter = \"{}ms\"",
            POLL_INTERVAL.as_millis(),
            POLL_JITTER.as_millis()
        )
    };
    format!(
        r#"state_dir = "{d}/state"
health_socket = "{d}/health.sock"

[sources.account]
kind = "vast"
url = "{url}"
api_key_env = "KEYSYNC_BENCH_API_KEY"
{mode}

[[users]]
name = "{user}"
sources = ["account"]
write = "block"
path = "{d}/ssh/authorized_keys"
"#,
        d = dir.display(),
        url = cp.url(),
        user = common::RunAs::pick_self().name,
    )
}

/// Writes `body` like the agent does: temp file, fsync, rename, dir fsync.
fn write_atomic(target: &Path, body: &[u8]) -> std::io::Result<()> {
    let dir = target.parent().expect("dir");
    let tmp = dir.join(".baseline.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, target)?;
    std::fs::File::open(dir)?.sync_all()
}

/// One conditional GET; writes the body on 200.
async fn fetch_and_write(
    client: &reqwest::Client,
    url: &str,
    etag: &mut Option<String>,
    target: &Path,
) {
    let mut req = client.get(url).bearer_auth(TOKEN);
    if let Some(e) = etag.as_deref() {
        req = req.header(reqwest::header::IF_NONE_MATCH, e);
    }
    let Ok(resp) = req.send().await else { return };
    if resp.status() != reqwest::StatusCode::OK {
        return;
    }
    *etag = resp
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Ok(body) = resp.bytes().await {
        let _ = write_atomic(target, &body);
    }
}

/// The baseline subscriber: on every SSE event, note the instant, then GET and write.
async fn sse_baseline(
    events_url: String,
    list_url: String,
    target: PathBuf,
    seen: std_mpsc::Sender<Instant>,
) {
    let client = reqwest::Client::new();
    let mut etag = None;
    fetch_and_write(&client, &list_url, &mut etag, &target).await;
    let Ok(mut resp) = client
        .get(&events_url)
        .bearer_auth(TOKEN)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
    else {
        return;
    };
    let mut buf: Vec<u8> = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let at = Instant::now();
        buf.extend_from_slice(&chunk);
        let mut events = 0;
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..end + 2).collect();
            if !block.starts_with(b":") {
                events += 1;
            }
        }
        if events > 0 {
            let _ = seen.send(at);
            fetch_and_write(&client, &list_url, &mut etag, &target).await;
        }
    }
}

/// The baseline poller: GET every interval ± jitter, write on 200.
async fn poll_baseline(list_url: String, target: PathBuf) {
    let client = reqwest::Client::new();
    let mut etag = None;
    loop {
        fetch_and_write(&client, &list_url, &mut etag, &target).await;
        let wait =
            POLL_INTERVAL.saturating_sub(POLL_JITTER) + (POLL_JITTER * 2).mul_f64(fastrand::f64());
        tokio::time::sleep(wait).await;
    }
}

/// Runs a baseline client on its own thread and runtime (not the fake's)
/// until the returned token is cancelled.
fn run_baseline<F>(
    make: impl FnOnce() -> F + Send + 'static,
) -> (CancellationToken, std::thread::JoinHandle<()>)
where
    F: std::future::Future<Output = ()>,
{
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = make() => {}
            }
        });
    });
    (cancel, handle)
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn row(label: &str, s: &[Duration], lost: usize, target: &str, verdict: &str) -> String {
    let mut v = s.to_vec();
    v.sort();
    if v.is_empty() {
        return format!("| {label} | 0 | – | – | – | – | {target} | no samples |");
    }
    format!(
        "| {label} | {}{} | {} | {} | {} | {} | {target} | {verdict} |",
        v.len(),
        if lost > 0 {
            format!(" ({lost} lost)")
        } else {
            String::new()
        },
        common::ms(percentile(&v, 50.0)),
        common::ms(percentile(&v, 90.0)),
        common::ms(percentile(&v, 99.0)),
        common::ms(v[v.len() - 1]),
    )
}

fn p99(s: &[Duration]) -> Duration {
    let mut v = s.to_vec();
    v.sort();
    if v.is_empty() {
        Duration::MAX
    } else {
        percentile(&v, 99.0)
    }
}

fn main() {
    let sub_n = common::env_count("KEYSYNC_BENCH_SUB_SAMPLES", 200);
    let poll_n = common::env_count("KEYSYNC_BENCH_POLL_SAMPLES", 50);
    let rt = common::runtime();
    let cp = rt.block_on(FakeControlPlane::start());
    cp.set_token(Some(TOKEN));
    let [alice, bob, _] = fixture_keys();
    cp.set_keys([alice, bob]);
    let mut keys = gen_ed25519_keys(2 * (sub_n + poll_n) + 10).into_iter();
    let work = tempfile::Builder::new()
        .prefix("keysync-propagation.")
        .tempdir()
        .expect("tempdir");
    let sub_gap = (Duration::from_millis(30), Duration::from_millis(130));
    let poll_gap = (Duration::from_millis(0), Duration::from_millis(500));

    // 1. keysync, subscribe mode (interval 60 s: only events explain a write).
    let dir = work.path().join("subscribe");
    std::fs::create_dir_all(dir.join("ssh")).expect("mkdir");
    std::fs::write(dir.join("config.toml"), config(&dir, &cp, true)).expect("config");
    let mut agents = Agents::new();
    agents.spawn(&dir.join("config.toml"), &dir.join("agent.log"), None);
    let target = dir.join("ssh/authorized_keys");
    wait_for("the agent's first write", Duration::from_secs(20), || {
        target.exists()
    });
    wait_for("the agent's stream", Duration::from_secs(20), || {
        cp.open_streams() >= 1
    });
    std::thread::sleep(Duration::from_millis(500));
    eprintln!("== keysync, subscribe mode: {sub_n} changes");
    let ks_sub = measure(&cp, &target, &mut keys, sub_n, sub_gap, None);
    agents.stop(Duration::from_secs(5));
    wait_for(
        "the agent's stream to close",
        Duration::from_secs(10),
        || cp.open_streams() == 0,
    );

    // 2. Baseline subscriber.
    let dir = work.path().join("baseline-sse");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let target = dir.join("authorized_keys");
    let (seen_tx, seen_rx) = std_mpsc::channel();
    let (events_url, list_url, t) = (cp.events_url(), cp.url(), target.clone());
    let (stop, handle) = run_baseline(move || sse_baseline(events_url, list_url, t, seen_tx));
    wait_for("the baseline's stream", Duration::from_secs(20), || {
        cp.open_streams() >= 1 && target.exists()
    });
    eprintln!("== baseline SSE client: {sub_n} changes");
    let base_sub = measure(&cp, &target, &mut keys, sub_n, sub_gap, Some(&seen_rx));
    stop.cancel();
    let _ = handle.join();

    // 3. keysync, poll mode.
    let dir = work.path().join("poll");
    std::fs::create_dir_all(dir.join("ssh")).expect("mkdir");
    std::fs::write(dir.join("config.toml"), config(&dir, &cp, false)).expect("config");
    agents.spawn(&dir.join("config.toml"), &dir.join("agent.log"), None);
    let target = dir.join("ssh/authorized_keys");
    wait_for("the agent's first write", Duration::from_secs(20), || {
        target.exists()
    });
    std::thread::sleep(Duration::from_millis(500));
    eprintln!("== keysync, poll mode: {poll_n} changes");
    let ks_poll = measure(&cp, &target, &mut keys, poll_n, poll_gap, None);
    agents.stop(Duration::from_secs(5));

    // 4. Baseline poller.
    let dir = work.path().join("baseline-poll");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let target = dir.join("authorized_keys");
    let (list_url, t) = (cp.url(), target.clone());
    let (stop, handle) = run_baseline(move || poll_baseline(list_url, t));
    wait_for(
        "the baseline's first write",
        Duration::from_secs(20),
        || target.exists(),
    );
    eprintln!("== baseline poller: {poll_n} changes");
    let base_poll = measure(&cp, &target, &mut keys, poll_n, poll_gap, None);
    stop.cancel();
    let _ = handle.join();

    let bound = POLL_INTERVAL + POLL_JITTER;
    let sub_ok = if p99(&ks_sub.file) < Duration::from_millis(250) {
        "ok"
    } else {
        "MISSED"
    };
    let poll_ok = if p99(&ks_poll.file) <= bound {
        "ok"
    } else {
        "MISSED"
    };
    println!("### a. Propagation latency: control-plane change to renamed authorized_keys");
    println!();
    println!(
        "Loopback; {sub_n} changes per subscribe row (one every 30–130 ms), {poll_n} per poll row \
         (one every 0–500 ms after the previous landed); poll interval {} ms ± {} ms.",
        POLL_INTERVAL.as_millis(),
        POLL_JITTER.as_millis()
    );
    println!();
    println!("| what | samples | p50 | p90 | p99 | max | target | verdict |");
    println!("|---|---:|---:|---:|---:|---:|---|---|");
    println!(
        "{}",
        row(
            "keysync, subscribe mode",
            &ks_sub.file,
            ks_sub.lost,
            "p99 < 250 ms",
            sub_ok
        )
    );
    println!(
        "{}",
        row(
            "baseline: minimal SSE client, GET + write/fsync/rename",
            &base_sub.file,
            base_sub.lost,
            "",
            ""
        )
    );
    println!(
        "{}",
        row(
            "baseline: raw SSE event delivery",
            &base_sub.event,
            0,
            "",
            ""
        )
    );
    println!(
        "{}",
        row(
            "keysync, poll mode",
            &ks_poll.file,
            ks_poll.lost,
            &format!("≤ interval + jitter = {} ms", bound.as_millis()),
            poll_ok
        )
    );
    println!(
        "{}",
        row(
            "baseline: minimal poller, same interval and jitter",
            &base_poll.file,
            base_poll.lost,
            "",
            ""
        )
    );
    println!();
    rt.block_on(cp.shutdown());
    if std::env::var_os("KEYSYNC_BENCH_KEEP").is_some() {
        eprintln!("kept {}", work.keep().display());
    }
}
