//! A fleet against one control plane (DESIGN.md §9): as many `keysync run`
//! processes as the machine holds (default: 1,000 when memory allows, at
//! least 200), each with its own state dir, target file and health socket,
//! polling one fake control plane every 2 s ± 1 s. Target: on average one
//! request per agent per interval, spread evenly (no one-second bucket over
//! 3× the mean rate), also after a control-plane outage, and 304 for the
//! unchanged list.
//!
//! Each agent's URL carries `?agent=N` (the URL is used exactly as given),
//! so the fake's request log tells the agents apart. Phases: start (paced),
//! warm-up, a steady window, a 30 s outage (`set_down`: every request gets
//! 503 and the agents back off), and the time after it. The interval is the
//! default's 60 s scaled down 30×, and so is `max_backoff` (5 min -> 10 s),
//! which keeps the run near 2½ minutes. Memory per agent is read from
//! `/proc` (RSS, and PSS, which shares the binary's pages fairly) and from
//! the drop in the machine's `MemAvailable`.
//!
//! When run as root the agents run as `nobody`: the kernel allows each user
//! 128 inotify instances, and a fleet running as root would use up those of
//! everything else root runs meanwhile (the agents beyond the limit run
//! without their directory watches and say so in their logs).
//!
//! Run: `cargo bench --bench fleet` (KEYSYNC_FLEET_AGENTS=N to choose the
//! size). Prints markdown. Every agent is stopped at the end, also on panic.

#[path = "../tests/it/support/fake_cp.rs"]
mod fake_cp;

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agents, RunAs, mib, percentile};
use fake_cp::{Endpoint, FakeControlPlane, RequestRecord, fixture_keys};

const TOKEN: &str = "bench-token";
const INTERVAL: Duration = Duration::from_secs(2);
const JITTER: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const WARMUP: Duration = Duration::from_secs(10);
const STEADY: Duration = Duration::from_secs(30);
const OUTAGE: Duration = Duration::from_secs(30);
const AFTER: Duration = Duration::from_secs(40);
/// The acceptance bound: no one-second bucket over this many times the mean.
const MAX_BURST: f64 = 3.0;

fn config(dir: &Path, url: &str, id: usize, user: &str) -> String {
    let source = format!(
        "{}\ninterval = \"{}s\"\njitter = \"{}s\"\ntimeout = \"5s\"\nmax_backoff = \"{}s\"",
        common::vast_source(&format!("{url}?agent={id}")),
        INTERVAL.as_secs(),
        JITTER.as_secs(),
        MAX_BACKOFF.as_secs(),
    );
    common::agent_config(dir, &source, user)
}

fn agent_id(r: &RequestRecord) -> Option<usize> {
    r.query.as_deref()?.strip_prefix("agent=")?.parse().ok()
}

/// List requests per one-second bucket in [from, from + secs).
fn buckets(log: &[RequestRecord], from: Instant, secs: usize) -> Vec<usize> {
    let mut b = vec![0usize; secs];
    for r in log
        .iter()
        .filter(|r| r.endpoint == Endpoint::List && r.at >= from)
    {
        let i = r.at.duration_since(from).as_secs() as usize;
        if i < secs {
            b[i] += 1;
        }
    }
    b
}

fn mean(v: &[usize]) -> f64 {
    v.iter().sum::<usize>() as f64 / v.len().max(1) as f64
}

fn stdev(v: &[usize]) -> f64 {
    let m = mean(v);
    (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// A histogram as text: one line per second, bar scaled to `scale` requests = 50 chars.
fn histogram(label: &str, b: &[usize], scale: f64, mark: f64) -> String {
    let mut out = format!("{label}\n");
    for (i, &n) in b.iter().enumerate() {
        let bar = "#".repeat(((n as f64 / scale) * 50.0).round() as usize);
        let flag = if n as f64 > mark {
            "  <-- over 3x mean"
        } else {
            ""
        };
        out.push_str(&format!("{i:>4}s {n:>5} {bar}{flag}\n"));
    }
    out
}

fn raise_fd_limit() -> u64 {
    // SAFETY: plain data in and out.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            return lim.rlim_cur;
        }
    }
    0
}

