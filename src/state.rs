//! What the agent keeps in `state_dir` (DESIGN.md §2, §4):
//!
//! - `sources/<name>.json`: each source's last good answer (keys, ETag, time),
//!   so a restart without network serves the last good keys. Root only, 0600.
//! - `users/<user>.keys`: the per-user cache the `authorized-keys` hook
//!   prints, in authorized_keys format, 0640, group `keysync` when it exists.
//! - `revoked_keys`: the OpenSSH `RevokedKeys` file, 0644 (sshd reads it
//!   before any key file; missing, it refuses every key, so it is made at
//!   start and only ever replaced atomically), with `revoked.json` beside it
//!   recording when each key was revoked, for `policy.revoked_retention`.
//! - `written.json`: what the agent last wrote for each user (mode, file),
//!   so a start after a config change removes what the new config no longer
//!   asks for.
//! - `users/<user>.fpr`: beside it, the index of its lines by fingerprint
//!   (src/cache_index.rs), written after the cache; the hook believes it
//!   only while it names the cache file it opened.
//!
//! Persisted keys are validated again on load with the current policy, so a
//! tampered or older state file cannot bring in a key the policy refuses.
//! The record also names the key policy its list was filtered with: under
//! another policy its ETag is dropped, because a key the old policy refused
//! is not in the record, and a conditional fetch would answer 304 and never
//! bring it (DESIGN.md §5: a change of policy drops the remembered ETags).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::unistd::{Gid, Group, Uid};
use serde::{Deserialize, Serialize};

use crate::cache_index::{self, Identity};
use crate::keys::{KeySet, Policy, parse_entries};
use crate::write::{self, FileSpec, Outcome, WriteError};

/// Name of the group that may read the caches (the AuthorizedKeysCommandUser).
pub(crate) const GROUP: &str = "keysync";

/// A source's last good answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LastGood {
    pub keys: KeySet,
    pub etag: Option<String>,
    /// When the answer that established these keys (or confirmed them with a 304) arrived.
    pub fetched_at: SystemTime,
}

#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    fetched_at_unix_ms: u64,
    #[serde(default)]
    etag: Option<String>,
    /// The key policy `keys` passed; a record without one (older agents)
    /// counts as made under another policy.
    #[serde(default)]
    policy: Option<Policy>,
    keys: Vec<String>,
}

/// Keys revoked by an authoritative answer: `"<algorithm> <blob>"` to the
/// Unix time (ms) of the revocation.
pub(crate) type Revoked = std::collections::BTreeMap<String, u64>;

/// What was written for one user, as `written.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Written {
    pub write: crate::config::WriteMode,
    /// The home file (block or fragment mode), expanded.
    pub path: Option<PathBuf>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    root: PathBuf,
    group: Option<Gid>,
}

