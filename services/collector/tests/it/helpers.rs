//! Helpers: a real etcd per test, streamer and collector configs, and inspection of what landed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use etcd_client::Client;
use telemetry_collector::CollectorConfig;
use telemetry_harness::{EtcdServer, count, range_all};
use telemetry_shared::{Keyspace, Message, model::PartitionStats};
use telemetry_streamer::{Flags, StreamerConfig};
use tokio_util::sync::CancellationToken;

pub const NS: &str = "/c";

pub fn keys() -> Keyspace {
    Keyspace::new(NS)
}

pub fn sample_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/dcgm_sample.csv")
}

pub async fn etcd() -> (EtcdServer, Client) {
    telemetry_harness::strict_etcd().await.expect("etcd starts")
}

fn vars(server: &EtcdServer, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    telemetry_harness::service_env(server, NS, extra)
}

pub fn streamer_config(server: &EtcdServer, extra: &[(&str, &str)]) -> StreamerConfig {
    let mut all = vec![
        ("CSV_PATH", sample_csv().display().to_string()),
        ("RATE", "0".to_string()),
        ("LOOP", "false".to_string()),
        ("STREAM_ID", "dcgm".to_string()),
        ("MAX_QUEUE_DEPTH", "0".to_string()),
    ];
    for (k, v) in extra {
        all.retain(|(key, _)| key != k);
        all.push((k, v.to_string()));
    }
    let pairs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (*k, v.as_str())).collect();
    StreamerConfig::from_vars(vars(server, &pairs), &Flags::default()).expect("valid streamer config")
}

pub fn collector_config(server: &EtcdServer, id: &str, extra: &[(&str, &str)]) -> CollectorConfig {
    let mut pairs = vec![("COLLECTOR_ID", id), ("LEASE_TTL", "3s")];
    pairs.extend_from_slice(extra);
    CollectorConfig::from_vars(vars(server, &pairs)).expect("valid collector config")
}

/// Runs the streamer one-shot over the sample, in process.
pub async fn stream_sample(server: &EtcdServer, client: &Client) {
    let totals = telemetry_streamer::run(
        streamer_config(server, &[]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("streamer runs");
    assert_eq!(totals.enqueued, 2470);
}

/// A collector running in process; stop it with its token.
pub struct InProcess {
    pub stop: CancellationToken,
    pub task:
        tokio::task::JoinHandle<Result<telemetry_collector::Totals, telemetry_collector::CollectorError>>,
}

pub fn spawn_collector(server: &EtcdServer, client: &Client, id: &str, extra: &[(&str, &str)]) -> InProcess {
    let stop = CancellationToken::new();
    let task = tokio::spawn(telemetry_collector::run(
        collector_config(server, id, extra),
        client.clone(),
        stop.clone(),
    ));
    InProcess { stop, task }
}

impl InProcess {
    pub async fn shutdown(self) -> telemetry_collector::Totals {
        self.stop.cancel();
        self.task.await.expect("joins").expect("collector ran")
    }
}

/// The real collector binary as a process; its log goes to a file.
pub fn spawn_collector_process(server: &EtcdServer, id: &str, log: &Path, extra: &[(&str, &str)]) -> Child {
    let file = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_telemetry-collector"));
    cmd.env_clear()
        .env("ETCD_ENDPOINTS", server.endpoint())
        .env("ETCD_NAMESPACE", NS)
        .env("COLLECTOR_ID", id)
        .env("LEASE_TTL", "3s")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("collector binary starts")
}

pub async fn data_count(client: &Client) -> i64 {
    count(client, &keys().data_prefix()).await.expect("count")
}

pub async fn queue_depth(client: &Client) -> i64 {
    count(client, &keys().queue_prefix()).await.expect("count")
}

/// Waits until the queue is empty and `n` data keys exist.
pub async fn wait_drained(client: &Client, n: i64, timeout: Duration) {
    let ok = telemetry_harness::eventually(timeout, || async {
        data_count(client).await >= n && queue_depth(client).await == 0
    })
    .await;
    assert!(
        ok,
        "not drained: {} data keys, {} queued",
        data_count(client).await,
        queue_depth(client).await
    );
}

/// Every stored record, by data key.
pub async fn records(client: &Client) -> BTreeMap<String, Message> {
    telemetry_harness::stored_records(client, &keys())
        .await
        .expect("records decode")
}

/// Asserts every row of the sample is stored exactly once.
pub async fn assert_sample_exactly_once(client: &Client) {
    let records = records(client).await;
    let mut rows: BTreeMap<u64, usize> = BTreeMap::new();
    for msg in records.values() {
        let src = msg.source.as_ref().expect("source");
        *rows.entry(src.row).or_default() += 1;
    }
    let doubled: Vec<_> = rows.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "rows stored twice: {doubled:?}");
    assert_eq!(rows.len(), 2470, "rows stored: {}", rows.len());
    assert_eq!(records.len(), 2470);
}

/// Sum of the partition stats counters.
pub async fn stats(client: &Client) -> PartitionStats {
    let mut total = PartitionStats::default();
    for (_, v) in range_all(client, &keys().stats_prefix()).await.expect("range") {
        let s: PartitionStats = serde_json::from_slice(&v).expect("stats JSON");
        total.records += s.records;
        total.duplicates += s.duplicates;
        total.dead_letters += s.dead_letters;
    }
    total
}
