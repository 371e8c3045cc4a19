//! Exposition servers for the scrape source: [`ExpositionServer`], a small HTTP server on a
//! free loopback port that serves the DCGM sample the way dcgm-exporter would (and simulated
//! targets for the benchmark), and can be told to misbehave; and [`NodeExporter`], Debian's
//! `prometheus-node-exporter` on a free port.
//!
//! Paths of an [`ExpositionServer`]:
//! - `/metrics`: the 2,470 rows of `data/dcgm_sample.csv` as 2,470 series of dcgm-exporter text
//!   (labels `gpu`, `UUID`, `device`, `modelName`, `Hostname` and those of `labels_raw`).
//! - `/targets/{i}/metrics`: simulated target `i`: [`SIM_SERIES`] series, 10 metrics of 8 GPUs on
//!   host `sim-{i:04}`, whose values change with every request.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{HarnessError, free_port, io, sample};

/// Series of one simulated target.
pub const SIM_SERIES: usize = 80;

/// The ten DCGM metrics of the sample.
const SIM_METRICS: [&str; 10] = [
    "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_ENC_UTIL",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_SM_CLOCK",
];

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Exposition text (the Prometheus text format 0.0.4).
    Serve,
    /// The same series as OpenMetrics 1.0 (`application/openmetrics-text`, `# EOF`).
    OpenMetrics,
    /// A 200 answer whose body is not exposition text.
    Garbage,
    /// Reads the request and never answers.
    Stall,
    /// Answers with this HTTP status and no body.
    Status(u16),
}

#[derive(Debug)]
struct Shared {
    behaviour: Mutex<Behaviour>,
    requests: AtomicU64,
    dcgm: String,
}

/// A running exposition server; stopped when dropped.
#[derive(Debug)]
pub struct ExpositionServer {
    port: u16,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl ExpositionServer {
    /// Starts a server on a free port, serving exposition text.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_on(std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts a server on `addr` (port 0: a free one).
    pub async fn start_on(addr: std::net::SocketAddr) -> Result<Self, HarnessError> {
        let dcgm = dcgm_text()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(io(format!("binding the exposition server to {addr}")))?;
        let port = listener
            .local_addr()
            .map_err(io("reading the exposition server's port"))?
            .port();
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(Behaviour::Serve),
            requests: AtomicU64::new(0),
            dcgm,
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(accept(listener, shared.clone(), stopped));
        Ok(ExpositionServer { port, shared, stop })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the DCGM sample.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.port)
    }

    /// The URL of simulated target `i`.
    pub fn target_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/targets/{i}/metrics", self.port)
    }

    /// Changes how it answers from the next request on.
    pub fn set(&self, behaviour: Behaviour) {
        if let Ok(mut b) = self.shared.behaviour.lock() {
            *b = behaviour;
        }
    }

    /// Requests answered or stalled so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }
}

impl Drop for ExpositionServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                tokio::spawn(serve(stream, shared.clone(), stopped.clone()));
            }
        }
    }
}

/// Answers the requests of one connection (keep-alive), until it closes or the server stops.
async fn serve(mut stream: TcpStream, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let Some(path) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let n = shared.requests.fetch_add(1, Ordering::Relaxed);
        let behaviour = shared.behaviour.lock().map(|b| *b).unwrap_or(Behaviour::Serve);
        let mut content_type = "text/plain; version=0.0.4; charset=utf-8";
        let (status, body) = match behaviour {
            Behaviour::Stall => {
                let _ = stopped.changed().await;
                return;
            }
            Behaviour::Status(code) => (code, String::new()),
            Behaviour::Garbage => (200, "<html><body>502 Bad Gateway</body></html>\n".to_string()),
            Behaviour::Serve | Behaviour::OpenMetrics => {
                let (status, mut body) = match path.as_str() {
                    "/metrics" => (200, shared.dcgm.clone()),
                    other => match simulated_target(other) {
                        Some(i) => (200, simulated_text(i, n)),
                        None => (404, String::new()),
                    },
                };
                if behaviour == Behaviour::OpenMetrics && status == 200 {
                    content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                    body.push_str("# EOF\n");
                }
                (status, body)
            }
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(body.as_bytes()).await.is_err()
        {
            return;
        }
    }
}

/// Reads one request's head; its path, or `None` when the connection ends.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return head.split_whitespace().nth(1).map(str::to_string);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn simulated_target(path: &str) -> Option<usize> {
    path.strip_prefix("/targets/")?
        .strip_suffix("/metrics")?
        .parse()
        .ok()
}

