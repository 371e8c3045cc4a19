//! Real time-series databases for the exporter's tests: a Prometheus with its remote-write
//! receiver on ([`PrometheusServer`]), or a VictoriaMetrics, on a free loopback port with a
//! temporary data dir, killed and removed when dropped. Either can be killed and started again
//! on the same port and data, and read back with PromQL.
//!
//! The binaries are Debian's (`apt-get install prometheus victoria-metrics`); `PROMETHEUS_BIN`
//! and `VICTORIA_METRICS_BIN` override them.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use telemetry_shared::{Message, config::Columns, exposition};

use crate::{HarnessError, PrometheusOptions, PrometheusServer, free_port, io};

/// Which server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TsdbKind {
    /// Prometheus; `out_of_order_window` is its `storage.tsdb.out_of_order_time_window`
    /// (`None`: not set).
    Prometheus {
        /// The window.
        out_of_order_window: Option<Duration>,
    },
    /// VictoriaMetrics; `dedup` is its `-dedup.minScrapeInterval` (`None`: not set).
    VictoriaMetrics {
        /// e.g. `"1ms"`.
        dedup: Option<String>,
    },
}

impl TsdbKind {
    /// Prometheus with a one-hour out-of-order window: what the exporter needs.
    pub fn prometheus() -> Self {
        TsdbKind::Prometheus {
            out_of_order_window: Some(Duration::from_secs(3600)),
        }
    }

    /// VictoriaMetrics that removes identical re-sent samples: what the exporter needs.
    pub fn victoria_metrics() -> Self {
        TsdbKind::VictoriaMetrics {
            dedup: Some("1ms".into()),
        }
    }
}

/// A running (or killed) TSDB; see the module docs.
#[derive(Debug)]
pub struct Tsdb {
    server: Server,
    http: reqwest::Client,
}

#[derive(Debug)]
enum Server {
    Prometheus(PrometheusServer),
    Victoria(Victoria),
}

/// A VictoriaMetrics process.
#[derive(Debug)]
struct Victoria {
    dedup: Option<String>,
    port: u16,
    child: Option<Child>,
    // Declared last: removed after the process is killed.
    dir: tempfile::TempDir,
}

