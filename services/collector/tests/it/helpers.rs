//! Helpers: a real etcd per test, streamer and collector configurations pointing at it, the
//! collector in process and as the real binary. Everything general (etcd, the sample,
//! environments, processes, reading what was stored) is in `telemetry-harness`; this file only
//! binds it to the collector.

use std::time::Duration;

use etcd_client::Client;
use telemetry_collector::CollectorConfig;
use telemetry_harness::{Env, EtcdServer, ProcessSpec, ServiceProcess};
pub use telemetry_harness::{Probe, sample};
use telemetry_streamer::{Flags, StreamerConfig};
use tokio_util::sync::CancellationToken;

pub const NS: &str = "/c";

/// How long a test waits for the sample to be drained.
pub const DRAIN: Duration = Duration::from_secs(60);

/// A strict etcd (`--max-txn-ops 128`), a client, and a probe of the test namespace.
pub async fn etcd() -> (EtcdServer, Client, Probe) {
    let (server, client) = telemetry_harness::strict_etcd().await.expect("etcd starts");
    let probe = Probe::new(&client, NS);
    (server, client, probe)
}

/// The streamer, one-shot over the sample without backpressure, then `extra`.
pub fn streamer_config(server: &EtcdServer, extra: &[(&str, &str)]) -> StreamerConfig {
    let env = server
        .env(NS)
        .streamer(sample::path(), sample::STREAM_ID)
        .set("MAX_QUEUE_DEPTH", 0)
        .with(extra);
    StreamerConfig::from_vars(env, &Flags::default()).expect("valid streamer config")
}

/// Collector `id` (lease TTL 3 s), then `extra`.
pub fn collector_env(server: &EtcdServer, id: &str, extra: &[(&str, &str)]) -> Env {
    server.env(NS).collector(id).with(extra)
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
    assert_eq!(totals.enqueued, sample::ROWS);
}

/// A collector running in process; stop it with its token.
pub struct InProcess {
    pub stop: CancellationToken,
    pub task:
        tokio::task::JoinHandle<Result<telemetry_collector::Totals, telemetry_collector::CollectorError>>,
}

pub fn spawn_collector(server: &EtcdServer, client: &Client, id: &str, extra: &[(&str, &str)]) -> InProcess {
    let config =
        CollectorConfig::from_vars(collector_env(server, id, extra)).expect("valid collector config");
    let stop = CancellationToken::new();
    let task = tokio::spawn(telemetry_collector::run(config, client.clone(), stop.clone()));
    InProcess { stop, task }
}

impl InProcess {
    pub async fn shutdown(self) -> telemetry_collector::Totals {
        self.stop.cancel();
        self.task.await.expect("joins").expect("collector ran")
    }
}

/// The real collector binary as a process (`RUST_LOG=info`); its log is
/// [`ServiceProcess::log`].
pub fn spawn_collector_process(server: &EtcdServer, id: &str, extra: &[(&str, &str)]) -> ServiceProcess {
    ProcessSpec::new(env!("CARGO_BIN_EXE_telemetry-collector"))
        .env(collector_env(server, id, extra))
        .start()
        .expect("collector binary starts")
}

/// Asserts every row of the sample is stored exactly once, and nothing else is.
pub async fn assert_sample_exactly_once(probe: &Probe) {
    let records = probe.records().await;
    telemetry_harness::assert_rows_exactly_once(records.values(), "dcgm-w0", 0, sample::ROWS);
    assert_eq!(records.len() as u64, sample::ROWS);
}
