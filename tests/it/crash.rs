//! Crash consistency (DESIGN.md §4: "a reader sees the old file or the new
//! one, never a mix"). For at least 30 s the fake control plane flips between
//! two disjoint 300-key lists every 50 ms, so every flip is a mass removal the
//! agent must confirm; the real `keysync run` is SIGKILLed at random moments
//! (at least 30 times) and restarted, while a reader thread reads the target,
//! the hook cache and the persisted last-good state in a tight loop. Every
//! read must be whole: the foreign lines byte for byte around exactly one
//! block holding exactly one of the two lists. Afterwards the agent still
//! converges, and `.keysync.*` leftovers of the kills are gone after the next
//! start, even when that start has nothing to write.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::agent::Agent;
use crate::support::block::{BEGIN, END};
use crate::support::config::Config;
use crate::support::env::TestEnv;
use crate::support::fake_cp::{FakeControlPlane, gen_ed25519_keys};
use crate::support::files::temp_files;
use crate::support::scenario::Scenario;
use crate::support::{DEADLINE, eventually, sorted};

/// How long keys flip and the agent is killed, at the least.
const CHAOS: Duration = Duration::from_secs(30);
const MIN_KILLS: usize = 30;

/// Lines another writer owns, before and after the block.
const BEFORE: &str = "# added by the platform\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi platform@host\n";
const AFTER: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFRzugNBd+MDtj+CrHEVbfNBi8jOKFGD1yT48UoTK0oN by-hand\r\n";

/// Which of the two sorted lists `lines` is, if either.
fn which(lines: &[String], sets: &[Vec<String>; 2]) -> Option<usize> {
    let got = sorted(lines);
    sets.iter().position(|s| *s == got)
}

/// A whole target file: BEFORE, one block holding one of the lists, AFTER.
fn classify_target(bytes: &[u8], sets: &[Vec<String>; 2]) -> Result<usize, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let middle = text
        .strip_prefix(BEFORE)
        .ok_or("the foreign lines before the block are not intact")?
        .strip_suffix(AFTER)
        .ok_or("the foreign line after the block is not intact")?;
    let keys = middle
        .strip_prefix(&format!("{BEGIN}\n"))
        .ok_or("no BEGIN marker right after the foreign lines")?
        .strip_suffix(&format!("{END}\n"))
        .ok_or("no END marker right before the foreign line")?;
    let lines: Vec<String> = keys.lines().map(str::to_string).collect();
    if lines.iter().any(|l| l.starts_with("# ")) {
        return Err("a second marker inside the block".into());
    }
    which(&lines, sets)
        .ok_or_else(|| format!("the block holds {} keys of neither list", lines.len()))
}

/// The hook cache: exactly one of the lists, one key per line.
fn classify_cache(bytes: &[u8], sets: &[Vec<String>; 2]) -> Result<usize, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    if !text.ends_with('\n') {
        return Err("no final newline".into());
    }
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    which(&lines, sets).ok_or_else(|| format!("{} keys of neither list", lines.len()))
}

/// The persisted last good answer: valid JSON whose keys are one of the lists.
fn classify_state(bytes: &[u8], sets: &[Vec<String>; 2]) -> Result<usize, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("bad JSON: {e}"))?;
    let keys: Vec<String> = value["keys"]
        .as_array()
        .ok_or("no keys array")?
        .iter()
        .map(|k| k.as_str().unwrap_or_default().to_string())
        .collect();
    which(&keys, sets).ok_or_else(|| format!("{} keys of neither list", keys.len()))
}

/// Tells which list a file's bytes hold, or why they are torn.
type Classify = fn(&[u8], &[Vec<String>; 2]) -> Result<usize, String>;

/// What the reader saw.
#[derive(Default)]
struct Seen {
    reads: AtomicU64,
    /// Reads of the target that showed each list (proves both were written).
    target_a: AtomicU64,
    target_b: AtomicU64,
    torn: std::sync::Mutex<Vec<String>>,
}

