//! Acceptance tests for what the packages and instance recipes ship
//! (packaging/README.md): the container start script against the fake
//! control plane, the packaged default config's "no API key yet" behaviour,
//! the generated man pages and shell completions. Building and installing
//! the .deb/.rpm themselves is `.ci/packaging`'s job (it needs root, a
//! Debian root file system and the packaging tools).

#[path = "../../examples/gen-assets/assets.rs"]
mod assets;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::block::block_keys;
use crate::support::env::{TestEnv, bin, keysync_cmd};
use crate::support::fake_cp::{FakeControlPlane, fixture_keys};
use crate::support::files::mode;
use crate::support::scenario::Scenario;
use crate::support::{DEADLINE, can_run, eventually, require_root};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tool the test needs: present, or a loud skip outside CI and a failure in CI.
fn need_tool(test: &str, tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let missing = format!("`{tool}` is not installed (.ci/run installs it)");
    can_run(test, (!found).then_some(missing.as_str()))
}

/// The generated man pages and completions in a temp dir (kept while the
/// first value lives), for a test that checks them with `tool`; None (a
/// loud skip) when the tool is not installed.
fn generated_assets(test: &str, tool: &str) -> Option<(tempfile::TempDir, assets::Assets)> {
    if !need_tool(test, tool) {
        return None;
    }
    let out = tempfile::tempdir().unwrap();
    let generated = assets::generate(out.path()).unwrap();
    Some((out, generated))
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie would still count, but both
    // processes here are reaped (the supervisor by its parent's exit and
    // re-parenting, the agent by the supervisor's `wait`).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The `CMD` of the HEALTHCHECK line in packaging/Dockerfile.example.
fn healthcheck_command() -> Vec<String> {
    let dockerfile = std::fs::read_to_string(repo().join("packaging/Dockerfile.example"))
        .expect("Dockerfile.example");
    let line = dockerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK line");
    let (_, cmd) = line.split_once(" CMD ").expect("HEALTHCHECK ... CMD ...");
    cmd.split_whitespace().map(String::from).collect()
}

/// Runs the Dockerfile's HEALTHCHECK command with `keysync` from `bin_dir`,
/// against `socket` instead of the default one.
fn healthcheck(bin_dir: &Path, socket: &Path) -> Output {
    let cmd = healthcheck_command();
    Command::new(bin_dir.join(&cmd[0]))
        .args(&cmd[1..])
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .expect("run the HEALTHCHECK command")
}

/// Stops an onstart supervisor and its agent if a test fails half way.
struct Supervisor {
    pid_file: PathBuf,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let agent = PathBuf::from(format!("{}.agent", self.pid_file.display()));
        for pid in [read_pid(&self.pid_file), read_pid(&agent)]
            .into_iter()
            .flatten()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// (a) packaging/onstart.sh in a scratch root: it installs the binary from a
/// path, writes the API key 0600 and the config from the environment, and
/// supervises `keysync run`; the fake control plane's keys reach the target
/// file, the Dockerfile's HEALTHCHECK turns healthy, a killed agent is
/// restarted, a second run does not start a second agent, and TERM to the
/// supervisor stops both processes.
#[tokio::test(flavor = "multi_thread")]
async fn onstart_script_syncs_keys_and_supervises_the_agent() {
    if !require_root("onstart_script_syncs_keys_and_supervises_the_agent") {
        return;
    }
    let s = Scenario::with_fixture().await;
    s.cp.set_token(Some("onstart-secret-token"));
    s.run(|s| onstart_scenario(&s.cp.url())).await;
}

fn onstart_scenario(url: &str) {
    let root = tempfile::Builder::new()
        .prefix("keysync-onstart.")
        .tempdir()
        .unwrap();
    let r = root.path();
    let install = r.join("usr/local/bin/keysync");
    let etc = r.join("etc/keysync");
    let run = r.join("run/keysync");
    let log = r.join("var/log/keysync.log");
    let target = r.join("root/.ssh/authorized_keys");
    let onstart = || {
        Command::new("sh")
            .arg(repo().join("packaging/onstart.sh"))
            .env_remove("KEYSYNC_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env("VAST_API_KEY", "onstart-secret-token")
            .env("KEYSYNC_BIN", bin())
            .env("KEYSYNC_INSTALL", &install)
            .env("KEYSYNC_ETC", &etc)
            .env("KEYSYNC_STATE", r.join("var/lib/keysync"))
            .env("KEYSYNC_RUN", &run)
            .env("KEYSYNC_LOG", &log)
            .env("KEYSYNC_URL", url)
            .env("KEYSYNC_USER", "root")
            .env("KEYSYNC_AUTHORIZED_KEYS", &target)
            .stdin(Stdio::null())
            .output()
            .expect("run onstart.sh")
    };
    let pid_file = run.join("supervisor.pid");
    let agent_pid_file = run.join("supervisor.pid.agent");
    let _guard = Supervisor {
        pid_file: pid_file.clone(),
    };

    let first = onstart();
    assert!(first.status.success(), "{}", text(&first));

    // Installed binary, secret file, config.
    assert_eq!(mode(&install), 0o755);
    assert_eq!(
        std::fs::read(&install).unwrap(),
        std::fs::read(bin()).unwrap()
    );
    assert_eq!(mode(&etc.join("api-key")), 0o600);
    assert_eq!(
        std::fs::read_to_string(etc.join("api-key")).unwrap(),
        "onstart-secret-token\n"
    );
    let config = std::fs::read_to_string(etc.join("config.toml")).unwrap();
    assert!(
        !config.contains("onstart-secret-token"),
        "the key leaked into the config:\n{config}"
    );
    assert!(config.contains(&format!(
        "api_key_file = \"{}\"",
        etc.join("api-key").display()
    )));

    // The keys arrive.
    let [alice, bob, _retired] = fixture_keys();
    let synced = eventually(DEADLINE, || {
        std::fs::read_to_string(&target).is_ok_and(|t| block_keys(&t) == [alice, bob])
    });
    assert!(
        synced,
        "keys not synced into {}:\n{:?}\nlog:\n{}",
        target.display(),
        std::fs::read_to_string(&target),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let bin_dir = install.parent().unwrap().to_path_buf();
    let socket = run.join("health.sock");
    assert!(
        eventually(DEADLINE, || healthcheck(&bin_dir, &socket).status.success()),
        "HEALTHCHECK never passed: {}",
        text(&healthcheck(&bin_dir, &socket))
    );
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log_text.contains("onstart-secret-token"),
        "the key leaked into the log"
    );

    // Running again (a container restart re-runs onstart) keeps one agent.
    let supervisor = read_pid(&pid_file).expect("supervisor pid file");
    let agent = read_pid(&agent_pid_file).expect("agent pid file");
    let second = onstart();
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already running"),
        "{}",
        text(&second)
    );
    assert_eq!(read_pid(&pid_file), Some(supervisor));
    assert_eq!(read_pid(&agent_pid_file), Some(agent));

    // A crashed agent is restarted by the supervisor (after its 5 s pause).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = eventually(DEADLINE, || {
        read_pid(&agent_pid_file).is_some_and(|p| p != agent && pid_alive(p))
    });
    assert!(
        restarted,
        "agent not restarted; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let agent = read_pid(&agent_pid_file).unwrap();
    assert!(
        eventually(DEADLINE, || healthcheck(&bin_dir, &socket).status.success()),
        "restarted agent never became ready"
    );

    // TERM to the supervisor stops both.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        eventually(DEADLINE, || !pid_alive(supervisor) && !pid_alive(agent)),
        "supervisor {supervisor} or agent {agent} still running after SIGTERM"
    );
    // The managed keys stay after the agent stopped: stopping is not revoking.
    assert_eq!(
        block_keys(&std::fs::read_to_string(&target).unwrap()),
        [alice, bob]
    );
}

