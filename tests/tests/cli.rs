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
fn bench_and_chaos_answer_help_and_version() {
    let version = env!("CARGO_PKG_VERSION");
    let bench = env!("CARGO_BIN_EXE_telemetry-bench");
    assert_eq!(answer(bench, "--version"), format!("telemetry-bench {version}\n"));
    let help = answer(bench, "--help");
    for line in [
        "--quick",
        "--gateway-only",
        "LOG_FORMAT [default: text]",
        "RUST_LOG [default: info]",
    ] {
        assert!(help.contains(line), "{line} in\n{help}");
    }
    let chaos = env!("CARGO_BIN_EXE_telemetry-chaos");
    assert_eq!(answer(chaos, "--version"), format!("telemetry-chaos {version}\n"));
    let help = answer(chaos, "--help");
    for line in ["--seed", "--short", "ETCD_BIN"] {
        assert!(help.contains(line), "{line} in\n{help}");
    }
}
