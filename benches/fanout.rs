//! The fleet recipe under a fleet (DESIGN.md §5 "Beyond one control plane",
//! §9): 100 real `keysync run` agents behind the shipped nginx recipe
//! (packaging/fleet/nginx.conf: the list cache and nchan, Debian's nginx on
//! 127.0.0.1), against the same 100 agents straight at the origin, in one
//! run. The origin is the fake control plane in this process; on each
//! change it also publishes one message to nchan, as an origin behind the
//! recipe does.
//!
//! Measured:
//! - origin list requests per key change (target ≤ 2 behind the recipe);
//! - propagation from the change to each agent's renamed `authorized_keys`
//!   (seen through inotify, the file read back for the new key): p50, p99
//!   and max over every agent and change, and the time until the last of
//!   the 100 has it (target p99 < 250 ms, §9's subscribe target);
//! - the same for the second of two changes 300 ms apart;
//! - list requests per agent in the 30 s after an nginx restart (nchan's
//!   state is gone; every stream drops and reconnects), against 30 s of
//!   steady state: the same agents with their streams up, and the polling
//!   fleet below (one request per `interval`);
//! - origin requests per minute while 100 agents poll through the cache,
//!   against 100 agents polling the origin straight, in the same minute.
//!
//! Every agent: interval 30 s ± 5 s, max_backoff 30 s, resync 10 min, its
//! own state dir, target file and health socket; as `nobody` when run as
//! root (see benches/fleet.rs: inotify instances are per user).
//!
//! The agents' directories are on /dev/shm when it exists: 100 agents
//! stand for 100 machines, each fsyncing its own disk, and on one shared
//! disk their 300 fsyncs per change queue behind each other (measured on a
//! virtio disk: p99 ~275 ms for the baseline as well as behind the recipe,
//! against ~75 ms on tmpfs). KEYSYNC_BENCH_FANOUT_DIR=DIR puts them in DIR
//! instead.
//!
//! Run: `cargo bench --bench fanout` (KEYSYNC_BENCH_FANOUT_AGENTS, default
//! 100; KEYSYNC_BENCH_FANOUT_CHANGES, default 20; KEYSYNC_BENCH_FANOUT_PAIRS,
//! default 5; KEYSYNC_BENCH_FANOUT_KEEP=DIR keeps nginx's access log there;
//! KEYSYNC_BENCH_FANOUT_DIR, above).
//! Needs nginx and libnginx-mod-nchan; without them it says so
//! and prints no figures. Prints markdown.

// The integration tests' support tree: the fake control plane, the health
// socket client and the recipe's nginx.
#[path = "../tests/it/support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Agents, RunAs, ms, percentile};
use notify::Watcher as _;
use support::fake_cp::{EVENTS_PATH, Endpoint, FakeControlPlane, LIST_PATH, gen_ed25519_keys};
use support::nginx::{self, Nginx};

const TOKEN: &str = "bench-token";
const INTERVAL: Duration = Duration::from_secs(30);
const JITTER: Duration = Duration::from_secs(5);
/// The window of the restart and steady-state counts.
const WINDOW: Duration = Duration::from_secs(30);
/// The polling window, and the wait before it (every agent's first poll
/// is at its start: the window begins after the first interval).
const POLL_WINDOW: Duration = Duration::from_secs(60);
/// How long one change may take to reach everyone before it counts as lost.
const GIVE_UP: Duration = Duration::from_secs(10);
/// After the last agent has a change: late requests still count for it.
const SETTLE: Duration = Duration::from_secs(1);
const PAIR_GAP: Duration = Duration::from_millis(300);
/// §9's subscribe target.
const TARGET_P99: Duration = Duration::from_millis(250);

/// Where one agent fetches and subscribes.
struct Endpoints {
    list: String,
    events: Option<String>,
}

