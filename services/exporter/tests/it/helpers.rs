//! Helpers: etcd, a TSDB, the pipeline that fills etcd (streamer and collector in process), the
//! exporter in process or as its binary, and what must have landed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use etcd_client::Client;
use telemetry_exporter::ExporterConfig;
use telemetry_harness::{EtcdServer, ExportedSample, Tsdb, TsdbKind};
use telemetry_shared::{Keyspace, config::Columns, exposition, model::ExportCheckpoint};
use tokio_util::sync::CancellationToken;

pub const NS: &str = "/x";
pub const NAME: &str = "e";

pub fn keys() -> Keyspace {
    Keyspace::new(NS)
}

pub fn sample_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/dcgm_sample.csv")
}

pub async fn etcd() -> (EtcdServer, Client) {
    telemetry_harness::strict_etcd().await.expect("etcd starts")
}

pub async fn prometheus() -> Tsdb {
    Tsdb::start(TsdbKind::prometheus())
        .await
        .expect("prometheus starts")
}

/// The streamer, one pass over the sample with `workers` workers at `rate` rows/s each (0:
/// unlimited), under stream id `stream`; returns when it is done.
pub async fn stream(server: &EtcdServer, client: &Client, stream: &str, workers: u32, rate: f64) -> u64 {
    let vars = telemetry_harness::service_env(
        server,
        NS,
        &[
            ("CSV_PATH", &sample_csv().display().to_string()),
            ("RATE", &rate.to_string()),
            ("LOOP", "false"),
            ("STREAM_ID", stream),
            ("WORKERS", &workers.to_string()),
            ("MAX_QUEUE_DEPTH", "0"),
        ],
    );
    let config = telemetry_streamer::StreamerConfig::from_vars(vars, &telemetry_streamer::Flags::default())
        .expect("streamer config");
    let totals = telemetry_streamer::run(config, client.clone(), CancellationToken::new())
        .await
        .expect("streamer runs");
    totals.enqueued
}

/// A task running the streamer (see [`stream`]).
pub fn stream_in_background(
    server: &EtcdServer,
    client: &Client,
    id: &str,
    workers: u32,
    rate: f64,
) -> tokio::task::JoinHandle<u64> {
    let vars = telemetry_harness::service_env(
        server,
        NS,
        &[
            ("CSV_PATH", &sample_csv().display().to_string()),
            ("RATE", &rate.to_string()),
            ("LOOP", "false"),
            ("STREAM_ID", id),
            ("WORKERS", &workers.to_string()),
            ("MAX_QUEUE_DEPTH", "0"),
        ],
    );
    let config = telemetry_streamer::StreamerConfig::from_vars(vars, &telemetry_streamer::Flags::default())
        .expect("streamer config");
    let client = client.clone();
    tokio::spawn(async move {
        telemetry_streamer::run(config, client, CancellationToken::new())
            .await
            .expect("streamer runs")
            .enqueued
    })
}

/// A service running in process; stop it with its token.
pub struct InProcess<T> {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<T>,
}

impl<T> InProcess<T> {
    pub async fn shutdown(self) -> T {
        self.stop.cancel();
        self.task.await.expect("joins")
    }
}

pub type Collector = InProcess<Result<telemetry_collector::Totals, telemetry_collector::CollectorError>>;
pub type Exporter = InProcess<Result<telemetry_exporter::Totals, telemetry_exporter::ExporterError>>;

pub fn spawn_collector(server: &EtcdServer, client: &Client) -> Collector {
    let vars = telemetry_harness::service_env(server, NS, &[("COLLECTOR_ID", "c1"), ("LEASE_TTL", "3s")]);
    let config = telemetry_collector::CollectorConfig::from_vars(vars).expect("collector config");
    let stop = CancellationToken::new();
    let task = tokio::spawn(telemetry_collector::run(config, client.clone(), stop.clone()));
    InProcess { stop, task }
}

/// The exporter's variables for `tsdb` (and `extra`, which replace earlier ones).
pub fn exporter_vars(server: &EtcdServer, tsdb: &Tsdb, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let url = tsdb.write_url();
    let mut vars = vec![
        ("REMOTE_WRITE_URL", url.as_str()),
        ("EXPORTER_NAME", NAME),
        ("EXPORTER_ID", "x1"),
        ("LEASE_TTL", "2s"),
        ("BATCH_WAIT", "20ms"),
        ("RETENTION", "1h"),
    ];
    for (k, v) in extra {
        vars.retain(|(key, _)| key != k);
        vars.push((k, v));
    }
    telemetry_harness::service_env(server, NS, &vars)
}

pub fn exporter_config(server: &EtcdServer, tsdb: &Tsdb, extra: &[(&str, &str)]) -> ExporterConfig {
    ExporterConfig::from_vars(exporter_vars(server, tsdb, extra)).expect("exporter config")
}

