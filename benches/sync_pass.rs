//! One sync pass (DESIGN.md §9: under 100 ms at 10,000 keys, linear growth):
//! fetch from a control plane on loopback, validate, render, write.
//!
//! Each size is measured two ways, interleaved with a baseline in the same
//! run (the machines are shared and noisy, so ratios matter more than
//! absolute figures):
//! - in-process: `agent::run_once` against fresh state and target dirs, so
//!   every pass writes everything (the worst case: a new instance);
//! - baseline: a plain GET of the same body plus an atomic write of the
//!   same number of bytes (the I/O floor any agent pays).
//!
//! Then the whole process, as an operator runs it: `keysync run --once` as a
//! subprocess (fresh state, default log level, stderr discarded), its wall
//! time, CPU time and peak RSS from `wait4`, against `curl` fetching the same
//! list into a file (a process that only downloads).
//!
//! Run: `cargo bench --bench sync_pass` (sizes via KEYSYNC_BENCH_SIZES, e.g. "10,1000,10000,100000").

#[path = "../tests/it/support/fake_cp.rs"]
mod fake_cp;

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use fake_cp::{FakeControlPlane, gen_ed25519_keys};

fn config(dir: &std::path::Path, url: &str) -> String {
    format!(
        r#"state_dir = "{d}/state"
health_socket = "{d}/health.sock"
[sources.account]
kind = "vast"
url = "{url}"
api_key_env = "KEYSYNC_BENCH_API_KEY"
jitter = "0s"
max_body = "64MiB"
[[users]]
name = "root"
sources = ["account"]
path = "{d}/home/.ssh/authorized_keys"
"#,
        d = dir.display()
    )
}

async fn one_pass(url: &str) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config(dir.path(), url)).expect("config");
    let settings = keysync::config::load(&path).expect("config loads");
    let started = Instant::now();
    let ok = keysync::agent::run_once(settings).await;
    let took = started.elapsed();
    assert!(ok, "sync pass failed");
    let written =
        std::fs::read_to_string(dir.path().join("home/.ssh/authorized_keys")).expect("written");
    assert!(written.contains("# END keysync managed keys"));
    took
}

async fn baseline(client: &reqwest::Client, url: &str) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let body = client
        .get(url)
        .bearer_auth("bench")
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    let tmp = dir.path().join(".tmp");
    let mut f = std::fs::File::create(&tmp).expect("create");
    f.write_all(&body).expect("write");
    f.sync_all().expect("fsync");
    std::fs::rename(&tmp, dir.path().join("out")).expect("rename");
    std::fs::File::open(dir.path())
        .and_then(|d| d.sync_all())
        .expect("dir fsync");
    started.elapsed()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `keysync run --once` in a fresh directory, as a subprocess.
fn once_subprocess(url: &str) -> common::Finished {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config(dir.path(), url)).expect("config");
    let mut cmd = common::keysync_command(
        &["run", "--once", "--config", path.to_str().expect("utf-8")],
        None,
    );
    cmd.env("KEYSYNC_BENCH_API_KEY", "bench")
        .env_remove("KEYSYNC_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let done = common::run_measured(&cmd);
    assert!(done.success, "keysync run --once failed");
    done
}

/// `curl` downloading the list into a file; None without curl.
fn curl_subprocess(url: &str) -> Option<common::Finished> {
    let have_curl = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_curl {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sf", "-H", "Authorization: Bearer bench", "-o"])
        .arg(dir.path().join("list.json"))
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let done = common::run_measured(&cmd);
    done.success.then_some(done)
}

fn med<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // When re-run as the middleman of `common::run_measured`, only that.
    common::middleman();
    // SAFETY of set_var: single-threaded at this point, before any runtime starts.
    unsafe { std::env::set_var("KEYSYNC_BENCH_API_KEY", "bench") };
    let sizes: Vec<usize> = std::env::var("KEYSYNC_BENCH_SIZES")
        .unwrap_or_else(|_| "10,1000,10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = common::runtime();
    rt.block_on(async {
        let cp = FakeControlPlane::start().await;
        let client = reqwest::Client::new();
        println!("### c. One sync pass (fetch from loopback, validate, render, write)");
        println!();
        println!("Target: 10,000 keys under 100 ms; cost linear in keys. In process (`agent::run_once`, fresh state):");
        println!();
        println!("| keys | sync pass median | baseline (GET + atomic write) | ratio | per key |");
        println!("|---:|---:|---:|---:|---:|");
        let mut per_key = Vec::new();
        let mut processes = Vec::new();
        for &n in &sizes {
            cp.set_keys(gen_ed25519_keys(n));
            let rounds = if n >= 100_000 { 5 } else if n >= 10_000 { 15 } else { 30 };
            // Warm up both paths once.
            one_pass(&cp.url()).await;
            baseline(&client, &cp.url()).await;
            let (mut ours, mut base) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                ours.push(one_pass(&cp.url()).await);
                base.push(baseline(&client, &cp.url()).await);
            }
            let (m, b) = (median(&mut ours), median(&mut base));
            // The whole process, interleaved with curl.
            let runs = if n >= 100_000 { 3 } else if n >= 10_000 { 5 } else { 10 };
            let (mut once, mut curl) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                once.push(once_subprocess(&cp.url()));
                curl.extend(curl_subprocess(&cp.url()));
            }
            processes.push((n, once, curl));
            let pk = m.as_secs_f64() * 1e6 / n as f64;
            per_key.push((n, pk));
            println!(
                "| {n} | {:.2} ms | {:.2} ms | {:.1}x | {:.2} µs |",
                m.as_secs_f64() * 1e3,
                b.as_secs_f64() * 1e3,
                m.as_secs_f64() / b.as_secs_f64(),
                pk
            );
        }
        println!();
        println!(
            "`keysync run --once` as a process (median of 10 runs, 5 at 10,000 keys, 3 at 100,000), against `curl` \
             downloading the same list:"
        );
        println!();
        println!(
            "Peak RSS from `wait4`, measured from a small middleman process (floor of the method, the RSS of `true`: {}).",
            common::mib(common::measurement_floor())
        );
        println!();
        println!("| keys | wall | CPU | peak RSS | RSS over the 10-key run, per key | curl wall | curl peak RSS |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        let base_rss = processes.first().map(|(_, o, _)| med(o.iter().map(|f| f.max_rss_kib).collect()));
        for (n, once, curl) in &processes {
            let wall = med(once.iter().map(|f| f.wall).collect());
            let cpu = med(once.iter().map(|f| f.cpu).collect());
            let rss = med(once.iter().map(|f| f.max_rss_kib).collect());
            let per_key = match base_rss {
                Some(b) if *n > 10 => format!("{:.0} bytes", (rss.saturating_sub(b)) as f64 * 1024.0 / (*n as f64 - 10.0)),
                _ => "–".into(),
            };
            let (cw, cr) = if curl.is_empty() {
                ("–".to_string(), "–".to_string())
            } else {
                (
                    common::ms(med(curl.iter().map(|f| f.wall).collect())),
                    common::mib(med(curl.iter().map(|f| f.max_rss_kib).collect())),
                )
            };
            println!(
                "| {n} | {} | {} | {} | {per_key} | {cw} | {cr} |",
                common::ms(wall),
                common::ms(cpu),
                common::mib(rss)
            );
        }
        cp.shutdown().await;
    });
}
