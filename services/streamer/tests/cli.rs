//! The real `telemetry-streamer` binary at its edges: `--help` and `--version` exit 0 at once
//! and start nothing; an invalid variable (or flag) is one line on stderr and exit status 2;
//! with `LOG_FORMAT=json` a whole one-shot run against a real etcd logs only JSON objects.

use std::{net::TcpListener, time::Duration};

use telemetry_harness::{Env, EtcdServer, Finished, ProcessSpec, sample};
use telemetry_streamer::StreamerConfig;

const BIN: &str = env!("CARGO_BIN_EXE_telemetry-streamer");

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
fn help_lists_every_flag_and_variable_with_its_default_and_starts_nothing() {
    let etcd = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = etcd.local_addr().expect("addr").to_string();
    let vars = [
        ("ETCD_ENDPOINTS", endpoint.as_str()),
        ("CSV_PATH", "/nonexistent.csv"),
    ];
    for flag in ["--help", "-h"] {
        let out = run_within(command(&[flag], &vars), Duration::from_secs(1));
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert!(out.stderr.is_empty(), "{}", out.stderr.clone());
        let help = out.stdout.clone();
        for option in [
            "--csv <CSV>",
            "--workers <WORKERS>",
            "--rate <RATE>",
            "--once",
            "--version",
        ] {
            assert!(help.contains(option), "{flag}: {option} in\n{help}");
        }
        let spec = StreamerConfig::env_spec();
        assert_eq!(spec.len(), StreamerConfig::env_vars().len());
        for var in &spec {
            assert!(
                help.contains(&format!("\n  {}\n", var.heading())),
                "{flag}: {} in\n{help}",
                var.name
            );
        }
        for line in [
            "CSV_PATH [default: empty]",
            "SCRAPE_TARGETS [default: empty]",
            "SCRAPE_INTERVAL [default: 15s]",
            "WORKERS [default: 1]",
            "LOOP [default: true]",
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
        format!("telemetry-streamer {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// Runs the binary with `args` and `vars`, expecting a configuration error: status 2 and one
/// line on stderr, which is returned.
fn config_error(args: &[&str], vars: &[(&str, &str)]) -> String {
    let out = run_within(command(args, vars), Duration::from_secs(5));
    let stderr = out.stderr.clone();
    assert_eq!(out.status.code(), Some(2), "{args:?} {vars:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());
    stderr
}

#[test]
fn an_invalid_variable_or_flag_is_one_line_and_status_2() {
    for (var, value) in [
        ("WORKERS", "0"),
        ("RATE", "fast"),
        ("LOOP", "yes"),
        ("DEDUP_TTL", "1s"),
        ("LOG_FORMAT", "xml"),
        ("RUST_LOG", "info,x=loud"),
    ] {
        let stderr = config_error(
            &[],
            &[("CSV_PATH", "a.csv"), (var, value), ("RUST_BACKTRACE", "1")],
        );
        assert!(
            stderr.starts_with(&format!("error: {var}={value:?} is invalid: must ")),
            "{stderr}"
        );
    }
    assert_eq!(
        config_error(&[], &[]),
        "error: CSV_PATH or SCRAPE_TARGETS is required but not set\n"
    );
    // A flag is checked like the variable it overrides.
    let stderr = config_error(&["--csv", "a.csv", "--workers", "0"], &[]);
    assert!(stderr.starts_with("error: WORKERS=\"0\" is invalid: must be a whole number from 1 to 1024"));
    let out = run_within(command(&["--workers", "many"], &[]), Duration::from_secs(1));
    assert_eq!(out.status.code(), Some(2), "a usage error");
}

#[tokio::test]
async fn a_one_shot_run_with_json_logs_writes_only_json_objects() {
    let server = EtcdServer::start().await.expect("etcd");
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("tiny.csv");
    sample::write_repeated(&csv, 3).expect("write csv");
    let csv = csv.display().to_string();
    let vars = Env::etcd(server.endpoint(), "/cli")
        .set("RATE", "0")
        .set("LOG_FORMAT", "json");
    let cmd = ProcessSpec::new(BIN).args(["--once", "--csv", &csv]).env(vars);
    let out = tokio::task::spawn_blocking(move || run_within(cmd, Duration::from_secs(60)))
        .await
        .expect("join");
    let stderr = out.stderr.clone();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value.is_object(), "{line}");
        assert!(
            value["timestamp"].is_string() && value["level"].is_string(),
            "{line}"
        );
    }
    assert!(
        stderr.contains("\"level\":\"INFO\""),
        "the run logs at info by default: {stderr}"
    );
}
