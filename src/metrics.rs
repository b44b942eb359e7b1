//! The Prometheus metrics of DESIGN.md §8, owned by the agent (no globals).
//!
//! Counters (fetches, writes, drift repairs, fetch durations) are counted by
//! the writer as things happen; gauges (keys per user, last success per
//! source) and the set of label values are taken from the published status
//! snapshot at each encoding, so a source or user removed by a reload
//! disappears from `/metrics` too.

use std::collections::BTreeSet;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::status::Status;

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    /// served, rate_limited, backoff, failed, off (see [`crate::status::RefreshStatus`]).
    pub result: String,
}

/// Every `result` label value of `keysync_refresh_total`.
pub(crate) const REFRESH_RESULTS: [&str; 5] =
    ["served", "rate_limited", "backoff", "failed", "off"];

/// The Prometheus metrics of DESIGN.md §8, owned by the agent (no globals).
pub struct Metrics {
    registry: Registry,
    pub fetch_total: Family<FetchLabels, Counter>,
    pub last_success: Family<SourceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub keys: Family<UserLabels, Gauge>,
    pub writes_total: Family<UserLabels, Counter>,
    pub drift_repairs_total: Family<UserLabels, Counter>,
    pub fetch_duration: Family<SourceLabels, Histogram>,
    pub revoked_copies: Family<UserLabels, Gauge>,
    /// Login-triggered refresh requests by what they got.
    pub refresh_total: Family<RefreshLabels, Counter>,
    /// The sources and users whose series are currently exported.
    exported: Mutex<Exported>,
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
        let revoked_copies = Family::<UserLabels, Gauge>::default();
        registry.register(
            "revoked_copies",
            "Lines of other writers in the user's file that carry a key deleted on the account",
            revoked_copies.clone(),
        );
        let refresh_total = Family::<RefreshLabels, Counter>::default();
        // Every result exists from the start, at 0.
        for result in REFRESH_RESULTS {
            drop(refresh_total.get_or_create(&RefreshLabels {
                result: result.to_string(),
            }));
        }
        registry.register(
            "refresh",
            "Login-triggered refresh requests (POST /refresh) by result",
            refresh_total.clone(),
        );
        Metrics {
            registry,
            fetch_total,
            last_success,
            keys,
            writes_total,
            drift_repairs_total,
            fetch_duration,
            revoked_copies,
            refresh_total,
            exported: Mutex::default(),
        }
    }
}

/// Every `result` label value of `keysync_fetch_total`.
const FETCH_RESULTS: [&str; 4] = ["ok", "unchanged", "empty", "error"];

impl Metrics {
    /// The metrics of the agent whose status is `status`, in OpenMetrics
    /// text (`openmetrics`, what Prometheus asks for) or else the classic
    /// Prometheus text format 0.0.4 (what `curl`, older scrapers and the
    /// textfile collector read).
    pub fn text(&self, status: &Status, openmetrics: bool) -> String {
        {
            let mut exported = self.exported.lock().unwrap_or_else(|p| p.into_inner());
            self.follow(
                &mut exported,
                status.sources.keys().cloned().collect(),
                status.users.keys().cloned().collect(),
            );
        }
        for (name, source) in &status.sources {
            if let Some(t) = source.last_success {
                self.last_success
                    .get_or_create(&SourceLabels {
                        source: name.clone(),
                    })
                    .set(t);
            }
        }
        for (name, user) in &status.users {
            let count = i64::try_from(user.fingerprints.len()).unwrap_or(i64::MAX);
            self.keys
                .get_or_create(&UserLabels { user: name.clone() })
                .set(count);
            self.revoked_copies
                .get_or_create(&UserLabels { user: name.clone() })
                .set(i64::try_from(user.revoked_copies).unwrap_or(i64::MAX));
        }
        let text = self.encode();
        if openmetrics {
            text
        } else {
            to_prometheus_text(&text)
        }
    }

    fn encode(&self) -> String {
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
            self.revoked_copies.remove(&labels);
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

/// OpenMetrics text to Prometheus text 0.0.4. The samples are the same;
/// what differs is that a counter family is named after its samples
/// (`keysync_fetch_total`, where OpenMetrics says `keysync_fetch`), and that
/// there is no `# UNIT` and no `# EOF`.
fn to_prometheus_text(openmetrics: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{SourceStatus, UserStatus};

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
        let metrics = Metrics::default();
        let mut status = Status::default();
        status.users.insert("alice".into(), UserStatus::default());
        status
            .sources
            .insert("acct".into(), SourceStatus::default());
        let text = metrics.text(&status, false);
        assert!(
            text.contains("keysync_drift_repairs_total{user=\"alice\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("keysync_fetch_total{source=\"acct\",result=\"error\"} 0\n"),
            "{text}"
        );
        let text = metrics.text(&Status::default(), false);
        assert!(!text.contains("alice") && !text.contains("acct"), "{text}");
    }

    #[test]
    fn refresh_results_are_exported_from_the_start() {
        let metrics = Metrics::default();
        metrics
            .refresh_total
            .get_or_create(&RefreshLabels {
                result: "served".into(),
            })
            .inc();
        let text = metrics.text(&Status::default(), false);
        assert!(
            text.contains("# TYPE keysync_refresh_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("keysync_refresh_total{result=\"served\"} 1\n"),
            "{text}"
        );
        for result in REFRESH_RESULTS.iter().filter(|r| **r != "served") {
            assert!(
                text.contains(&format!("keysync_refresh_total{{result=\"{result}\"}} 0\n")),
                "{text}"
            );
        }
    }
}