/// Reads the three files in a tight loop until `stop`. The target starts
/// as `initial` (allowed until the first whole write is seen); the state
/// files may be absent until the agent first writes them.
fn reader(
    files: [PathBuf; 3],
    initial: Vec<u8>,
    sets: [Vec<String>; 2],
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
) {
    let [target, cache, state] = files;
    let mut target_written = false;
    let mut cache_written = false;
    let mut state_written = false;
    let torn = |what: String| {
        let mut list = seen.torn.lock().unwrap_or_else(|p| p.into_inner());
        if list.len() < 20 {
            list.push(what);
        } else if list.len() == 20 {
            list.push("…".into());
        }
    };
    while !stop.load(Ordering::Relaxed) {
        seen.reads.fetch_add(1, Ordering::Relaxed);
        match std::fs::read(&target) {
            Ok(bytes) if !target_written && bytes == initial => {}
            Ok(bytes) => match classify_target(&bytes, &sets) {
                Ok(i) => {
                    target_written = true;
                    let counter = if i == 0 {
                        &seen.target_a
                    } else {
                        &seen.target_b
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => torn(format!(
                    "target: {why}: {:?}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                )),
            },
            Err(e) => torn(format!("target unreadable: {e}")),
        }
        for (path, written, classify) in [
            (&cache, &mut cache_written, classify_cache as Classify),
            (&state, &mut state_written, classify_state),
        ] {
            match std::fs::read(path) {
                Ok(bytes) => {
                    *written = true;
                    if let Err(why) = classify(&bytes, &sets) {
                        torn(format!("{}: {why}", path.display()));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !*written => {}
                Err(e) => torn(format!("{} unreadable: {e}", path.display())),
            }
        }
    }
}

/// `.keysync.*` files in `dirs`.
fn temps(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter().flat_map(|d| temp_files(d)).collect()
}

/// Fast polls, fast backoff and a short confirmation: many flips and many
/// mass removals confirmed during the chaos.
fn config(env: &TestEnv, url: &str) -> Config {
    Config::vast(env, url)
        .set("interval", "50ms")
        .set("max_backoff", "200ms")
        .policy("confirm_delay", "10ms")
}

/// The agent, quiet: at debug level 600 flips of 300 keys would log gigabytes.
fn spawn(env: &TestEnv) -> Agent {
    env.spawn_with(|cmd| {
        cmd.env("KEYSYNC_LOG", "warn");
    })
}

fn holds(path: &Path, classify: Classify, sets: &[Vec<String>; 2], want: usize) -> bool {
    std::fs::read(path).is_ok_and(|b| classify(&b, sets) == Ok(want))
}

/// Flips the fake between the two lists every 50 ms until `stop`, from a
/// thread of its own (the fake is driven by plain synchronous calls);
/// returns the number of flips.
fn flipper(
    cp: Arc<FakeControlPlane>,
    lists: [Vec<String>; 2],
    stop: Arc<AtomicBool>,
) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            i += 1;
            cp.set_keys(lists[i % 2].clone());
        }
        i as u64
    })
}

/// What the kills did.
struct Kills {
    kills: usize,
    /// Kills after which a `.keysync.*` file was left.
    leaving_temps: usize,
    took: Duration,
}

/// SIGKILLs the agent at random moments (20 ms to 1 s apart), restarting
/// it each time, for [`CHAOS`] and [`MIN_KILLS`] at the least; returns the
/// agent still running.
fn kill_repeatedly(env: &TestEnv, temp_dirs: &[PathBuf]) -> (Agent, Kills) {
    let started = Instant::now();
    let (mut kills, mut leaving_temps) = (0usize, 0usize);
    let mut agent = spawn(env);
    while started.elapsed() < CHAOS || kills < MIN_KILLS {
        std::thread::sleep(Duration::from_millis(fastrand::u64(20..=1000)));
        assert!(
            agent.alive(),
            "the agent died on its own:\n{}",
            agent.log_tail()
        );
        agent.kill();
        kills += 1;
        if !temps(temp_dirs).is_empty() {
            leaving_temps += 1;
        }
        agent = spawn(env);
    }
    let took = started.elapsed();
    (
        agent,
        Kills {
            kills,
            leaving_temps,
            took,
        },
    )
}

/// A clean stop, then leftovers as a kill at the worst moment leaves them
/// (besides any the kills left): the next start removes them although
/// there is nothing to write, and leaves the target as it was.
fn leftovers_go_at_the_next_start(
    agent: Agent,
    env: &TestEnv,
    temp_dirs: &[PathBuf],
    still: impl Fn() -> bool,
) {
    let (status, _) = agent.stop(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    for dir in temp_dirs {
        std::fs::write(dir.join(".keysync.leftover"), b"half a file").expect("plant leftover");
    }
    let agent = spawn(env);
    let cleaned = eventually(DEADLINE, || temps(temp_dirs).is_empty());
    assert!(
        cleaned,
        "leftovers not removed at start: {:?}\n{}",
        temps(temp_dirs),
        agent.log_tail()
    );
    assert!(still(), "the target changed at the quiet start");
    let (status, _) = agent.stop(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert_eq!(
        temps(temp_dirs),
        Vec::<PathBuf>::new(),
        "temp files after a clean stop"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_never_tears_a_file() {
    let s = Scenario::new().await;
    s.cp.set_empty_is_404(false);
    s.run(|Scenario { cp, env }| {
        let all = gen_ed25519_keys(600);
        let lists = [all[..300].to_vec(), all[300..].to_vec()];
        let sets = [sorted(&lists[0]), sorted(&lists[1])];
        cp.set_keys(lists[0].clone());

        let target = env.target();
        let ssh = target.parent().expect("parent").to_path_buf();
        std::fs::create_dir_all(&ssh).expect("mkdir");
        // The platform's lines and an old block (a key of neither list) that
        // the agent takes over in place.
        let initial = format!("{BEFORE}{BEGIN}\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIQqCk/WCCVJSnO/aqHWoU9WSh+5VYPMIdi/n06c9h+i old\n{END}\n{AFTER}");
        std::fs::write(&target, &initial).expect("target");
        env.write_config(config(&env, &cp.url()));
        let cache = env.state_dir().join("users/root.keys");
        let state = env.state_dir().join("sources/account.json");
        let temp_dirs = [ssh.clone(), env.state_dir().join("users"), env.state_dir().join("sources")];

        let stop_reader = Arc::new(AtomicBool::new(false));
        let stop_flips = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let reader = {
            let files = [target.clone(), cache.clone(), state.clone()];
            let (initial, sets, stop, seen) = (
                initial.clone().into_bytes(),
                sets.clone(),
                stop_reader.clone(),
                seen.clone(),
            );
            std::thread::spawn(move || reader(files, initial, sets, stop, seen))
        };
        let cp = Arc::new(cp);
        let flip_thread = flipper(cp.clone(), lists.clone(), stop_flips.clone());

        let (agent, chaos) = kill_repeatedly(&env, &temp_dirs);
        stop_flips.store(true, Ordering::Relaxed);
        let flips = flip_thread.join().expect("flipper");

        // Calm: the last list is B or A; the agent (still running) converges
        // to it and the reader keeps checking meanwhile.
        let last = cp.keys();
        let want = which(&last, &sets).expect("the fake serves one of the lists");
        let converged = eventually(DEADLINE, || {
            holds(&target, classify_target, &sets, want)
                && holds(&cache, classify_cache, &sets, want)
                && holds(&state, classify_state, &sets, want)
        });
        stop_reader.store(true, Ordering::Relaxed);
        reader.join().expect("reader");
        let log = agent.log_text();
        assert!(converged, "no convergence after the chaos:\n{}", agent.log_tail());

        let reads = seen.reads.load(Ordering::Relaxed);
        let (saw_a, saw_b) = (seen.target_a.load(Ordering::Relaxed), seen.target_b.load(Ordering::Relaxed));
        eprintln!(
            "crash: {} SIGKILLs ({} left a temp file) in {:.1} s, {flips} flips, \
             {reads} read rounds (target showed A {saw_a}x, B {saw_b}x), 0 torn reads allowed",
            chaos.kills,
            chaos.leaving_temps,
            chaos.took.as_secs_f64()
        );
        let torn = seen.torn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert!(torn.is_empty(), "{} torn read(s):\n{}", torn.len(), torn.join("\n"));
        assert!(saw_a > 0 && saw_b > 0, "the target never showed both lists (A {saw_a}, B {saw_b}): nothing was tested");
        assert!(!log.contains("corrupt last good state"), "a kill corrupted the state:\n{}", agent.log_tail());

        leftovers_go_at_the_next_start(agent, &env, &temp_dirs, || {
            holds(&target, classify_target, &sets, want)
        });
    })
    .await;
}
