//! The tool binaries answer `--help` and `--version` at once, exit 0 and start nothing.

use std::time::Duration;

use telemetry_harness::ProcessSpec;

/// Runs `bin` with `arg` and returns its stdout, failing unless it exits 0 within a second.
fn answer(bin: &str, arg: &str) -> String {
    let out = ProcessSpec::new(bin)
        .args([arg])
        .run_within(Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{bin} {arg}: {e}"));
    assert_eq!(out.status.code(), Some(0), "{bin} {arg}");
    out.stdout
}

#[test]
fn etcd_path_answers_help_and_version() {
    let bin = env!("CARGO_BIN_EXE_etcd-path");
    assert_eq!(
        answer(bin, "--version"),
        format!("etcd-path {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert!(answer(bin, "--help").contains("ETCD_BIN"));
}
