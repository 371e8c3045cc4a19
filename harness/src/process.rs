//! A service binary run as a real process: started by path with exactly the environment given
//! and its log in a file, then signalled, awaited and read.
//!
//! Tests that are about the process itself (exit codes, SIGTERM, SIGKILL mid-file, SIGSTOP past
//! a lease, what it logs, its `/metrics`, its peak memory) use this; everything else runs the
//! services in process. The environment is cleared first, so a variable in the caller's shell
//! (a stray `ETCD_NAMESPACE`) never leaks in. A [`ServiceProcess`] is SIGKILLed (after a
//! SIGCONT, in case it was paused) when dropped, so a failing test leaves no process behind.
//!
//! ```no_run
//! # async fn f(server: &telemetry_harness::EtcdServer) {
//! use telemetry_harness::ProcessSpec;
//! let mut collector = ProcessSpec::new("target/debug/telemetry-collector")
//!     .env(server.env("/t").collector("a"))
//!     .start()
//!     .expect("starts");
//! collector.terminate().expect("SIGTERM");
//! assert!(collector.wait().await.success());
//! assert!(collector.log().contains("stopped"));
//! # }
//! ```

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use crate::{Env, HarnessError, io};

/// The directory the workspace build puts the service binaries in, for an integration test of
/// another package (`telemetry-tests`): the test runs from `target/<profile>/deps/`, the
/// binaries are in `target/<profile>/` (built by the same `cargo nextest run --workspace`, or
/// by `cargo build`). A package's own tests use `env!("CARGO_BIN_EXE_...")` instead.
pub fn workspace_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("target/debug"), Path::to_path_buf)
}

/// Where a process's standard error (its log) goes.
#[derive(Debug, Clone)]
enum LogTo {
    /// A file in a temporary directory owned by the process handle.
    Temp,
    /// This file (created, or truncated).
    File(PathBuf),
    /// This process's standard error.
    Inherit,
}

/// How to start a service binary: path, environment, `RUST_LOG`, where its log goes. Cheap to
/// clone, so one spec can start a process again (a restart, a new incarnation).
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    binary: PathBuf,
    args: Vec<String>,
    env: Env,
    rust_log: Option<String>,
    log: LogTo,
}

