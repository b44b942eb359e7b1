//! Configuration in three typed stages (DESIGN.md §7).
//!
//! 1. Each file (the main file, then `config.d/*.toml` in lexical order) is
//!    parsed on its own into a [`Fragment`], so syntax, type and unknown-key
//!    errors name the file, line and field.
//! 2. Fragments merge: tables key by key with the later value winning,
//!    `[[users]]` appended, and a user whose `name` matches an earlier one
//!    replaces it.
//! 3. The merged fragment is validated into [`Settings`] with defaults filled
//!    in: durations, sizes and URLs become typed values, and every cross
//!    reference (a user's sources) is checked.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keys::{DEFAULT_ALGORITHMS, Policy};

/// Where the main config lives unless `--config` or `KEYSYNC_CONFIG` says otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/keysync/config.toml";
/// The reference control plane's key list.
pub const DEFAULT_VAST_URL: &str = "https://console.vast.ai/api/v0/ssh/";

/// A config that cannot be used. The agent exits 2 at start, or keeps the
/// running config at reload and reports this.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax, type or unknown-key error: toml's message names line and field.
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A value that parses but is not acceptable.
    #[error("config file {path}, line {line}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

// ---------------------------------------------------------------------------
// Stage 1: fragments, exactly as written in one file.

/// One config file as written. Every field is optional so a drop-in can set
/// just what it changes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fragment {
    state_dir: Option<Spanned<PathBuf>>,
    health_socket: Option<Spanned<PathBuf>>,
    #[serde(default)]
    sources: BTreeMap<String, SourceFragment>,
    #[serde(default)]
    users: Vec<UserFragment>,
    policy: Option<PolicyFragment>,
}

type Spanned<T> = toml::Spanned<T>;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFragment {
    kind: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    path: Option<Spanned<PathBuf>>,
    api_key_file: Option<Spanned<PathBuf>>,
    api_key_env: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    subscribe_url: Option<Spanned<String>>,
    resync: Option<Spanned<String>>,
    max_body: Option<Spanned<String>>,
    max_backoff: Option<Spanned<String>>,
    ca_file: Option<Spanned<PathBuf>>,
    #[serde(skip)]
    origin: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFragment {
    name: Spanned<String>,
    #[serde(default)]
    sources: Option<Spanned<Vec<String>>>,
    write: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    options: Option<Spanned<String>>,
    #[serde(skip)]
    origin: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFragment {
    min_rsa_bits: Option<Spanned<u32>>,
    allowed_algorithms: Option<Spanned<Vec<String>>>,
    allow_source_options: Option<bool>,
    max_stale: Option<Spanned<String>>,
    confirm_delay: Option<Spanned<String>>,
    #[serde(skip)]
    origin: Option<PathBuf>,
}

/// Where a spanned value came from, for error messages.
struct At<'a> {
    path: &'a Path,
    text: &'a str,
}

impl At<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }
}

// ---------------------------------------------------------------------------
// Stage 3: validated settings.

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
    pub sources: BTreeMap<String, SourceSettings>,
    pub users: Vec<UserSettings>,
    pub policy: PolicySettings,
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
}

impl SourceKind {
    pub fn name(&self) -> &'static str {
        match self {
            SourceKind::Vast { .. } => "vast",
            SourceKind::Http { .. } => "http",
            SourceKind::File { .. } => "file",
        }
    }
}

/// Where the API key is looked up, in order. The key itself is read at each
/// fetch (so a key file that appears after start is picked up) and never
/// stored in settings, printed or logged.
#[derive(Debug, Clone, Serialize)]
pub struct ApiKeySource {
    pub api_key_file: Option<PathBuf>,
    pub api_key_env: String,
}

/// An API key. `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    /// The raw value, for the Authorization header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why no API key could be had.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error("cannot read api_key_file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no API key: api_key_file is missing or empty, and neither the {env} environment variable nor the systemd credential api-key is set"
    )]
    Missing { env: String },
}

