//! The agent's observable state: what `/status`, `/readyz`, `/metrics`,
//! `keysync status` and systemd's `STATUS=` report (DESIGN.md §8).
//!
//! The loops update one shared [`Status`] behind a mutex (updates are rare
//! and tiny, so contention is not a concern) and the metrics registry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch, as JSON numbers.
pub fn unix_now() -> f64 {
    to_unix(SystemTime::now())
}

pub fn to_unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The whole status document (`GET /status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// Unix time the agent started.
    pub started_at: f64,
    pub uptime_seconds: f64,
    pub config: ConfigStatus,
    pub sources: BTreeMap<String, SourceStatus>,
    pub users: BTreeMap<String, UserStatus>,
    /// One line for an operator, also sent as systemd `STATUS=`.
    pub summary: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub path: PathBuf,
    pub loaded_at: f64,
    pub last_reload_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SourceStatus {
    pub kind: String,
    /// `poll` or `subscribe`.
    pub mode: String,
    pub last_attempt: Option<f64>,
    pub last_success: Option<f64>,
    pub last_error: Option<String>,
    pub etag: Option<String>,
    pub key_count: usize,
    /// A good answer is known (fresh or persisted).
    pub has_answer: bool,
    /// Whether the subscription stream is connected (subscribe mode).
    #[serde(default)]
    pub stream_connected: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserStatus {
    pub path: Option<PathBuf>,
    pub write_mode: String,
    pub fingerprints: Vec<String>,
    pub last_write: Option<f64>,
    pub drift_repairs: u64,
    pub last_error: Option<String>,
    /// Waiting for sources, or for the confirmation of a mass removal.
    pub pending: Option<String>,
}

impl Status {
    /// Ready: every source has a good answer and no user failed its last write.
    pub fn readiness(&self) -> Result<(), String> {
        let missing: Vec<&str> = self
            .sources
            .iter()
            .filter(|(_, s)| !s.has_answer)
            .map(|(n, _)| n.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "no good answer yet from source(s): {}",
                missing.join(", ")
            ));
        }
        let failed: Vec<String> = self
            .users
            .iter()
            .filter_map(|(n, u)| u.last_error.as_ref().map(|e| format!("{n}: {e}")))
            .collect();
        if !failed.is_empty() {
            return Err(format!("user write failed: {}", failed.join("; ")));
        }
        Ok(())
    }

    /// Recomputes the one-line summary.
    pub fn summarize(&mut self) {
        let keys: usize = self.users.values().map(|u| u.fingerprints.len()).sum();
        let failing: Vec<&str> = self
            .sources
            .iter()
            .filter(|(_, s)| s.last_error.is_some())
            .map(|(n, _)| n.as_str())
            .collect();
        let last = self
            .sources
            .values()
            .filter_map(|s| s.last_success)
            .fold(None, |acc: Option<f64>, t| {
                Some(acc.map_or(t, |a| a.max(t)))
            });
        let since = match last {
            Some(t) => format!("last success {:.0}s ago", (unix_now() - t).max(0.0)),
            None => "no success yet".to_string(),
        };
        self.summary = match self.readiness() {
            Ok(()) if failing.is_empty() => {
                format!(
                    "in sync: {keys} key(s) for {} user(s), {since}",
                    self.users.len()
                )
            }
            Ok(()) => format!(
                "serving last good keys ({keys}); failing source(s): {}; {since}",
                failing.join(", ")
            ),
            Err(why) => format!("not ready: {why}"),
        };
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    pub source: String,
    /// ok, unchanged, empty, error.
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UserLabels {
    pub user: String,
}

/// The Prometheus metrics of DESIGN.md §8, owned by the agent (no globals).
pub struct Metrics {
    pub registry: Registry,
    pub fetch_total: Family<FetchLabels, Counter>,
    pub last_success: Family<SourceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub keys: Family<UserLabels, Gauge>,
    pub writes_total: Family<UserLabels, Counter>,
    pub drift_repairs_total: Family<UserLabels, Counter>,
    pub fetch_duration: Family<SourceLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keysync");
        let fetch_total = Family::<FetchLabels, Counter>::default();
        let last_success =
            Family::<SourceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let keys = Family::<UserLabels, Gauge>::default();
        let writes_total = Family::<UserLabels, Counter>::default();
        let drift_repairs_total = Family::<UserLabels, Counter>::default();
        let fetch_duration = Family::<SourceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        registry.register("fetch", "Fetches by source and result", fetch_total.clone());
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last good answer per source",
            last_success.clone(),
        );
        registry.register("keys", "Keys managed per user", keys.clone());
        registry.register("writes", "Files written per user", writes_total.clone());
        registry.register(
            "drift_repairs",
            "Managed blocks re-asserted after another writer changed the file",
            drift_repairs_total.clone(),
        );
        registry.register(
            "fetch_duration_seconds",
            "Duration of fetches per source",
            fetch_duration.clone(),
        );
        Metrics {
            registry,
            fetch_total,
            last_success,
            keys,
            writes_total,
            drift_repairs_total,
            fetch_duration,
        }
    }
}

/// Every `result` label value of `keysync_fetch_total`.
pub const FETCH_RESULTS: [&str; 4] = ["ok", "unchanged", "empty", "error"];

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Makes the label sets follow the configured sources and users: every
    /// series of a configured one exists from the start (at 0, so `rate()`
    /// and alerts see it before its first event), and the series of one that
    /// a reload removed disappear.
    fn follow(&self, exported: &mut Exported, sources: BTreeSet<String>, users: BTreeSet<String>) {
        for gone in exported.sources.difference(&sources) {
            let labels = SourceLabels {
                source: gone.clone(),
            };
            self.last_success.remove(&labels);
            self.fetch_duration.remove(&labels);
            for result in FETCH_RESULTS {
                self.fetch_total.remove(&FetchLabels {
                    source: gone.clone(),
                    result: result.to_string(),
                });
            }
        }
        for gone in exported.users.difference(&users) {
            let labels = UserLabels { user: gone.clone() };
            self.keys.remove(&labels);
            self.writes_total.remove(&labels);
            self.drift_repairs_total.remove(&labels);
        }
        for source in &sources {
            // get_or_create hands out a read guard; only the creation matters.
            drop(self.fetch_duration.get_or_create(&SourceLabels {
                source: source.clone(),
            }));
            for result in FETCH_RESULTS {
                drop(self.fetch_total.get_or_create(&FetchLabels {
                    source: source.clone(),
                    result: result.to_string(),
                }));
            }
        }
        for user in &users {
            let labels = UserLabels { user: user.clone() };
            drop(self.keys.get_or_create(&labels));
            drop(self.writes_total.get_or_create(&labels));
            drop(self.drift_repairs_total.get_or_create(&labels));
        }
        exported.sources = sources;
        exported.users = users;
    }
}

/// The sources and users whose series `/metrics` currently carries.
#[derive(Default)]
struct Exported {
    sources: BTreeSet<String>,
    users: BTreeSet<String>,
}

/// How often the writer loop beats when systemd asks for no watchdog.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// The writer loop's heartbeat, which `/healthz` reports on. The writer is
/// the loop that does the work (and sends systemd's `WATCHDOG=1`), so a
/// writer stuck in a write or a deadlock shows up here too.
struct Heartbeat {
    origin: Instant,
    /// Milliseconds since `origin` of the last beat.
    last_ms: AtomicU64,
    /// The writer's beat period in milliseconds.
    period_ms: AtomicU64,
}

impl Heartbeat {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The handle the loops share.
#[derive(Clone)]
pub struct Shared {
    status: Arc<Mutex<Status>>,
    pub metrics: Arc<Metrics>,
    heartbeat: Arc<Heartbeat>,
    exported: Arc<Mutex<Exported>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    pub fn new() -> Self {
        let now = unix_now();
        Shared {
            status: Arc::new(Mutex::new(Status {
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at: now,
                ..Status::default()
            })),
            metrics: Arc::new(Metrics::default()),
            // Start-up counts as a beat: the writer starts after the state is restored.
            heartbeat: Arc::new(Heartbeat {
                origin: Instant::now(),
                last_ms: AtomicU64::new(0),
                period_ms: AtomicU64::new(millis(DEFAULT_HEARTBEAT)),
            }),
            exported: Arc::default(),
        }
    }

    /// Locks the status. A panic while holding it cannot leave it
    /// inconsistent in a way that matters for reporting, so poison is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy with uptime and summary freshly computed.
    pub fn snapshot(&self) -> Status {
        let mut s = self.lock().clone();
        s.uptime_seconds = (unix_now() - s.started_at).max(0.0);
        s.summarize();
        s
    }

    /// The metrics in OpenMetrics text (`openmetrics`, what Prometheus asks
    /// for) or else the classic Prometheus text format 0.0.4 (what `curl`,
    /// older scrapers and textfile collectors read). The series follow the
    /// configured sources and users.
    pub fn metrics_text(&self, openmetrics: bool) -> String {
        let text = self.openmetrics_text();
        if openmetrics {
            text
        } else {
            to_prometheus_text(&text)
        }
    }

    fn openmetrics_text(&self) -> String {
        let (sources, users) = {
            let status = self.lock();
            (
                status.sources.keys().cloned().collect(),
                status.users.keys().cloned().collect(),
            )
        };
        let mut exported = self.exported.lock().unwrap_or_else(|p| p.into_inner());
        self.metrics.follow(&mut exported, sources, users);
        self.metrics.encode()
    }

    /// The writer loop is alive and will beat again within `period`.
    pub fn beat(&self, period: Duration) {
        self.heartbeat
            .period_ms
            .store(millis(period), Ordering::Relaxed);
        self.heartbeat
            .last_ms
            .store(self.heartbeat.now_ms(), Ordering::Relaxed);
    }

    /// What `/readyz` and `keysync status --check` answer: the writer loop
    /// is alive, every source has a good answer and no user's write failed.
    /// A hung agent is not ready, even though its last state looked fine.
    pub fn ready(&self) -> Result<(), String> {
        self.liveness()?;
        self.snapshot().readiness()
    }

    /// Ok while the writer loop beats on time. Three missed beats (plus a
    /// second of slack for a loaded machine) count as stalled.
    pub fn liveness(&self) -> Result<(), String> {
        let period = self.heartbeat.period_ms.load(Ordering::Relaxed);
        let last = self.heartbeat.last_ms.load(Ordering::Relaxed);
        let age = self.heartbeat.now_ms().saturating_sub(last);
        if age > period.saturating_mul(3).saturating_add(1000) {
            return Err(format!(
                "the writer loop is stalled: last heartbeat {:.1}s ago, expected every {:.1}s",
                age as f64 / 1000.0,
                period as f64 / 1000.0
            ));
        }
        Ok(())
    }
}

/// OpenMetrics text to Prometheus text 0.0.4. The samples are the same;
/// what differs is that a counter family is named after its samples
/// (`keysync_fetch_total`, where OpenMetrics says `keysync_fetch`), and that
/// there is no `# UNIT` and no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters.contains(name).then(|| {
                format!("{prefix}{name}_total {tail}")
                    .trim_end()
                    .to_string()
            })
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counter_families_after_their_samples() {
        let metrics = Metrics::default();
        metrics
            .fetch_total
            .get_or_create(&FetchLabels {
                source: "a".into(),
                result: "ok".into(),
            })
            .inc();
        metrics
            .keys
            .get_or_create(&UserLabels {
                user: "root".into(),
            })
            .set(2);
        let om = metrics.encode();
        assert!(om.contains("# TYPE keysync_fetch counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = to_prometheus_text(&om);
        assert!(
            text.contains("# HELP keysync_fetch_total Fetches by source and result.\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE keysync_fetch_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("keysync_fetch_total{source=\"a\",result=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE keysync_keys gauge\nkeysync_keys{user=\"root\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn series_follow_configured_sources_and_users() {
        let shared = Shared::new();
        shared
            .lock()
            .users
            .insert("alice".into(), UserStatus::default());
        shared
            .lock()
            .sources
            .insert("acct".into(), SourceStatus::default());
        let text = shared.metrics_text(false);
        assert!(
            text.contains("keysync_drift_repairs_total{user=\"alice\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("keysync_fetch_total{source=\"acct\",result=\"error\"} 0\n"),
            "{text}"
        );
        shared.lock().users.clear();
        shared.lock().sources.clear();
        let text = shared.metrics_text(false);
        assert!(!text.contains("alice") && !text.contains("acct"), "{text}");
    }

    #[test]
    fn a_writer_that_stops_beating_is_reported() {
        let shared = Shared::new();
        shared.beat(Duration::from_millis(10));
        assert!(shared.liveness().is_ok());
        // Last beat 5 s ago with a 10 ms period: past three periods plus
        // the second of slack.
        let stale = Shared {
            heartbeat: Arc::new(Heartbeat {
                origin: Instant::now() - Duration::from_secs(5),
                last_ms: AtomicU64::new(0),
                period_ms: AtomicU64::new(10),
            }),
            ..shared
        };
        let why = stale.liveness().unwrap_err();
        assert!(why.contains("stalled"), "{why}");
        // Ready by its status, but a stalled writer is not ready.
        assert!(stale.snapshot().readiness().is_ok());
        assert!(stale.ready().unwrap_err().contains("stalled"));
    }
}
