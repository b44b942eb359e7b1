//! The shortest end-to-end path: the fake control plane's list lands in
//! the managed block through `keysync run --once`.

use crate::support::agent::{TestEnv, block_keys};
use crate::support::config::Config;
use crate::support::fake_cp::{FakeControlPlane, fixture_keys};

#[tokio::test(flavor = "multi_thread")]
async fn run_once_writes_the_fixture_list() {
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some("test-token"));
    cp.load_fixture();
    let env = TestEnv::new();
    env.write_config(Config::vast(&env, &cp.url()));
    // The binary blocks; keep it off the runtime that serves the fake.
    let (env, output) = tokio::task::spawn_blocking(move || {
        let output = env.run_once();
        (env, output)
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let keys = block_keys(&env.read_target().unwrap());
    let [alice, bob, retired] = fixture_keys();
    assert_eq!(keys, [alice, bob]);
    assert!(!keys.iter().any(|k| k == retired));
    assert_eq!(env.cache("root").unwrap(), format!("{alice}\n{bob}\n"));
}
