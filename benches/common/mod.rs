//! Shared by the benchmarks of DESIGN.md §9 (`benches/*.rs`): spawning real
//! `keysync run` processes that die with the benchmark, reading a process's
//! memory, CPU time and context switches from `/proc`, a child's peak RSS
//! through `wait4`, and percentiles.
//!
//! Every agent a benchmark starts is killed when the benchmark ends, however
//! it ends: an [`Agents`] guard stops them on drop (also while unwinding
//! from a panic), each child asks the kernel for SIGKILL when the benchmark
//! process dies (`PR_SET_PDEATHSIG`, for a SIGKILL of the benchmark itself),
//! and their PIDs are written to `$KEYSYNC_BENCH_PIDS` (if set) so that
//! `bench/run.sh` can sweep up after an interrupted run.

#![allow(dead_code)]

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The config of one benchmark agent: state dir, `health.sock` and
/// `authorized_keys` in `dir`, the source `account` (the body of its
/// table: `kind = …` and the rest), and `user` in block mode.
pub fn agent_config(dir: &Path, source: &str, user: &str) -> String {
    format!(
        r#"state_dir = "{d}/state"
health_socket = "{d}/health.sock"

[sources.account]
{source}

[[users]]
name = "{user}"
sources = ["account"]
write = "block"
path = "{d}/authorized_keys"
"#,
        d = dir.display(),
    )
}

/// The vast source at `url`, with its API key from `KEYSYNC_BENCH_API_KEY`,
/// as the first lines of a source table.
pub fn vast_source(url: &str) -> String {
    format!("kind = \"vast\"\nurl = \"{url}\"\napi_key_env = \"KEYSYNC_BENCH_API_KEY\"")
}

/// The `keysync` binary cargo built for this benchmark (release settings).
/// The runtime that serves a benchmark's fake control plane.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A count from the environment variable `name`, or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn keysync_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keysync"))
}

/// Clock ticks per second of `/proc/PID/stat`'s CPU times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// An account to run agents as, so that their inotify instances (the kernel
/// allows 128 per user by default) do not use up those of whoever runs the
/// benchmark, and its other tests.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `nobody` when we are root, else ourselves (no switch).
    pub fn pick() -> RunAs {
        let me = nix::unistd::geteuid();
        if me.is_root()
            && let Ok(Some(u)) = nix::unistd::User::from_name("nobody")
        {
            return RunAs {
                name: u.name,
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            };
        }
        RunAs::pick_self()
    }

    /// Whoever runs the benchmark.
    pub fn pick_self() -> RunAs {
        let me = nix::unistd::geteuid();
        let u = nix::unistd::User::from_uid(me)
            .ok()
            .flatten()
            .expect("current user has a passwd entry");
        RunAs {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }
    }

    pub fn switches(&self) -> bool {
        self.uid != nix::unistd::geteuid().as_raw()
    }

    /// Makes `path` (a directory the benchmark created) the agent's.
    pub fn own(&self, path: &Path) {
        if self.switches() {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
                .expect("chown to the agents' user");
        }
    }
}