fn binary(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

impl Victoria {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("victoria-metrics.log")
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn spawn(&mut self, http: &reqwest::Client) -> Result<(), HarnessError> {
        self.kill();
        let mut cmd = Command::new(binary("VICTORIA_METRICS_BIN", "victoria-metrics"));
        cmd.arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
            .arg(format!(
                "-storageDataPath={}",
                self.dir.path().join("data").display()
            ))
            .arg("-retentionPeriod=100y")
            .arg("-search.latencyOffset=0s")
            .arg("-loggerLevel=WARN");
        if let Some(dedup) = &self.dedup {
            cmd.arg(format!("-dedup.minScrapeInterval={dedup}"));
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("opening the VictoriaMetrics log"))?;
        let log_err = log.try_clone().map_err(io("opening the VictoriaMetrics log"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        self.child = Some(cmd.spawn().map_err(io(
            "starting victoria-metrics (install Debian's victoria-metrics; VICTORIA_METRICS_BIN overrides it)",
        ))?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(self.not_ready(format!("the process exited ({status})")));
            }
            let url = format!("{}/health", self.base_url());
            if let Ok(resp) = http.get(&url).send().await
                && resp.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.not_ready("not ready after 30s".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn not_ready(&self, reason: String) -> HarnessError {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        HarnessError::Io {
            context: format!("VictoriaMetrics did not start: {reason}; log:\n{log}"),
            source: std::io::Error::other("not ready"),
        }
    }
}

impl Drop for Victoria {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Tsdb {
    /// Starts a server of `kind` and waits until it is ready.
    pub async fn start(kind: TsdbKind) -> Result<Self, HarnessError> {
        let http = reqwest::Client::new();
        let server = match kind {
            TsdbKind::Prometheus { out_of_order_window } => Server::Prometheus(
                PrometheusServer::start(PrometheusOptions {
                    scrape_interval: Duration::from_secs(3600),
                    remote_write_receiver: true,
                    out_of_order_window,
                    ..PrometheusOptions::default()
                })
                .await?,
            ),
            TsdbKind::VictoriaMetrics { dedup } => {
                let mut victoria = Victoria {
                    dedup,
                    port: free_port()?,
                    child: None,
                    dir: tempfile::Builder::new()
                        .prefix("telemetry-vm-")
                        .tempdir()
                        .map_err(io("creating a temporary dir"))?,
                };
                victoria.spawn(&http).await?;
                Server::Victoria(victoria)
            }
        };
        Ok(Tsdb { server, http })
    }

    /// Kills the server (SIGKILL); its data is kept.
    pub fn kill(&mut self) {
        match &mut self.server {
            Server::Prometheus(p) => p.kill(),
            Server::Victoria(v) => v.kill(),
        }
    }

    /// Starts the server again on its port, with its data, and waits until it is ready.
    pub async fn start_again(&mut self) -> Result<(), HarnessError> {
        match &mut self.server {
            Server::Prometheus(p) => p.restart().await,
            Server::Victoria(v) => v.spawn(&self.http).await,
        }
    }

    /// `http://127.0.0.1:{port}`.
    pub fn base_url(&self) -> String {
        match &self.server {
            Server::Prometheus(p) => p.url(),
            Server::Victoria(v) => v.base_url(),
        }
    }

    /// The remote-write URL, as `REMOTE_WRITE_URL` takes it.
    pub fn write_url(&self) -> String {
        format!("{}/api/v1/write", self.base_url())
    }

    /// Makes what was written visible to queries (VictoriaMetrics buffers recent samples for
    /// about a second; Prometheus needs nothing).
    pub async fn flush(&self) -> Result<(), HarnessError> {
        if matches!(self.server, Server::Victoria(_)) {
            let url = format!("{}/internal/force_flush", self.base_url());
            self.http.get(url).send().await.map_err(http_error)?;
        }
        Ok(())
    }

    /// Evaluates an instant PromQL query at `time` (Unix seconds); returns `data.result`.
    pub async fn query(&self, promql: &str, time: f64) -> Result<serde_json::Value, HarnessError> {
        self.flush().await?;
        let url = format!("{}/api/v1/query", self.base_url());
        let resp = self
            .http
            .get(url)
            .query(&[
                ("query", promql),
                ("time", &format!("{time:.3}")),
                ("nocache", "1"),
            ])
            .send()
            .await
            .map_err(http_error)?;
        let body: serde_json::Value = resp.json().await.map_err(http_error)?;
        if body["status"] != "success" {
            return Err(HarnessError::Io {
                context: format!("query {promql}"),
                source: std::io::Error::other(body.to_string()),
            });
        }
        Ok(body["data"]["result"].clone())
    }

    /// A query's single scalar result (`sum(...)` and the like), 0 when it returns nothing.
    pub async fn query_number(&self, promql: &str, time: f64) -> Result<f64, HarnessError> {
        let result = self.query(promql, time).await?;
        Ok(result[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    }

    /// `count_over_time` summed over every series whose name matches `name_regex` (one query
    /// per metric name: `count_over_time` drops the name, so series of two metrics with the
    /// same labels cannot share one query's result).
    pub async fn count_over_time(
        &self,
        name_regex: &str,
        window: &str,
        time: f64,
    ) -> Result<u64, HarnessError> {
        self.flush().await?;
        let url = format!("{}/api/v1/label/__name__/values", self.base_url());
        let body: serde_json::Value = self
            .http
            .get(url)
            .send()
            .await
            .map_err(http_error)?
            .json()
            .await
            .map_err(http_error)?;
        let pattern = format!("^(?:{name_regex})$");
        let mut total = 0u64;
        for name in body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str())
        {
            if !matches_anchored(&pattern, name) {
                continue;
            }
            let n = self
                .query_number(&format!("sum(count_over_time({name}[{window}]))"), time)
                .await?;
            total += n as u64;
        }
        Ok(total)
    }

    /// Every sample of every series whose name matches `name_regex`, within `window` before
    /// `time` (Unix seconds): (metric name, sorted labels without `__name__`, timestamp in ms,
    /// value), sorted.
    pub async fn samples(
        &self,
        name_regex: &str,
        window: &str,
        time: f64,
    ) -> Result<Vec<ExportedSample>, HarnessError> {
        let result = self
            .query(&format!("{{__name__=~\"{name_regex}\"}}[{window}]"), time)
            .await?;
        let mut out = Vec::new();
        for series in result.as_array().into_iter().flatten() {
            let mut labels: Vec<(String, String)> = series["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let name = labels
                .iter()
                .position(|(k, _)| k == "__name__")
                .map(|i| labels.remove(i).1)
                .unwrap_or_default();
            labels.sort();
            for point in series["values"].as_array().into_iter().flatten() {
                let ms = (point[0].as_f64().unwrap_or(0.0) * 1000.0).round() as i64;
                let value = point[1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                out.push(ExportedSample {
                    name: name.clone(),
                    labels: labels.clone(),
                    timestamp_ms: ms,
                    value,
                });
            }
        }
        out.sort_by(|a, b| (&a.name, &a.labels, a.timestamp_ms).cmp(&(&b.name, &b.labels, b.timestamp_ms)));
        Ok(out)
    }
}

/// The samples `records` must have become in a TSDB, sorted like [`Tsdb::samples`] (default
/// columns). Two records of one series in the same millisecond with the same value are one
/// sample in any TSDB (two streamer workers reading the same row at once do that), so it is
/// listed once.
pub fn expected_samples<'a>(records: impl IntoIterator<Item = &'a Message>) -> Vec<ExportedSample> {
    let mut out: Vec<ExportedSample> = records
        .into_iter()
        .flat_map(|m| exposition::samples(m, &Columns::default()).unwrap_or_default())
        .map(|s| ExportedSample {
            name: s.name,
            labels: s.labels,
            timestamp_ms: s.timestamp_ms,
            value: s.value,
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.name, &a.labels, a.timestamp_ms)
            .cmp(&(&b.name, &b.labels, b.timestamp_ms))
            .then(a.value.total_cmp(&b.value))
    });
    out.dedup_by(|a, b| {
        a.name == b.name && a.labels == b.labels && a.timestamp_ms == b.timestamp_ms && a.value == b.value
    });
    out
}

/// A sample as read back from a TSDB.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportedSample {
    /// Metric name.
    pub name: String,
    /// Labels, sorted, without `__name__`.
    pub labels: Vec<(String, String)>,
    /// Timestamp, Unix ms.
    pub timestamp_ms: i64,
    /// Value.
    pub value: f64,
}

/// The regexes tests use are a literal prefix and `.+` or `.*` (`DCGM_.+`); anything else
/// matches only itself.
fn matches_anchored(pattern: &str, name: &str) -> bool {
    let inner = pattern.trim_start_matches("^(?:").trim_end_matches(")$");
    if let Some(prefix) = inner.strip_suffix(".+") {
        name.len() > prefix.len() && name.starts_with(prefix)
    } else if let Some(prefix) = inner.strip_suffix(".*") {
        name.starts_with(prefix)
    } else {
        name == inner
    }
}

fn http_error(err: reqwest::Error) -> HarnessError {
    HarnessError::Io {
        context: "asking the TSDB".into(),
        source: std::io::Error::other(err.to_string()),
    }
}

/// Is the binary of `kind` installed? (Tests that need it say so instead of failing obscurely.)
pub fn installed(kind: &TsdbKind) -> bool {
    let (var, default) = match kind {
        TsdbKind::Prometheus { .. } => ("PROMETHEUS_BIN", "prometheus"),
        TsdbKind::VictoriaMetrics { .. } => ("VICTORIA_METRICS_BIN", "victoria-metrics"),
    };
    let bin = binary(var, default);
    if bin.components().count() > 1 {
        return bin.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| Path::new(&dir).join(&bin).is_file()))
}
