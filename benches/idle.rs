//! Idle footprint (DESIGN.md §9: RSS under 10 MiB, no busy wake-ups) and the
//! size of the release binary.
//!
//! Daemons with nothing to do, side by side for the same window (default
//! 60 s, after 15 s to settle), against one fake control plane whose list
//! never changes:
//! - keysync, vast source, poll mode (interval 60 s ± 10 s, the defaults);
//! - keysync, vast source, subscribe mode (stream open, heartbeat every 15 s);
//! - keysync, file source only (no HTTP client at all);
//! - keysync over https, poll and subscribe mode: the same fake behind a TLS
//!   front (tokio-rustls, a throw-away CA made with the `openssl` command and
//!   given as `ca_file`), when `openssl` is installed: the TLS code a real
//!   control plane needs;
//! - baselines: `sleep` (the floor of any process) and a shell loop that
//!   curls the list every 60 s (the naive agent).
//!
//! Per process, from `/proc`: RSS (and its peak), threads, CPU seconds
//! (utime + stime, children included) over the window, and wake-ups:
//! voluntary + involuntary context switches summed over every thread seen
//! during the window (sampled each second, so a short-lived thread counts
//! up to its last sample).
//!
//! Run: `cargo bench --bench idle` (window via KEYSYNC_BENCH_IDLE_SECS). Prints markdown.

#[path = "../tests/it/support/fake_cp.rs"]
mod fake_cp;

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Agents, mib};
use fake_cp::{FakeControlPlane, fixture_keys};

const TOKEN: &str = "bench-token";
const SETTLE: Duration = Duration::from_secs(15);
/// Flagged as busy: more wake-ups per second than this (a timer of 500 ms or faster).
const BUSY_WAKEUPS_PER_S: f64 = 2.0;

/// A throw-away CA and a certificate for 127.0.0.1 signed by it, made with
/// the `openssl` command in `dir`: (CA file, certificate, key), or None
/// without openssl.
fn make_certs(dir: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .ok()?;
    let ca = [
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=keysync bench CA",
        ],
    ];
    let csr = [
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ];
    let sign = [
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ];
    (run(&ca.concat()) && run(&csr.concat()) && run(&sign)).then(|| {
        (
            dir.join("ca.pem"),
            dir.join("leaf.pem"),
            dir.join("leaf.key"),
        )
    })
}

/// A TLS front for the fake control plane (as a load balancer terminating
/// TLS would be): accepts TLS with `cert`/`key` on a free loopback port and
/// splices each connection to `upstream`. Returns its address.
async fn tls_front(
    cert: &Path,
    key: &Path,
    upstream: std::net::SocketAddr,
) -> Option<std::net::SocketAddr> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .ok()?
        .collect::<Result<_, _>>()
        .ok()?;
    let key = PrivateKeyDer::from_pem_file(key).ok()?;
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .ok()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
    let addr = listener.local_addr().ok()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    Some(addr)
}