impl ApiKeySource {
    /// Looks the key up: `api_key_file`, else the env var, else
    /// `$CREDENTIALS_DIRECTORY/api-key`. Surrounding whitespace is trimmed.
    pub fn resolve(&self) -> Result<Secret, ApiKeyError> {
        if let Some(path) = &self.api_key_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    warn_if_readable_by_others(path);
                    if let Some(key) = non_empty(text) {
                        return Ok(key);
                    }
                }
                // Not there (yet): the next places may have it, e.g. a
                // packaged default config used with LoadCredential=.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ApiKeyError::Read {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        if let Some(key) = std::env::var(&self.api_key_env).ok().and_then(non_empty) {
            return Ok(key);
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join("api-key");
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Some(key) = non_empty(text)
            {
                return Ok(key);
            }
        }
        Err(ApiKeyError::Missing {
            env: self.api_key_env.clone(),
        })
    }
}

fn non_empty(text: String) -> Option<Secret> {
    let trimmed = text.trim();
    (!trimmed.is_empty()).then(|| Secret(trimmed.to_string()))
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The key is read at every fetch; warn once per path, not every minute.
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
        && let Ok(mut warned) = WARNED.lock()
        && !warned.iter().any(|p| p == path)
    {
        warned.push(path.to_path_buf());
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o7777),
            "API key file is readable by group or others; chmod 600 it"
        );
    }
}

/// How a user's keys reach sshd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// A managed block inside `~/.ssh/authorized_keys`.
    Block,
    /// The whole file `~/.ssh/authorized_keys.d/keysync`.
    Fragment,
    /// Only the cache the `authorized-keys` hook prints.
    None,
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
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            keys: Policy::default(),
            max_stale: None,
            confirm_delay: Duration::from_secs(5),
        }
    }
}

mod dur {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod opt_dur {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_str("off"),
        }
    }
}

// ---------------------------------------------------------------------------
// Loading.

/// The main file's path: `--config`, else `$KEYSYNC_CONFIG`, else the default.
pub fn main_path(flag: Option<&Path>) -> PathBuf {
    if let Some(path) = flag {
        return path.to_path_buf();
    }
    match std::env::var_os("KEYSYNC_CONFIG") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(DEFAULT_CONFIG),
    }
}

/// The drop-in directory that belongs to a main file.
pub fn dropin_dir(main: &Path) -> PathBuf {
    main.parent()
        .unwrap_or_else(|| Path::new("."))
        .join("config.d")
}

/// The main file and its drop-ins, in merge order.
pub fn config_files(main: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let mut files = vec![main.to_path_buf()];
    let dir = dropin_dir(main);
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            let mut dropins: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
                .collect();
            // Lexical order of the file names, byte-wise.
            dropins.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
            files.extend(dropins);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    }
    Ok(files)
}

/// Loads, merges and validates the main file and its drop-ins.
pub fn load(main: &Path) -> Result<Settings, ConfigError> {
    let files = config_files(main)?;
    let mut texts = Vec::with_capacity(files.len());
    for path in &files {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        texts.push((path.clone(), text));
    }
    let refs: Vec<(&Path, &str)> = texts
        .iter()
        .map(|(p, t)| (p.as_path(), t.as_str()))
        .collect();
    let mut settings = from_texts(&refs)?;
    settings.config_path = main.to_path_buf();
    settings.files = files;
    Ok(settings)
}

/// Parses and merges the given (path, text) pairs in order, then validates.
pub fn from_texts(files: &[(&Path, &str)]) -> Result<Settings, ConfigError> {
    let mut merged = Fragment::default();
    for (path, text) in files {
        let mut fragment: Fragment = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        fragment.tag(path);
        merged.merge(fragment);
    }
    validate(merged, files)
}

