//! Generated package assets: the man pages (clap_mangen) and the bash, zsh
//! and fish completions (clap_complete), all built from `keysync::cli::Cli`
//! so they can never drift from the real command line.
//!
//! Used by the `gen-assets` example (which the packaging scripts run) and
//! included into `tests/it/packaging.rs` with `#[path]`, so the test checks
//! exactly what the packages ship.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

/// What [`generate`] wrote, by kind.
#[derive(Debug, Default)]
pub struct Assets {
    /// `man/keysync.1` first, then one page per subcommand.
    pub man_pages: Vec<PathBuf>,
    pub bash: PathBuf,
    pub zsh: PathBuf,
    pub fish: PathBuf,
}

/// Sections the generated main page lacks: clap knows the options, not the
/// files, exit codes and environment the daemon lives with (DESIGN.md §3, §7).
const MAIN_PAGE_EXTRA: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Success.
.TP
\fB1\fR
A sync or check failed. For \fBrun \-\-once\fR: any source failed, even when the last good keys were written. For \fBstatus \-\-check\fR: the agent is not ready or did not answer.
.TP
\fB2\fR
Bad configuration or usage.
.SH ENVIRONMENT
.TP
\fBKEYSYNC_CONFIG\fR
Main configuration file used instead of \fI/etc/keysync/config.toml\fR; its own \fIconfig.d/\fR beside it is merged in.
.TP
\fBVAST_API_KEY\fR
The control plane API key when the configuration has no \fBapi_key_file\fR (the variable's name is set by \fBapi_key_env\fR).
.TP
\fBKEYSYNC_LOG\fR
Log filter, for example \fBdebug\fR (default \fBinfo\fR).
.TP
\fBHTTPS_PROXY\fR, \fBNO_PROXY\fR
Standard proxy settings, honoured for all fetches.
.SH FILES
.TP
\fI/etc/keysync/config.toml\fR
Main configuration (TOML). Drop\-ins in \fI/etc/keysync/config.d/*.toml\fR are merged in lexical order.
.TP
\fI/etc/keysync/api\-key\fR
The control plane API key (mode 0600, owner root), read at every fetch: a key placed there later is used without a restart.
.TP
\fI/var/lib/keysync/\fR
Last good key sets and the per\-user caches \fIusers/USER.keys\fR that \fBkeysync authorized\-keys\fR prints.
.TP
\fI/run/keysync/health.sock\fR
Health socket: \fB/healthz\fR, \fB/readyz\fR, \fB/status\fR, \fB/metrics\fR over HTTP/1.1.
.TP
\fI~/.ssh/authorized_keys\fR
Holds the managed block between \fB# BEGIN keysync managed keys\fR and \fB# END keysync managed keys\fR; every other line is left alone.
.SH "SEE ALSO"
\fBsshd_config\fR(5), \fBsystemd.service\fR(5), \fI/usr/share/doc/keysync/\fR
"#;

/// Longer text for the DESCRIPTION of the main page only; the CLI's own
/// `--help` stays as DESIGN.md fixes it.
const LONG_ABOUT: &str = "keysync keeps a machine's authorized_keys equal to the SSH keys saved on \
the account at the cloud's control plane: a key saved on the account reaches running instances \
within seconds, and a deleted key stops working just as fast. It owns only its own lines (a \
managed block), keeps the last good keys through outages, and answers sshd's \
AuthorizedKeysCommand from a local cache, so no login waits on the network.";

/// Writes man pages to `OUT/man/` and completions to `OUT/completions/`.
pub fn generate(out: &Path) -> std::io::Result<Assets> {
    let man_dir = out.join("man");
    let completion_dir = out.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&completion_dir)?;

    let version = env!("CARGO_PKG_VERSION");
    // `help` is clap's built-in, not part of DESIGN.md's CLI: no page for it.
    let mut cmd = keysync::cli::Cli::command().disable_help_subcommand(true);
    // build() gives subcommands their display names ("keysync-run").
    cmd.build();

    let mut assets = Assets::default();
    let main = clap_mangen::Man::new(cmd.clone().long_about(LONG_ABOUT))
        .source(format!("keysync {version}"))
        .manual("keysync manual");
    let main_path = man_dir.join(main.get_filename());
    // The generated sections, with ours before VERSION (where man pages
    // usually end).
    let mut page = Vec::new();
    main.render_title(&mut page)?;
    main.render_name_section(&mut page)?;
    main.render_synopsis_section(&mut page)?;
    main.render_description_section(&mut page)?;
    main.render_options_section(&mut page)?;
    main.render_subcommands_section(&mut page)?;
    page.extend_from_slice(MAIN_PAGE_EXTRA.as_bytes());
    main.render_version_section(&mut page)?;
    write_file(&main_path, &page)?;
    assets.man_pages.push(main_path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let man = clap_mangen::Man::new(sub.clone())
            .source(format!("keysync {version}"))
            .manual("keysync manual");
        let path = man_dir.join(man.get_filename());
        let mut page = Vec::new();
        man.render(&mut page)?;
        write_file(&path, &page)?;
        assets.man_pages.push(path);
    }

    let mut completion_cmd = keysync::cli::Cli::command().disable_help_subcommand(true);
    assets.bash =
        clap_complete::generate_to(Shell::Bash, &mut completion_cmd, "keysync", &completion_dir)?;
    assets.zsh =
        clap_complete::generate_to(Shell::Zsh, &mut completion_cmd, "keysync", &completion_dir)?;
    assets.fish =
        clap_complete::generate_to(Shell::Fish, &mut completion_cmd, "keysync", &completion_dir)?;
    Ok(assets)
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