fn main() {
    let available_kib = common::mem_available_kib();
    // Budget 12 MiB per agent (its whole RSS, as if nothing were shared, plus
    // kernel overhead; the real cost is nearer 2 MiB) in 3/4 of what is free.
    let fits = (available_kib * 3 / 4 / (12 * 1024)) as usize;
    let n: usize = std::env::var("KEYSYNC_FLEET_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fits.clamp(200, 1000));
    let fd_limit = raise_fd_limit();
    let run_as = RunAs::pick();
    let rt = common::runtime();
    let cp = rt.block_on(FakeControlPlane::start());
    cp.set_token(Some(TOKEN));
    let [alice, bob, _] = fixture_keys();
    cp.set_keys([alice, bob]);

    let work = tempfile::Builder::new()
        .prefix("keysync-fleet.")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut agents = Agents::new();
    let before_kib = common::mem_available_kib();
    eprintln!(
        "== starting {n} agents as {} (MemAvailable {}, fd limit {fd_limit})",
        run_as.name,
        mib(before_kib)
    );
    let started = Instant::now();
    // Paced at ~100 starts per second, as a fleet never starts in one instant.
    for id in 0..n {
        let dir = work.path().join(format!("a{id}"));
        std::fs::create_dir(&dir).expect("mkdir");
        run_as.own(&dir);
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config(&dir, &cp.url(), id, &run_as.name)).expect("config");
        agents.spawn(&config_path, &dir.join("agent.log"), Some(&run_as));
        let due = started + Duration::from_millis(10 * (id as u64 + 1));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    let spawned_in = started.elapsed();
    // Every agent has had a good answer.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut synced = 0;
    while Instant::now() < deadline {
        let ok: std::collections::HashSet<usize> = cp
            .requests()
            .iter()
            .filter(|r| r.status == Some(200))
            .filter_map(agent_id)
            .collect();
        synced = ok.len();
        if synced >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let all_synced_in = started.elapsed();
    eprintln!(
        "== {synced}/{n} agents synced after {:.1} s; warming up",
        all_synced_in.as_secs_f64()
    );
    std::thread::sleep(WARMUP);

    // Memory, once the agents are in their steady state.
    let pids = agents.pids();
    let mut rss: Vec<u64> = pids
        .iter()
        .filter_map(|&p| common::status_kib(p, "VmRSS"))
        .collect();
    let mut pss: Vec<u64> = pids.iter().filter_map(|&p| common::pss_kib(p)).collect();
    let mut threads: Vec<u64> = pids
        .iter()
        .filter_map(|&p| common::status_kib(p, "Threads"))
        .collect();
    rss.sort();
    pss.sort();
    threads.sort();
    let after_kib = common::mem_available_kib();
    let per_agent_kib = before_kib.saturating_sub(after_kib) / n as u64;
    let cpu_before: u64 = pids.iter().filter_map(|&p| common::cpu_ticks(p)).sum();
    let self_before = common::cpu_ticks(std::process::id()).unwrap_or(0);

    eprintln!("== steady window {} s", STEADY.as_secs());
    let steady_from = Instant::now();
    std::thread::sleep(STEADY);
    let cpu_after: u64 = pids.iter().filter_map(|&p| common::cpu_ticks(p)).sum();
    let self_after = common::cpu_ticks(std::process::id()).unwrap_or(0);

    eprintln!("== outage {} s", OUTAGE.as_secs());
    let down_from = Instant::now();
    cp.set_down(true);
    std::thread::sleep(OUTAGE);
    let up_from = Instant::now();
    cp.set_down(false);
    eprintln!("== after the outage {} s", AFTER.as_secs());
    std::thread::sleep(AFTER);
    let exited = agents.exited();
    let log = cp.requests();
    let stop_started = Instant::now();
    let killed = agents.stop(Duration::from_secs(10));
    let stop_took = stop_started.elapsed();
    rt.block_on(cp.shutdown());

    // --- Analysis.
    let steady = buckets(&log, steady_from, STEADY.as_secs() as usize);
    let outage = buckets(&log, down_from, OUTAGE.as_secs() as usize);
    let after = buckets(&log, up_from, AFTER.as_secs() as usize);
    let mean_rate = mean(&steady);
    let steady_max = *steady.iter().max().unwrap_or(&0);
    let after_max = *after.iter().max().unwrap_or(&0);
    let outage_max = *outage.iter().max().unwrap_or(&0);
    let in_steady: Vec<&RequestRecord> = log
        .iter()
        .filter(|r| {
            r.endpoint == Endpoint::List && r.at >= steady_from && r.at < steady_from + STEADY
        })
        .collect();
    let per_interval =
        in_steady.len() as f64 / (n as f64 * STEADY.as_secs_f64() / INTERVAL.as_secs_f64());
    let not_modified = in_steady.iter().filter(|r| r.status == Some(304)).count();
    let share_304 = not_modified as f64 / in_steady.len().max(1) as f64;
    let mut per_agent: HashMap<usize, usize> = HashMap::new();
    for r in &in_steady {
        if let Some(id) = agent_id(r) {
            *per_agent.entry(id).or_default() += 1;
        }
    }
    let mut counts: Vec<usize> = (0..n)
        .map(|i| per_agent.get(&i).copied().unwrap_or(0))
        .collect();
    counts.sort();
    // Recovery: each agent's first good answer after the outage.
    let mut recovered: HashMap<usize, Duration> = HashMap::new();
    for r in log
        .iter()
        .filter(|r| r.at >= up_from && matches!(r.status, Some(200) | Some(304)))
    {
        if let Some(id) = agent_id(r) {
            recovered.entry(id).or_insert(r.at.duration_since(up_from));
        }
    }
    let mut rec: Vec<Duration> = recovered.values().copied().collect();
    rec.sort();
    let outage_requests: usize = outage.iter().sum();
    let ticks = common::clk_tck();
    let agent_cpu = (cpu_after.saturating_sub(cpu_before)) as f64 / ticks;
    let server_cpu = (self_after.saturating_sub(self_before)) as f64 / ticks;
    let bound = MAX_BURST * mean_rate;
    let verdict = |max: usize| {
        if (max as f64) <= bound {
            "ok"
        } else {
            "MISSED"
        }
    };

    println!("### b. Fleet: {n} agents against one control plane");
    println!();
    println!(
        "Each agent: `keysync run` as user `{}`, interval {} s ± {} s, max_backoff {} s, its own state dir, \
         target file and health socket; one fake control plane (in the benchmark process, 2 tokio workers). \
         Started at ~100/s: {n} started in {:.1} s, {synced}/{n} had their keys {:.1} s after the first start.",
        run_as.name,
        INTERVAL.as_secs(),
        JITTER.as_secs(),
        MAX_BACKOFF.as_secs(),
        spawned_in.as_secs_f64(),
        all_synced_in.as_secs_f64()
    );
    println!();
    println!("| figure | value | target / baseline | verdict |");
    println!("|---|---:|---|---|");
    println!(
        "| requests per agent per interval (steady {} s) | {per_interval:.3} | 1 | {} |",
        STEADY.as_secs(),
        if (0.9..=1.1).contains(&per_interval) {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!(
        "| mean request rate | {mean_rate:.1}/s | n / interval = {:.1}/s | |",
        n as f64 / INTERVAL.as_secs_f64()
    );
    println!(
        "| steady: max one-second bucket | {steady_max} ({:.2}× mean; min {}, stdev {:.1}) | ≤ 3× mean = {bound:.0} | {} |",
        steady_max as f64 / mean_rate,
        steady.iter().min().unwrap_or(&0),
        stdev(&steady),
        verdict(steady_max)
    );
    println!(
        "| after the outage: max one-second bucket (first {} s) | {after_max} ({:.2}× steady mean) | ≤ 3× steady mean = {bound:.0} | {} |",
        AFTER.as_secs(),
        after_max as f64 / mean_rate,
        verdict(after_max)
    );
    println!(
        "| during the outage: requests (all 503) | {outage_requests} in {} s, max bucket {outage_max} ({:.2}× steady mean) | backoff: fewer than steady | {} |",
        OUTAGE.as_secs(),
        outage_max as f64 / mean_rate,
        verdict(outage_max)
    );
    println!(
        "| share of 304 answers (steady) | {:.1} % ({not_modified}/{}) | unchanged list: all but first fetches | |",
        share_304 * 100.0,
        in_steady.len()
    );
    println!(
        "| requests per agent in the steady window: min / median / max | {} / {} / {} | {:.0} expected | |",
        counts[0],
        counts[counts.len() / 2],
        counts[counts.len() - 1],
        STEADY.as_secs_f64() / INTERVAL.as_secs_f64()
    );
    if !rec.is_empty() {
        println!(
            "| recovery after the outage: first good answer p50 / p99 / max | {:.1} s / {:.1} s / {:.1} s ({} of {n} agents) | ≤ max_backoff + interval + jitter = {} s | {} |",
            percentile(&rec, 50.0).as_secs_f64(),
            percentile(&rec, 99.0).as_secs_f64(),
            rec[rec.len() - 1].as_secs_f64(),
            rec.len(),
            (MAX_BACKOFF + INTERVAL + JITTER).as_secs(),
            if rec.len() == n && rec[rec.len() - 1] <= MAX_BACKOFF + INTERVAL + JITTER {
                "ok"
            } else {
                "MISSED"
            }
        );
    }
    println!(
        "| memory per agent: RSS p50 / max | {} / {} | idle target < 10 MiB | {} |",
        mib(percentile(&rss, 50.0)),
        mib(rss[rss.len() - 1]),
        if percentile(&rss, 50.0) < 10 * 1024 {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!(
        "| memory per agent: PSS p50 / max | {} / {} | | |",
        mib(percentile(&pss, 50.0)),
        mib(pss[pss.len() - 1])
    );
    println!(
        "| memory per agent: drop of MemAvailable / agents | {} | | |",
        mib(per_agent_kib)
    );
    println!(
        "| threads per agent p50 / max | {} / {} | | |",
        percentile(&threads, 50.0),
        threads[threads.len() - 1]
    );
    println!(
        "| CPU, all agents together (steady) | {:.3} CPU-s per s = {:.0} µs per request | | |",
        agent_cpu / STEADY.as_secs_f64(),
        agent_cpu * 1e6 / in_steady.len().max(1) as f64
    );
    println!(
        "| CPU, the fake control plane (steady) | {:.3} CPU-s per s = {:.0} µs per request | | |",
        server_cpu / STEADY.as_secs_f64(),
        server_cpu * 1e6 / in_steady.len().max(1) as f64
    );
    println!(
        "| agents that exited on their own / needed SIGKILL at the end | {exited} / {killed} (stop took {:.1} s) | 0 / 0 | {} |",
        stop_took.as_secs_f64(),
        if exited == 0 && killed == 0 {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!();
    let scale = (steady_max.max(after_max).max(outage_max) as f64).max(1.0);
    println!("```");
    print!(
        "{}",
        histogram("requests per second, steady window:", &steady, scale, bound)
    );
    print!(
        "{}",
        histogram(
            "requests per second during the outage (all answered 503):",
            &outage,
            scale,
            bound
        )
    );
    print!(
        "{}",
        histogram(
            "requests per second after the control plane came back:",
            &after,
            scale,
            bound
        )
    );
    println!("```");
    println!();
}