/// The file a merged piece came from, with its text for line numbers.
fn at_of<'a>(files: &[(&'a Path, &'a str)], origin: &Option<PathBuf>) -> At<'a> {
    match files.iter().find(|(p, _)| Some(*p) == origin.as_deref()) {
        Some((path, text)) => At { path, text },
        None => At {
            path: Path::new("?"),
            text: "",
        },
    }
}

impl Fragment {
    /// Records which file each mergeable piece came from.
    fn tag(&mut self, path: &Path) {
        for source in self.sources.values_mut() {
            source.origin = Some(path.to_path_buf());
        }
        for user in &mut self.users {
            user.origin = Some(path.to_path_buf());
        }
        if let Some(policy) = &mut self.policy {
            policy.origin = Some(path.to_path_buf());
        }
    }

    /// Merges a later fragment into this one: later values win key by key.
    fn merge(&mut self, later: Fragment) {
        if later.state_dir.is_some() {
            self.state_dir = later.state_dir;
        }
        if later.health_socket.is_some() {
            self.health_socket = later.health_socket;
        }
        for (name, src) in later.sources {
            match self.sources.get_mut(&name) {
                Some(existing) => existing.merge(src),
                None => {
                    self.sources.insert(name, src);
                }
            }
        }
        for user in later.users {
            match self
                .users
                .iter_mut()
                .find(|u| u.name.get_ref() == user.name.get_ref())
            {
                Some(existing) => *existing = user,
                None => self.users.push(user),
            }
        }
        match (&mut self.policy, later.policy) {
            (Some(existing), Some(p)) => existing.merge(p),
            (slot @ None, Some(p)) => *slot = Some(p),
            (_, None) => {}
        }
    }
}

macro_rules! take_later {
    ($self:ident, $later:ident; $($field:ident),*) => {
        $( if $later.$field.is_some() { $self.$field = $later.$field; } )*
    };
}

impl SourceFragment {
    fn merge(&mut self, later: SourceFragment) {
        take_later!(self, later; kind, url, path, api_key_file, api_key_env, interval, jitter,
            timeout, subscribe_url, resync, max_body, max_backoff, ca_file);
        // Errors in merged values point at the last file that touched the table.
        self.origin = later.origin;
    }
}

impl PolicyFragment {
    fn merge(&mut self, later: PolicyFragment) {
        take_later!(self, later; min_rsa_bits, allowed_algorithms, allow_source_options,
            max_stale, confirm_delay);
        self.origin = later.origin;
    }
}

fn validate(merged: Fragment, files: &[(&Path, &str)]) -> Result<Settings, ConfigError> {
    let state_dir = merged
        .state_dir
        .map(|s| s.into_inner())
        .unwrap_or_else(|| PathBuf::from("/var/lib/keysync"));
    let health_socket = merged
        .health_socket
        .map(|s| s.into_inner())
        .unwrap_or_else(|| PathBuf::from("/run/keysync/health.sock"));

    let mut sources = BTreeMap::new();
    for (name, frag) in merged.sources {
        let at = at_of(files, &frag.origin);
        let settings = validate_source(&name, frag, &at)?;
        sources.insert(name, settings);
    }

    let policy = match merged.policy {
        Some(frag) => {
            let at = at_of(files, &frag.origin);
            validate_policy(frag, &at)?
        }
        None => PolicySettings::default(),
    };

    let mut users = Vec::new();
    for frag in merged.users {
        let at = at_of(files, &frag.origin);
        users.push(validate_user(frag, &sources, &at)?);
    }

    Ok(Settings {
        config_path: PathBuf::new(),
        files: Vec::new(),
        state_dir,
        health_socket,
        sources,
        users,
        policy,
    })
}

fn invalid<T>(
    at: &At<'_>,
    span: std::ops::Range<usize>,
    field: &str,
    message: impl Into<String>,
) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        path: at.path.to_path_buf(),
        line: at.line(span),
        field: field.to_string(),
        message: message.into(),
    })
}

