//! The tool binaries answer `--help` and `--version` at once, exit 0 and start nothing.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Runs `bin` with `arg` and returns its stdout, failing unless it exits 0 within a second.
fn answer(bin: &str, arg: &str) -> String {
    let mut child = Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > Duration::from_secs(1) {
            let _ = child.kill();
            panic!("{bin} {arg} still running after a second");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(0), "{bin} {arg}");
    String::from_utf8_lossy(&out.stdout).into_owned()
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