impl ProcessSpec {
    /// The binary at `binary`, with no arguments, an empty environment (so the service's own
    /// defaults apply, `RUST_LOG` included) and its log in a temporary file.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        ProcessSpec {
            binary: binary.into(),
            args: Vec::new(),
            env: Env::new(),
            rust_log: None,
            log: LogTo::Temp,
        }
    }

    /// Appends command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets every variable of `env`, replacing earlier values of the same names.
    pub fn env(mut self, env: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env = env.into_iter().fold(self.env, |acc, (k, v)| acc.set(&k, v));
        self
    }

    /// Sets one variable.
    pub fn var(mut self, name: &str, value: impl ToString) -> Self {
        self.env = self.env.set(name, value);
        self
    }

    /// Sets `RUST_LOG` (unset by default: the services log at `info`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = Some(filter.into());
        self
    }

    /// Writes the log (standard error) to `path`.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = LogTo::File(path.into());
        self
    }

    /// Lets the log go to this process's standard error (for a benchmark whose reader should
    /// see the services' warnings).
    pub fn inherit_log(mut self) -> Self {
        self.log = LogTo::Inherit;
        self
    }

    /// The binary's path.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Starts the process (standard input and output closed).
    pub fn start(&self) -> Result<ServiceProcess, HarnessError> {
        if !self.binary.is_file() {
            return Err(HarnessError::Io {
                context: format!("starting {}", self.binary.display()),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such binary (build it first)"),
            });
        }
        let (stderr, log, dir) = self.open_log()?;
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(io(format!("starting {}", self.binary.display())))?;
        Ok(ServiceProcess {
            name: self.name(),
            pid: child.id(),
            child,
            status: None,
            log,
            _dir: dir,
        })
    }

    /// Runs it to its end with its output captured (in files, so that a chatty process never
    /// blocks on a full pipe). If it runs longer than `limit` it is SIGKILLed and the result
    /// is [`HarnessError::Timeout`]. Blocks the calling thread (short runs such as `--help` or a
    /// configuration error; in an async test, inside `spawn_blocking`).
    pub fn run_within(&self, limit: Duration) -> Result<Finished, HarnessError> {
        let dir = tempfile::tempdir().map_err(io("creating an output dir"))?;
        let create =
            |name: &str| std::fs::File::create(dir.path().join(name)).map_err(io(format!("creating {name}")));
        let mut child = self
            .command()
            .stdout(create("stdout")?)
            .stderr(create("stderr")?)
            .spawn()
            .map_err(io(format!("starting {}", self.binary.display())))?;
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(io("waiting"))? {
                break status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::Timeout(format!(
                    "{} {:?} still running after {limit:?}",
                    self.binary.display(),
                    self.args
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let read = |name: &str| {
            std::fs::read(dir.path().join(name))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(io(format!("reading {name}")))
        };
        Ok(Finished {
            status,
            stdout: read("stdout")?,
            stderr: read("stderr")?,
        })
    }

    /// The command: arguments, exactly the environment given, standard input closed.
    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(&self.args)
            .env_clear()
            .envs(self.env.vars().iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        if let Some(filter) = &self.rust_log {
            command.env("RUST_LOG", filter);
        }
        command
    }

    fn name(&self) -> String {
        let binary = self.binary.file_name().map_or_else(
            || self.binary.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        match self.env.get("COLLECTOR_ID") {
            Some(id) => format!("{binary} {id}"),
            None => binary,
        }
    }

    #[allow(clippy::type_complexity)]
    fn open_log(&self) -> Result<(Stdio, Option<PathBuf>, Option<Arc<tempfile::TempDir>>), HarnessError> {
        let (path, dir) = match &self.log {
            LogTo::Inherit => return Ok((Stdio::inherit(), None, None)),
            LogTo::File(path) => (path.clone(), None),
            LogTo::Temp => {
                let dir = tempfile::Builder::new()
                    .prefix("telemetry-process-")
                    .tempdir()
                    .map_err(io("creating a log dir"))?;
                (dir.path().join("stderr.log"), Some(Arc::new(dir)))
            }
        };
        let file = std::fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        Ok((Stdio::from(file), Some(path), dir))
    }
}

/// A process that ran to its end ([`ProcessSpec::run_within`]).
#[derive(Debug, Clone)]
pub struct Finished {
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output (lossy UTF-8).
    pub stdout: String,
    /// Its standard error (lossy UTF-8).
    pub stderr: String,
}

/// A running (or exited) service process. SIGKILLed when dropped.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    pid: u32,
    child: Child,
    status: Option<ExitStatus>,
    log: Option<PathBuf>,
    _dir: Option<Arc<tempfile::TempDir>>,
}

impl ServiceProcess {
    /// The binary's name (and `COLLECTOR_ID`, if set), for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` (fails once the process has been reaped).
    pub fn signal(&self, signal: Signal) -> Result<(), HarnessError> {
        if self.status.is_some() {
            return Err(HarnessError::Io {
                context: format!("signalling {}", self.name),
                source: std::io::Error::other("the process has exited"),
            });
        }
        let pid = Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        nix::sys::signal::kill(pid, signal).map_err(|e| HarnessError::Io {
            context: format!("sending {signal} to {}", self.name),
            source: std::io::Error::from(e),
        })
    }

    /// SIGTERM: a graceful stop.
    pub fn terminate(&self) -> Result<(), HarnessError> {
        self.signal(Signal::SIGTERM)
    }

    /// SIGSTOP: it stops running but keeps its sockets (and its leases run out).
    pub fn pause(&self) -> Result<(), HarnessError> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) -> Result<(), HarnessError> {
        self.signal(Signal::SIGCONT)
    }

    /// SIGKILL, and waits for it to be gone. A no-op once it has exited.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Its exit status, if it has exited (never blocks).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Is it still running?
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits until it exits, without blocking the async runtime.
    pub async fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `timeout` for it to exit.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A graceful stop: SIGTERM, then up to `grace` for it to exit. If it does not, it is
    /// SIGKILLed and the result is [`HarnessError::Timeout`].
    pub async fn stop(&mut self, grace: Duration) -> Result<ExitStatus, HarnessError> {
        if let Some(status) = self.try_status() {
            return Ok(status);
        }
        self.terminate()?;
        match self.wait_timeout(grace).await {
            Some(status) => Ok(status),
            None => {
                self.kill();
                Err(HarnessError::Timeout(format!(
                    "{} did not exit within {grace:?} of SIGTERM",
                    self.name
                )))
            }
        }
    }

    /// Where its log is (`None` when it goes to this process's standard error).
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Its log so far (empty when it goes to this process's standard error).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Waits up to `timeout` until its log satisfies `condition` (polled every 20 ms); returns
    /// whether it did.
    pub async fn wait_for_log(&self, timeout: Duration, condition: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(&self.log()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its peak resident set (`VmHWM`) in KiB, while it runs (`None` once it has exited).
    /// `VmHWM` only grows, so the last reading before a stop is the peak.
    pub fn peak_rss_kib(&mut self) -> Option<u64> {
        if !self.is_running() {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.signal(Signal::SIGCONT);
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> ProcessSpec {
        ProcessSpec::new("/bin/sh").args(["-c", script])
    }

    #[tokio::test]
    async fn the_environment_is_exactly_the_one_given_and_the_log_is_kept() {
        let mut p = sh("echo \"[$GREETING] [$HOME] [$RUST_LOG]\" >&2; exit 3")
            .env(Env::new().set("GREETING", "hello"))
            .var("GREETING", "hi")
            .rust_log("warn")
            .start()
            .expect("starts");
        assert_eq!(p.wait().await.code(), Some(3));
        assert_eq!(p.log().trim(), "[hi] [] [warn]");
        assert!(p.terminate().is_err(), "an exited process cannot be signalled");
    }

    #[tokio::test]
    async fn stop_terminates_pause_holds_and_drop_kills() {
        let mut p = sh("exec sleep 30").start().expect("starts");
        assert!(p.is_running());
        assert!(p.peak_rss_kib().is_some_and(|kib| kib > 0));
        p.pause().expect("SIGSTOP");
        assert!(p.wait_timeout(Duration::from_millis(200)).await.is_none());
        p.resume().expect("SIGCONT");
        let status = p.stop(Duration::from_secs(5)).await.expect("exits on SIGTERM");
        assert!(!status.success());
        assert_eq!(p.peak_rss_kib(), None);

        let mut ignores = sh("trap '' TERM; exec sleep 30").start().expect("starts");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(
            ignores.stop(Duration::from_millis(300)).await,
            Err(HarnessError::Timeout(_))
        ));
        assert!(!ignores.is_running(), "killed after the grace period");

        let paused = sh("exec sleep 30").start().expect("starts");
        paused.pause().expect("SIGSTOP");
        let pid = Pid::from_raw(i32::try_from(paused.pid()).expect("pid"));
        drop(paused);
        assert!(
            nix::sys::signal::kill(pid, None).is_err(),
            "a paused process is gone after drop"
        );
    }

    #[test]
    fn run_within_captures_both_streams_and_gives_up_at_the_limit() {
        let out = sh("echo out; echo err >&2; exit 2")
            .run_within(Duration::from_secs(5))
            .expect("runs");
        assert_eq!(
            (out.status.code(), out.stdout.as_str(), out.stderr.as_str()),
            (Some(2), "out\n", "err\n")
        );
        let slow = sh("exec sleep 30").run_within(Duration::from_millis(200));
        assert!(matches!(slow, Err(HarnessError::Timeout(_))), "{slow:?}");
    }

    #[tokio::test]
    async fn wait_for_log_sees_lines_as_they_are_written() {
        let p = sh("echo ready >&2; exec sleep 30").start().expect("starts");
        assert!(
            p.wait_for_log(Duration::from_secs(5), |log| log.contains("ready"))
                .await
        );
        assert!(
            !p.wait_for_log(Duration::from_millis(100), |log| log.contains("never"))
                .await
        );
    }

    #[test]
    fn a_missing_binary_is_named() {
        let err = ProcessSpec::new("/nonexistent/telemetry-x")
            .start()
            .expect_err("no binary");
        assert!(err.to_string().contains("/nonexistent/telemetry-x"), "{err}");
    }
}