fn duration(at: &At<'_>, field: &str, value: &Spanned<String>) -> Result<Duration, ConfigError> {
    match parse_duration(value.get_ref()) {
        Ok(d) => Ok(d),
        Err(message) => invalid(at, value.span(), field, message),
    }
}

fn positive(at: &At<'_>, field: &str, value: &Spanned<String>) -> Result<Duration, ConfigError> {
    let d = duration(at, field, value)?;
    if d.is_zero() {
        return invalid(at, value.span(), field, "must be greater than zero");
    }
    Ok(d)
}

/// Parses `"250ms"`, `"60s"`, `"10m"`, `"24h"`, `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like \"250ms\", \"60s\" or \"10m\" ({e})"))
}

/// Parses a byte size: `"4MiB"`, `"512KiB"`, `"1048576"`, `"2MB"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"4MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("{text:?}: unknown unit (use B, KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn validate_url(at: &At<'_>, field: &str, value: &Spanned<String>) -> Result<String, ConfigError> {
    let url = value.get_ref();
    match reqwest::Url::parse(url) {
        Ok(parsed) => match parsed.scheme() {
            "https" => Ok(url.clone()),
            "http" if is_loopback_host(&parsed) => Ok(url.clone()),
            "http" => invalid(
                at,
                value.span(),
                field,
                "plain http:// is allowed only to loopback addresses; use https://",
            ),
            other => invalid(
                at,
                value.span(),
                field,
                format!("unsupported scheme {other:?}"),
            ),
        },
        Err(e) => invalid(at, value.span(), field, format!("not a URL: {e}")),
    }
}

