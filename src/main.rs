//! The `keysync` binary: parse the command line and call into the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The AuthorizedKeysCommand runs on every login: skip clap's set-up
    // when its arguments are the plain ones sshd passes.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "authorized-keys")
        && let Some((state_dir, user, fpr)) = keysync::cli::authorized_keys::fast_args(&args[2..])
    {
        return ExitCode::from(keysync::cli::authorized_keys::main(&state_dir, &user, fpr.as_deref()));
    }
    let cli = keysync::cli::Cli::parse_from(args);
    ExitCode::from(keysync::cli::dispatch(cli))
}
