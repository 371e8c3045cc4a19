//! The real `telemetry-collector` binary at its edges: `--help` and `--version` exit 0 at once
//! and start nothing; an invalid variable is one line on stderr and exit status 2; with
//! `LOG_FORMAT=json` every stderr line is a JSON object, the final error included.

use std::{net::TcpListener, time::Duration};

use telemetry_collector::CollectorConfig;
use telemetry_harness::{Env, Finished, ProcessSpec};

const BIN: &str = env!("CARGO_BIN_EXE_telemetry-collector");

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
fn help_lists_every_variable_with_its_default_and_starts_nothing() {
    // An "etcd" that would see any connection attempt.
    let etcd = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = etcd.local_addr().expect("addr").to_string();
    for flag in ["--help", "-h"] {
        let out = run_within(
            command(&[flag], &[("ETCD_ENDPOINTS", &endpoint)]),
            Duration::from_secs(1),
        );
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert!(out.stderr.is_empty(), "{}", out.stderr.clone());
        let help = out.stdout.clone();
        let spec = CollectorConfig::env_spec();
        assert_eq!(spec.len(), CollectorConfig::env_vars().len());
        for var in &spec {
            assert!(
                help.contains(&format!("\n  {}\n", var.heading())),
                "{flag}: {} in\n{help}",
                var.name
            );
        }
        for line in [
            "LEASE_TTL [default: 30s]",
            "BATCH_SIZE [default: 63]",
            "LOG_FORMAT [default: text]",
        ] {
            assert!(help.contains(line), "{line}");
        }
    }
    etcd.set_nonblocking(true).expect("nonblocking");
    let accepted = etcd.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "--help connected to etcd: {accepted:?}"
    );
}

#[test]
fn version_prints_the_version() {
    let out = run_within(command(&["--version"], &[]), Duration::from_secs(1));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout.clone(),
        format!("telemetry-collector {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn an_invalid_variable_is_one_line_and_status_2() {
    for (var, value) in [
        ("LEASE_TTL", "1s"),
        ("BATCH_SIZE", "500"),
        ("COLLECTOR_ID", "a/b"),
        ("LOG_FORMAT", "xml"),
        ("ETCD_ENDPOINTS", "nohost"),
    ] {
        // RUST_BACKTRACE changes nothing for a configuration error.
        let out = run_within(
            command(&[], &[(var, value), ("RUST_BACKTRACE", "1")]),
            Duration::from_secs(5),
        );
        assert_eq!(out.status.code(), Some(2), "{var}");
        let stderr = out.stderr.clone();
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].starts_with(&format!("error: {var}={value:?} is invalid: must ")),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    let out = run_within(command(&["--bogus"], &[]), Duration::from_secs(1));
    assert_eq!(out.status.code(), Some(2), "a usage error");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_up_to_the_final_error() {
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let mut child = command(&[], &[("ETCD_ENDPOINTS", &endpoint), ("LOG_FORMAT", "json")])
        .start()
        .expect("starts");
    // The first line is the warning that etcd cannot be reached; then ask it to stop (a moment
    // later, so that its signal handler is surely installed).
    let first_line = child
        .wait_for_log(Duration::from_secs(20), |log| log.contains('\n'))
        .await;
    assert!(first_line, "a log line");
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.terminate().expect("SIGTERM");
    let status = child.wait().await;
    let log = child.log();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(status.code(), Some(1), "{lines:#?}");
    let objects: Vec<serde_json::Map<String, serde_json::Value>> = lines
        .iter()
        .map(|l| match serde_json::from_str(l) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => panic!("not a JSON object: {l}"),
        })
        .collect();
    assert!(objects.len() >= 2, "{lines:#?}");
    assert_eq!(objects[0]["level"], "WARN", "{lines:#?}");
    let last = &objects[objects.len() - 1];
    assert_eq!(last["level"], "ERROR");
    let message = last["message"].as_str().expect("message");
    assert!(
        message.contains(&endpoint) && message.contains("ETCD_ENDPOINTS"),
        "{message}"
    );
}
