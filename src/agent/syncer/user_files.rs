//! What one sync writes for one user: the hook's cache (and its
//! fingerprint index), then the home file in block or fragment mode, with
//! the other writers' copies of revoked keys counted or removed; and the
//! log lines of what changed.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::SystemTime;

use super::{LOGGED_CHANGES, Syncer};
use crate::agent::reconcile;
use crate::config::{UserSettings, WriteMode};
use crate::keys::KeySet;
use crate::logging::error_chain;
use crate::metrics::UserLabels;
use crate::render;
use crate::users;
use crate::write::{self, Outcome};

impl Syncer {
    /// Writes the cache and the home file of one user; true when the home
    /// file changed. The error is what status reports; a file written that
    /// sshd's StrictModes would refuse is recorded as the user's error too.
    pub(super) fn write_user(
        &mut self,
        user: &UserSettings,
        keys: &render::Desired,
    ) -> Result<bool, String> {
        let name = &user.name;
        let account = users::lookup(name).map_err(|e| e.to_string())?;
        let lines = render::key_lines(keys, user.options.as_deref());
        let cache = render::cache(&lines);
        let mut wrote_any = false;
        // A cache that cannot be rewritten is removed (the hook then fails
        // closed) and the home file is written anyway: a failed write of one
        // file never keeps a removed key in another.
        let cache_error = match self.state.save_cache(name, &cache) {
            Ok(Outcome::Unchanged) => None,
            Ok(_) => {
                wrote_any = true;
                None
            }
            Err(e) => {
                let error = format!("cache: {}", error_chain(&e));
                if let Err(e) = self.state.remove_cache(name) {
                    tracing::error!(user = %name, "cannot remove the stale cache of user {name} either: {e}");
                }
                Some(error)
            }
        };
        if cache_error.is_none() {
            self.state.save_index(name, &lines, &keys.keys);
        }
        let spec = users::home_file_spec(user, &account);
        let copies = std::cell::Cell::new(0usize);
        let remove_copies = self.settings.policy.remove_revoked_copies;
        let revocation = &self.revocation;
        let home = match (&spec, user.write) {
            (Some(spec), WriteMode::Block) => write::apply(spec, &mut |cur| {
                // Other writers' copies of revoked keys: counted, and
                // removed only when the config asks for it.
                let merged = render::merge_block(cur, &lines)?;
                if revocation.len() == 0 {
                    return Some(merged);
                }
                let (kept, dropped) = render::drop_foreign_lines(&merged, |l| revocation.covers(l));
                copies.set(dropped);
                Some(if remove_copies { kept } else { merged })
            }),
            (Some(spec), WriteMode::Fragment) => {
                write::apply(spec, &mut |_| render::fragment(&lines))
            }
            _ => Ok(Outcome::Unchanged),
        };
        let wrote_home = home.map_err(|e| error_chain(&e))? != Outcome::Unchanged;
        wrote_any |= wrote_home;
        self.note_revoked_copies(name, copies.get(), spec.as_ref().map(|s| s.path.as_path()));
        reconcile::record(
            &mut self.written,
            &self.state,
            user,
            spec.as_ref().map(|s| s.path.clone()),
        );
        if let Some(error) = cache_error {
            self.engine.written(name, keys.clone());
            return Err(error);
        }
        self.log_changes(name, &keys.keys);
        self.engine.written(name, keys.clone());
        if wrote_any {
            self.board
                .metrics
                .writes_total
                .get_or_create(&UserLabels { user: name.clone() })
                .inc();
        }
        // Written either way (a removal must land), but sshd may ignore it.
        let refused = spec.as_ref().and_then(write::strict_modes_problem);
        if let Some(why) = &refused {
            tracing::warn!(user = %name, "user {name} is not ready: {why}");
        }
        let attempt = self.log.user(name);
        attempt.last_error = refused;
        attempt.path = spec.map(|s| s.path);
        if wrote_any {
            attempt.last_write = Some(SystemTime::now());
        }
        Ok(wrote_home)
    }

    /// Reports other writers' lines that carry a revoked key (once per change).
    fn note_revoked_copies(&mut self, user: &str, copies: usize, path: Option<&Path>) {
        let remove = self.settings.policy.remove_revoked_copies;
        let attempt = self.log.user(user);
        if copies != attempt.revoked_copies && copies > 0 {
            let path = path.map(|p| p.display().to_string()).unwrap_or_default();
            if remove {
                tracing::warn!(
                    user,
                    copies,
                    "removed {copies} line(s) of another writer from {path} that carried a key deleted on the account (policy.remove_revoked_copies)"
                );
            } else {
                tracing::warn!(
                    user,
                    copies,
                    "{path} has {copies} line(s) of another writer carrying a key deleted on the account; sshd refuses them through RevokedKeys (set policy.remove_revoked_copies where sshd cannot be configured)"
                );
            }
        }
        attempt.revoked_copies = if remove { 0 } else { copies };
    }

    pub(super) fn log_changes(&self, user: &str, keys: &KeySet) {
        let empty = KeySet::default();
        let before = self.engine.applied(user).unwrap_or(&empty);
        let old: HashSet<(&str, &str)> = before.keys().iter().map(|k| k.id()).collect();
        let new: HashSet<(&str, &str)> = keys.keys().iter().map(|k| k.id()).collect();
        let mut added = keys
            .keys()
            .iter()
            .filter(|k| !old.contains(&k.id()))
            .peekable();
        if added.peek().is_some() {
            // Which sources name each key: one pass over each source's list.
            let mut sources_of: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
            let names = self
                .settings
                .users
                .iter()
                .find(|u| u.name == user)
                .map(|u| u.sources.as_slice())
                .unwrap_or_default();
            for name in names {
                if let Some(good) = self.engine.last_good(name) {
                    for k in good.keys.keys() {
                        sources_of.entry(k.id()).or_default().push(name);
                    }
                }
            }
            let mut count = 0usize;
            for key in added {
                count += 1;
                if count > LOGGED_CHANGES {
                    continue;
                }
                let source = sources_of
                    .get(&key.id())
                    .map(|s| s.join(","))
                    .unwrap_or_default();
                let (fingerprint, comment) = (&key.fingerprint, &key.comment);
                let named = key_name(fingerprint, comment);
                // `event` names the change for log pipelines; the text is for people.
                tracing::info!(event = "key_added", user, source, %fingerprint, %comment, "key {named} from source {source} added for user {user}");
            }
            if count > LOGGED_CHANGES {
                tracing::info!(
                    user,
                    added = count,
                    "{count} keys added for user {user}; only the first {LOGGED_CHANGES} are logged one by one"
                );
            }
        }
        let removed = before.keys().iter().filter(|k| !new.contains(&k.id()));
        let mut count = 0usize;
        for key in removed {
            count += 1;
            if count <= LOGGED_CHANGES {
                let (fingerprint, comment) = (&key.fingerprint, &key.comment);
                let named = key_name(fingerprint, comment);
                tracing::info!(event = "key_removed", user, %fingerprint, %comment, "key {named} removed for user {user}");
            }
        }
        if count > LOGGED_CHANGES {
            tracing::info!(
                user,
                removed = count,
                "{count} keys removed for user {user}; only the first {LOGGED_CHANGES} are logged one by one"
            );
        }
    }
}

/// A key as a log message names it: its fingerprint, and its comment when
/// it has one.
fn key_name(fingerprint: &str, comment: &str) -> String {
    if comment.is_empty() {
        fingerprint.to_owned()
    } else {
        format!("{fingerprint} ({comment})")
    }
}
