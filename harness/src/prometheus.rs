//! A real Prometheus server (Debian's `prometheus`; `PROMETHEUS_BIN` overrides) on a free
//! loopback port with a generated configuration and a temporary data directory, for tests and
//! scripts, like the etcd members: it scrapes targets, evaluates rule files, and can receive
//! remote write. Stopped (and its data removed) when dropped; [`PrometheusServer::restart`]
//! keeps the data.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{HarnessError, free_port, io};

/// What the server does besides serving queries.
#[derive(Debug, Clone)]
pub struct PrometheusOptions {
    /// `global.scrape_interval` (and evaluation interval).
    pub scrape_interval: Duration,
    /// Scrape jobs: (job name, `host:port` targets, metrics path).
    pub scrape: Vec<(String, Vec<String>, String)>,
    /// Rule files to load.
    pub rule_files: Vec<PathBuf>,
    /// Accept remote write at `/api/v1/write`.
    pub remote_write_receiver: bool,
    /// `storage.tsdb.out_of_order_time_window`, if any.
    pub out_of_order_window: Option<Duration>,
    /// A whole configuration file to use instead of the one generated from `scrape_interval`,
    /// `scrape`, `rule_files` and `out_of_order_window` (a deploy file with its targets
    /// rewritten to this machine, say).
    pub config: Option<String>,
}

impl Default for PrometheusOptions {
    fn default() -> Self {
        PrometheusOptions {
            scrape_interval: Duration::from_secs(1),
            scrape: Vec::new(),
            rule_files: Vec::new(),
            remote_write_receiver: false,
            out_of_order_window: None,
            config: None,
        }
    }
}

impl PrometheusOptions {
    /// The configuration file's text.
    pub fn config_yaml(&self) -> String {
        if let Some(config) = &self.config {
            return config.clone();
        }
        let secs = self.scrape_interval.as_secs().max(1);
        let mut out = format!("global:\n  scrape_interval: {secs}s\n  evaluation_interval: {secs}s\n");
        if let Some(window) = self.out_of_order_window {
            out.push_str(&format!(
                "storage:\n  tsdb:\n    out_of_order_time_window: {}s\n",
                window.as_secs().max(1)
            ));
        }
        if !self.rule_files.is_empty() {
            out.push_str("rule_files:\n");
            for file in &self.rule_files {
                out.push_str(&format!("  - {:?}\n", file.display().to_string()));
            }
        }
        out.push_str("scrape_configs:\n");
        for (job, targets, path) in &self.scrape {
            let targets: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
            out.push_str(&format!(
                "  - job_name: {job:?}\n    metrics_path: {path:?}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
        }
        out
    }
}

/// A running Prometheus server.
#[derive(Debug)]
pub struct PrometheusServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    options: PrometheusOptions,
}

/// The Prometheus binary: `$PROMETHEUS_BIN`, else `prometheus` on `PATH`.
pub fn prometheus_binary() -> PathBuf {
    std::env::var_os("PROMETHEUS_BIN").map_or_else(|| PathBuf::from("prometheus"), PathBuf::from)
}

impl PrometheusServer {
    /// Starts a server with `options` and waits until it is ready.
    pub async fn start(options: PrometheusOptions) -> Result<Self, HarnessError> {
        let dir = tempfile::tempdir().map_err(io("creating Prometheus' directory"))?;
        let mut server = PrometheusServer {
            child: None,
            port: free_port()?,
            dir,
            options,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `http://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The remote-write endpoint.
    pub fn remote_write_url(&self) -> String {
        format!("{}/api/v1/write", self.url())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Stops the server (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.spawn().await
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.yml")
    }

    async fn spawn(&mut self) -> Result<(), HarnessError> {
        std::fs::write(self.config_path(), self.options.config_yaml())
            .map_err(io("writing prometheus.yml"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("prometheus.log"))
            .map_err(io("opening Prometheus' log"))?;
        let log_err = log.try_clone().map_err(io("opening Prometheus' log"))?;
        let mut cmd = Command::new(prometheus_binary());
        cmd.arg(format!("--config.file={}", self.config_path().display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--web.enable-lifecycle")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        if self.options.remote_write_receiver {
            cmd.arg("--web.enable-remote-write-receiver");
        }
        let child = cmd.spawn().map_err(io(format!(
            "starting {} (install Debian's prometheus)",
            prometheus_binary().display()
        )))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            if http_get(self.port, "/-/ready").is_some_and(|(status, _)| status == 200) {
                return Ok(());
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || started.elapsed() > timeout {
                return Err(HarnessError::Io {
                    context: format!("Prometheus did not become ready; log:\n{}", self.log()),
                    source: std::io::Error::other("not ready"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where the configuration file is (for `promtool check config`).
    pub fn config_file(&self) -> PathBuf {
        self.config_path()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP/1.0 GET on loopback: (status, body), or `None` if nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_names_jobs_rules_and_the_out_of_order_window() {
        let options = PrometheusOptions {
            scrape: vec![(
                "gateway".into(),
                vec!["127.0.0.1:1".into()],
                "/metrics/gpus".into(),
            )],
            rule_files: vec![PathBuf::from("/r/alerts.yml")],
            out_of_order_window: Some(Duration::from_secs(600)),
            ..PrometheusOptions::default()
        };
        let yaml = options.config_yaml();
        assert!(yaml.contains("out_of_order_time_window: 600s"), "{yaml}");
        assert!(yaml.contains("metrics_path: \"/metrics/gpus\""), "{yaml}");
        assert!(yaml.contains("- \"/r/alerts.yml\""), "{yaml}");
    }
}
