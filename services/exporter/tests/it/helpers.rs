//! Helpers: etcd, a TSDB, the pipeline that fills etcd (streamer and collector in process), the
//! exporter in process or as its binary, and what must have landed.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::Client;
use telemetry_exporter::ExporterConfig;
use telemetry_harness::{
    Env, EtcdServer, ExportedSample, Probe, ProcessSpec, ServiceProcess, Tsdb, TsdbKind, sample,
};
use telemetry_shared::{Keyspace, model::ExportCheckpoint};
use tokio_util::sync::CancellationToken;

pub const NS: &str = "/x";
pub const NAME: &str = "e";
pub const SLOW: Duration = Duration::from_secs(60);

pub fn keys() -> Keyspace {
    Keyspace::new(NS)
}

pub async fn etcd() -> (EtcdServer, Client, Probe) {
    let (server, client) = telemetry_harness::strict_etcd().await.expect("etcd starts");
    let probe = Probe::new(&client, NS);
    (server, client, probe)
}

pub async fn prometheus() -> Tsdb {
    Tsdb::start(TsdbKind::prometheus())
        .await
        .expect("prometheus starts")
}

/// A task running the streamer: one pass over the sample with `workers` workers at `rate`
/// rows/s each (0: unlimited), under stream id `id`; it returns the rows enqueued.
pub fn stream(
    server: &EtcdServer,
    client: &Client,
    id: &str,
    workers: u32,
    rate: f64,
) -> tokio::task::JoinHandle<u64> {
    let env = server
        .env(NS)
        .streamer(sample::path(), id)
        .set("WORKERS", workers)
        .set("RATE", rate)
        .set("MAX_QUEUE_DEPTH", 0);
    let config = telemetry_streamer::StreamerConfig::from_vars(env, &telemetry_streamer::Flags::default())
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
    let config = telemetry_collector::CollectorConfig::from_vars(server.env(NS).collector("c1"))
        .expect("collector config");
    let stop = CancellationToken::new();
    let task = tokio::spawn(telemetry_collector::run(config, client.clone(), stop.clone()));
    InProcess { stop, task }
}

/// The exporter's environment for `tsdb`, then `extra`.
pub fn exporter_env(server: &EtcdServer, tsdb: &Tsdb, extra: &[(&str, &str)]) -> Env {
    server
        .env(NS)
        .exporter(&tsdb.write_url(), NAME)
        .set("EXPORTER_ID", "x1")
        .with(extra)
}

pub fn exporter_config(server: &EtcdServer, tsdb: &Tsdb, extra: &[(&str, &str)]) -> ExporterConfig {
    ExporterConfig::from_vars(exporter_env(server, tsdb, extra)).expect("exporter config")
}

pub fn spawn_exporter(server: &EtcdServer, client: &Client, tsdb: &Tsdb, extra: &[(&str, &str)]) -> Exporter {
    let config = exporter_config(server, tsdb, extra);
    let stop = CancellationToken::new();
    let task = tokio::spawn(telemetry_exporter::run(config, client.clone(), stop.clone()));
    InProcess { stop, task }
}

/// The real exporter binary (killed when dropped).
pub fn start_exporter_process(server: &EtcdServer, tsdb: &Tsdb, extra: &[(&str, &str)]) -> ServiceProcess {
    ProcessSpec::new(env!("CARGO_BIN_EXE_telemetry-exporter"))
        .env(exporter_env(server, tsdb, extra))
        .rust_log("info")
        .start()
        .expect("exporter binary starts")
}

pub async fn checkpoint(probe: &Probe) -> ExportCheckpoint {
    probe.export_checkpoint(NAME).await
}

/// Waits until the checkpoint accounts for `n` records (exported, rejected or expired).
pub async fn wait_exported(probe: &Probe, n: u64) -> ExportCheckpoint {
    probe.wait_exported(NAME, n, SLOW).await
}

/// Waits until exporter `id` is the active one.
pub async fn wait_active(probe: &Probe, id: &str) {
    let ok = telemetry_harness::eventually(Duration::from_secs(15), || async {
        probe.exporter_owner(NAME).await.as_deref() == Some(id)
    })
    .await;
    assert!(
        ok,
        "{id} not active in 15 s (active: {:?})",
        probe.exporter_owner(NAME).await
    );
}

/// The samples the stored records must have become, sorted like [`Tsdb::samples`].
pub async fn expected_samples(probe: &Probe) -> Vec<ExportedSample> {
    telemetry_harness::expected_samples(probe.records().await.values())
}

/// A query time after every sample written by now.
pub fn query_time() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0 + 60.0
}

/// Asserts that `tsdb` holds exactly the samples of the stored records (`expected`), each
/// once: the same series, timestamps and values, and `count_over_time` summed over every series
/// equal to their number.
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
        let missing: Vec<_> = expected.iter().filter(|e| !got.contains(e)).take(3).collect();
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
