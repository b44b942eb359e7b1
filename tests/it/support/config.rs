//! One builder for the agent's config file (DESIGN.md §7), so that a test
//! states only the knobs it turns. [`Config::vast`] is the config most tests
//! run; the builder changes a field, adds or replaces users, or starts from
//! [`Config::new`] for other source kinds, and renders TOML text (values
//! quoted and escaped by the `toml` crate, so a path with a newline in it
//! stays one string).

use std::fmt;
use std::path::Path;

use toml::Value;

use super::env::TestEnv;

/// The key-value lines of one TOML table, in the order they were first set.
#[derive(Debug, Clone, Default)]
struct Table(Vec<(String, Value)>);

impl Table {
    fn set(&mut self, key: &str, value: impl Into<Value>) {
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }

    fn unset(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in &self.0 {
            writeln!(f, "{key} = {value}")?;
        }
        Ok(())
    }
}

fn path_value(path: impl AsRef<Path>) -> Value {
    Value::String(path.as_ref().display().to_string())
}

/// One `[[users]]` entry.
#[derive(Debug, Clone)]
pub struct User(Table);

impl User {
    /// `name`, fed by the source `account`, in `write` mode (`block`,
    /// `fragment` or `none`), at the mode's default path.
    pub fn new(name: &str, write: &str) -> User {
        let mut table = Table::default();
        table.set("name", name);
        table.set("sources", vec!["account"]);
        table.set("write", write);
        User(table)
    }

    /// `name` in block mode, writing `path` (a `~/…` path is the user's home).
    pub fn block(name: &str, path: impl AsRef<Path>) -> User {
        User::new(name, "block").set("path", path_value(path))
    }

    /// Sets (or replaces) a field, e.g. `sources` or `options`.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> User {
        self.0.set(key, value);
        self
    }
}

/// A whole config file (or, without state_dir and health_socket, a drop-in).
#[derive(Debug, Clone, Default)]
pub struct Config {
    top: Table,
    sources: Vec<(String, Table)>,
    users: Vec<User>,
    policy: Option<Table>,
}

impl Config {
    /// The env's `state_dir` and `health_socket`; no source, no user.
    pub fn new(env: &TestEnv) -> Config {
        Config::default()
            .top("state_dir", path_value(env.state_dir()))
            .top("health_socket", path_value(env.socket()))
    }

    /// The config most tests run: the vast source `account` at `url` (API
    /// key from env `KEYSYNC_TEST_API_KEY`, interval 200 ms, jitter off,
    /// timeout 2 s, max_backoff 1 s), user root writing the env's target in
    /// block mode, `confirm_delay` 300 ms.
    pub fn vast(env: &TestEnv, url: &str) -> Config {
        Config::new(env)
            .source("account", "vast")
            .set("url", url)
            .set("api_key_env", "KEYSYNC_TEST_API_KEY")
            .set("interval", "200ms")
            .set("jitter", "0s")
            .set("timeout", "2s")
            .set("max_backoff", "1s")
            .user(User::block("root", env.target()))
            .policy("confirm_delay", "300ms")
    }

    /// Sets a top-level key (`state_dir`, `health_socket`).
    pub fn top(mut self, key: &str, value: impl Into<Value>) -> Config {
        self.top.set(key, value);
        self
    }

    /// Adds the source table `[sources.<name>]` of this `kind`; [`set`](Self::set)
    /// then fills it.
    pub fn source(mut self, name: &str, kind: &str) -> Config {
        let mut table = Table::default();
        table.set("kind", kind);
        self.sources.push((name.to_owned(), table));
        self
    }

    /// Sets (or replaces) a field of the last source added.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Config {
        self.last_source().set(key, value);
        self
    }

    /// Removes a field of the last source added (the agent's default applies).
    pub fn unset(mut self, key: &str) -> Config {
        self.last_source().unset(key);
        self
    }

    fn last_source(&mut self) -> &mut Table {
        &mut self
            .sources
            .last_mut()
            .expect("a source to set a field of")
            .1
    }

    /// Adds a user after the ones there are.
    pub fn user(mut self, user: User) -> Config {
        self.users.push(user);
        self
    }

    /// Replaces every user with this one.
    pub fn only_user(mut self, user: User) -> Config {
        self.users = vec![user];
        self
    }

    /// Sets a field of `[policy]`.
    pub fn policy(mut self, key: &str, value: impl Into<Value>) -> Config {
        self.policy
            .get_or_insert_with(Table::default)
            .set(key, value);
        self
    }

    /// No `[policy]` table: the agent's defaults.
    pub fn no_policy(mut self) -> Config {
        self.policy = None;
        self
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.top)?;
        for (name, table) in &self.sources {
            write!(f, "\n[sources.{name}]\n{table}")?;
        }
        for User(table) in &self.users {
            write!(f, "\n[[users]]\n{table}")?;
        }
        if let Some(policy) = &self.policy {
            write!(f, "\n[policy]\n{policy}")?;
        }
        Ok(())
    }
}
