//! The real `telemetry-exporter` binary at its edges: `--help` and `--version` exit 0 at once
//! and start nothing; an invalid or missing variable is one line on stderr and exit status 2.

use std::process::{Command, Stdio};

use telemetry_exporter::ExporterConfig;

const BIN: &str = env!("CARGO_BIN_EXE_telemetry-exporter");

fn run(args: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("runs")
}

#[test]
fn help_and_version_list_every_variable_and_start_nothing() {
    let out = run(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for var in ExporterConfig::env_spec() {
        assert!(
            help.contains(&format!("\n  {}\n", var.heading())),
            "{} in\n{help}",
            var.name
        );
    }
    assert!(help.contains("REMOTE_WRITE_URL [required]"), "{help}");
    let out = run(&["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("telemetry-exporter "));
}

#[test]
fn configuration_errors_are_one_line_and_status_2() {
    for (vars, expected) in [
        (vec![], "error: REMOTE_WRITE_URL is required but not set"),
        (
            vec![("REMOTE_WRITE_URL", "ftp://x/api/v1/write")],
            "error: REMOTE_WRITE_URL=\"ftp://x/api/v1/write\" is invalid: must be an http:// URL",
        ),
        (
            vec![
                ("REMOTE_WRITE_URL", "http://x/api/v1/write"),
                ("BATCH_SAMPLES", "0"),
            ],
            "error: BATCH_SAMPLES=\"0\" is invalid",
        ),
    ] {
        let out = run(&[], &vars);
        assert_eq!(out.status.code(), Some(2), "{vars:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(expected), "{stderr}");
    }
}
