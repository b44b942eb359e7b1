//! The fleet recipe (packaging/fleet/nginx.conf, DESIGN.md §5 "Beyond one
//! control plane") with Debian's real nginx and nchan on 127.0.0.1: the
//! fake control plane is the origin, it publishes each change to nchan,
//! and several real agents subscribe and fetch through nginx only.
//!
//! Asserted: every change reaches every agent; one change costs the origin
//! at most two list requests however many agents fetch; two changes 300 ms
//! apart both arrive without a resync (the event id in the cache key); after
//! an nginx restart the agents reconnect and the next change arrives. Every
//! "arrives" has a generous deadline; no latency is asserted.

use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::config::{Config, User};
use crate::support::current_user;
use crate::support::env::TestEnv;
use crate::support::fake_cp::{EVENTS_PATH, FakeControlPlane, LIST_PATH};
use crate::support::nginx::{self, Nginx};
use crate::support::scenario::Scenario;
use crate::support::{DEADLINE, can_run, eventually};

const AGENTS: usize = 5;

struct Fleet {
    agents: Vec<(TestEnv, Agent)>,
}

impl Fleet {
    /// `AGENTS` agents, each fetching and subscribing through `nginx` only.
    /// `interval` 2 s: the stream's reconnect backoff after the nginx
    /// restart stays short; with the stream up they poll only every
    /// `resync` (10 min), so an event is what makes them fetch.
    fn start(nginx: &Nginx) -> Fleet {
        let agents = (0..AGENTS)
            .map(|_| {
                let env = TestEnv::new();
                let config = Config::vast(&env, &nginx.url(LIST_PATH))
                    .set("subscribe_url", nginx.url(EVENTS_PATH))
                    .set("interval", "2s")
                    .set("max_backoff", "2s")
                    .set("resync", "10m")
                    .only_user(User::new(&current_user(), "none"));
                env.write_config(config);
                let agent = env.spawn();
                (env, agent)
            })
            .collect();
        Fleet { agents }
    }

    fn all_have(&self, key: &str) -> bool {
        let user = current_user();
        self.agents
            .iter()
            .all(|(env, _)| env.cache(&user).is_some_and(|c| c.contains(key)))
    }

    fn all_connected(&self) -> bool {
        self.agents.iter().all(|(env, _)| {
            env.try_status_json()["sources"]["account"]["stream_connected"]
                == serde_json::Value::Bool(true)
        })
    }

    fn wait_for(&self, key: &str, what: &str, nginx: &Nginx) {
        assert!(
            eventually(DEADLINE, || self.all_have(key)),
            "{what}: not every agent has the key; first agent's log:\n{}\nnginx:\n{}",
            self.agents[0].1.log_tail(),
            nginx.log()
        );
    }

    /// The origin saves `key` and publishes; returns the list requests the
    /// origin saw until every agent had it.
    fn change(&self, cp: &FakeControlPlane, nginx: &Nginx, key: &str, what: &str) -> usize {
        let before = cp.list_requests();
        cp.add_key(key);
        nginx.publish();
        self.wait_for(key, what, nginx);
        cp.list_requests() - before
    }
}

fn key(n: u8) -> String {
    // Distinct valid ed25519 keys: a 32-byte blob of one repeated byte.
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(&[n; 32]);
    format!(
        "ssh-ed25519 {} fleet{n}@test",
        crate::support::fake_cp::base64_encode(&blob)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_recipe_costs_the_origin_two_requests_per_change_and_survives_a_restart() {
    if !can_run("fleet_nginx", nginx::missing()) {
        return;
    }
    let s = Scenario::new().await;
    s.cp.set_keys([key(1)]);
    s.run(|s| {
        let cp = &s.cp;
        let mut nginx = Nginx::start(cp.addr().port());
        let fleet = Fleet::start(&nginx);
        fleet.wait_for(&key(1), "first sync through the cache", &nginx);
        assert!(
            eventually(DEADLINE, || fleet.all_connected()),
            "not every stream connected through nchan:\n{}",
            nginx.log()
        );

        // One change: the origin publishes, every agent fetches.
        let cost = fleet.change(cp, &nginx, &key(2), "one change");
        assert!(
            (1..=2).contains(&cost),
            "one change cost the origin {cost} list requests for {AGENTS} agents"
        );

        // Two changes 300 ms apart: the second is not answered from the
        // entry the first filled.
        let before = cp.list_requests();
        cp.add_key(&key(3));
        nginx.publish();
        std::thread::sleep(Duration::from_millis(300));
        cp.add_key(&key(4));
        nginx.publish();
        fleet.wait_for(&key(4), "the second of two changes 300 ms apart", &nginx);
        assert!(fleet.all_have(&key(3)));
        let cost = cp.list_requests() - before;
        assert!(
            (2..=4).contains(&cost),
            "two changes cost the origin {cost} list requests for {AGENTS} agents"
        );

        // nginx restarts (nchan's buffer is gone): the agents reconnect
        // with their Last-Event-ID, and the next change still arrives.
        nginx.restart();
        assert!(
            eventually(Duration::from_secs(60), || fleet.all_connected()),
            "not every agent reconnected after the restart:\n{}",
            nginx.log()
        );
        let cost = fleet.change(cp, &nginx, &key(5), "a change after the restart");
        assert!(
            cost <= 2 + AGENTS,
            "after the restart one change cost {cost} list requests"
        );
        drop(fleet);
    })
    .await;
}
