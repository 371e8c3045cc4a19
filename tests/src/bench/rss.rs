//! Peak memory of each service, run as a real process (`target/release/`): collectors and a
//! gateway with WebSocket subscribers are started, then a one-shot streamer; when every message
//! is stored each service's `VmHWM` is read and it is stopped with SIGTERM.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use telemetry_harness::{Env, Probe, ProcessSpec, ServiceProcess, free_port};

use super::pipeline::Target;

/// Peak resident memory (`VmHWM`) of each service, in MiB.
#[derive(Debug)]
pub struct ServiceRss {
    /// The streamer (sampled every 100 ms until it exited on its own).
    pub streamer: f64,
    /// Each collector, read just before its SIGTERM.
    pub collectors: Vec<f64>,
    /// The gateway, read just before its SIGTERM.
    pub gateway: f64,
    /// Messages the streamer enqueued (and the collectors stored).
    pub messages: u64,
    /// Subscribers that received every stored record before the gateway stopped.
    pub subscribers_complete: usize,
    /// Seconds from the streamer's start until every message was stored.
    pub seconds: f64,
}

/// A service process with the highest `VmHWM` read so far.
struct Tracked {
    process: ServiceProcess,
    peak_kib: u64,
}

impl Tracked {
    /// Starts `binary` from `bin_dir` with `env`; its log goes to this process's standard error
    /// (at `warn`), so the bench's reader sees the services' warnings.
    fn start(bin_dir: &Path, binary: &str, env: Env) -> anyhow::Result<Self> {
        let path = bin_dir.join(binary);
        anyhow::ensure!(
            path.is_file(),
            "{} not found: build the services with `cargo build --release --bins -p telemetry-streamer \
             -p telemetry-collector -p telemetry-gateway` (scripts/bench does)",
            path.display()
        );
        let process = ProcessSpec::new(path)
            .env(env)
            .rust_log("warn")
            .inherit_log()
            .start()?;
        Ok(Tracked { process, peak_kib: 0 })
    }

    /// Reads `VmHWM` if the process is still alive (it only grows, so the last read wins).
    fn sample(&mut self) -> bool {
        match self.process.peak_rss_kib() {
            Some(kib) => {
                self.peak_kib = self.peak_kib.max(kib);
                true
            }
            None => false,
        }
    }

    /// Fails if it exited on its own; otherwise samples it.
    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.process.try_status() {
            anyhow::bail!("{} exited on its own with {status}", self.process.name());
        }
        self.sample();
        Ok(())
    }

    /// Reads `VmHWM` once more, sends SIGTERM and waits (up to 30 s) for a clean exit.
    async fn stop(&mut self) -> anyhow::Result<()> {
        let name = self.process.name().to_string();
        anyhow::ensure!(
            self.sample(),
            "{name} (pid {}) exited before it was stopped",
            self.process.pid()
        );
        let status = self.process.stop(Duration::from_secs(30)).await?;
        anyhow::ensure!(status.success(), "{name} exited with {status} after SIGTERM");
        Ok(())
    }

    fn peak_mib(&self) -> f64 {
        self.peak_kib as f64 / 1024.0
    }
}

/// Peak RSS of each service, run as real processes from `bin_dir`: `collectors` collectors and a
/// gateway with `subscribers` WebSocket subscribers (all records, read as they come) are
/// started, then a one-shot streamer with `workers` workers at `RATE=0` over `csv`. When every
/// message is stored, the queue is empty and the subscribers have caught up (or 30 s passed),
/// each service's `VmHWM` is read and it is stopped with SIGTERM.
pub async fn service_rss(
    target: &Target,
    bin_dir: &Path,
    csv: &Path,
    workers: usize,
    collectors: usize,
    subscribers: usize,
) -> anyhow::Result<ServiceRss> {
    let env = Env::etcd(target.endpoint.clone(), "/rss");
    let probe = Probe::new(&target.client, "/rss");
    let (mut running, mut gateway, addr) = start_services(bin_dir, &env, collectors, subscribers)?;
    anyhow::ensure!(
        probe.all_partitions_owned(Duration::from_secs(30)).await,
        "the collectors did not own all 32 partitions within 30 s"
    );
    wait_healthy(&addr).await?;
    let subscribed = Subscribers::connect(&addr, subscribers).await?;

    let streamer_env = env
        .streamer(csv, "rss")
        .set("MAX_QUEUE_DEPTH", 0)
        .set("WORKERS", workers)
        .set("PROGRESS_INTERVAL", "1h");
    let data_rows = std::fs::read_to_string(csv)?.lines().count().saturating_sub(1);
    let expected = (data_rows * workers) as i64;
    let started = Instant::now();
    let mut streamer = Tracked::start(bin_dir, "telemetry-streamer", streamer_env)?;
    let stored_at = watch_until_stored(
        &probe,
        &mut streamer,
        &mut running,
        &mut gateway,
        &subscribed,
        expected,
    )
    .await?;
    let seconds = stored_at - started;
    gateway.stop().await?;
    for service in &mut running {
        service.stop().await?;
    }
    let complete = subscribed.finish(expected as u64).await;
    let stored = probe.data_count().await;
    anyhow::ensure!(stored == expected, "{stored} records stored, expected {expected}");
    Ok(ServiceRss {
        streamer: streamer.peak_mib(),
        collectors: running.iter().map(Tracked::peak_mib).collect(),
        gateway: gateway.peak_mib(),
        messages: expected as u64,
        subscribers_complete: complete,
        seconds: seconds.as_secs_f64(),
    })
}