/// True for 127.0.0.0/8, ::1 and `localhost`.
pub fn is_loopback_host(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn validate_source(
    name: &str,
    f: SourceFragment,
    at: &At<'_>,
) -> Result<SourceSettings, ConfigError> {
    let field = |k: &str| format!("sources.{name}.{k}");
    let kind_name = f
        .kind
        .as_ref()
        .map(|k| k.get_ref().as_str())
        .unwrap_or("vast");
    let kind_span = f.kind.as_ref().map(|k| k.span()).unwrap_or(0..0);
    let kind = match kind_name {
        "vast" => {
            let url = match &f.url {
                Some(u) => validate_url(at, &field("url"), u)?,
                None => DEFAULT_VAST_URL.to_string(),
            };
            SourceKind::Vast {
                url,
                api_key: ApiKeySource {
                    api_key_file: f.api_key_file.as_ref().map(|p| p.get_ref().clone()),
                    api_key_env: f
                        .api_key_env
                        .as_ref()
                        .map(|e| e.get_ref().clone())
                        .unwrap_or_else(|| "VAST_API_KEY".to_string()),
                },
            }
        }
        "http" => match &f.url {
            Some(u) => SourceKind::Http {
                url: validate_url(at, &field("url"), u)?,
            },
            None => return invalid(at, kind_span, &field("url"), "an http source needs a url"),
        },
        "file" => match &f.path {
            Some(p) => SourceKind::File {
                path: p.get_ref().clone(),
            },
            None => return invalid(at, kind_span, &field("path"), "a file source needs a path"),
        },
        other => {
            return invalid(
                at,
                kind_span,
                &field("kind"),
                format!("unknown kind {other:?} (expected vast, http or file)"),
            );
        }
    };
    // Fields that only make sense for some kinds.
    if !matches!(kind, SourceKind::Vast { .. }) {
        for (key, span) in [
            ("api_key_file", f.api_key_file.as_ref().map(|v| v.span())),
            ("api_key_env", f.api_key_env.as_ref().map(|v| v.span())),
        ] {
            if let Some(span) = span {
                return invalid(
                    at,
                    span,
                    &field(key),
                    format!("not used by a {kind_name} source"),
                );
            }
        }
    }
    if !matches!(kind, SourceKind::File { .. })
        && let Some(p) = &f.path
    {
        return invalid(
            at,
            p.span(),
            &field("path"),
            "only a file source has a path",
        );
    }
    if matches!(kind, SourceKind::File { .. })
        && let Some(u) = &f.url
    {
        return invalid(
            at,
            u.span(),
            &field("url"),
            "a file source has a path, not a url",
        );
    }

    let opt =
        |v: &Option<Spanned<String>>, key: &str, default: Duration, must_be_positive: bool| match v
        {
            Some(v) if must_be_positive => positive(at, &field(key), v),
            Some(v) => duration(at, &field(key), v),
            None => Ok(default),
        };
    let interval = opt(&f.interval, "interval", Duration::from_secs(60), true)?;
    let jitter = opt(&f.jitter, "jitter", Duration::from_secs(10), false)?;
    let timeout = opt(&f.timeout, "timeout", Duration::from_secs(10), true)?;
    let resync = opt(&f.resync, "resync", Duration::from_secs(600), true)?;
    let max_backoff = opt(
        &f.max_backoff,
        "max_backoff",
        Duration::from_secs(300),
        true,
    )?;
    let max_body = match &f.max_body {
        Some(v) => match parse_size(v.get_ref()) {
            Ok(0) => {
                return invalid(
                    at,
                    v.span(),
                    &field("max_body"),
                    "must be greater than zero",
                );
            }
            Ok(n) => n,
            Err(m) => return invalid(at, v.span(), &field("max_body"), m),
        },
        None => 4 << 20,
    };
    let subscribe_url = match &f.subscribe_url {
        Some(u) if matches!(kind, SourceKind::File { .. }) => {
            return invalid(
                at,
                u.span(),
                &field("subscribe_url"),
                "a file source is watched, not subscribed",
            );
        }
        Some(u) => Some(validate_url(at, &field("subscribe_url"), u)?),
        None => None,
    };
    Ok(SourceSettings {
        name: name.to_string(),
        kind,
        interval,
        jitter,
        timeout,
        max_body,
        max_backoff,
        subscribe_url,
        resync,
        ca_file: f.ca_file.map(|p| p.into_inner()),
    })
}

fn validate_policy(f: PolicyFragment, at: &At<'_>) -> Result<PolicySettings, ConfigError> {
    let mut policy = PolicySettings::default();
    if let Some(bits) = f.min_rsa_bits {
        if *bits.get_ref() < 1024 {
            return invalid(
                at,
                bits.span(),
                "policy.min_rsa_bits",
                "must be at least 1024",
            );
        }
        policy.keys.min_rsa_bits = *bits.get_ref();
    }
    if let Some(algs) = f.allowed_algorithms {
        let mut list = Vec::new();
        for alg in algs.get_ref() {
            if alg == "ssh-dss" {
                return invalid(
                    at,
                    algs.span(),
                    "policy.allowed_algorithms",
                    "ssh-dss is never allowed",
                );
            }
            if !DEFAULT_ALGORITHMS.contains(&alg.as_str()) {
                return invalid(
                    at,
                    algs.span(),
                    "policy.allowed_algorithms",
                    format!(
                        "unknown algorithm {alg:?} (known: {})",
                        DEFAULT_ALGORITHMS.join(", ")
                    ),
                );
            }
            list.push(alg.clone());
        }
        policy.keys.allowed_algorithms = list;
    }
    if let Some(allow) = f.allow_source_options {
        policy.keys.allow_source_options = allow;
    }
    if let Some(v) = &f.max_stale {
        policy.max_stale = Some(positive(at, "policy.max_stale", v)?);
    }
    if let Some(v) = &f.confirm_delay {
        policy.confirm_delay = duration(at, "policy.confirm_delay", v)?;
    }
    Ok(policy)
}

fn validate_user(
    f: UserFragment,
    sources: &BTreeMap<String, SourceSettings>,
    at: &At<'_>,
) -> Result<UserSettings, ConfigError> {
    let name = f.name.get_ref().clone();
    let field = |k: &str| format!("users[{name}].{k}");
    if name.is_empty()
        || name.starts_with('-')
        || name.contains(['/', '\0'])
        || name == "."
        || name == ".."
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return invalid(
            at,
            f.name.span(),
            "users.name",
            format!("{name:?} is not a valid user name"),
        );
    }
    let (user_sources, sources_span) = match &f.sources {
        Some(s) => (s.get_ref().clone(), s.span()),
        None => {
            return invalid(
                at,
                f.name.span(),
                &field("sources"),
                "a user needs at least one source",
            );
        }
    };
    if user_sources.is_empty() {
        return invalid(
            at,
            sources_span,
            &field("sources"),
            "a user needs at least one source",
        );
    }
    for s in &user_sources {
        if !sources.contains_key(s) {
            return invalid(
                at,
                sources_span.clone(),
                &field("sources"),
                format!("names undefined source {s:?}"),
            );
        }
    }
    let write = match &f.write {
        Some(w) => match w.get_ref().as_str() {
            "block" => WriteMode::Block,
            "fragment" => WriteMode::Fragment,
            "none" => WriteMode::None,
            other => {
                return invalid(
                    at,
                    w.span(),
                    &field("write"),
                    format!("unknown mode {other:?} (expected block, fragment or none)"),
                );
            }
        },
        None => WriteMode::Block,
    };
    let path = match (&f.path, write) {
        (Some(p), WriteMode::None) => {
            return invalid(
                at,
                p.span(),
                &field("path"),
                "write = \"none\" writes no file in the home",
            );
        }
        (Some(p), _) => {
            let text = p.get_ref();
            if !(text.starts_with("~/") || text.starts_with('/')) {
                return invalid(
                    at,
                    p.span(),
                    &field("path"),
                    "must be absolute or start with ~/",
                );
            }
            if text.split('/').any(|c| c == "..") || text.ends_with('/') {
                return invalid(at, p.span(), &field("path"), "must name a file, without ..");
            }
            Some(text.clone())
        }
        (None, mode) => mode.default_path().map(str::to_string),
    };
    let options = match &f.options {
        Some(o) => {
            let text = o.get_ref().trim();
            if text.chars().any(|c| c.is_control()) || text.contains(' ') && !text.contains('"') {
                return invalid(
                    at,
                    o.span(),
                    &field("options"),
                    "options are one comma-separated list without spaces or control characters",
                );
            }
            (!text.is_empty()).then(|| text.to_string())
        }
        None => None,
    };
    Ok(UserSettings {
        name,
        sources: user_sources,
        write,
        path,
        options,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load_texts(files: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let owned: Vec<(PathBuf, &str)> =
            files.iter().map(|(p, t)| (PathBuf::from(p), *t)).collect();
        let refs: Vec<(&Path, &str)> = owned.iter().map(|(p, t)| (p.as_path(), *t)).collect();
        from_texts(&refs)
    }

    const MAIN: &str = r#"
state_dir = "/var/lib/keysync"

[sources.account]
kind = "vast"
api_key_env = "MY_KEY"
interval = "60s"

[[users]]
name = "root"
sources = ["account"]
"#;

    #[test]
    fn defaults_fill_in() {
        let s = load_texts(&[("/etc/keysync/config.toml", MAIN)]).unwrap();
        let src = &s.sources["account"];
        assert_eq!(src.interval, Duration::from_secs(60));
        assert_eq!(src.jitter, Duration::from_secs(10));
        assert_eq!(src.timeout, Duration::from_secs(10));
        assert_eq!(src.max_body, 4 << 20);
        assert_eq!(src.max_backoff, Duration::from_secs(300));
        assert_eq!(src.resync, Duration::from_secs(600));
        match &src.kind {
            SourceKind::Vast { url, api_key } => {
                assert_eq!(url, DEFAULT_VAST_URL);
                assert_eq!(api_key.api_key_env, "MY_KEY");
            }
            other => panic!("wrong kind {other:?}"),
        }
        assert_eq!(s.users[0].write, WriteMode::Block);
        assert_eq!(s.users[0].path.as_deref(), Some("~/.ssh/authorized_keys"));
        assert_eq!(s.health_socket, PathBuf::from("/run/keysync/health.sock"));
        assert_eq!(s.policy.keys.min_rsa_bits, 2048);
        assert_eq!(s.policy.confirm_delay, Duration::from_secs(5));
        assert!(s.policy.max_stale.is_none());
    }

    #[test]
    fn dropins_merge_key_by_key_later_wins_users_append_or_replace() {
        let d1 = r#"
[sources.account]
interval = "5s"
[[users]]
name = "alice"
sources = ["account"]
write = "fragment"
"#;
        let d2 = r#"
[sources.account]
jitter = "0s"
[sources.account2]
kind = "file"
path = "/etc/keys"
[[users]]
name = "root"
sources = ["account", "account2"]
write = "none"
"#;
        let s = load_texts(&[
            ("/m.toml", MAIN),
            ("/config.d/10-a.toml", d1),
            ("/config.d/20-b.toml", d2),
        ])
        .unwrap();
        let src = &s.sources["account"];
        // d1 set interval, d2 set jitter; the main file's api_key_env survives.
        assert_eq!(src.interval, Duration::from_secs(5));
        assert_eq!(src.jitter, Duration::ZERO);
        assert!(
            matches!(&src.kind, SourceKind::Vast { api_key, .. } if api_key.api_key_env == "MY_KEY")
        );
        // root replaced in place (keeps its position), alice appended.
        let names: Vec<_> = s.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["root", "alice"]);
        assert_eq!(s.users[0].write, WriteMode::None);
        assert_eq!(s.users[0].sources, ["account", "account2"]);
        assert_eq!(s.users[1].write, WriteMode::Fragment);
    }

    #[test]
    fn dropin_directory_is_read_in_lexical_order() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("config.toml");
        std::fs::write(&main, MAIN).unwrap();
        std::fs::create_dir(dir.path().join("config.d")).unwrap();
        std::fs::write(
            dir.path().join("config.d/b.toml"),
            "[sources.account]\ninterval = \"2s\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config.d/a.toml"),
            "[sources.account]\ninterval = \"1s\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("config.d/c.txt"), "not toml at all [").unwrap();
        let s = load(&main).unwrap();
        assert_eq!(s.sources["account"].interval, Duration::from_secs(2));
        assert_eq!(s.files.len(), 3);
    }

    #[test]
    fn unknown_key_names_file_line_and_field() {
        let bad = "state_dir = \"/x\"\n\n[policy]\nmin_rsa_bit = 2048\n";
        let err = load_texts(&[("/etc/keysync/config.toml", bad)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/keysync/config.toml"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("min_rsa_bit"), "{err}");
    }

    #[test]
    fn bad_duration_names_file_line_and_field() {
        let bad = MAIN.replace("interval = \"60s\"", "interval = \"soon\"");
        let err = load_texts(&[("/c.toml", &bad)]).unwrap_err().to_string();
        assert!(
            err.contains("/c.toml, line 7: sources.account.interval"),
            "{err}"
        );
        let zero = MAIN.replace("interval = \"60s\"", "interval = \"0s\"");
        let err = load_texts(&[("/c.toml", &zero)]).unwrap_err().to_string();
        assert!(err.contains("greater than zero"), "{err}");
    }

    #[test]
    fn sub_second_intervals_are_accepted() {
        let fast = MAIN.replace("interval = \"60s\"", "interval = \"250ms\"");
        let s = load_texts(&[("/c.toml", &fast)]).unwrap();
        assert_eq!(s.sources["account"].interval, Duration::from_millis(250));
    }

    #[test]
    fn undefined_source_is_an_error_in_the_dropin_that_names_it() {
        let d = "[[users]]\nname = \"bob\"\nsources = [\"nope\"]\n";
        let err = load_texts(&[("/m.toml", MAIN), ("/config.d/x.toml", d)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/config.d/x.toml, line 3"), "{err}");
        assert!(err.contains("undefined source \"nope\""), "{err}");
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for (url, ok) in [
            ("http://127.0.0.1:8080/api/v0/ssh/", true),
            ("http://[::1]:8080/x", true),
            ("http://localhost/x", true),
            ("http://10.0.0.1/x", false),
            ("http://example.com/x", false),
            ("https://example.com/x?q=1", true),
            ("ftp://example.com/x", false),
        ] {
            let text = MAIN.replace(
                "kind = \"vast\"",
                &format!("kind = \"vast\"\nurl = \"{url}\""),
            );
            assert_eq!(load_texts(&[("/c.toml", &text)]).is_ok(), ok, "{url}");
        }
    }

    #[test]
    fn url_kept_exactly_with_query() {
        let text = MAIN.replace(
            "kind = \"vast\"",
            "kind = \"vast\"\nurl = \"https://h.example/api/v0/ssh/?owner=me&x=1\"",
        );
        let s = load_texts(&[("/c.toml", &text)]).unwrap();
        assert!(
            matches!(&s.sources["account"].kind, SourceKind::Vast { url, .. } if url == "https://h.example/api/v0/ssh/?owner=me&x=1")
        );
    }

    #[test]
    fn ssh_dss_and_unknown_algorithms_refused() {
        let text =
            format!("{MAIN}\n[policy]\nallowed_algorithms = [\"ssh-ed25519\", \"ssh-dss\"]\n");
        assert!(
            load_texts(&[("/c.toml", &text)])
                .unwrap_err()
                .to_string()
                .contains("ssh-dss")
        );
        let text = format!(
            "{MAIN}\n[policy]\nallowed_algorithms = [\"ssh-ed25519\"]\nmax_stale = \"24h\"\n"
        );
        let s = load_texts(&[("/c.toml", &text)]).unwrap();
        assert_eq!(s.policy.keys.allowed_algorithms, ["ssh-ed25519"]);
        assert_eq!(s.policy.max_stale, Some(Duration::from_secs(86400)));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("2 KiB").unwrap(), 2048);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn check_config_output_has_no_secret_and_round_trips_kinds() {
        let text = MAIN.replace(
            "kind = \"vast\"",
            "kind = \"vast\"\nurl = \"https://u:hunter2@h.example/api/v0/ssh/\"",
        );
        let s = load_texts(&[("/c.toml", &text)]).unwrap();
        let out = s.to_redacted_toml();
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("kind = \"vast\""), "{out}");
        assert!(out.contains("interval = \"1m\""), "{out}");
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("sk-live-123".into());
        assert_eq!(format!("{s:?} {s}"), "Secret(<redacted>) <redacted>");
    }

    #[test]
    fn api_key_lookup_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        let src = ApiKeySource {
            api_key_file: Some(file),
            api_key_env: "KEYSYNC_TEST_NOT_SET_1".into(),
        };
        assert_eq!(src.resolve().unwrap().expose(), "from-file");
        let src = ApiKeySource {
            api_key_file: None,
            api_key_env: "KEYSYNC_TEST_NOT_SET_2".into(),
        };
        assert!(matches!(src.resolve(), Err(ApiKeyError::Missing { .. })));
    }

    #[test]
    fn every_shipped_example_config_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        for dir in ["examples", "packaging"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    from_texts(&[(&path, &text)])
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    seen += 1;
                }
            }
        }
        assert!(seen >= 1, "no example config found");
    }
}
