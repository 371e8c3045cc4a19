//! Gateway phases of `telemetry-bench`: "last 100 points of one GPU" with a million points
//! stored, and WebSocket write-to-delivery latency with 100 subscribers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use futures::StreamExt as _;
use telemetry_harness::EtcdServer;
use telemetry_shared::{Fields, Keyspace, Message, SchemaVersion, Timestamp, model::GpuInfo};
use tokio_util::sync::CancellationToken;

/// GPUs the stored points are spread over (the DCGM sample has 247).
pub const GPUS: usize = 250;
const HOSTS: usize = 32;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Samples.
    pub n: usize,
}

/// Percentiles of `samples` (milliseconds).
pub fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if samples.is_empty() {
            return f64::NAN;
        }
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i]
    };
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
        n: samples.len(),
    }
}

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
    let mut client = client.clone();
    for i in 0..GPUS {
        let (hostname, gpu_id, uuid) = gpu(i);
        let info = GpuInfo {
            uuid: uuid.clone(),
            hostname: hostname.clone(),
            device: Some(format!("nvidia{gpu_id}")),
            gpu_id,
            model: Some("NVIDIA H100 80GB HBM3".into()),
            last_seen: Timestamp::from_datetime(now),
        };
        client
            .put(keys.gpu_index(&uuid), serde_json::to_vec(&info)?, None)
            .await?;
        client
            .put(keys.host_index(&hostname), hostname.clone(), None)
            .await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// A gateway served in process on a free loopback port.
pub struct Gateway {
    /// `127.0.0.1:{port}`.
    pub addr: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), telemetry_gateway::GatewayError>>,
}

impl Gateway {
    /// Starts a gateway over `server` with the given extra variables.
    pub async fn start(
        server: &EtcdServer,
        client: &Client,
        namespace: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut vars = vec![
            ("ETCD_ENDPOINTS".to_string(), server.endpoint()),
            ("ETCD_NAMESPACE".to_string(), namespace.to_string()),
        ];
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = telemetry_gateway::GatewayConfig::from_vars(vars)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let stop = CancellationToken::new();
        let task = tokio::spawn(telemetry_gateway::run(
            config,
            listener,
            client.clone(),
            stop.clone(),
        ));
        Ok(Gateway { addr, stop, task })
    }

    /// Stops it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

/// p50/p99 of `GET /api/v1/gpus/{uuid}/telemetry?limit=100` (newest first) over `requests`
/// requests for GPUs in turn, from `clients` concurrent clients.
pub async fn last_100_latency(addr: &str, requests: usize, clients: usize) -> anyhow::Result<Percentiles> {
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
                let resp = http.get(&url).send().await?;
                let status = resp.status();
                let body: serde_json::Value = resp.json().await?;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                anyhow::ensure!(status.is_success(), "{url}: {status} {body}");
                anyhow::ensure!(
                    body["count"] == 100,
                    "{url}: expected 100 points, got {}",
                    body["count"]
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
/// write was sent.
pub async fn ws_latency(
    addr: &str,
    client: &Client,
    keys: &Keyspace,
    subscribers: usize,
    writes: usize,
    rate: f64,
) -> anyhow::Result<Percentiles> {
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..subscribers {
        let url = format!("ws://{addr}/api/v1/ws/telemetry");
        let (mut socket, _) = tokio_tungstenite::connect_async(&url)
            .await
            .context("subscribe")?;
        socket.next().await.context("hello")??;
        let (sent, samples) = (sent.clone(), samples.clone());
        readers.spawn(async move {
            let mut got = 0;
            while got < writes {
                let Some(msg) = socket.next().await else { break };
                let tokio_tungstenite::tungstenite::Message::Text(text) = msg? else {
                    continue;
                };
                let arrived = Instant::now();
                let frame: serde_json::Value = serde_json::from_str(&text)?;
                for record in frame["records"].as_array().into_iter().flatten() {
                    let id = record["id"].as_str().unwrap_or_default();
                    let at = sent
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .get(id)
                        .copied();
                    if let Some(at) = at {
                        samples
                            .lock()
                            .map_err(|_| anyhow::anyhow!("poisoned"))?
                            .push((arrived - at).as_secs_f64() * 1000.0);
                    }
                    got += 1;
                }
            }
            anyhow::Ok(())
        });
    }
    let mut client = client.clone();
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut tick = tokio::time::interval(period);
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
        sent.lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(message.id.to_string(), Instant::now());
        client.put(key, value, None).await?;
    }
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(result) = readers.join_next().await {
            result??;
        }
        anyhow::Ok(())
    })
    .await;
    drained.context("subscribers did not receive every write within 60 s")??;
    let samples = std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    anyhow::ensure!(
        samples.len() == subscribers * writes,
        "{} deliveries, expected {}",
        samples.len(),
        subscribers * writes
    );
    Ok(percentiles(samples))
}
