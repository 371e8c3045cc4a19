//! Gateway figures of `telemetry-bench`: "last 100 points of one GPU" with a million points
//! stored, WebSocket write-to-delivery latency, and the load tests (a thousand concurrent REST
//! clients, a thousand WebSocket subscribers at once).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use futures::StreamExt as _;
use telemetry_shared::{Fields, Keyspace, Message, SchemaVersion, Timestamp, model::GpuInfo};

use super::{Percentiles, percentiles};

/// GPUs the stored points are spread over (the DCGM sample has 247).
pub const GPUS: usize = 250;
const HOSTS: usize = 32;

fn gpu(i: usize) -> (String, String, String) {
    let host = format!("bench-host-{:02}", i % HOSTS);
    let gpu_id = (i / HOSTS).to_string();
    let uuid = format!("GPU-bench-{i:04}");
    (host, gpu_id, uuid)
}

fn record(i: usize, at: Timestamp, seq: u128, metric: &str, value: f64) -> (String, Message) {
    let (host, gpu_id, uuid) = gpu(i);
    let mut fields = Fields::new();
    fields.insert("timestamp".into(), at.to_string().into());
    fields.insert("metric_name".into(), metric.into());
    fields.insert(
        "gpu_id".into(),
        serde_json::json!(gpu_id.parse::<f64>().unwrap_or(0.0)),
    );
    fields.insert("device".into(), format!("nvidia{gpu_id}").into());
    fields.insert("uuid".into(), uuid.into());
    fields.insert("modelName".into(), "NVIDIA H100 80GB HBM3".into());
    fields.insert("Hostname".into(), host.clone().into());
    fields.insert("value".into(), value.into());
    let id = ulid::Ulid::from_parts(at.unix_millis().max(0) as u64, seq);
    let message = Message {
        schema_version: SchemaVersion::V1,
        id,
        timestamp: at,
        idempotency_key: format!("{:064x}", seq),
        source: None,
        fields,
    };
    (host + "/" + &gpu_id, message)
}