/// The reference cloud limits the onstart field to 4,048 characters.
#[test]
fn onstart_script_fits_the_onstart_field() {
    let script = std::fs::read_to_string(repo().join("packaging/onstart.sh")).unwrap();
    let chars = script.chars().count();
    assert!(
        chars <= 4048,
        "packaging/onstart.sh has {chars} characters, the onstart field takes 4048"
    );
}

/// (d) The packaged /etc/keysync/config.toml with no API key yet: the agent
/// starts, reports not ready (naming the source and the missing key), sends
/// nothing to the control plane; a key written later to the key file is
/// picked up without a restart. Only the URL, paths and timings are changed
/// from the shipped file, each replacement asserted, so the test follows it.
#[tokio::test(flavor = "multi_thread")]
async fn packaged_config_waits_for_a_late_api_key() {
    if !require_root("packaged_config_waits_for_a_late_api_key") {
        return;
    }
    let s = Scenario::with_fixture().await;
    s.cp.set_token(Some("late-key"));
    s.run(|s| late_key_scenario(&s.env, &s.cp)).await;
}

fn late_key_scenario(env: &TestEnv, cp: &FakeControlPlane) {
    let url = cp.url();
    let key_file = env.path().join("api-key");
    let shipped = std::fs::read_to_string(repo().join("packaging/config.toml")).unwrap();
    let mut config = shipped.clone();
    for (from, to) in [
        (
            "state_dir = \"/var/lib/keysync\"",
            format!("state_dir = \"{}\"", env.state_dir().display()),
        ),
        (
            "health_socket = \"/run/keysync/health.sock\"",
            format!("health_socket = \"{}\"", env.socket().display()),
        ),
        (
            "url = \"https://console.vast.ai/api/v0/ssh/\"",
            format!("url = \"{url}\""),
        ),
        (
            "api_key_file = \"/etc/keysync/api-key\"",
            format!("api_key_file = \"{}\"", key_file.display()),
        ),
        // Shorter waits, so the retry that finds the key comes quickly.
        (
            "interval = \"60s\"",
            "interval = \"200ms\"\nmax_backoff = \"1s\"".into(),
        ),
        ("jitter = \"10s\"", "jitter = \"0s\"".into()),
        (
            "write = \"block\"",
            format!("write = \"block\"\npath = \"{}\"", env.target().display()),
        ),
    ] {
        assert_eq!(
            shipped.matches(from).count(),
            1,
            "packaging/config.toml no longer has `{from}` once"
        );
        config = config.replace(from, &to);
    }
    env.write_config(&config);

    let status = |args: &[&str]| env.status(args);
    let mut agent = env.spawn_with(|cmd| {
        cmd.env_remove("VAST_API_KEY")
            .env_remove("CREDENTIALS_DIRECTORY");
    });
    let not_ready = eventually(DEADLINE, || {
        let out = status(&["--json"]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("no usable API key")
    });
    assert!(
        not_ready,
        "no 'no usable API key' in status; log:\n{}",
        agent.log_text()
    );
    let check = status(&["--check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("account"),
        "{}",
        text(&check)
    );
    assert!(agent.alive());
    assert_eq!(
        cp.request_count(),
        0,
        "requests went out without an API key"
    );
    assert_eq!(env.read_target(), None);

    // The key arrives later, as an admin or cloud-init would write it.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)
            .unwrap();
        f.write_all(b"late-key\n").unwrap();
    }
    let [alice, bob, _] = fixture_keys();
    assert!(
        eventually(DEADLINE, || env.read_target().is_some_and(|t| block_keys(
            &t
        ) == [
            alice, bob
        ])),
        "late key not picked up; log:\n{}",
        agent.log_text()
    );
    assert!(
        eventually(DEADLINE, || status(&["--check"]).status.success()),
        "never ready after the key arrived"
    );
    assert!(agent.alive(), "the agent restarted or died");
    agent.stop(DEADLINE);
}

/// The shipped default config is accepted by `keysync check-config`.
#[test]
fn check_config_accepts_the_packaged_config() {
    let out = keysync_cmd(&["check-config", "--config"])
        .arg(repo().join("packaging/config.toml"))
        .env_remove("KEYSYNC_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("url = \"https://console.vast.ai/api/v0/ssh/\""),
        "{stdout}"
    );
    assert!(stdout.contains("name = \"root\""), "{stdout}");
}