/// utime + stime + cutime + cstime, in ticks.
fn cpu_with_children(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (11..15).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

struct Watched {
    label: String,
    pid: u32,
    /// tid -> (voluntary, involuntary) at first and last sight.
    first: HashMap<u32, (u64, u64)>,
    last: HashMap<u32, (u64, u64)>,
    rss_min: u64,
    rss_max: u64,
    cpu0: u64,
    cpu1: u64,
    threads: u64,
}

impl Watched {
    fn new(label: &str, pid: u32) -> Watched {
        Watched {
            label: label.into(),
            pid,
            first: HashMap::new(),
            last: HashMap::new(),
            rss_min: u64::MAX,
            rss_max: 0,
            cpu0: cpu_with_children(pid).unwrap_or(0),
            cpu1: 0,
            threads: 0,
        }
    }

    fn sample(&mut self) {
        let first_sample = self.last.is_empty();
        for (tid, v, n) in common::thread_switches(self.pid) {
            // A thread first seen mid-window started then: count it from 0.
            let start = if first_sample { (v, n) } else { (0, 0) };
            self.first.entry(tid).or_insert(start);
            self.last.insert(tid, (v, n));
        }
        if let Some(rss) = common::status_kib(self.pid, "VmRSS") {
            self.rss_min = self.rss_min.min(rss);
            self.rss_max = self.rss_max.max(rss);
        }
        self.threads = common::status_kib(self.pid, "Threads").unwrap_or(0);
    }

    fn wakeups(&self) -> (u64, u64) {
        let mut total = (0, 0);
        for (tid, (v1, n1)) in &self.last {
            let (v0, n0) = self.first.get(tid).copied().unwrap_or((0, 0));
            total.0 += v1.saturating_sub(v0);
            total.1 += n1.saturating_sub(n0);
        }
        total
    }
}

fn main() {
    let window = Duration::from_secs(
        std::env::var("KEYSYNC_BENCH_IDLE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let rt = common::runtime();
    let cp = rt.block_on(FakeControlPlane::start());
    cp.set_token(Some(TOKEN));
    let [alice, bob, _] = fixture_keys();
    cp.set_keys([alice, bob]);
    let work = tempfile::Builder::new()
        .prefix("keysync-idle.")
        .tempdir()
        .expect("tempdir");
    let user = common::RunAs::pick_self().name;
    let keys_file = work.path().join("keys.pub");
    std::fs::write(&keys_file, format!("{alice}\n{bob}\n")).expect("keys file");

    let vast = |tag: &str| {
        format!(
            "{}\ninterval = \"60s\"\njitter = \"10s\"",
            common::vast_source(&format!("{}?agent={tag}", cp.url()))
        )
    };
    let tls_dir = work.path().join("tls");
    std::fs::create_dir_all(&tls_dir).expect("mkdir");
    let tls = make_certs(&tls_dir).and_then(|(ca, cert, key)| {
        let front = rt.block_on(tls_front(&cert, &key, cp.addr()))?;
        Some((front, ca))
    });
    let mut setups = vec![
        ("keysync, poll mode (vast source)", vast("poll")),
        (
            "keysync, subscribe mode (vast source + SSE)",
            format!(
                "{}\nsubscribe_url = \"{}\"",
                vast("subscribe"),
                cp.events_url()
            ),
        ),
        (
            "keysync, file source only",
            format!("kind = \"file\"\npath = \"{}\"", keys_file.display()),
        ),
    ];
    if let Some((front, ca)) = &tls {
        let https = |tag: &str| {
            format!(
                "{}\nca_file = \"{}\"\ninterval = \"60s\"\njitter = \"10s\"",
                common::vast_source(&format!("https://{front}/api/v0/ssh/?agent={tag}")),
                ca.display()
            )
        };
        setups.push(("keysync, poll mode over https", https("https-poll")));
        setups.push((
            "keysync, subscribe mode over https",
            format!(
                "{}\nsubscribe_url = \"https://{front}/api/v0/ssh/events\"",
                https("https-subscribe")
            ),
        ));
    } else {
        eprintln!("(no openssl: the https variants are skipped)");
    }
    let mut agents = Agents::new();
    let mut watched = Vec::new();
    for (i, (label, source)) in setups.iter().enumerate() {
        let dir = work.path().join(format!("agent{i}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("config.toml"),
            common::agent_config(&dir, source, &user),
        )
        .expect("config");
        // The log level a service runs with.
        let pid = agents.spawn(&dir.join("config.toml"), &dir.join("agent.log"), None);
        watched.push((label.to_string(), pid));
    }
    // Baselines: they are plain processes; they die with us too.
    let mut baselines: Vec<Child> = Vec::new();
    let mut spawn_baseline = |label: &str, cmd: &mut Command| {
        // SAFETY: prctl is async-signal-safe.
        let child = unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        }
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn baseline");
        watched.push((label.to_string(), child.id()));
        baselines.push(child);
    };
    spawn_baseline(
        "baseline: `sleep` (an idle process)",
        Command::new("sleep").arg("100000"),
    );
    let curl = Path::new("/usr/bin/curl").exists();
    if curl {
        spawn_baseline(
            "baseline: `sh` loop, `curl` the list every 60 s",
            Command::new("sh").arg("-c").arg(format!(
                "while :; do curl -sf -o /dev/null -H 'Authorization: Bearer {TOKEN}' '{}?agent=curl'; sleep 60; done",
                cp.url()
            )),
        );
    }

    eprintln!(
        "== settling {} s, then watching {} s",
        SETTLE.as_secs(),
        window.as_secs()
    );
    std::thread::sleep(SETTLE);
    let mut w: Vec<Watched> = watched.iter().map(|(l, p)| Watched::new(l, *p)).collect();
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let from = Instant::now();
    while from.elapsed() < window {
        for x in &mut w {
            x.sample();
        }
        std::thread::sleep(Duration::from_secs(1).min(window.saturating_sub(from.elapsed())));
    }
    for x in &mut w {
        x.sample();
        x.cpu1 = cpu_with_children(x.pid).unwrap_or(0);
    }
    let elapsed = from.elapsed();
    let hwm: Vec<u64> = w
        .iter()
        .map(|x| common::status_kib(x.pid, "VmHWM").unwrap_or(0))
        .collect();
    let rss_detail: Vec<(u64, u64)> = w
        .iter()
        .map(|x| {
            (
                common::status_kib(x.pid, "RssAnon").unwrap_or(0),
                common::status_kib(x.pid, "RssFile").unwrap_or(0),
            )
        })
        .collect();
    let requests = cp.requests();
    let count = |tag: &str| {
        requests
            .iter()
            .filter(|r| r.at >= from && r.query.as_deref() == Some(&format!("agent={tag}")))
            .count()
    };
    let exited = agents.exited();
    agents.stop(Duration::from_secs(5));
    for mut b in baselines {
        let _ = b.kill();
        let _ = b.wait();
    }
    rt.block_on(cp.shutdown());

    let ticks = common::clk_tck();
    let secs = elapsed.as_secs_f64();
    println!("### d. Idle footprint over {:.0} s", secs);
    println!();
    println!(
        "Nothing changes on the control plane; {} s to settle first. Load average at the start: {}.",
        SETTLE.as_secs(),
        load0
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!(
        "| process | RSS (min–max) | peak RSS | anon / file | threads | CPU over the window | wake-ups (vol + invol) | requests | verdict |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for (i, x) in w.iter().enumerate() {
        let (v, n) = x.wakeups();
        let per_s = (v + n) as f64 / secs;
        let cpu = (x.cpu1.saturating_sub(x.cpu0)) as f64 / ticks;
        let is_agent = i < setups.len();
        let reqs = match x.label.as_str() {
            l if l.starts_with("keysync, poll mode over https") => count("https-poll").to_string(),
            l if l.starts_with("keysync, subscribe mode over https") => {
                count("https-subscribe").to_string()
            }
            l if l.starts_with("keysync, poll mode") => count("poll").to_string(),
            l if l.starts_with("keysync, subscribe mode") => count("subscribe").to_string(),
            l if l.contains("curl") => count("curl").to_string(),
            _ => "–".into(),
        };
        let verdict = if !is_agent {
            String::new()
        } else if x.rss_max < 10 * 1024 && per_s <= BUSY_WAKEUPS_PER_S {
            "ok".into()
        } else {
            format!(
                "MISSED ({}{})",
                if x.rss_max >= 10 * 1024 {
                    "RSS ≥ 10 MiB "
                } else {
                    ""
                },
                if per_s > BUSY_WAKEUPS_PER_S {
                    "busy"
                } else {
                    ""
                }
            )
        };
        println!(
            "| {} | {}–{} | {} | {} / {} | {} | {:.2} s ({:.3} %) | {v} + {n} = {:.2}/s | {reqs} | {verdict} |",
            x.label,
            mib(x.rss_min),
            mib(x.rss_max),
            mib(hwm[i]),
            mib(rss_detail[i].0),
            mib(rss_detail[i].1),
            x.threads,
            cpu,
            cpu * 100.0 / secs,
            per_s,
        );
    }
    println!();
    if exited > 0 {
        println!("**{exited} agent(s) exited during the run.**");
        println!();
    }

    // The binary.
    let bin = common::keysync_bin();
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    let copy = work.path().join("keysync.strip");
    let stripped = std::fs::copy(&bin, &copy)
        .ok()
        .and_then(|_| Command::new("strip").arg("-s").arg(&copy).status().ok())
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&copy).ok())
        .map(|m| m.len());
    println!("#### Binary size");
    println!();
    println!(
        "`{}` (release profile: lto = \"thin\", codegen-units = 4, strip = \"symbols\", panic = \"abort\"): \
         {} bytes ({:.2} MiB){}.",
        bin.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("keysync"),
        size,
        size as f64 / 1048576.0,
        match stripped {
            Some(s) => format!(
                "; after a further `strip -s`: {s} bytes ({:.2} MiB)",
                s as f64 / 1048576.0
            ),
            None => String::new(),
        }
    );
    if curl {
        let curl_size = std::fs::metadata("/usr/bin/curl")
            .map(|m| m.len())
            .unwrap_or(0);
        let lib = [
            "/usr/lib/x86_64-linux-gnu/libcurl.so.4",
            "/usr/lib/aarch64-linux-gnu/libcurl.so.4",
        ]
        .iter()
        .find_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .unwrap_or(0);
        println!(
            "For scale: `/usr/bin/curl` is {curl_size} bytes plus {:.2} MiB of libcurl (and its TLS, HTTP/2, … libraries).",
            lib as f64 / 1048576.0
        );
    }
    println!();
}
