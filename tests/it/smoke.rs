//! The shortest end-to-end path: the fake control plane's list lands in
//! the managed block through `keysync run --once`.

use crate::support::fake_cp::fixture_keys;
use crate::support::scenario::with_fixture;

#[tokio::test(flavor = "multi_thread")]
async fn run_once_writes_the_fixture_list() {
    with_fixture(|s| {
        s.env.write_config(s.config());
        let output = s.env.run_once();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let keys = s.env.block_keys();
        let [alice, bob, retired] = fixture_keys();
        assert_eq!(keys, [alice, bob]);
        assert!(!keys.iter().any(|k| k == retired));
        assert_eq!(s.env.cache("root").unwrap(), format!("{alice}\n{bob}\n"));
    })
    .await;
}