/// (b) Every generated man page renders with `man -l` without groff
/// warnings, the main page has the sections operators look for, and each
/// subcommand of the real CLI has its page with its options.
#[test]
fn man_pages_render() {
    let Some((_out, generated)) = generated_assets("man_pages_render", "man") else {
        return;
    };
    let names: Vec<String> = generated
        .man_pages
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "keysync.1",
            "keysync-run.1",
            "keysync-authorized-keys.1",
            "keysync-status.1",
            "keysync-check-config.1"
        ]
    );
    let render = |page: &Path| {
        Command::new("man")
            .args(["--warnings", "-l", "-P", "cat"])
            .arg(page)
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap()
    };
    for page in &generated.man_pages {
        let shown = render(page);
        assert!(
            shown.status.success(),
            "{}: {}",
            page.display(),
            text(&shown)
        );
        assert!(
            shown.stderr.is_empty(),
            "{}: groff warnings: {}",
            page.display(),
            text(&shown)
        );
        let stdout = String::from_utf8_lossy(&shown.stdout);
        assert!(
            stdout.lines().any(|l| l == "NAME"),
            "{}: no NAME section:\n{stdout}",
            page.display()
        );
    }
    let main = String::from_utf8_lossy(&render(&generated.man_pages[0]).stdout).into_owned();
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "SUBCOMMANDS",
        "EXIT STATUS",
        "ENVIRONMENT",
        "FILES",
    ] {
        assert!(
            main.lines().any(|l| l == section),
            "keysync.1 lacks {section}:\n{main}"
        );
    }
    assert!(
        main.contains("keysync - SSH authorized-keys sync agent"),
        "{main}"
    );
    let run = String::from_utf8_lossy(&render(&generated.man_pages[1]).stdout).into_owned();
    assert!(run.contains("--once") && run.contains("--config"), "{run}");
    let status = String::from_utf8_lossy(&render(&generated.man_pages[3]).stdout).into_owned();
    assert!(status.contains("--check"), "{status}");
}

