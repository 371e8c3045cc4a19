//! Pipeline phases of `telemetry-bench` beyond throughput: raw single-put ceilings,
//! enqueue-to-commit latency, the peak memory of each service run as a real process, and the
//! open-file limit the gateway load phase needs.

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use etcd_client::Client;
use futures::StreamExt as _;
use telemetry_harness::count;
use telemetry_shared::{
    Keyspace,
    watch::{Follow, Update},
};
use telemetry_streamer::{Flags, StreamerConfig};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::gateway_bench::{Percentiles, percentiles};

/// Keys per second written by single puts (no transaction) of `value_len`-byte values: `tasks`
/// tasks, each sending one put at a time in a loop, for `seconds`. One task measures the
/// round trip of a durable write; many show how far etcd batches concurrent proposals.
pub async fn raw_put_rate(
    client: &Client,
    tasks: usize,
    value_len: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let value = vec![b'x'; value_len];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let mut client = client.clone();
        let value = value.clone();
        set.spawn(async move {
            let mut keys = 0u64;
            while Instant::now() < deadline {
                client
                    .put(format!("/bench/put/{t}/{keys}"), value.clone(), None)
                    .await?;
                keys += 1;
            }
            anyhow::Ok(keys)
        });
    }
    let started = Instant::now();
    let mut total = 0;
    while let Some(result) = set.join_next().await {
        total += result??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Starts `collectors` in-process collectors on namespace `ns` and waits until they own all 32
/// queue partitions. Returns their stop tokens and tasks.
async fn start_collectors(
    endpoint: &str,
    client: &Client,
    ns: &str,
    collectors: usize,
) -> anyhow::Result<Vec<RunningCollector>> {
    let keys = Keyspace::new(ns);
    let mut running = Vec::new();
    for i in 0..collectors {
        let vars = vec![
            ("ETCD_ENDPOINTS".to_string(), endpoint.to_string()),
            ("ETCD_NAMESPACE".to_string(), ns.to_string()),
            ("COLLECTOR_ID".to_string(), format!("bench-{i}")),
            ("LEASE_TTL".to_string(), "10s".to_string()),
        ];
        let config = telemetry_collector::CollectorConfig::from_vars(vars)?;
        let stop = CancellationToken::new();
        running.push((
            stop.clone(),
            tokio::spawn(telemetry_collector::run(config, client.clone(), stop)),
        ));
    }
    wait_for_owners(client, &keys, Duration::from_secs(20)).await?;
    Ok(running)
}

/// Waits until every one of the 32 queue partitions has an owner.
async fn wait_for_owners(client: &Client, keys: &Keyspace, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while count(client, &keys.owners_prefix()).await? < 32 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the collectors did not own all 32 partitions within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

type RunningCollector = (
    CancellationToken,
    tokio::task::JoinHandle<Result<telemetry_collector::Totals, telemetry_collector::CollectorError>>,
);

/// Enqueue-to-commit latency: `collectors` in-process collectors drain while a streamer with
/// `workers` workers enqueues every row of `csv` (one pass each) at `rate` rows/s per worker,
/// so the queue stays short. A watch on the data prefix sees every stored record; its latency is
/// the wall-clock arrival of the watch event minus the message's `timestamp` (set by the
/// streamer when it built the message, just before its enqueue transaction). It therefore
/// includes the streamer's transaction, the collector's pickup and commit, and the watch
/// delivery to this process.
pub async fn enqueue_to_commit(
    endpoint: &str,
    client: &Client,
    csv: &Path,
    workers: usize,
    rate: f64,
    collectors: usize,
) -> anyhow::Result<Percentiles> {
    let ns = "/latency";
    let keys = Keyspace::new(ns);
    let running = start_collectors(endpoint, client, ns, collectors).await?;
    let from = telemetry_shared::etcd::current_revision(client).await? + 1;
    let mut follow = Follow::new(client, keys.data_prefix(), from).without_deletes();
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let seen = Arc::new(AtomicU64::new(0));
    let stop_watch = CancellationToken::new();
    let watcher = {
        let (samples, seen, stop) = (samples.clone(), seen.clone(), stop_watch.clone());
        tokio::spawn(async move {
            loop {
                let changes = match follow.next(&stop).await {
                    None => return anyhow::Ok(()),
                    Some(Update::Compacted { .. }) => {
                        anyhow::bail!("the data watch fell behind a compaction")
                    }
                    Some(Update::Changes { changes, .. }) => changes,
                };
                let arrived = chrono::Utc::now();
                let mut batch = Vec::new();
                for change in changes {
                    // The record's key carries its processing time.
                    let key = change.key_str();
                    let written = keys
                        .parse_data_record(&key)
                        .and_then(|parts| telemetry_shared::Timestamp::parse(parts.timestamp).ok())
                        .with_context(|| format!("stored record {key}"))?;
                    let micros = (arrived - written.as_datetime())
                        .num_microseconds()
                        .unwrap_or(i64::MAX);
                    batch.push(micros as f64 / 1000.0);
                }
                seen.fetch_add(batch.len() as u64, Ordering::Relaxed);
                samples
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .extend(batch);
            }
        })
    };
    let vars = vec![
        ("ETCD_ENDPOINTS".to_string(), endpoint.to_string()),
        ("ETCD_NAMESPACE".to_string(), ns.to_string()),
        ("CSV_PATH".to_string(), csv.display().to_string()),
        ("RATE".to_string(), rate.to_string()),
        ("LOOP".to_string(), "false".to_string()),
        ("WORKERS".to_string(), workers.to_string()),
        ("STREAM_ID".to_string(), "latency".to_string()),
        ("PROGRESS_INTERVAL".to_string(), "1h".to_string()),
    ];
    let config = StreamerConfig::from_vars(vars, &Flags::default())?;
    let totals = telemetry_streamer::run(config, client.clone(), CancellationToken::new()).await?;
    let expected = totals.enqueued;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.load(Ordering::Relaxed) < expected && !watcher.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_seen = seen.load(Ordering::Relaxed) >= expected;
    stop_watch.cancel();
    watcher.await??;
    anyhow::ensure!(
        all_seen,
        "the data watch saw {} of {expected} records within 60 s of the streamer's end",
        seen.load(Ordering::Relaxed)
    );
    for (stop, task) in running {
        stop.cancel();
        task.await??;
    }
    let samples = std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    anyhow::ensure!(
        samples.len() as u64 == expected,
        "{} records stored, {expected} enqueued",
        samples.len()
    );
    Ok(percentiles(samples))
}

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

/// `VmHWM` (peak resident set) of a live process, in KiB.
fn vm_hwm_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .with_context(|| format!("no VmHWM in /proc/{pid}/status (has it exited?)"))?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM without a value")?
        .parse()?;
    Ok(kib)
}

/// A service binary run as a child process, with its peak RSS tracked.
struct Service {
    name: String,
    child: Child,
    pid: u32,
    peak_kib: u64,
}

impl Service {
    fn spawn(bin_dir: &Path, binary: &str, name: String, vars: &[(&str, String)]) -> anyhow::Result<Self> {
        let path = bin_dir.join(binary);
        anyhow::ensure!(
            path.is_file(),
            "{} not found: build the services with `cargo build --release --bins -p telemetry-streamer \
             -p telemetry-collector -p telemetry-gateway` (scripts/bench does)",
            path.display()
        );
        let mut command = Command::new(&path);
        // Only the variables given (a stray ETCD_NAMESPACE in the caller's shell must not leak in).
        command.env_clear();
        command
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        let pid = child.id().context("child has no pid")?;
        Ok(Service {
            name,
            child,
            pid,
            peak_kib: 0,
        })
    }

    /// Reads `VmHWM` if the process is still alive (it is monotonic, so the last read wins).
    fn sample(&mut self) -> bool {
        match vm_hwm_kib(self.pid) {
            Ok(kib) => {
                self.peak_kib = self.peak_kib.max(kib);
                true
            }
            Err(_) => false,
        }
    }

    /// Returns its exit status if it has exited.
    fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Reads `VmHWM` once more, sends SIGTERM and waits (up to 30 s) for a clean exit.
    async fn stop(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.sample(),
            "{} (pid {}) exited before it was stopped",
            self.name,
            self.pid
        );
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.pid);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within 30 s of SIGTERM", self.name))??;
        anyhow::ensure!(
            status.success(),
            "{} exited with {status} after SIGTERM",
            self.name
        );
        Ok(())
    }

    fn peak_mib(&self) -> f64 {
        self.peak_kib as f64 / 1024.0
    }
}

