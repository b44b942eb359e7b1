//! Stage 1 and 2 of the config: each file as written (every field optional,
//! unknown keys rejected by serde, values spanned for error lines), and the
//! merge of a later file into an earlier one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One config file as written. Every field is optional so a drop-in can set
/// just what it changes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Fragment {
    pub(super) state_dir: Option<Spanned<PathBuf>>,
    pub(super) health_socket: Option<Spanned<PathBuf>>,
    pub(super) refresh_min_interval: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) sources: BTreeMap<String, SourceFragment>,
    #[serde(default)]
    pub(super) users: Vec<UserFragment>,
    pub(super) policy: Option<PolicyFragment>,
    pub(super) metrics_textfile: Option<Spanned<PathBuf>>,
    pub(super) metrics_listen: Option<Spanned<String>>,
    /// The file that set `refresh_min_interval` (the one top-level value
    /// that is checked beyond its type), for error lines.
    #[serde(skip)]
    pub(super) origin: Option<PathBuf>,
}

pub(super) type Spanned<T> = toml::Spanned<T>;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SourceFragment {
    pub(super) kind: Option<Spanned<String>>,
    pub(super) url: Option<Spanned<String>>,
    pub(super) path: Option<Spanned<PathBuf>>,
    pub(super) api_key_file: Option<Spanned<PathBuf>>,
    pub(super) api_key_env: Option<Spanned<String>>,
    pub(super) interval: Option<Spanned<String>>,
    pub(super) jitter: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) subscribe_url: Option<Spanned<String>>,
    pub(super) resync: Option<Spanned<String>>,
    pub(super) max_body: Option<Spanned<String>>,
    pub(super) max_backoff: Option<Spanned<String>>,
    pub(super) ca_file: Option<Spanned<PathBuf>>,
    /// The keys of a `static` source (tests only).
    #[cfg(test)]
    pub(super) keys: Option<Vec<String>>,
    #[serde(skip)]
    pub(super) origin: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UserFragment {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    pub(super) sources: Option<Spanned<Vec<String>>>,
    pub(super) write: Option<Spanned<String>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) options: Option<Spanned<String>>,
    #[serde(skip)]
    pub(super) origin: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFragment {
    pub(super) min_rsa_bits: Option<Spanned<u32>>,
    pub(super) allowed_algorithms: Option<Spanned<Vec<String>>>,
    pub(super) allow_source_options: Option<bool>,
    pub(super) max_stale: Option<Spanned<String>>,
    pub(super) confirm_delay: Option<Spanned<String>>,
    pub(super) revoked_retention: Option<Spanned<String>>,
    pub(super) remove_revoked_copies: Option<bool>,
    #[serde(skip)]
    pub(super) origin: Option<PathBuf>,
}

/// Where a spanned value came from, for error messages.
pub(super) struct At<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
}

impl At<'_> {
    pub(super) fn line(&self, span: std::ops::Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }
}

/// The file a merged piece came from, with its text for line numbers.
pub(super) fn at_of<'a>(files: &[(&'a Path, &'a str)], origin: &Option<PathBuf>) -> At<'a> {
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
    pub(super) fn tag(&mut self, path: &Path) {
        self.origin = Some(path.to_path_buf());
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
    pub(super) fn merge(&mut self, later: Fragment) {
        if later.state_dir.is_some() {
            self.state_dir = later.state_dir;
        }
        if later.health_socket.is_some() {
            self.health_socket = later.health_socket;
        }
        if later.refresh_min_interval.is_some() {
            self.refresh_min_interval = later.refresh_min_interval;
            self.origin = later.origin;
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
        if later.metrics_textfile.is_some() {
            self.metrics_textfile = later.metrics_textfile;
        }
        if later.metrics_listen.is_some() {
            self.metrics_listen = later.metrics_listen;
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
        #[cfg(test)]
        take_later!(self, later; keys);
        // Errors in merged values point at the last file that touched the table.
        self.origin = later.origin;
    }
}

impl PolicyFragment {
    fn merge(&mut self, later: PolicyFragment) {
        take_later!(self, later; min_rsa_bits, allowed_algorithms, allow_source_options,
            max_stale, confirm_delay, revoked_retention, remove_revoked_copies);
        self.origin = later.origin;
    }
}
