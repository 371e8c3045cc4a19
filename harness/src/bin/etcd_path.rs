//! Prints the etcd binary the harness would use (`$ETCD_BIN`, the vendored etcd 3.7.2, or
//! `etcd` on `PATH`), for shell scripts that start etcd themselves.

use clap::Parser as _;

/// No flags besides `--help` and `--version`.
#[derive(clap::Parser)]
#[command(
    name = "etcd-path",
    version,
    about = "Prints the path of the etcd binary the test harness uses",
    after_help = "Environment variables:\n  ETCD_BIN [default: the vendored etcd 3.7.2, else etcd on PATH]\n          \
The etcd binary to use instead."
)]
struct Cli {}

fn main() {
    Cli::parse();
    match telemetry_harness::etcd_binary() {
        Ok(path) => println!("{}", path.display()),
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}