impl StateDir {
    pub(crate) fn new(root: impl Into<PathBuf>) -> Self {
        let group = Group::from_name(GROUP).ok().flatten().map(|g| g.gid);
        StateDir {
            root: root.into(),
            group,
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directory (0750, group keysync when it exists) if missing.
    pub(crate) fn ensure(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !self.root.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(&self.root)?;
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o750))?;
            if let Some(gid) = self.group
                && nix::unistd::geteuid().is_root()
            {
                nix::unistd::chown(&self.root, None, Some(gid)).map_err(std::io::Error::from)?;
            }
        }
        Ok(())
    }

    pub(crate) fn source_path(&self, name: &str) -> PathBuf {
        self.root
            .join("sources")
            .join(format!("{}.json", file_safe(name)))
    }

    pub(crate) fn cache_path(&self, user: &str) -> PathBuf {
        cache_path(&self.root, user)
    }

    pub(crate) fn index_path(&self, user: &str) -> PathBuf {
        index_path(&self.root, user)
    }

    /// Loads a source's last good answer; None when there is none or it is
    /// unreadable (logged).
    pub(crate) fn load_source(&self, name: &str, policy: &Policy) -> Option<LastGood> {
        let path = self.source_path(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the last good state of source {name} at {} ({e}); starting without it", path.display());
                return None;
            }
        };
        let record: Record = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring the corrupt last good state of source {name} at {} ({e})", path.display());
                return None;
            }
        };
        let (keys, rejected) = parse_entries(record.keys.iter().map(String::as_str), policy);
        for r in rejected {
            tracing::warn!(source = name, %r, "a persisted key of source {name} no longer passes the policy, dropped: {r}");
        }
        let mut etag = record.etag;
        if etag.is_some() && record.policy.as_ref() != Some(policy) {
            tracing::info!(
                source = name,
                "the key policy changed since source {name}'s last good list was fetched; dropping its ETag so that the next fetch brings the whole list, with any key the new policy allows"
            );
            etag = None;
        }
        Some(LastGood {
            keys,
            etag,
            fetched_at: UNIX_EPOCH + Duration::from_millis(record.fetched_at_unix_ms),
        })
    }

    /// Persists a source's last good answer, filtered with `policy`, atomically.
    pub(crate) fn save_source(
        &self,
        name: &str,
        good: &LastGood,
        policy: &Policy,
    ) -> Result<Outcome, WriteError> {
        let record = Record {
            version: 1,
            fetched_at_unix_ms: good
                .fetched_at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            etag: good.etag.clone(),
            policy: Some(policy.clone()),
            keys: good.keys.keys().iter().map(|k| k.line(None)).collect(),
        };
        // Serializing plain strings and numbers cannot fail.
        let bytes = serde_json::to_vec_pretty(&record).unwrap_or_default();
        let spec = FileSpec {
            path: self.source_path(name),
            base: self.root.clone(),
            owner: Some((Uid::from_raw(0), Gid::from_raw(0))),
            act_as: None,
            file_mode: 0o600,
            dir_mode: 0o700,
        };
        write::apply(&spec, &mut |_| Some(bytes.clone()))
    }

    /// A file beside the caches, readable by the hook's group.
    fn hook_file(&self, path: PathBuf) -> FileSpec {
        FileSpec {
            path,
            base: self.root.clone(),
            owner: Some((Uid::from_raw(0), self.group.unwrap_or(Gid::from_raw(0)))),
            act_as: None,
            file_mode: 0o640,
            dir_mode: 0o750,
        }
    }

    /// Writes a user's cache (the hook's answer).
    pub(crate) fn save_cache(&self, user: &str, content: &[u8]) -> Result<Outcome, WriteError> {
        let spec = self.hook_file(self.cache_path(user));
        write::apply(&spec, &mut |_| Some(content.to_vec()))
    }

    /// Writes the fingerprint index of the cache just written, whose lines
    /// are `lines` with the keys of `keys`, in order. A failure leaves a
    /// stale index, which the hook does not believe (it reads the cache),
    /// so it costs speed, never correctness: it is logged, not reported.
    pub(crate) fn save_index(&self, user: &str, lines: &[String], keys: &KeySet) {
        let path = self.index_path(user);
        let index = std::fs::metadata(self.cache_path(user))
            .ok()
            .and_then(|meta| {
                let fingerprints = keys.keys().iter().map(|k| k.fingerprint.as_str());
                cache_index::render(Identity::of(&meta), lines, fingerprints)
            });
        // Without an index the hook reads the whole cache: slower, as right.
        if let Err(e) = write::apply(&self.hook_file(path.clone()), &mut |_| index.clone()) {
            tracing::warn!(user, path = %path.display(), error = %e, "cannot write the fingerprint index of user {user} ({e}); the hook reads the whole cache instead");
        }
    }

    /// Removes the cache (and its index) of a user no longer configured.
    pub(crate) fn remove_cache(&self, user: &str) -> Result<Outcome, WriteError> {
        let index = self.hook_file(self.index_path(user));
        if let Err(e) = write::apply(&index, &mut |_| None) {
            tracing::warn!(user, path = %index.path.display(), error = %e, "cannot remove the fingerprint index of removed user {user}: {e}");
        }
        write::apply(&self.hook_file(self.cache_path(user)), &mut |_| None)
    }

    fn root_file(&self, name: &str, mode: u32) -> FileSpec {
        FileSpec {
            path: self.root.join(name),
            base: self.root.clone(),
            owner: Some((Uid::from_raw(0), Gid::from_raw(0))),
            act_as: None,
            file_mode: mode,
            dir_mode: 0o750,
        }
    }

    /// Makes `revoked_keys` exist (empty) if it does not: sshd refuses every
    /// public key while the file its `RevokedKeys` names is missing.
    pub(crate) fn ensure_revoked_keys(&self) -> Result<Outcome, WriteError> {
        let spec = self.root_file("revoked_keys", 0o644);
        write::apply(&spec, &mut |cur| {
            Some(cur.map(<[u8]>::to_vec).unwrap_or_default())
        })
    }

    /// The revoked keys and when each was revoked; empty when unknown.
    pub(crate) fn load_revoked(&self) -> Revoked {
        let path = self.root.join("revoked.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring corrupt {}: {e}", path.display());
                Revoked::new()
            }),
            Err(_) => Revoked::new(),
        }
    }

    /// Writes `revoked_keys` (what sshd reads) and `revoked.json` (the times).
    pub(crate) fn save_revoked(&self, revoked: &Revoked) -> Result<(), WriteError> {
        let keys = crate::render::revoked_keys(revoked.keys().map(String::as_str));
        write::apply(&self.root_file("revoked_keys", 0o644), &mut |_| {
            Some(keys.clone())
        })?;
        // Serializing strings and numbers cannot fail.
        let json = serde_json::to_vec_pretty(revoked).unwrap_or_default();
        write::apply(&self.root_file("revoked.json", 0o600), &mut |_| {
            Some(json.clone())
        })?;
        Ok(())
    }

    /// What was last written for each user (see [`Written`]).
    pub(crate) fn load_written(&self) -> std::collections::BTreeMap<String, Written> {
        std::fs::read(self.root.join("written.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub(crate) fn save_written(
        &self,
        written: &std::collections::BTreeMap<String, Written>,
    ) -> Result<Outcome, WriteError> {
        // Serializing strings and enums cannot fail.
        let json = serde_json::to_vec_pretty(written).unwrap_or_default();
        write::apply(&self.root_file("written.json", 0o600), &mut |_| {
            Some(json.clone())
        })
    }

    /// Reads a user's cache back (what the agent last wrote for the user).
    pub(crate) fn load_cache(&self, user: &str) -> Option<Vec<u8>> {
        std::fs::read(self.cache_path(user)).ok()
    }

    /// Names of users that have a cache file.
    pub(crate) fn cached_users(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join("users")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".keys").map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect()
    }
}

