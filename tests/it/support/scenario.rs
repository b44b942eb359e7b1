//! The set-up most tests share: a fake control plane that wants the test
//! API key, a scratch [`TestEnv`], the standard config against the two, an
//! agent started and waited for until its first sync landed, and the test
//! body run off the runtime that serves the fake.

use std::fmt::Display;
use std::path::Path;

use super::agent::Agent;
use super::block::block_keys;
use super::config::Config;
use super::env::TestEnv;
use super::fake_cp::FakeControlPlane;
use super::{DEADLINE, blocking, eventually, sorted};

/// The API key the fake wants and every [`TestEnv`] command carries.
pub const TOKEN: &str = "test-token";

/// A fake control plane and a scratch world for one agent.
pub struct Scenario {
    pub cp: FakeControlPlane,
    pub env: TestEnv,
}

impl Scenario {
    /// The fake (requiring `Bearer test-token`, no keys yet) and a new env.
    pub async fn new() -> Scenario {
        let cp = FakeControlPlane::start().await;
        cp.set_token(Some(TOKEN));
        Scenario {
            cp,
            env: TestEnv::new(),
        }
    }

    /// [`Scenario::new`] serving the fixture list (alice and bob live,
    /// old@retired soft-deleted).
    pub async fn with_fixture() -> Scenario {
        let scenario = Scenario::new().await;
        scenario.cp.load_fixture();
        scenario
    }

    /// The standard config ([`Config::vast`]) against this fake.
    pub fn config(&self) -> Config {
        Config::vast(&self.env, &self.cp.url())
    }

    /// Writes `config`, starts the agent and waits until the first sync
    /// wrote exactly `want` (in order) into the env's target.
    pub fn start(&self, config: impl Display, want: &[impl AsRef<str>]) -> Agent {
        self.env.write_config(config);
        let agent = self.env.spawn();
        wait_block(&self.env.target(), &agent, want, "first sync");
        agent
    }

    /// Runs the blocking test body with this scenario (see [`blocking`]).
    pub async fn run<T: Send + 'static>(
        self,
        body: impl FnOnce(Scenario) -> T + Send + 'static,
    ) -> T {
        blocking(move || body(self)).await
    }
}

fn as_strs(keys: &[impl AsRef<str>]) -> Vec<&str> {
    keys.iter().map(AsRef::as_ref).collect()
}

/// Waits until the block of `path` holds exactly `want`, in order.
pub fn wait_block(path: &Path, agent: &Agent, want: &[impl AsRef<str>], what: &str) {
    let want = as_strs(want);
    wait_block_where(path, agent, &want, what, |keys| keys == want);
}

/// Waits until the block of `path` holds exactly `want`, in any order.
pub fn wait_block_any_order(path: &Path, agent: &Agent, want: &[String], what: &str) {
    let want = sorted(want);
    wait_block_where(path, agent, &want, what, |keys| sorted(keys) == want);
}

fn wait_block_where(
    path: &Path,
    agent: &Agent,
    want: &[impl std::fmt::Debug],
    what: &str,
    done: impl Fn(&[String]) -> bool,
) {
    let ok = eventually(DEADLINE, || {
        std::fs::read_to_string(path).is_ok_and(|t| done(&block_keys(&t)))
    });
    assert!(
        ok,
        "{what}: the block of {} never became {want:#?}\nfile: {:?}\nagent log:\n{}",
        path.display(),
        std::fs::read_to_string(path),
        agent.log_tail()
    );
}

/// Runs the blocking `body` with a [`Scenario::with_fixture`].
pub async fn with_fixture<T: Send + 'static>(
    body: impl FnOnce(Scenario) -> T + Send + 'static,
) -> T {
    Scenario::with_fixture().await.run(body).await
}

/// Runs the blocking `body` with a [`Scenario::new`]: the fake serves no
/// keys until the body sets them.
pub async fn with_no_keys<T: Send + 'static>(
    body: impl FnOnce(Scenario) -> T + Send + 'static,
) -> T {
    Scenario::new().await.run(body).await
}

/// A fake control plane wanting [`TOKEN`] and serving `keys`, handed to
/// the blocking `body` while the test's runtime serves it.
pub async fn with_fake<T: Send + 'static>(
    keys: impl IntoIterator<Item = impl Into<String>>,
    body: impl FnOnce(&FakeControlPlane) -> T + Send + 'static,
) -> T {
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some(TOKEN));
    cp.set_keys(keys);
    let cp = std::sync::Arc::new(cp);
    let shared = cp.clone();
    blocking(move || body(&shared)).await
}
