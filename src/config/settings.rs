//! Stage 3 of the config: the validated settings the agent runs with, typed
//! (durations, sizes, enums), and their redacted rendering for `check-config`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keys::Policy;

/// The effective configuration the agent runs with.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The main config file this was loaded from.
    #[serde(skip)]
    pub config_path: PathBuf,
    /// Every file that contributed, main file first.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
    /// Cache and last-good state. Default `/var/lib/keysync`.
    pub state_dir: PathBuf,
    /// The health socket. Default `/run/keysync/health.sock`.
    pub health_socket: PathBuf,
    /// Login-triggered refresh (DESIGN.md §3): at most one per this long.
    /// Default 5 s; zero turns the feature off (`POST /refresh` answers 404).
    #[serde(with = "dur")]
    pub refresh_min_interval: Duration,
    pub sources: BTreeMap<String, SourceSettings>,
    pub users: Vec<UserSettings>,
    pub policy: PolicySettings,
    /// The metrics, also written to this file for node_exporter's textfile
    /// collector (a `*.prom` path). Off by default; read at start.
    pub metrics_textfile: Option<PathBuf>,
    /// The metrics, also served as plain HTTP `/metrics` on this address
    /// (e.g. `127.0.0.1:9273`). Off by default; read at start.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// One key source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceSettings {
    #[serde(skip)]
    pub name: String,
    #[serde(flatten)]
    pub kind: SourceKind,
    /// Poll interval. Default 60 s.
    #[serde(with = "dur")]
    pub interval: Duration,
    /// Uniform random offset in [-jitter, +jitter] added to each wait. Default 10 s.
    #[serde(with = "dur")]
    pub jitter: Duration,
    /// Whole-request timeout (connect, headers and body). Default 10 s.
    #[serde(with = "dur")]
    pub timeout: Duration,
    /// Largest accepted body in bytes. Default 4 MiB.
    pub max_body: u64,
    /// Cap of the failure backoff. Default 5 min.
    #[serde(with = "dur")]
    pub max_backoff: Duration,
    /// SSE stream whose events trigger a fetch (vast and http kinds).
    pub subscribe_url: Option<String>,
    /// Re-fetch period even while the stream is healthy. Default 10 min.
    #[serde(with = "dur")]
    pub resync: Duration,
    /// Extra CA bundle (PEM) for https.
    pub ca_file: Option<PathBuf>,
}

#[cfg(test)]
impl SourceSettings {
    /// A source of `kind` with the defaults of DESIGN.md §7 but no jitter,
    /// for unit tests.
    pub(crate) fn for_tests(name: &str, kind: SourceKind) -> SourceSettings {
        SourceSettings {
            name: name.into(),
            kind,
            interval: Duration::from_secs(60),
            jitter: Duration::ZERO,
            timeout: Duration::from_secs(10),
            max_body: 4 << 20,
            max_backoff: Duration::from_secs(300),
            subscribe_url: None,
            resync: Duration::from_secs(600),
            ca_file: None,
        }
    }
}

/// What a source reads.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceKind {
    /// The control-plane REST API (DESIGN.md §5).
    Vast { url: String, api_key: ApiKeySource },
    /// A URL whose body is in authorized_keys format.
    Http { url: String },
    /// A local file in authorized_keys format or one of the JSON forms.
    File { path: PathBuf },
    /// Keys given inline in the config. Tests only: it shows what a new kind
    /// takes (`src/source/fixed.rs` and one arm in `source::build`, plus
    /// its fields here and in `validate`).
    #[cfg(test)]
    Static { keys: Vec<String> },
}

impl SourceKind {
    pub fn name(&self) -> &'static str {
        match self {
            SourceKind::Vast { .. } => "vast",
            SourceKind::Http { .. } => "http",
            SourceKind::File { .. } => "file",
            #[cfg(test)]
            SourceKind::Static { .. } => "static",
        }
    }
}

/// Where the API key is looked up, in order (`crate::source::vast` reads
/// it). The key itself is read at each fetch (so a key file that appears
/// after start is picked up) and never stored in settings, printed or logged.
#[derive(Debug, Clone, Serialize)]
pub struct ApiKeySource {
    pub api_key_file: Option<PathBuf>,
    pub api_key_env: String,
}

/// How a user's keys reach sshd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// A managed block inside `~/.ssh/authorized_keys`.
    #[default]
    Block,
    /// The whole file `~/.ssh/authorized_keys.d/keysync`.
    Fragment,
    /// Only the cache the `authorized-keys` hook prints.
    None,
}

impl std::fmt::Display for WriteMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriteMode::Block => "block",
            WriteMode::Fragment => "fragment",
            WriteMode::None => "none",
        })
    }
}

impl WriteMode {
    /// The default path per mode, relative to the home.
    pub fn default_path(self) -> Option<&'static str> {
        match self {
            WriteMode::Block => Some("~/.ssh/authorized_keys"),
            WriteMode::Fragment => Some("~/.ssh/authorized_keys.d/keysync"),
            WriteMode::None => None,
        }
    }
}

/// One target user.
#[derive(Debug, Clone, Serialize)]
pub struct UserSettings {
    pub name: String,
    pub sources: Vec<String>,
    pub write: WriteMode,
    /// The file written, `~` standing for the user's home; None in `none` mode.
    pub path: Option<String>,
    /// Options prepended to every key of this user.
    pub options: Option<String>,
}

/// The key policy (DESIGN.md §6) plus the timing rules around it.
#[derive(Debug, Clone, Serialize)]
pub struct PolicySettings {
    #[serde(flatten)]
    pub keys: Policy,
    /// Remove a source's keys when its last good answer is older than this. Off by default.
    #[serde(with = "opt_dur")]
    pub max_stale: Option<Duration>,
    /// Delay of the second fetch that confirms a mass removal. Default 5 s.
    #[serde(with = "dur")]
    pub confirm_delay: Duration,
    /// How long a key deleted on the account stays in `revoked_keys`. Default 90 days.
    #[serde(with = "dur")]
    pub revoked_retention: Duration,
    /// Remove other writers' lines that carry a revoked key (for containers
    /// whose sshd cannot be given `RevokedKeys`). Default false: reported only.
    pub remove_revoked_copies: bool,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            keys: Policy::default(),
            max_stale: None,
            confirm_delay: Duration::from_secs(5),
            revoked_retention: Duration::from_secs(90 * 24 * 3600),
            remove_revoked_copies: false,
        }
    }
}

mod dur {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod opt_dur {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_str("off"),
        }
    }
}

impl Settings {
    /// The effective config as TOML, for `check-config`. Holds no secret:
    /// the API key is never part of the settings, and URL passwords are masked.
    pub fn to_redacted_toml(&self) -> String {
        let mut copy = self.clone();
        for source in copy.sources.values_mut() {
            match &mut source.kind {
                SourceKind::Vast { url, .. } | SourceKind::Http { url } => *url = redact_url(url),
                SourceKind::File { .. } => {}
                #[cfg(test)]
                SourceKind::Static { .. } => {}
            }
            if let Some(u) = &mut source.subscribe_url {
                *u = redact_url(u);
            }
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Masks a password in a URL's userinfo.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}