fn config(dir: &Path, user: &str, at: &Endpoints) -> String {
    let events = at
        .events
        .as_ref()
        .map(|u| format!("subscribe_url = \"{u}\"\n"))
        .unwrap_or_default();
    let source = format!(
        "{}\n{events}interval = \"{}s\"\njitter = \"{}s\"\nmax_backoff = \"30s\"\nresync = \"10m\"\ntimeout = \"5s\"",
        common::vast_source(&at.list),
        INTERVAL.as_secs(),
        JITTER.as_secs(),
    );
    common::agent_config(dir, &source, user)
}

/// The first arrival of the awaited key in each agent's file.
#[derive(Default)]
struct Arrivals {
    want: Option<String>,
    at: Vec<Option<Instant>>,
}

/// Agents with their directories, and the inotify watch on their files.
struct Fleet {
    agents: Agents,
    dirs: Vec<PathBuf>,
    arrivals: Arc<Mutex<Arrivals>>,
    _watcher: notify::RecommendedWatcher,
}

/// The base64 blob of a key line: what the agent's file holds for it.
fn blob(key: &str) -> String {
    key.split_whitespace().nth(1).unwrap_or(key).to_owned()
}

impl Fleet {
    /// `n` agents in `work/PREFIX-N`, paced at ~100 starts per second.
    fn start(
        work: &Path,
        prefix: &str,
        n: usize,
        run_as: &RunAs,
        at: &dyn Fn(usize) -> Endpoints,
    ) -> Fleet {
        let arrivals = Arc::new(Mutex::new(Arrivals {
            want: None,
            at: vec![None; n],
        }));
        let mut index: HashMap<PathBuf, usize> = HashMap::new();
        let mut dirs = Vec::new();
        for i in 0..n {
            let dir = work.join(format!("{prefix}-{i}"));
            std::fs::create_dir(&dir).expect("mkdir");
            run_as.own(&dir);
            index.insert(dir.join("authorized_keys"), i);
            dirs.push(dir);
        }
        let seen = Arc::clone(&arrivals);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let now = Instant::now();
            let Ok(ev) = res else { return };
            if !matches!(
                ev.kind,
                notify::EventKind::Create(_) | notify::EventKind::Modify(_)
            ) {
                return;
            }
            for path in &ev.paths {
                let Some(&i) = index.get(path) else { continue };
                let mut a = seen.lock().expect("arrivals lock");
                let Some(want) = a.want.clone() else { continue };
                if a.at[i].is_none()
                    && std::fs::read_to_string(path).is_ok_and(|body| body.contains(&want))
                {
                    a.at[i] = Some(now);
                }
            }
        })
        .expect("inotify watcher");
        for dir in &dirs {
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .expect("watch an agent's directory");
        }
        let mut agents = Agents::new();
        let started = Instant::now();
        for (i, dir) in dirs.iter().enumerate() {
            let config_path = dir.join("config.toml");
            std::fs::write(&config_path, config(dir, &run_as.name, &at(i))).expect("config");
            agents.spawn(&config_path, &dir.join("agent.log"), Some(run_as));
            let due = started + Duration::from_millis(10 * (i as u64 + 1));
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        Fleet {
            agents,
            dirs,
            arrivals,
            _watcher: watcher,
        }
    }

    fn socket(&self, i: usize) -> PathBuf {
        self.dirs[i].join("health.sock")
    }

    /// Waits until every agent has `key` and, with `streams`, its stream up.
    fn wait_ready(&self, key: &str, streams: bool, what: &str) {
        let want = blob(key);
        let ready = support::eventually(Duration::from_secs(120), || {
            (0..self.dirs.len()).all(|i| {
                std::fs::read_to_string(self.dirs[i].join("authorized_keys"))
                    .is_ok_and(|b| b.contains(&want))
                    && (!streams || self.stream_up(i))
            })
        });
        assert!(
            ready,
            "{what}: not every agent is in sync{}; first agent's log:\n{}",
            if streams { " with its stream up" } else { "" },
            std::fs::read_to_string(self.dirs[0].join("agent.log")).unwrap_or_default()
        );
    }

    fn stream_up(&self, i: usize) -> bool {
        support::http::try_get(&self.socket(i), "/status", None)
            .ok()
            .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
            .is_some_and(|s| s["sources"]["account"]["stream_connected"] == true)
    }

    /// Every agent's fetch count so far (all results), from its `/metrics`.
    fn fetches(&self) -> Vec<u64> {
        (0..self.dirs.len())
            .map(|i| {
                let text = support::http::try_get(&self.socket(i), "/metrics", None)
                    .map(|r| r.body)
                    .unwrap_or_default();
                text.lines()
                    .filter(|l| {
                        l.starts_with("keysync_fetch_total{") && l.contains("source=\"account\"")
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>() as u64
            })
            .collect()
    }

    /// From now on, records when each agent's file first holds `key`.
    fn expect(&self, key: &str) {
        let mut a = self.arrivals.lock().expect("arrivals lock");
        a.want = Some(blob(key));
        a.at.iter_mut().for_each(|t| *t = None);
    }

    /// Waits until every agent has the awaited key (or GIVE_UP from `since`);
    /// returns each arrival's delay, and how many never arrived.
    fn arrivals_since(&self, since: Instant) -> (Vec<Duration>, usize) {
        let n = self.dirs.len();
        support::eventually(GIVE_UP, || {
            self.arrivals
                .lock()
                .expect("arrivals lock")
                .at
                .iter()
                .all(Option::is_some)
        });
        let a = self.arrivals.lock().expect("arrivals lock");
        let got: Vec<Duration> =
            a.at.iter()
                .flatten()
                .map(|t| t.saturating_duration_since(since))
                .collect();
        let lost = n - got.len();
        (got, lost)
    }

    fn all_have(&self, key: &str) -> bool {
        let want = blob(key);
        self.dirs.iter().all(|d| {
            std::fs::read_to_string(d.join("authorized_keys")).is_ok_and(|b| b.contains(&want))
        })
    }
}

fn list_requests_since(cp: &FakeControlPlane, since: Instant, query: Option<bool>) -> usize {
    cp.requests()
        .iter()
        .filter(|r| r.endpoint == Endpoint::List && r.at >= since)
        .filter(|r| query.is_none_or(|q| r.query.is_some() == q))
        .count()
}

/// The results of one way of fanning out changes.
#[derive(Default)]
struct Changes {
    /// Every agent's delay, every change.
    each: Vec<Duration>,
    /// Per change: until the last agent had it.
    last: Vec<Duration>,
    /// Per change: origin list requests.
    origin: Vec<usize>,
    lost: usize,
    /// Pairs: the same for the second change of each pair.
    pair_each: Vec<Duration>,
    pair_last: Vec<Duration>,
    pair_origin: Vec<usize>,
    pair_lost: usize,
    /// Pairs whose first change was missing anywhere at the end.
    first_missing: usize,
}

/// `changes` single changes, then `pairs` pairs 300 ms apart. `publish`
/// runs right after each change on the origin.
fn measure_changes(
    cp: &FakeControlPlane,
    fleet: &Fleet,
    keys: &mut impl Iterator<Item = String>,
    changes: usize,
    pairs: usize,
    publish: &dyn Fn(),
) -> Changes {
    let mut out = Changes::default();
    for _ in 0..changes {
        let key = keys.next().expect("enough keys");
        fleet.expect(&key);
        let since = Instant::now();
        cp.add_key(&key);
        publish();
        let (got, lost) = fleet.arrivals_since(since);
        std::thread::sleep(SETTLE);
        out.origin.push(list_requests_since(cp, since, None));
        out.last.push(got.iter().copied().max().unwrap_or(GIVE_UP));
        out.each.extend(got);
        out.lost += lost;
    }
    for _ in 0..pairs {
        let (first, second) = (keys.next().expect("keys"), keys.next().expect("keys"));
        let since = Instant::now();
        cp.add_key(&first);
        publish();
        std::thread::sleep(PAIR_GAP);
        fleet.expect(&second);
        let since_second = Instant::now();
        cp.add_key(&second);
        publish();
        let (got, lost) = fleet.arrivals_since(since_second);
        std::thread::sleep(SETTLE);
        out.pair_origin.push(list_requests_since(cp, since, None));
        out.pair_last
            .push(got.iter().copied().max().unwrap_or(GIVE_UP));
        out.pair_each.extend(got);
        out.pair_lost += lost;
        out.first_missing += usize::from(!fleet.all_have(&first));
    }
    out
}

fn spread(v: &[Duration]) -> String {
    if v.is_empty() {
        return "none arrived".into();
    }
    let mut v = v.to_vec();
    v.sort();
    format!(
        "{} / {} / {}",
        ms(percentile(&v, 50.0)),
        ms(percentile(&v, 99.0)),
        ms(v[v.len() - 1])
    )
}

fn max_of(v: &[usize]) -> usize {
    v.iter().copied().max().unwrap_or(0)
}

fn mean_of(v: &[u64]) -> f64 {
    v.iter().sum::<u64>() as f64 / v.len().max(1) as f64
}

fn deltas(after: &[u64], before: &[u64]) -> Vec<u64> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect()
}

