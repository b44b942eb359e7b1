//! A source whose keys are given inline in the config (`kind = "static"`,
//! `keys = [...]`). Built only for tests: it is the smallest possible kind,
//! and shows that a kind is this one file plus one arm in [`super::build`].

use super::{Answer, FetchFuture, KeySource};

pub(crate) struct StaticSource {
    entries: Vec<String>,
    answered: bool,
}

impl StaticSource {
    pub(crate) fn new(entries: Vec<String>) -> Self {
        StaticSource {
            entries,
            answered: false,
        }
    }
}

impl KeySource for StaticSource {
    /// The list once, then "unchanged": the config is the list.
    fn fetch(&mut self) -> FetchFuture<'_> {
        let answer = if std::mem::replace(&mut self.answered, true) {
            Answer::Unchanged
        } else {
            Answer::List {
                entries: self.entries.clone(),
                etag: None,
            }
        };
        Box::pin(async move { Ok(answer) })
    }
}

#[cfg(test)]
mod tests {
    use crate::config;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_static_source_reaches_the_cache_through_the_whole_pipeline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl inline@test";
        let text = format!(
            "state_dir = \"{state}\"\nhealth_socket = \"{sock}\"\n\
             [sources.inline]\nkind = \"static\"\nkeys = [\"{key}\"]\n\
             [[users]]\nname = \"root\"\nsources = [\"inline\"]\nwrite = \"none\"\n",
            state = dir.path().join("state").display(),
            sock = dir.path().join("health.sock").display(),
        );
        let path = dir.path().join("config.toml");
        let settings = config::from_texts(&[(path.as_path(), text.as_str())]).expect("config");
        assert!(crate::agent::run_once(settings).await, "run --once failed");
        let cache = std::fs::read_to_string(dir.path().join("state/users/root.keys"))
            .expect("cache written");
        assert_eq!(cache, format!("{key}\n"));
    }
}
