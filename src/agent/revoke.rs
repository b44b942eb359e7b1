//! Revocation that holds (DESIGN.md §4 "Revoked keys"): the keys that an
//! authoritative answer removed (seen on the account, then gone) and that
//! no source grants any more go into `<state_dir>/revoked_keys`, which sshd
//! checks before any `AuthorizedKeysFile` or `AuthorizedKeysCommand`, so a
//! deleted key stops working also where another tool copied it.
//!
//! A removed key is first a candidate: it is revoked once no user's files
//! hold it any more, so a mass removal held for confirmation revokes
//! nothing until it is confirmed. A key that comes back on the account
//! leaves the file before the files that grant it are written.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::engine::Engine;
use crate::keys::KeySet;
use crate::state::{Revoked, StateDir};

/// The identity of a key in the revoked file: `"<algorithm> <blob>"`.
fn id_of(algorithm: &str, blob: &str) -> String {
    format!("{algorithm} {blob}")
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, Default)]
pub(crate) struct Revocation {
    revoked: Revoked,
    /// Removed by an answer, not yet revoked: id to fingerprint (for the log).
    candidates: BTreeMap<String, String>,
    /// The revoked set changed and is not on disk yet.
    unsaved: bool,
}

impl Revocation {
    /// Loads the revoked keys and makes sure `revoked_keys` exists.
    pub(crate) fn load(state: &StateDir) -> Self {
        let revoked = state.load_revoked();
        let mut this = Revocation {
            revoked,
            ..Revocation::default()
        };
        // Rewrite from the record (it may be newer than the file after a
        // crash between the two); with nothing revoked, only make the file.
        if this.revoked.is_empty() {
            if let Err(e) = state.ensure_revoked_keys() {
                tracing::error!(error = %e, "cannot create the revoked keys file: {e}; sshd refuses every key while it is missing");
            }
        } else {
            this.unsaved = true;
            this.save(state);
        }
        this
    }

    /// Whether `line` of another writer carries a revoked key.
    pub(crate) fn covers(&self, line: &[u8]) -> bool {
        if self.revoked.is_empty() {
            return false;
        }
        std::str::from_utf8(line)
            .ok()
            .and_then(crate::keys::line_key_id)
            .is_some_and(|(alg, blob)| self.revoked.contains_key(&id_of(alg, blob)))
    }

    /// An authoritative answer replaced `old` by `new`: the keys it removed
    /// become candidates, and the keys it grants leave the revoked file now,
    /// before any file that grants them is written.
    pub(crate) fn answered(&mut self, state: &StateDir, old: Option<&KeySet>, new: &KeySet) {
        let granted: HashSet<(&str, &str)> = new.keys().iter().map(|k| k.id()).collect();
        if let Some(old) = old {
            for key in old.keys() {
                if !granted.contains(&key.id()) {
                    self.candidates
                        .insert(id_of(&key.algorithm, &key.blob), key.fingerprint.clone());
                }
            }
        }
        if !self.revoked.is_empty() {
            for key in new.keys() {
                let id = id_of(&key.algorithm, &key.blob);
                self.candidates.remove(&id);
                if self.revoked.remove(&id).is_some() {
                    tracing::info!(fingerprint = %key.fingerprint, "key {} is on the account again; no longer revoked", key.fingerprint);
                    self.unsaved = true;
                }
            }
        }
        self.save(state);
    }

    /// Revokes the candidates no source grants and no user's files hold,
    /// forgets what is past `retention`, and writes the file if it changed.
    /// Copies in other writers' lines are counted at the user's next write.
    pub(crate) fn settle(
        &mut self,
        state: &StateDir,
        engine: &Engine,
        sources: &[&str],
        users: &[&str],
        retention: Duration,
    ) {
        let now = SystemTime::now();
        if !self.candidates.is_empty() {
            let granted: HashSet<String> = sources
                .iter()
                .filter_map(|s| engine.last_good(s))
                .flat_map(|g| g.keys.keys().iter().map(|k| id_of(&k.algorithm, &k.blob)))
                .collect();
            let held: HashSet<String> = users
                .iter()
                .filter_map(|u| engine.applied(u))
                .flat_map(|k| k.keys().iter().map(|k| id_of(&k.algorithm, &k.blob)))
                .collect();
            let at = unix_ms(now);
            let candidates = std::mem::take(&mut self.candidates);
            for (id, fingerprint) in candidates {
                if granted.contains(&id) {
                    continue;
                }
                if held.contains(&id) {
                    // Still written somewhere (a removal awaiting confirmation).
                    self.candidates.insert(id, fingerprint);
                    continue;
                }
                tracing::info!(fingerprint = %fingerprint, "key {fingerprint} was deleted on the account; revoked for sshd everywhere on this machine");
                self.revoked.insert(id, at);
                self.unsaved = true;
            }
        }
        let oldest = unix_ms(now.checked_sub(retention).unwrap_or(UNIX_EPOCH));
        let before = self.revoked.len();
        self.revoked.retain(|_, at| *at >= oldest);
        self.unsaved |= self.revoked.len() != before;
        self.save(state);
    }

    fn save(&mut self, state: &StateDir) {
        if !self.unsaved {
            return;
        }
        match state.save_revoked(&self.revoked) {
            Ok(()) => self.unsaved = false,
            Err(e) => {
                let error = crate::logging::error_chain(&e);
                tracing::error!(error = %error, "cannot write the revoked keys file: {error}; trying again at the next change");
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.revoked.len()
    }
}