/// The cache file of a user under a state dir (also used by the hook, which
/// must not do any other work).
pub(crate) fn cache_path(state_dir: &Path, user: &str) -> PathBuf {
    state_dir
        .join("users")
        .join(format!("{}.keys", file_safe(user)))
}

/// The fingerprint index beside a user's cache.
pub(crate) fn index_path(state_dir: &Path, user: &str) -> PathBuf {
    state_dir
        .join("users")
        .join(format!("{}.fpr", file_safe(user)))
}

/// Names come from the config (validated) or sshd's `%u`; never let one
/// leave its directory.
fn file_safe(name: &str) -> String {
    name.replace(['/', '\0'], "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::parse_entries;

    const ALICE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi alice@laptop";

    #[test]
    fn last_good_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        state.ensure().unwrap();
        let (keys, _) = parse_entries([ALICE], &Policy::default());
        let good = LastGood {
            keys,
            etag: Some("\"v1\"".into()),
            fetched_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        };
        let policy = Policy::default();
        assert_eq!(
            state.save_source("account", &good, &policy).unwrap(),
            Outcome::Written
        );
        assert_eq!(
            state.save_source("account", &good, &policy).unwrap(),
            Outcome::Unchanged
        );
        assert_eq!(state.load_source("account", &policy), Some(good));
        assert_eq!(state.load_source("other", &policy), None);
    }

    #[test]
    fn another_policy_drops_the_etag_and_keeps_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        state.ensure().unwrap();
        let (keys, _) = parse_entries([ALICE], &Policy::default());
        let good = LastGood {
            keys,
            etag: Some("\"v1\"".into()),
            fetched_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        };
        let strict = Policy {
            min_rsa_bits: 4096,
            ..Policy::default()
        };
        state.save_source("account", &good, &strict).unwrap();
        let loosened = state.load_source("account", &Policy::default()).unwrap();
        assert_eq!(loosened.etag, None);
        assert_eq!(loosened.keys, good.keys);
        assert_eq!(
            state.load_source("account", &strict).unwrap().etag,
            good.etag
        );
        // A record from before policies were recorded: the ETag goes once.
        let old = r#"{"version":1,"fetched_at_unix_ms":0,"etag":"\"v1\"","keys":[]}"#;
        std::fs::write(state.source_path("account"), old).unwrap();
        assert_eq!(state.load_source("account", &strict).unwrap().etag, None);
    }

    #[test]
    fn corrupt_or_tampered_state_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        std::fs::create_dir_all(dir.path().join("sources")).unwrap();
        std::fs::write(state.source_path("a"), b"{not json").unwrap();
        assert_eq!(state.load_source("a", &Policy::default()), None);
        let tampered = format!(
            r#"{{"version":1,"fetched_at_unix_ms":0,"keys":["{ALICE}","command=\"sh\" {ALICE}"]}}"#
        );
        std::fs::write(state.source_path("a"), tampered).unwrap();
        let good = state.load_source("a", &Policy::default()).unwrap();
        assert_eq!(good.keys.len(), 1);
        assert!(good.keys.keys()[0].options.is_none());
    }

    #[test]
    fn cache_is_0640_and_listed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        state.save_cache("alice", b"x\n").unwrap();
        let meta = std::fs::metadata(state.cache_path("alice")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(state.cached_users(), ["alice"]);
        assert_eq!(state.load_cache("alice").unwrap(), b"x\n");
        assert_eq!(
            cache_path(dir.path(), "../etc/passwd"),
            dir.path().join("users/.._etc_passwd.keys")
        );
    }
}