fn p99_ok(v: &[Duration], lost: usize) -> &'static str {
    let mut v = v.to_vec();
    v.sort();
    if lost == 0 && !v.is_empty() && percentile(&v, 99.0) < TARGET_P99 {
        "ok"
    } else {
        "MISSED"
    }
}

fn raise_fd_limit() {
    // SAFETY: plain data in and out.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    println!("### g. Fan-out: 100 agents behind the nginx fleet recipe (benches/fanout.rs)");
    println!();
    if let Some(missing) = nginx::missing() {
        println!("Not measured: {missing}.");
        return;
    }
    let n = common::env_count("KEYSYNC_BENCH_FANOUT_AGENTS", 100).max(1);
    let changes = common::env_count("KEYSYNC_BENCH_FANOUT_CHANGES", 20).max(1);
    let pairs = common::env_count("KEYSYNC_BENCH_FANOUT_PAIRS", 5).max(1);
    raise_fd_limit();
    let run_as = RunAs::pick();
    let rt = common::runtime();
    let cp = rt.block_on(FakeControlPlane::start());
    cp.set_token(Some(TOKEN));
    let mut keys = gen_ed25519_keys(1 + 2 * (changes + 2 * pairs) + 1).into_iter();
    let first = keys.next().expect("a key");
    cp.set_keys([first.clone()]);

    let parent = std::env::var_os("KEYSYNC_BENCH_FANOUT_DIR")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("keysync-fanout.")
        .tempdir_in(&parent)
        .expect("tempdir");
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");

    // --- Behind the recipe: subscribe through nchan, fetch through the cache.
    let mut nginx = Nginx::start(cp.addr().port());
    let behind = Endpoints {
        list: nginx.url(LIST_PATH),
        events: Some(nginx.url(EVENTS_PATH)),
    };
    eprintln!("== {n} agents behind the recipe");
    let mut fleet = Fleet::start(work.path(), "recipe", n, &run_as, &|_| Endpoints {
        list: behind.list.clone(),
        events: behind.events.clone(),
    });
    fleet.wait_ready(&first, true, "behind the recipe");
    eprintln!("== behind the recipe: {changes} changes, {pairs} pairs");
    let recipe = measure_changes(&cp, &fleet, &mut keys, changes, pairs, &|| nginx.publish());

    eprintln!(
        "== behind the recipe: {} s steady, then an nginx restart",
        WINDOW.as_secs()
    );
    let before = fleet.fetches();
    let origin_from = Instant::now();
    std::thread::sleep(WINDOW);
    let steady_stream = deltas(&fleet.fetches(), &before);
    let steady_origin = list_requests_since(&cp, origin_from, None);
    let before = fleet.fetches();
    let restart_from = Instant::now();
    nginx.restart();
    std::thread::sleep(WINDOW.saturating_sub(restart_from.elapsed()));
    let after_restart = deltas(&fleet.fetches(), &before);
    let restart_origin = list_requests_since(&cp, restart_from, None);
    let reconnected = (0..n).filter(|&i| fleet.stream_up(i)).count();
    // A change after the restart still reaches everyone.
    let key = keys.next().expect("a key");
    fleet.expect(&key);
    let since = Instant::now();
    cp.add_key(&key);
    nginx.publish();
    let (after_got, after_lost) = fleet.arrivals_since(since);
    let exited_recipe = fleet.agents.exited();
    fleet.agents.stop(Duration::from_secs(10));

    // --- Baseline: the same agents straight at the origin.
    eprintln!("== {n} agents straight at the origin");
    let straight = Endpoints {
        list: cp.url(),
        events: Some(cp.events_url()),
    };
    let mut fleet_b = Fleet::start(work.path(), "straight", n, &run_as, &|_| Endpoints {
        list: straight.list.clone(),
        events: straight.events.clone(),
    });
    fleet_b.wait_ready(&cp.keys()[0], true, "straight at the origin");
    eprintln!("== straight at the origin: {changes} changes, {pairs} pairs");
    let baseline = measure_changes(&cp, &fleet_b, &mut keys, changes, pairs, &|| {});
    let exited_straight = fleet_b.agents.exited();
    fleet_b.agents.stop(Duration::from_secs(10));

    // --- Polling: n agents through the cache and n straight, the same minute.
    eprintln!(
        "== {n} agents polling through the cache and {n} straight, {} s",
        POLL_WINDOW.as_secs()
    );
    let cached = nginx.url(LIST_PATH);
    let mut polling_cache = Fleet::start(work.path(), "poll-cache", n, &run_as, &|_| Endpoints {
        list: cached.clone(),
        events: None,
    });
    // The URL is used as given: the query tells these apart at the origin.
    let mut polling_straight =
        Fleet::start(work.path(), "poll-straight", n, &run_as, &|i| Endpoints {
            list: format!("{}?agent={i}", cp.url()),
            events: None,
        });
    let current = cp.keys()[0].clone();
    polling_cache.wait_ready(&current, false, "polling through the cache");
    polling_straight.wait_ready(&current, false, "polling straight");
    // Past everyone's first poll and the first interval's jitter.
    std::thread::sleep(INTERVAL);
    let before_cache = polling_cache.fetches();
    let poll_from = Instant::now();
    std::thread::sleep(POLL_WINDOW);
    let per_agent_cache = deltas(&polling_cache.fetches(), &before_cache);
    let origin_cache = list_requests_since(&cp, poll_from, Some(false));
    let origin_straight = list_requests_since(&cp, poll_from, Some(true));
    let exited_polling = polling_cache.agents.exited() + polling_straight.agents.exited();
    polling_cache.agents.stop(Duration::from_secs(10));
    polling_straight.agents.stop(Duration::from_secs(10));
    if let Ok(keep) = std::env::var("KEYSYNC_BENCH_FANOUT_KEEP") {
        let _ = std::fs::copy(
            nginx.log_path("access"),
            Path::new(&keep).join("access.log"),
        );
    }
    drop(nginx);
    rt.block_on(cp.shutdown());

    // --- Report.
    let per_minute = 60.0 / POLL_WINDOW.as_secs_f64();
    let window_share = WINDOW.as_secs_f64() / POLL_WINDOW.as_secs_f64();
    let polling_per_window = mean_of(&per_agent_cache) * window_share;
    println!(
        "Each agent: `keysync run` as user `{}`, interval {} s ± {} s, max_backoff 30 s, resync 10 min, \
         state and target under {}. Behind the recipe: `url` and `subscribe_url` at nginx (packaging/fleet/nginx.conf, only its \
         `SITE:` values changed); straight: both at the origin, a fake control plane in this process \
         that publishes each change to nchan too. {changes} single changes (the next one 1 s after the \
         last agent had the previous), then {pairs} pairs of changes {} ms apart.",
        run_as.name,
        INTERVAL.as_secs(),
        JITTER.as_secs(),
        parent.display(),
        PAIR_GAP.as_millis()
    );
    println!();
    println!(
        "| figure | behind the recipe | straight at the origin (baseline) | target | verdict |"
    );
    println!("|---|---:|---:|---|---|");
    println!(
        "| origin list requests per change: max (mean) | {} ({:.1}) | {} ({:.1}) | ≤ 2 | {} |",
        max_of(&recipe.origin),
        recipe.origin.iter().sum::<usize>() as f64 / recipe.origin.len().max(1) as f64,
        max_of(&baseline.origin),
        baseline.origin.iter().sum::<usize>() as f64 / baseline.origin.len().max(1) as f64,
        if max_of(&recipe.origin) <= 2 {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!(
        "| propagation to each of {n} agents: p50 / p99 / max ({changes} changes) | {} | {} | p99 < 250 ms | {} |",
        spread(&recipe.each),
        spread(&baseline.each),
        p99_ok(&recipe.each, recipe.lost)
    );
    println!(
        "| propagation to all {n} (the last agent): p50 / p99 / max | {} | {} | | |",
        spread(&recipe.last),
        spread(&baseline.last)
    );
    println!(
        "| changes that did not reach every agent within {} s | {} agent(s) | {} agent(s) | 0 | {} |",
        GIVE_UP.as_secs(),
        recipe.lost,
        baseline.lost,
        if recipe.lost == 0 { "ok" } else { "MISSED" }
    );
    println!(
        "| two changes {} ms apart, the second: to each p50 / p99 / max | {} | {} | p99 < 250 ms | {} |",
        PAIR_GAP.as_millis(),
        spread(&recipe.pair_each),
        spread(&baseline.pair_each),
        p99_ok(&recipe.pair_each, recipe.pair_lost)
    );
    println!(
        "| two changes, the second: to all {n} p50 / p99 / max | {} | {} | | |",
        spread(&recipe.pair_last),
        spread(&baseline.pair_last)
    );
    println!(
        "| two changes: origin list requests per pair, max | {} | {} | ≤ 4 | {} |",
        max_of(&recipe.pair_origin),
        max_of(&baseline.pair_origin),
        if max_of(&recipe.pair_origin) <= 4 && recipe.first_missing == 0 && recipe.pair_lost == 0 {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!(
        "| list requests per agent in {} s, streams up, no change: mean (max) | {:.2} ({}) | | | |",
        WINDOW.as_secs(),
        mean_of(&steady_stream),
        steady_stream.iter().max().unwrap_or(&0)
    );
    println!(
        "| list requests per agent in {} s of polling (interval {} s): mean | {polling_per_window:.2} | | | |",
        WINDOW.as_secs(),
        INTERVAL.as_secs()
    );
    let restart_mean = mean_of(&after_restart);
    println!(
        "| list requests per agent in the {} s after an nginx restart: mean (max) | {restart_mean:.2} ({}) | | ≤ polling's {polling_per_window:.2} | {} |",
        WINDOW.as_secs(),
        after_restart.iter().max().unwrap_or(&0),
        if restart_mean <= polling_per_window.max(1.0) {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!(
        "| origin list requests: {} s steady / {} s after the restart | {steady_origin} / {restart_origin} | | | |",
        WINDOW.as_secs(),
        WINDOW.as_secs()
    );
    println!(
        "| after the restart: streams up again / next change at all {n}, max | {reconnected} of {n} / {} ({} lost) | | all | {} |",
        ms(after_got.iter().copied().max().unwrap_or(GIVE_UP)),
        after_lost,
        if reconnected == n && after_lost == 0 {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!(
        "| origin list requests per minute, {n} agents polling | {:.0} | {:.0} | ≤ 13 (one per 5 s of cache validity) | {} |",
        origin_cache as f64 * per_minute,
        origin_straight as f64 * per_minute,
        if origin_cache as f64 * per_minute <= 13.0 {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!(
        "| agents that exited on their own | {} | {} | 0 | {} |",
        exited_recipe + exited_polling,
        exited_straight,
        if exited_recipe + exited_straight + exited_polling == 0 {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!();
}