/// (c) The bash completion loads, registers for `keysync`, and completes
/// subcommands and options of the real CLI. The zsh and fish files are
/// for the same command.
#[test]
fn bash_completion_loads() {
    let Some((_out, generated)) = generated_assets("bash_completion_loads", "bash") else {
        return;
    };
    let spec = Command::new("bash")
        .arg("-c")
        .arg(r#"source "$1" && complete -p keysync"#)
        .arg("bash")
        .arg(&generated.bash)
        .output()
        .unwrap();
    assert!(spec.status.success(), "{}", text(&spec));
    let spec_text = String::from_utf8_lossy(&spec.stdout);
    assert!(
        spec_text.starts_with("complete ") && spec_text.trim_end().ends_with(" keysync"),
        "{}",
        text(&spec)
    );

    let complete = |words: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                r#"source "$1"; COMP_WORDS=({words}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMP_LINE="{words}"; COMP_POINT=${{#COMP_LINE}}; _keysync keysync "${{COMP_WORDS[-1]}}" "${{COMP_WORDS[-2]}}"; printf '%s\n' "${{COMPREPLY[@]}}""#
            ))
            .arg("bash")
            .arg(&generated.bash)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let subcommands = complete("keysync ''");
    for sub in ["run", "authorized-keys", "status", "check-config"] {
        assert!(
            subcommands.iter().any(|w| w == sub),
            "no {sub} in {subcommands:?}"
        );
    }
    let status_options = complete("keysync status --");
    for option in ["--socket", "--json", "--check"] {
        assert!(
            status_options.iter().any(|w| w == option),
            "no {option} in {status_options:?}"
        );
    }

    let zsh = std::fs::read_to_string(&generated.zsh).unwrap();
    assert!(zsh.starts_with("#compdef keysync"), "{zsh}");
    let fish = std::fs::read_to_string(&generated.fish).unwrap();
    assert!(
        fish.contains("complete -c keysync") && fish.contains("check-config"),
        "{fish}"
    );
}

/// The Debian changelog's newest entry is this crate version (revision 1);
/// lintian and dpkg read the package's history from it.
#[test]
fn deb_changelog_names_the_crate_version() {
    let changelog = std::fs::read_to_string(repo().join("packaging/deb/changelog")).unwrap();
    let first = changelog.lines().next().unwrap_or_default();
    let expected = format!("keysync ({}-1) ", env!("CARGO_PKG_VERSION"));
    assert!(
        first.starts_with(&expected),
        "packaging/deb/changelog starts with {first:?}, expected {expected:?}: add an entry for the new version"
    );
}