/// A command for `keysync ARGS` that dies with the benchmark.
pub fn keysync_command(args: &[&str], run_as: Option<&RunAs>) -> Command {
    let mut cmd = Command::new(keysync_bin());
    cmd.args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env("KEYSYNC_BENCH_API_KEY", "bench-token")
        .stdin(Stdio::null());
    if let Some(r) = run_as
        && r.switches()
    {
        // As root, std also drops the supplementary groups (setgroups(0)).
        cmd.uid(r.uid).gid(r.gid);
    }
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    // std applies the uid switch before this closure, and a uid switch would
    // clear the death signal, so it is set last.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Running agents, stopped on drop: SIGTERM, then SIGKILL after 5 s.
#[derive(Default)]
pub struct Agents {
    pub children: Vec<Child>,
    pids_file: Option<std::fs::File>,
}

impl Agents {
    pub fn new() -> Agents {
        let pids_file = std::env::var_os("KEYSYNC_BENCH_PIDS").and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        Agents {
            children: Vec::new(),
            pids_file,
        }
    }

    /// Starts `keysync run --config CONFIG`, stderr to `log`.
    pub fn spawn(&mut self, config: &Path, log: &Path, run_as: Option<&RunAs>) -> u32 {
        // Created by us; the agent only inherits the open descriptor.
        let log = std::fs::File::create(log).expect("agent log");
        let child = keysync_command(
            &["run", "--config", config.to_str().expect("utf-8 path")],
            run_as,
        )
        .env(
            "KEYSYNC_LOG",
            std::env::var("KEYSYNC_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn keysync run");
        let pid = child.id();
        if let Some(f) = self.pids_file.as_mut() {
            let _ = writeln!(f, "{pid}");
        }
        self.children.push(child);
        pid
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// How many have exited already (they never should).
    pub fn exited(&mut self) -> usize {
        let mut n = 0;
        for c in &mut self.children {
            n += usize::from(matches!(c.try_wait(), Ok(Some(_))));
        }
        n
    }

    /// SIGTERM to all, wait up to `grace`, SIGKILL the rest; reaps all.
    /// Returns how many needed SIGKILL.
    pub fn stop(&mut self, grace: Duration) -> usize {
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + grace;
        let mut killed = 0;
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        killed += 1;
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        self.children.clear();
        killed
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        if !self.children.is_empty() {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// One line of `/proc/PID/status` (`VmRSS:   1234 kB` -> 1234), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field(&text, field)
}

fn status_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Proportional set size (shared pages divided among their users), KiB.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    status_field(&text, "Pss")
}

/// utime + stime of the whole process (all threads, living and dead), in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Context switches per thread id: (voluntary, involuntary).
pub fn thread_switches(pid: u32) -> Vec<(u32, u64, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(entry.path().join("status")) {
            let v = status_field(&text, "voluntary_ctxt_switches").unwrap_or(0);
            let n = status_field(&text, "nonvoluntary_ctxt_switches").unwrap_or(0);
            out.push((tid, v, n));
        }
    }
    out
}

/// `MemAvailable` of the machine, KiB.
pub fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| status_field(&t, "MemAvailable"))
        .unwrap_or(0)
}

/// What `wait4` tells about a finished child.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    pub success: bool,
    pub wall: Duration,
    pub max_rss_kib: u64,
    pub cpu: Duration,
}

/// Set in the environment of a benchmark binary re-run as the middleman of
/// [`run_measured`].
const MIDDLEMAN: &str = "KEYSYNC_BENCH_MIDDLEMAN";

/// Spawns `cmd` and waits for it with `wait4`.
fn spawn_and_wait4(cmd: &mut Command) -> Finished {
    let started = Instant::now();
    let child = cmd.spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet reaped (std reaps only in wait/try_wait).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = started.elapsed();
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    // The Child is reaped now; dropping it does not wait again.
    drop(child);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Finished {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        wall,
        max_rss_kib: usage.ru_maxrss as u64,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
    }
}

/// Runs `cmd` to completion and reports its wall time, CPU time and peak
/// RSS. The peak comes from `wait4`, but not from this process's own child:
/// Linux counts in a child's `ru_maxrss` the RSS of the image it replaced at
/// exec, which for a child spawned from a benchmark holding 100,000 keys is
/// the benchmark's own hundreds of MiB. So a fresh, small copy of the
/// benchmark binary (the middleman, see [`middleman`]) spawns the command
/// and reports its rusage; the middleman's own RSS is the floor of what can
/// be measured this way ([`measurement_floor`]). Stdio of the command is
/// discarded.
pub fn run_measured(cmd: &Command) -> Finished {
    let mut m = Command::new(std::env::current_exe().expect("current_exe"));
    m.arg(cmd.get_program())
        .args(cmd.get_args())
        .env(MIDDLEMAN, "1");
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => m.env(k, v),
            None => m.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        m.current_dir(dir);
    }
    m.stdin(Stdio::null()).stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        m.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let out = m.output().expect("run the middleman");
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(f.len(), 4, "middleman said {text:?}");
    Finished {
        success: f[0] == 1,
        wall: Duration::from_nanos(f[1]),
        max_rss_kib: f[2],
        cpu: Duration::from_micros(f[3]),
    }
}

/// The smallest peak RSS [`run_measured`] can report: that of `true`, which
/// is the middleman's own.
pub fn measurement_floor() -> u64 {
    run_measured(&Command::new("true")).max_rss_kib
}

/// Call first in a benchmark's `main`: when this process is the middleman of
/// [`run_measured`], it runs the command given as arguments, prints
/// `success wall_ns max_rss_kib cpu_us`, and exits.
pub fn middleman() {
    if std::env::var_os(MIDDLEMAN).is_none() {
        return;
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let Some((program, rest)) = args.split_first() else {
        std::process::exit(2);
    };
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .env_remove(MIDDLEMAN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let done = spawn_and_wait4(&mut cmd);
    println!(
        "{} {} {} {}",
        u8::from(done.success),
        done.wall.as_nanos(),
        done.max_rss_kib,
        done.cpu.as_micros()
    );
    std::process::exit(0);
}

/// The `p`-th percentile (0..=100) of sorted values, nearest rank.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    assert!(!sorted.is_empty());
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Median of unsorted durations.
pub fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[s.len() / 2]
}
