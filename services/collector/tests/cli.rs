//! The real `telemetry-collector` binary at its edges: `--help` and `--version` exit 0 at once
//! and start nothing; an invalid variable is one line on stderr and exit status 2; with
//! `LOG_FORMAT=json` every stderr line is a JSON object, the final error included.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use telemetry_collector::CollectorConfig;

const BIN: &str = env!("CARGO_BIN_EXE_telemetry-collector");

/// The binary with these arguments and exactly these variables (nothing leaks in from the
/// test's environment, `RUST_BACKTRACE` included).
fn command(args: &[&str], vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to its end, failing the test if that takes longer than `limit`.
fn run_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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
        assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
        let help = text(&out.stdout);
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
        text(&out.stdout),
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
        let stderr = text(&out.stderr);
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

#[test]
fn json_logs_are_one_object_per_line_up_to_the_final_error() {
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let mut child = command(&[], &[("ETCD_ENDPOINTS", &endpoint), ("LOG_FORMAT", "json")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The first line is the warning that etcd cannot be reached; then ask it to stop (a moment
    // later, so that its signal handler is surely installed).
    let first = rx.recv_timeout(Duration::from_secs(20)).expect("a log line");
    std::thread::sleep(Duration::from_millis(300));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    let lines: Vec<String> = std::iter::once(first).chain(rx.iter()).collect();
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