/// Starts `collectors` collector processes and a gateway process (room for `subscribers`);
/// returns them and the gateway's address.
fn start_services(
    bin_dir: &Path,
    env: &Env,
    collectors: usize,
    subscribers: usize,
) -> anyhow::Result<(Vec<Tracked>, Tracked, String)> {
    let mut running = Vec::new();
    for i in 0..collectors {
        let env = env.clone().collector(&format!("rss-{i}")).set("LEASE_TTL", "10s");
        running.push(Tracked::start(bin_dir, "telemetry-collector", env)?);
    }
    let port = free_port()?;
    let gateway_env = env
        .clone()
        .gateway(port)
        .set("WS_MAX_CONNECTIONS", subscribers + 100);
    let gateway = Tracked::start(bin_dir, "telemetry-gateway", gateway_env)?;
    Ok((running, gateway, format!("127.0.0.1:{port}")))
}

/// Waits up to 30 s for the gateway process to answer `/health`.
async fn wait_healthy(addr: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http.get(format!("http://{addr}/health")).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => anyhow::bail!("the gateway process did not answer /health within 30 s: {other:?}"),
        }
    }
}

/// Samples every process each 100 ms until the streamer has exited, every message is stored,
/// the queue is empty and the subscribers have caught up (or 30 s passed since it was stored).
/// Returns when everything was stored. Fails if a service exits on its own, or after 600 s.
async fn watch_until_stored(
    probe: &Probe,
    streamer: &mut Tracked,
    running: &mut [Tracked],
    gateway: &mut Tracked,
    subscribed: &Subscribers,
    expected: i64,
) -> anyhow::Result<Instant> {
    let (mut streamer_done, mut stored_at) = (false, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        // VmHWM only grows, so the last sample before exit is the streamer's peak (to 100 ms).
        if !streamer_done {
            streamer.sample();
            if let Some(status) = streamer.process.try_status() {
                anyhow::ensure!(status.success(), "the streamer process exited with {status}");
                streamer_done = true;
            }
        }
        for service in running.iter_mut().chain(std::iter::once(&mut *gateway)) {
            service.check()?;
        }
        if stored_at.is_none() && streamer_done && probe.drained(expected).await {
            stored_at = Some(Instant::now());
        }
        if let Some(at) = stored_at
            && (subscribed.complete(expected as u64) == subscribed.len() || at.elapsed().as_secs_f64() > 30.0)
        {
            return Ok(at);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every message stored within 600 s ({} of {expected})",
            probe.data_count().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// WebSocket subscribers to every record, each counting the records it received.
struct Subscribers {
    received: Arc<Vec<AtomicU64>>,
    readers: tokio::task::JoinSet<()>,
}

impl Subscribers {
    /// Connects `n` subscribers to `ws://{addr}/api/v1/ws/telemetry`. They read every frame as
    /// it comes and count records, without building values.
    async fn connect(addr: &str, n: usize) -> anyhow::Result<Self> {
        #[derive(serde::Deserialize)]
        struct Frame {
            #[serde(default)]
            records: Vec<serde::de::IgnoredAny>,
        }
        let received: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let mut readers = tokio::task::JoinSet::new();
        for s in 0..n {
            let url = format!("ws://{addr}/api/v1/ws/telemetry");
            let (mut socket, _) = tokio_tungstenite::connect_async(&url)
                .await
                .with_context(|| format!("subscriber {s}: subscribing to {url}"))?;
            let received = received.clone();
            readers.spawn(async move {
                while let Some(Ok(msg)) = socket.next().await {
                    if let tokio_tungstenite::tungstenite::Message::Text(text) = msg
                        && let Ok(frame) = serde_json::from_str::<Frame>(&text)
                    {
                        received[s].fetch_add(frame.records.len() as u64, Ordering::Relaxed);
                    }
                }
            });
        }
        Ok(Subscribers { received, readers })
    }

    fn len(&self) -> usize {
        self.received.len()
    }

    /// Subscribers that have received at least `expected` records.
    fn complete(&self, expected: u64) -> usize {
        self.received
            .iter()
            .filter(|r| r.load(Ordering::Relaxed) >= expected)
            .count()
    }

    /// Stops reading; returns how many subscribers received at least `expected` records.
    async fn finish(mut self, expected: u64) -> usize {
        self.readers.abort_all();
        while self.readers.join_next().await.is_some() {}
        self.complete(expected)
    }
}