/// Writes `points` records spread over [`GPUS`] GPUs, one per second per GPU going back from
/// now, in 128-put transactions from 16 writers, plus the GPU index. Returns the seconds taken.
pub async fn load_points(client: &Client, keys: &Keyspace, points: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let per_gpu = points.div_ceil(GPUS);
    let now = Timestamp::now().as_datetime();
    let writers = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let mut client = client.clone();
        let keys = keys.clone();
        tasks.spawn(async move {
            let mut ops = Vec::with_capacity(128);
            for n in (w..points).step_by(writers) {
                let i = n % GPUS;
                let step = (n / GPUS) as i64;
                let at = Timestamp::from_datetime(now - chrono::TimeDelta::seconds(per_gpu as i64 - step));
                let (_, message) = record(i, at, n as u128, "DCGM_FI_DEV_GPU_UTIL", (n % 100) as f64);
                let (host, gpu_id, _) = gpu(i);
                let key = keys.data_record(&host, &gpu_id, &at.to_string(), &message.id.to_string());
                ops.push(TxnOp::put(key, serde_json::to_vec(&message)?, None::<PutOptions>));
                if ops.len() == 128 {
                    client.txn(Txn::new().and_then(std::mem::take(&mut ops))).await?;
                }
            }
            if !ops.is_empty() {
                client.txn(Txn::new().and_then(ops)).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    write_index(client, keys, Timestamp::from_datetime(now)).await?;
    Ok(started.elapsed().as_secs_f64())
}

/// The GPU and host index entries of the [`GPUS`] GPUs, last seen `now`.
async fn write_index(client: &Client, keys: &Keyspace, now: Timestamp) -> anyhow::Result<()> {
    let mut client = client.clone();
    for i in 0..GPUS {
        let (hostname, gpu_id, uuid) = gpu(i);
        let info = GpuInfo {
            uuid: uuid.clone(),
            hostname: hostname.clone(),
            device: Some(format!("nvidia{gpu_id}")),
            gpu_id,
            model: Some("NVIDIA H100 80GB HBM3".into()),
            last_seen: now,
        };
        client
            .put(keys.gpu_index(&uuid), serde_json::to_vec(&info)?, None)
            .await?;
        client
            .put(keys.host_index(&hostname), hostname.clone(), None)
            .await?;
    }
    Ok(())
}

/// Where a gateway read comes from: its in-memory window, or etcd (`Cache-Control: no-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The window (the default read).
    Memory,
    /// etcd, asked for with `Cache-Control: no-cache`.
    Etcd,
}

impl Source {
    fn header(self) -> &'static str {
        match self {
            Source::Memory => "memory",
            Source::Etcd => "etcd",
        }
    }
}

/// A telemetry page as the load test checks it.
#[derive(serde::Deserialize)]
struct LastPage {
    count: u64,
    items: Vec<serde::de::IgnoredAny>,
}

/// `GET url` from `source`; checks the answer is 100 points from that source.
async fn get_last_100(http: &reqwest::Client, url: &str, source: Source) -> anyhow::Result<()> {
    let mut request = http.get(url);
    if source == Source::Etcd {
        request = request.header("cache-control", "no-cache");
    }
    let resp = request.send().await?;
    let status = resp.status();
    let served = resp
        .headers()
        .get("x-telemetry-source")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.bytes().await?;
    anyhow::ensure!(
        status.is_success(),
        "{url}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    // The whole page is parsed (it must be valid JSON), but its records are not built into
    // values: the load test measures the gateway, and building 100 records' JSON trees per
    // answer made the bench's own clients most of the CPU of both paths.
    let page: LastPage = serde_json::from_slice(&body)?;
    anyhow::ensure!(
        page.count == 100 && page.items.len() == 100,
        "{url}: expected 100 points, got {} ({} items)",
        page.count,
        page.items.len()
    );
    anyhow::ensure!(
        served == source.header(),
        "{url}: served from {served:?}, wanted {source:?}"
    );
    Ok(())
}

/// p50/p99 of `GET /api/v1/gpus/{uuid}/telemetry?limit=100` (newest first) over `requests`
/// requests for GPUs in turn, from `clients` concurrent clients, read from `source`.
pub async fn last_100_latency(
    addr: &str,
    requests: usize,
    clients: usize,
    source: Source,
) -> anyhow::Result<Percentiles> {
    let http = reqwest::Client::new();
    let samples = Arc::new(Mutex::new(Vec::with_capacity(requests)));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (http, samples, addr) = (http.clone(), samples.clone(), addr.to_string());
        tasks.spawn(async move {
            for r in (c..requests).step_by(clients) {
                let (_, _, uuid) = gpu((r * 7) % GPUS);
                let url = format!("http://{addr}/api/v1/gpus/{uuid}/telemetry?limit=100");
                let started = Instant::now();
                get_last_100(&http, &url, source).await?;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(ms);
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let samples = std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(percentiles(samples))
}

/// The first key of each GPU's newest 100 records (read once through the gateway), for
/// [`etcd_range_latency`].
pub async fn newest_100_starts(addr: &str, keys: &Keyspace) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let http = reqwest::Client::new();
    let mut starts = Vec::with_capacity(GPUS);
    for i in 0..GPUS {
        let (host, gpu_id, uuid) = gpu(i);
        let url = format!("http://{addr}/api/v1/gpus/{uuid}/telemetry?limit=100");
        let body: serde_json::Value = http.get(&url).send().await?.json().await?;
        let oldest = &body["items"][99];
        let (Some(ts), Some(id)) = (oldest["timestamp"].as_str(), oldest["id"].as_str()) else {
            anyhow::bail!("{url}: no 100th record");
        };
        let prefix = keys.gpu_data_prefix(&host, &gpu_id);
        starts.push((
            keys.data_record(&host, &gpu_id, ts, id),
            telemetry_shared::keys::prefix_end(&prefix),
        ));
    }
    Ok(starts)
}

/// p50/p99 of a direct etcd range read of the same 100 keys the gateway's "last 100" returns
/// (values included), over `requests` reads for GPUs in turn, from `clients` concurrent clients.
pub async fn etcd_range_latency(
    client: &Client,
    starts: &[(String, Vec<u8>)],
    requests: usize,
    clients: usize,
) -> anyhow::Result<Percentiles> {
    let starts = Arc::new(starts.to_vec());
    let samples = Arc::new(Mutex::new(Vec::with_capacity(requests)));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (mut kv, samples, starts) = (
            telemetry_shared::etcd::kv(client),
            samples.clone(),
            starts.clone(),
        );
        tasks.spawn(async move {
            for r in (c..requests).step_by(clients) {
                let (start, end) = &starts[(r * 7) % starts.len()];
                let options = etcd_client::GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(100);
                let started = Instant::now();
                let resp = kv.get(start.as_str(), Some(options)).await?;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                anyhow::ensure!(
                    resp.kvs().len() == 100,
                    "expected 100 keys, got {}",
                    resp.kvs().len()
                );
                samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(ms);
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let samples = std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(percentiles(samples))
}

/// Write-to-delivery latency: `subscribers` WebSocket clients, then `writes` single-record
/// transactions at `rate` per second; each delivery's latency is measured from just before its
/// write was sent. Fails on the first subscription or delivery that goes wrong.
pub async fn ws_latency(
    addr: &str,
    client: &Client,
    keys: &Keyspace,
    subscribers: usize,
    writes: usize,
    rate: f64,
) -> anyhow::Result<Percentiles> {
    let outcome = ws_deliveries(addr, client, keys, subscribers, writes, rate).await?;
    if let Some(first) = outcome.errors.first() {
        anyhow::bail!(
            "{} WebSocket failure(s), the first: {first}",
            outcome.errors.len()
        );
    }
    Ok(outcome.latency)
}

/// What a load run measured: latency of what succeeded, and every failure.
#[derive(Debug)]
pub struct LoadOutcome {
    /// Latency of the successful requests or deliveries.
    pub latency: Percentiles,
    /// One line per failed request, subscription or missing delivery.
    pub errors: Vec<String>,
    /// Wall-clock seconds the run took.
    pub seconds: f64,
}

fn lock<T>(m: &Mutex<T>) -> anyhow::Result<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| anyhow::anyhow!("poisoned"))
}

/// Load test of the REST API: `clients` concurrent clients (tasks, released together), each
/// sending `per_client` requests for "the last 100 points of one GPU" over its own kept-alive
/// connection. Failures (transport errors, non-2xx, a page without 100 points) are counted,
/// not fatal.
pub async fn rest_load(
    addr: &str,
    clients: usize,
    per_client: usize,
    source: Source,
) -> anyhow::Result<LoadOutcome> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .timeout(Duration::from_secs(120))
        .build()?;
    let samples = Arc::new(Mutex::new(Vec::with_capacity(clients * per_client)));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (http, samples, errors, start) = (http.clone(), samples.clone(), errors.clone(), start.clone());
        let addr = addr.to_string();
        tasks.spawn(async move {
            start.wait().await;
            for r in 0..per_client {
                let (_, _, uuid) = gpu((c * 7 + r * 13) % GPUS);
                let url = format!("http://{addr}/api/v1/gpus/{uuid}/telemetry?limit=100");
                let started = Instant::now();
                let outcome = get_last_100(&http, &url, source).await;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                match outcome {
                    Ok(()) => lock(&samples)?.push(ms),
                    Err(err) => lock(&errors)?.push(format!("GET {url}: {err:#}")),
                }
            }
            anyhow::Ok(())
        });
    }
    start.wait().await;
    let started = Instant::now();
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *lock(&samples)?);
    let errors = std::mem::take(&mut *lock(&errors)?);
    Ok(LoadOutcome {
        latency: percentiles(samples),
        errors,
        seconds,
    })
}

/// Write-to-delivery latency with `subscribers` WebSocket clients connected at once (connected
/// one after another, each waiting for its hello), then `writes` single-record transactions at
/// `rate` per second. Every subscriber must receive every write within 60 s of the last one; a
/// failed subscription, a broken socket or a missing delivery is recorded in `errors`.
pub async fn ws_deliveries(
    addr: &str,
    client: &Client,
    keys: &Keyspace,
    subscribers: usize,
    writes: usize,
    rate: f64,
) -> anyhow::Result<LoadOutcome> {
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut errors = Vec::new();
    let mut readers = tokio::task::JoinSet::new();
    for s in 0..subscribers {
        let url = format!("ws://{addr}/api/v1/ws/telemetry");
        match subscribe(&url).await {
            Ok(socket) => {
                readers.spawn(read_deliveries(socket, writes, sent.clone(), samples.clone(), s));
            }
            Err(err) => errors.push(format!("subscriber {s}: subscribing to {url}: {err:#}")),
        }
    }
    let subscribed = readers.len();
    let started = Instant::now();
    write_records(client, keys, writes, rate, &sent).await?;
    errors.extend(join_readers(readers, Duration::from_secs(60)).await?);
    let seconds = started.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *lock(&samples)?);
    if errors.is_empty() && samples.len() != subscribed * writes {
        errors.push(format!(
            "{} deliveries, expected {}",
            samples.len(),
            subscribed * writes
        ));
    }
    Ok(LoadOutcome {
        latency: percentiles(samples),
        errors,
        seconds,
    })
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects a subscriber and waits for its hello.
async fn subscribe(url: &str) -> anyhow::Result<Socket> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    socket.next().await.context("closed before its hello")??;
    Ok(socket)
}

/// Reads until `writes` records arrived, recording each one's latency from its write (looked
/// up by record id in `sent`).
async fn read_deliveries(
    mut socket: Socket,
    writes: usize,
    sent: Arc<Mutex<HashMap<String, Instant>>>,
    samples: Arc<Mutex<Vec<f64>>>,
    s: usize,
) -> Result<(), String> {
    let mut got = 0;
    let result = async {
        while got < writes {
            let Some(msg) = socket.next().await else {
                anyhow::bail!("closed after {got} of {writes} records");
            };
            let tokio_tungstenite::tungstenite::Message::Text(text) = msg? else {
                continue;
            };
            let arrived = Instant::now();
            let frame: serde_json::Value = serde_json::from_str(&text)?;
            anyhow::ensure!(frame["type"] != "error", "server closed it: {frame}");
            for record in frame["records"].as_array().into_iter().flatten() {
                let id = record["id"].as_str().unwrap_or_default();
                let at = lock(&sent)?.get(id).copied();
                if let Some(at) = at {
                    lock(&samples)?.push((arrived - at).as_secs_f64() * 1000.0);
                }
                got += 1;
            }
        }
        anyhow::Ok(())
    }
    .await;
    result.map_err(|err| format!("subscriber {s}: {err:#}"))
}

/// Writes `writes` single records at `rate` per second, noting when each was sent.
async fn write_records(
    client: &Client,
    keys: &Keyspace,
    writes: usize,
    rate: f64,
    sent: &Mutex<HashMap<String, Instant>>,
) -> anyhow::Result<()> {
    let mut client = client.clone();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    for n in 0..writes {
        tick.tick().await;
        let at = Timestamp::now();
        let (_, message) = record(
            n % GPUS,
            at,
            (1u128 << 64) + n as u128,
            "DCGM_FI_DEV_POWER_USAGE",
            300.0,
        );
        let (host, gpu_id, _) = gpu(n % GPUS);
        let key = keys.data_record(&host, &gpu_id, &at.to_string(), &message.id.to_string());
        let value = serde_json::to_vec(&message)?;
        lock(sent)?.insert(message.id.to_string(), Instant::now());
        client.put(key, value, None).await?;
    }
    Ok(())
}

/// Waits up to `timeout` for every reader; returns their errors (and one for the readers still
/// waiting when it ran out, which are aborted).
async fn join_readers(
    mut readers: tokio::task::JoinSet<Result<(), String>>,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let mut errors = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, readers.join_next()).await {
            Ok(None) => break,
            Ok(Some(result)) => {
                if let Err(err) = result? {
                    errors.push(err);
                }
            }
            Err(_) => {
                errors.push(format!(
                    "{} subscriber(s) did not receive every write within {} s",
                    readers.len(),
                    timeout.as_secs()
                ));
                readers.abort_all();
                break;
            }
        }
    }
    Ok(errors)
}