/// Where the release service binaries are: next to this binary (`target/release/`).
pub fn service_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating telemetry-bench")?;
    Ok(exe
        .parent()
        .context("telemetry-bench has no directory")?
        .to_path_buf())
}

/// Peak RSS of each service, run as real processes from `bin_dir`: `collectors` collectors and a
/// gateway with `subscribers` WebSocket subscribers (all records, read as they come) are
/// started, then a one-shot streamer with `workers` workers at `RATE=0` over `csv`. When every
/// message is stored, the queue is empty and the subscribers have caught up (or 30 s passed),
/// each service's `VmHWM` is read and it is stopped with SIGTERM.
pub async fn service_rss(
    endpoint: &str,
    client: &Client,
    bin_dir: &Path,
    csv: &Path,
    workers: usize,
    collectors: usize,
    subscribers: usize,
) -> anyhow::Result<ServiceRss> {
    let ns = "/rss".to_string();
    let keys = Keyspace::new(&ns);
    let common = [
        ("ETCD_ENDPOINTS", endpoint.to_string()),
        ("ETCD_NAMESPACE", ns.clone()),
    ];
    let mut running = Vec::new();
    for i in 0..collectors {
        let mut vars = common.to_vec();
        vars.extend([
            ("COLLECTOR_ID", format!("rss-{i}")),
            ("LEASE_TTL", "10s".to_string()),
        ]);
        running.push(Service::spawn(
            bin_dir,
            "telemetry-collector",
            format!("collector {i}"),
            &vars,
        )?);
    }
    let port = telemetry_harness::free_port()?;
    let mut vars = common.to_vec();
    vars.extend([
        ("GATEWAY_HOST", "127.0.0.1".to_string()),
        ("GATEWAY_PORT", port.to_string()),
        ("WS_MAX_CONNECTIONS", (subscribers + 100).to_string()),
    ]);
    let mut gateway = Service::spawn(bin_dir, "telemetry-gateway", "gateway".into(), &vars)?;
    let addr = format!("127.0.0.1:{port}");

    wait_for_owners(client, &keys, Duration::from_secs(30)).await?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http.get(format!("http://{addr}/health")).send().await {
            Ok(r) if r.status().is_success() => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => anyhow::bail!("the gateway process did not answer /health within 30 s: {other:?}"),
        }
    }

    // Subscribers read every frame as it comes and count records, without building values.
    #[derive(serde::Deserialize)]
    struct Frame {
        #[serde(default)]
        records: Vec<serde::de::IgnoredAny>,
    }
    let received: Arc<Vec<AtomicU64>> = Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
    let mut readers = tokio::task::JoinSet::new();
    for s in 0..subscribers {
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

    let mut vars = common.to_vec();
    vars.extend([
        ("CSV_PATH", csv.display().to_string()),
        ("RATE", "0".to_string()),
        ("LOOP", "false".to_string()),
        ("MAX_QUEUE_DEPTH", "0".to_string()),
        ("WORKERS", workers.to_string()),
        ("STREAM_ID", "rss".to_string()),
        ("PROGRESS_INTERVAL", "1h".to_string()),
    ]);
    let started = Instant::now();
    let mut streamer = Service::spawn(bin_dir, "telemetry-streamer", "streamer".into(), &vars)?;
    let data_rows = std::fs::read_to_string(csv)?.lines().count().saturating_sub(1);
    let expected = (data_rows * workers) as i64;
    let mut streamer_done = false;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut stored_at = None;
    loop {
        // VmHWM only grows, so the last sample before exit is the streamer's peak (to 100 ms).
        if !streamer_done {
            streamer.sample();
            if let Some(status) = streamer.exited()? {
                anyhow::ensure!(status.success(), "the streamer process exited with {status}");
                streamer_done = true;
            }
        }
        for service in running.iter_mut().chain(std::iter::once(&mut gateway)) {
            if let Some(status) = service.exited()? {
                anyhow::bail!("{} exited on its own with {status}", service.name);
            }
            service.sample();
        }
        if stored_at.is_none()
            && streamer_done
            && count(client, &keys.queue_prefix()).await? == 0
            && count(client, &keys.data_prefix()).await? >= expected
        {
            stored_at = Some(started.elapsed().as_secs_f64());
        }
        let caught_up = received
            .iter()
            .all(|r| r.load(Ordering::Relaxed) >= expected as u64);
        if let Some(at) = stored_at
            && (caught_up || started.elapsed().as_secs_f64() > at + 30.0)
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every message stored within 600 s ({} of {expected})",
            count(client, &keys.data_prefix()).await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateway.stop().await?;
    for service in &mut running {
        service.stop().await?;
    }
    readers.abort_all();
    while readers.join_next().await.is_some() {}
    let complete = received
        .iter()
        .filter(|r| r.load(Ordering::Relaxed) >= expected as u64)
        .count();
    let stored = count(client, &keys.data_prefix()).await?;
    anyhow::ensure!(stored == expected, "{stored} records stored, expected {expected}");
    Ok(ServiceRss {
        streamer: streamer.peak_mib(),
        collectors: running.iter().map(Service::peak_mib).collect(),
        gateway: gateway.peak_mib(),
        messages: expected as u64,
        subscribers_complete: complete,
        seconds: stored_at.unwrap_or_default(),
    })
}

/// The soft and hard open-file limits of this process, from `/proc/self/limits`
/// (`None` stands for unlimited).
pub fn open_file_limits() -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no \"Max open files\" in /proc/self/limits")?;
    let mut values = line["Max open files".len()..].split_whitespace();
    let mut parse = || -> anyhow::Result<Option<u64>> {
        match values.next().context("short \"Max open files\" line")? {
            "unlimited" => Ok(None),
            v => Ok(Some(v.parse()?)),
        }
    };
    let soft = parse()?;
    let hard = parse()?;
    Ok((soft, hard))
}

/// Fails with what to run when the soft open-file limit is below `needed`.
pub fn ensure_open_files(needed: u64) -> anyhow::Result<()> {
    let (soft, hard) = open_file_limits()?;
    if let Some(soft) = soft
        && soft < needed
    {
        let hard = hard.map_or("unlimited".to_string(), |h| h.to_string());
        anyhow::bail!(
            "the open-file limit is {soft} (hard limit {hard}), and the gateway load phase needs about \
             {needed} descriptors (client and server side of every REST connection and WebSocket, in \
             this one process). Raise it with `ulimit -n {needed}` in this shell (scripts/bench raises \
             the soft limit to the hard one), or pass smaller --rest-clients/--ws-load-subscribers."
        );
    }
    Ok(())
}
