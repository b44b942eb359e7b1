//! Generates the man pages and shell completions the packages ship:
//!
//!     cargo run --example gen-assets -- OUTDIR
//!
//! writes `OUTDIR/man/*.1` and `OUTDIR/completions/{keysync.bash,_keysync,keysync.fish}`.
//! `.ci/packaging` runs it before `cargo deb` and `cargo generate-rpm`.

mod assets;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: gen-assets OUTDIR");
        return ExitCode::from(2);
    };
    let out = PathBuf::from(out);
    match assets::generate(&out) {
        Ok(assets) => {
            for path in assets
                .man_pages
                .iter()
                .chain([&assets.bash, &assets.zsh, &assets.fish])
            {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-assets: writing to {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}