/// Simulated target `i`'s text at request `n`: 10 metrics × 8 GPUs.
fn simulated_text(i: usize, n: u64) -> String {
    let mut out = String::with_capacity(SIM_SERIES * 200);
    for metric in SIM_METRICS {
        out.push_str(&format!("# HELP {metric} simulated\n# TYPE {metric} gauge\n"));
        for gpu in 0..SIM_SERIES / SIM_METRICS.len() {
            out.push_str(&format!(
                "{metric}{{gpu=\"{gpu}\",UUID=\"GPU-sim-{i:04}-{gpu}\",device=\"nvidia{gpu}\",modelName=\"{}\",Hostname=\"sim-{i:04}\",DCGM_FI_DRIVER_VERSION=\"535.129.03\"}} {}\n",
                sample::MODEL,
                (n + gpu as u64) % 100
            ));
        }
    }
    out
}

/// The sample as dcgm-exporter text: one series per row, grouped by metric.
fn dcgm_text() -> Result<String, HarnessError> {
    let (_, lines) = sample::lines().map_err(io("reading the DCGM sample"))?;
    let mut by_metric: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for line in lines {
        // Every field is quoted and only labels_raw (the last) holds commas.
        let fields: Vec<String> = line
            .splitn(12, "\",\"")
            .map(|f| f.trim_matches('"').replace("\"\"", "\""))
            .collect();
        if fields.len() != 12 {
            continue;
        }
        let (metric, gpu, device, uuid, model, host, value, raw) = (
            &fields[1],
            &fields[2],
            &fields[3],
            &fields[4],
            &fields[5],
            &fields[6],
            &fields[10],
            &fields[11],
        );
        let mut labels = vec![
            ("gpu".to_string(), gpu.clone()),
            ("UUID".to_string(), uuid.clone()),
            ("device".to_string(), device.clone()),
            ("modelName".to_string(), model.clone()),
            ("Hostname".to_string(), host.clone()),
        ];
        for (name, v) in telemetry_shared::exposition::parse_labels_raw(raw) {
            let skip = ["__name__", "instance", "job"].contains(&name.as_str())
                || labels.iter().any(|(n, _)| *n == name)
                || v.is_empty();
            if !skip {
                labels.push((name, v));
            }
        }
        let mut text = metric.clone();
        text.push('{');
        for (i, (name, v)) in labels.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(name);
            text.push('=');
            telemetry_shared::exposition::escape_label_value(v, &mut text);
        }
        text.push_str(&format!("}} {value}\n"));
        by_metric.entry(metric.clone()).or_default().push(text);
    }
    let mut out = String::new();
    for (metric, lines) in by_metric {
        out.push_str(&format!("# HELP {metric} DCGM sample\n# TYPE {metric} gauge\n"));
        for line in lines {
            out.push_str(&line);
        }
    }
    Ok(out)
}

/// Debian's `prometheus-node-exporter` (`NODE_EXPORTER_BIN` overrides) on a free loopback
/// port; stopped when dropped.
#[derive(Debug)]
pub struct NodeExporter {
    child: Child,
    port: u16,
}

/// The node exporter binary: `$NODE_EXPORTER_BIN`, else `prometheus-node-exporter` on `PATH`.
pub fn node_exporter_binary() -> PathBuf {
    std::env::var_os("NODE_EXPORTER_BIN")
        .map_or_else(|| PathBuf::from("prometheus-node-exporter"), PathBuf::from)
}

impl NodeExporter {
    /// Starts it and waits until `/metrics` answers.
    pub async fn start() -> Result<Self, HarnessError> {
        let port = free_port()?;
        let child = Command::new(node_exporter_binary())
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting prometheus-node-exporter"))?;
        let exporter = NodeExporter { child, port };
        let ready = crate::eventually(Duration::from_secs(20), || async {
            matches!(crate::http_get(port, "/metrics").await, Ok((200, _)))
        })
        .await;
        if !ready {
            return Err(HarnessError::Timeout(
                "prometheus-node-exporter did not answer".into(),
            ));
        }
        Ok(exporter)
    }

    /// The URL of its `/metrics`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.port)
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_becomes_one_series_per_row() {
        let text = dcgm_text().expect("sample");
        let series = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(series as u64, sample::ROWS);
        assert!(text.contains("DCGM_FI_DRIVER_VERSION=\""), "{}", &text[..400]);
        assert_eq!(
            simulated_text(3, 0)
                .lines()
                .filter(|l| !l.starts_with('#'))
                .count(),
            SIM_SERIES
        );
        assert_eq!(simulated_target("/targets/42/metrics"), Some(42));
    }
}
