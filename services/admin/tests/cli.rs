//! The real `telemetry-admin` binary at its edges: `--help` and `--version` exit 0 at once
//! and connect to nothing; an invalid variable is one line on stderr and exit status 2; an
//! unreachable etcd is one line (JSON with `LOG_FORMAT=json`) and status 1.

use std::{net::TcpListener, time::Duration};

use telemetry_harness::{Env, Finished, ProcessSpec};

const BIN: &str = env!("CARGO_BIN_EXE_telemetry-admin");

/// The binary with these arguments and exactly these variables (nothing leaks in from the
/// test's environment, `RUST_BACKTRACE` included).
fn command(args: &[&str], vars: &[(&str, &str)]) -> ProcessSpec {
    ProcessSpec::new(BIN)
        .args(args.iter().copied())
        .env(Env::new().with(vars))
}

/// Runs `cmd` to its end, failing the test if that takes longer than `limit`.
fn run_within(cmd: ProcessSpec, limit: Duration) -> Finished {
    cmd.run_within(limit).expect("runs to its end in time")
}

#[test]
fn help_lists_the_commands_and_every_variable_and_connects_to_nothing() {
    let etcd = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = etcd.local_addr().expect("addr").to_string();
    let out = run_within(
        command(&["--help"], &[("ETCD_ENDPOINTS", &endpoint)]),
        Duration::from_secs(1),
    );
    assert_eq!(out.status.code(), Some(0));
    let help = out.stdout.clone();
    for line in [
        "queue",
        "dead-letters",
        "audit",
        "status",
        "--json",
        "--version",
        "\n  ETCD_ENDPOINTS [default: 127.0.0.1:2379]\n",
        "\n  ETCD_NAMESPACE [default: empty]\n",
        "\n  RUST_LOG [default: info]\n",
        "\n  LOG_FORMAT [default: text]\n",
    ] {
        assert!(help.contains(line), "{line} in\n{help}");
    }
    etcd.set_nonblocking(true).expect("nonblocking");
    assert!(etcd.accept().is_err(), "--help connected to etcd");
}

#[test]
fn version_prints_the_version() {
    let out = run_within(command(&["--version"], &[]), Duration::from_secs(1));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout.clone(),
        format!("telemetry-admin {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn an_invalid_variable_is_one_line_and_status_2() {
    for (var, value) in [
        ("ETCD_ENDPOINTS", "nohost"),
        ("ETCD_NAMESPACE", "a b"),
        ("LOG_FORMAT", "xml"),
    ] {
        let out = run_within(command(&["queue"], &[(var, value)]), Duration::from_secs(5));
        let stderr = out.stderr.clone();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!("error: {var}={value:?} is invalid: must ")),
            "{stderr}"
        );
    }
}

#[test]
fn an_unreachable_etcd_is_one_line_and_status_1() {
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let out = run_within(
        command(&["status"], &[("ETCD_ENDPOINTS", &endpoint)]),
        Duration::from_secs(20),
    );
    let stderr = out.stderr.clone();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: cannot reach etcd at {endpoint} (ETCD_ENDPOINTS): "
        )),
        "{stderr}"
    );
    let out = run_within(
        command(
            &["status"],
            &[("ETCD_ENDPOINTS", &endpoint), ("LOG_FORMAT", "json")],
        ),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = out.stderr.clone();
    for line in stderr.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value.is_object(), "{line}");
    }
    assert!(stderr.contains("\"level\":\"ERROR\""), "{stderr}");
}