pub fn spawn_exporter(server: &EtcdServer, client: &Client, tsdb: &Tsdb, extra: &[(&str, &str)]) -> Exporter {
    let config = exporter_config(server, tsdb, extra);
    let stop = CancellationToken::new();
    let task = tokio::spawn(telemetry_exporter::run(config, client.clone(), stop.clone()));
    InProcess { stop, task }
}

/// The real exporter binary; its log goes to `log`.
pub fn spawn_exporter_process(server: &EtcdServer, tsdb: &Tsdb, log: &Path, extra: &[(&str, &str)]) -> Child {
    let file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_telemetry-exporter"));
    cmd.env_clear()
        .envs(exporter_vars(server, tsdb, extra))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
    cmd.spawn().expect("exporter binary starts")
}

/// The stored checkpoint of exporter `name`.
pub async fn checkpoint_of(client: &Client, name: &str) -> ExportCheckpoint {
    let resp = client
        .clone()
        .get(keys().exporter_checkpoint(name), None)
        .await
        .expect("get");
    resp.kvs()
        .first()
        .map(|kv| serde_json::from_slice(kv.value()).expect("checkpoint JSON"))
        .unwrap_or_default()
}

pub async fn checkpoint(client: &Client) -> ExportCheckpoint {
    checkpoint_of(client, NAME).await
}

/// Waits until the checkpoint accounts for `n` records (exported, rejected or expired).
pub async fn wait_accounted(client: &Client, n: u64, timeout: Duration) -> ExportCheckpoint {
    let ok = telemetry_harness::eventually(timeout, || async {
        let cp = checkpoint(client).await;
        cp.records + cp.rejected + cp.expired >= n
    })
    .await;
    let cp = checkpoint(client).await;
    assert!(ok, "not exported in {timeout:?}: {cp:?}");
    cp
}

/// Waits until `n` records are stored and the queue is empty.
pub async fn wait_stored(client: &Client, n: i64, timeout: Duration) {
    let ok = telemetry_harness::eventually(timeout, || async {
        telemetry_harness::count(client, &keys().data_prefix())
            .await
            .unwrap_or(0)
            >= n
            && telemetry_harness::count(client, &keys().queue_prefix())
                .await
                .unwrap_or(1)
                == 0
    })
    .await;
    assert!(ok, "{n} records not stored in {timeout:?}");
}

/// The samples the stored records must have become, sorted like [`Tsdb::samples`].
pub async fn expected_samples(client: &Client) -> Vec<ExportedSample> {
    let records = telemetry_harness::stored_records(client, &keys())
        .await
        .expect("records decode");
    let mut out: Vec<ExportedSample> = records
        .values()
        .flat_map(|m| exposition::samples(m, &Columns::default()).unwrap_or_default())
        .map(|s| ExportedSample {
            name: s.name,
            labels: s.labels,
            timestamp_ms: s.timestamp_ms,
            value: s.value,
        })
        .collect();
    out.sort_by(|a, b| (&a.name, &a.labels, a.timestamp_ms).cmp(&(&b.name, &b.labels, b.timestamp_ms)));
    // Two records of one series in the same millisecond with the same value are one sample in
    // any TSDB (two streamer workers reading the same row at once do that): a TSDB keeps one.
    // With different values the second would be refused and rejected, which the tests check.
    out.dedup_by(|a, b| {
        a.name == b.name && a.labels == b.labels && a.timestamp_ms == b.timestamp_ms && a.value == b.value
    });
    out
}

/// A query time after every sample written by now.
pub fn query_time() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0 + 60.0
}

/// Asserts that `tsdb` holds exactly the samples of the stored records (`expected`), each
/// once: the same series, timestamps and values, and `count_over_time` summed over every series
/// equal to the number of records.
pub async fn assert_exactly_once(tsdb: &Tsdb, expected: &[ExportedSample]) {
    let time = query_time();
    let counted = tsdb
        .count_over_time("DCGM_.+", "3h", time)
        .await
        .expect("count query");
    let got = tsdb.samples("DCGM_.+", "3h", time).await.expect("samples");
    if got != expected {
        let mut seen: BTreeMap<(String, String, i64), usize> = BTreeMap::new();
        for s in &got {
            *seen
                .entry((s.name.clone(), format!("{:?}", s.labels), s.timestamp_ms))
                .or_default() += 1;
        }
        let doubled = seen.values().filter(|n| **n > 1).count();
        let missing = expected
            .iter()
            .filter(|e| !got.contains(e))
            .take(3)
            .collect::<Vec<_>>();
        panic!(
            "the TSDB holds {} samples ({doubled} series/timestamps twice), {} expected; first missing: {missing:?}",
            got.len(),
            expected.len()
        );
    }
    assert_eq!(counted as usize, expected.len(), "sum of count_over_time");
}

/// A pseudo-random number below `n` (no dependency for a few kill delays).
pub fn random_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut x = u64::from(nanos) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % n.max(1)
}

pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
