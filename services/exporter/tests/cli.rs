//! The real `telemetry-exporter` binary at its edges: `--help` and `--version` exit 0 at once
//! and start nothing; an invalid or missing variable is one line on stderr and exit status 2;
//! with `LOG_FORMAT=json` the failure line is JSON too.

use std::time::Duration;

use telemetry_exporter::ExporterConfig;
use telemetry_harness::{Env, Finished, ProcessSpec};

const BIN: &str = env!("CARGO_BIN_EXE_telemetry-exporter");

/// Runs the binary with these arguments and exactly these variables to its end (within 5 s).
fn run(args: &[&str], vars: &[(&str, &str)]) -> Finished {
    ProcessSpec::new(BIN)
        .args(args.iter().copied())
        .env(Env::new().with(vars))
        .run_within(Duration::from_secs(5))
        .expect("runs to its end in time")
}

#[test]
fn help_and_version_list_every_variable_and_start_nothing() {
    let out = run(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    for var in ExporterConfig::env_spec() {
        assert!(
            out.stdout.contains(&format!("\n  {}\n", var.heading())),
            "{} in\n{}",
            var.name,
            out.stdout
        );
    }
    assert!(
        out.stdout.contains("REMOTE_WRITE_URL [required]"),
        "{}",
        out.stdout
    );
    let out = run(&["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.starts_with("telemetry-exporter "), "{}", out.stdout);
}

#[test]
fn configuration_errors_are_one_line_and_status_2() {
    let url = ("REMOTE_WRITE_URL", "http://x/api/v1/write");
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[], "error: REMOTE_WRITE_URL is required but not set"),
        (
            &[("REMOTE_WRITE_URL", "ftp://x/api/v1/write")],
            "error: REMOTE_WRITE_URL=\"ftp://x/api/v1/write\" is invalid: must be an http:// URL",
        ),
        (
            &[url, ("BATCH_SAMPLES", "0")],
            "error: BATCH_SAMPLES=\"0\" is invalid",
        ),
        (
            &[url, ("SERVER_CHECK", "never")],
            "error: SERVER_CHECK=\"never\" is invalid",
        ),
    ];
    for (vars, expected) in cases {
        let out = run(&[], vars);
        assert_eq!(out.status.code(), Some(2), "{vars:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(out.stderr.starts_with(expected), "{}", out.stderr);
    }
}

#[test]
fn a_start_up_failure_in_json_is_one_json_line_and_status_1() {
    // A failure after the configuration is read (the metrics port is taken) is one line in
    // the log format, with status 1.
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let out = run(
        &[],
        &[
            ("REMOTE_WRITE_URL", "http://127.0.0.1:1/api/v1/write"),
            ("ETCD_ENDPOINTS", "127.0.0.1:1"),
            ("METRICS_PORT", &port),
            ("LOG_FORMAT", "json"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    let line: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|m| m.contains("METRICS_PORT")),
        "{line}"
    );
}
