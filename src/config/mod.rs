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

//!
//! One file per stage: [`fragment`] (serde types and merging), [`validate`]
//! (defaults and cross-field rules) and [`settings`] (what the agent runs
//! with). This module loads files and holds the one set of default paths.

use std::path::{Path, PathBuf};

mod fragment;
mod settings;
#[cfg(test)]
mod tests;
mod validate;
mod values;

use fragment::Fragment;
pub use settings::{
    ApiKeySource, PolicySettings, Settings, SourceKind, SourceSettings, UserSettings, WriteMode,
    redact_url,
};
pub use values::{is_loopback_host, parse_duration, parse_size};

/// Where the main config lives unless `--config` or `KEYSYNC_CONFIG` says otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/keysync/config.toml";
/// The reference control plane's key list.
pub const DEFAULT_VAST_URL: &str = "https://console.vast.ai/api/v0/ssh/";
/// Cache, last-good state and the revoked keys file.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/keysync";
/// The health socket.
pub const DEFAULT_HEALTH_SOCKET: &str = "/run/keysync/health.sock";
/// At most one login-triggered refresh per this long (DESIGN.md §3, §7).
pub const DEFAULT_REFRESH_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

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
    validate::validate(merged, files)
}
