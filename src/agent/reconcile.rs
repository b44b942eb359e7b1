//! What the agent manages is what the current config says, also after a
//! restart (DESIGN.md §4): the state dir records what was written for each
//! user (`written.json`), and at start every block, fragment and cache that
//! an earlier config made and the current one no longer asks for (a user
//! removed, a write mode or path changed while the agent was stopped) is
//! removed, as a reload does.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::{Settings, UserSettings, WriteMode};
use crate::render;
use crate::state::{StateDir, Written};
use crate::users;
use crate::write;

/// What is recorded as written for each user.
pub(crate) type Record = BTreeMap<String, Written>;

/// The home file a user's settings name now, expanded.
fn current_path(user: &UserSettings) -> Option<PathBuf> {
    let account = users::lookup(&user.name).ok()?;
    users::home_file_spec(user, &account).map(|s| s.path)
}

/// Removes what an earlier config made and this one does not ask for;
/// returns the record of what stays.
pub(crate) fn at_start(settings: &Settings, state: &StateDir) -> Record {
    let mut record = state.load_written();
    let before = record.clone();
    record.retain(|name, written| {
        let now = settings.users.iter().find(|u| &u.name == name);
        let same = now.is_some_and(|u| u.write == written.write && current_path(u) == written.path);
        if !same {
            tracing::info!(user = %name, "user {name}'s earlier target is no longer in the config; removing the agent's keys from it");
            let old = UserSettings {
                name: name.clone(),
                sources: Vec::new(),
                write: written.write,
                path: written.path.as_ref().map(|p| p.display().to_string()),
                options: None,
            };
            clear_home_file(&old);
        }
        if now.is_none()
            && let Err(e) = state.remove_cache(name)
        {
            tracing::warn!(user = %name, error = %e, "cannot remove the cache of removed user {name}: {e}");
        }
        same
    });
    // Caches of users no config names any more (also from before the record).
    for name in state.cached_users() {
        if !settings.users.iter().any(|u| u.name == name) {
            tracing::info!(user = %name, "removing the cache of user {name}, whom the config no longer names");
            if let Err(e) = state.remove_cache(&name) {
                tracing::warn!(user = %name, error = %e, "cannot remove the cache of removed user {name}: {e}");
            }
        }
    }
    if record != before {
        save(state, &record);
    }
    record
}

/// Records what was just written for `user`.
pub(crate) fn record(
    record: &mut Record,
    state: &StateDir,
    user: &UserSettings,
    path: Option<PathBuf>,
) {
    let written = Written {
        write: user.write,
        path,
    };
    if record.get(&user.name) != Some(&written) {
        record.insert(user.name.clone(), written);
        save(state, record);
    }
}

fn save(state: &StateDir, record: &Record) {
    if let Err(e) = state.save_written(record) {
        tracing::error!(error = %e, "cannot record what was written in the state dir: {e}");
    }
}

/// Takes the agent's lines out of a user's file (block mode) or removes its
/// fragment, so no key stays behind where nothing manages it.
pub(crate) fn clear_home_file(user: &UserSettings) {
    let Ok(account) = users::lookup(&user.name) else {
        return;
    };
    let Some(spec) = users::home_file_spec(user, &account) else {
        return;
    };
    let result = match user.write {
        WriteMode::Block => write::apply(&spec, &mut |cur| render::merge_block(cur, &[])),
        WriteMode::Fragment => write::apply(&spec, &mut |_| None),
        WriteMode::None => return,
    };
    if let Err(e) = result {
        tracing::warn!(user = %user.name, error = %e, "cannot remove keys from the old target of user {}: {e}", user.name);
    }
}
