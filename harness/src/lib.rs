//! Test support for the telemetry pipeline, in one place: real etcd servers and clusters, the
//! sample data and its known facts, service environments, service binaries run as processes,
//! reads of what the pipeline stored, and `promtool`. Tests, the benchmark, the chaos run and
//! scripts use it; nothing here mocks etcd.
//!
//! # Layout
//! - [`etcd`]: [`EtcdServer`] (one member), [`EtcdCluster`] (members that can be killed, paused
//!   and restarted), [`strict_etcd`] (the etcd every service test starts), [`range_all`] and
//!   [`count`].
//! - [`proxy`]: [`TcpProxy`], which cuts one client off from etcd without signals.
//! - [`sample`]: `data/dcgm_sample.csv`, what is known about it (2,470 rows, 247 GPUs, 31
//!   hosts, 10 metrics), generated inputs built from it and temporary CSV files.
//! - [`env`]: [`Env`], the environment a service reads (`ETCD_ENDPOINTS`, `ETCD_NAMESPACE`, and
//!   presets for the streamer, collector and gateway).
//! - [`process`]: [`ProcessSpec`] and [`ServiceProcess`], a service binary started by path with
//!   an environment and a log file, signalled, awaited and read; killed when dropped.
//! - [`probe`]: [`Probe`], the pipeline's keys in one namespace (queue, records, counters,
//!   checkpoints, owners) read for assertions, and waits such as [`Probe::wait_drained`].
//! - [`records`]: queued messages and stored records decoded in either form (lean, with their
//!   profiles, or the JSON of earlier releases); [`Probe`] reads through it.
//! - [`metrics`]: scraping a `/metrics` endpoint and `promtool check metrics`.
//! - [`prometheus`]: [`PrometheusServer`], a real Prometheus with a generated configuration.
//! - [`exposition`]: [`ExpositionServer`] (the DCGM sample and simulated targets as
//!   dcgm-exporter text, or garbage, a stall, an error status) and [`NodeExporter`], targets for
//!   the streamer's scrape source.
//! - [`tls`]: [`TestPki`], a CA and certificates made at test time for etcd over TLS
//!   ([`EtcdOptions::with_tls`]).
//! - [`tsdb`]: [`Tsdb`], a Prometheus (with its remote-write receiver) or a VictoriaMetrics
//!   for the exporter, stopped and restarted on its port and data, and read back with PromQL.
//!
//! The harness depends on `telemetry-shared` (key layout, message model) but on no service:
//! every service crate dev-depends on it. The pipeline started in process (streamer, collectors
//! and gateway together) is `telemetry_tests::Pipeline`, which may depend on all of them.

use std::{
    net::{Ipv4Addr, TcpListener},
    time::{Duration, Instant},
};

use thiserror::Error;

pub mod env;
pub mod etcd;
pub mod exposition;
pub mod metrics;
pub mod probe;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod records;
pub mod sample;
pub mod tls;
pub mod tsdb;

pub use env::Env;
pub use etcd::{
    EtcdCluster, EtcdOptions, EtcdServer, EtcdTls, Member, count, etcd_binary, range_all, strict_etcd,
};
pub use exposition::{Behaviour, ExpositionServer, NodeExporter};
pub use metrics::{http_get, promtool_check_metrics, scrape_metrics};
pub use probe::{Probe, assert_rows_exactly_once};
pub use process::{Finished, ProcessSpec, ServiceProcess, workspace_bin_dir};
pub use prometheus::{PrometheusOptions, PrometheusServer};
pub use proxy::{ProxyMode, TcpProxy};
pub use records::{queued_messages, stored_records};
pub use tls::{CertFiles, TestPki};
pub use tsdb::{ExportedSample, Tsdb, TsdbKind, expected_samples};

/// Errors starting or controlling etcd and service processes.
#[derive(Debug, Error)]
pub enum HarnessError {
    /// No etcd binary could be found.
    #[error("no etcd binary: set ETCD_BIN, or build with etcd-bin-vendored, or put etcd on PATH")]
    NoBinary,
    /// A filesystem or process error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// etcd did not become healthy in time, or exited.
    #[error("etcd member {name} did not start: {reason}\n--- etcd log tail ---\n{log_tail}")]
    NotHealthy {
        /// Member name.
        name: String,
        /// Why we gave up.
        reason: String,
        /// The end of the member's log.
        log_tail: String,
    },
    /// A client call failed.
    #[error("etcd client: {0}")]
    Client(#[from] etcd_client::Error),
    /// No member reports itself leader.
    #[error("no leader among the running members")]
    NoLeader,
    /// Something awaited did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// A free TCP port on 127.0.0.1 (free when asked; callers retry if another process takes it).
pub fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("binding a free port"))?;
    Ok(listener.local_addr().map_err(io("reading a bound port"))?.port())
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_every(Duration::from_millis(50), timeout, condition).await
}

/// Polls `condition` every `interval` until it holds or `timeout` passes; returns whether it
/// held. A longer interval keeps the polling itself from loading etcd in a measurement.
pub async fn eventually_every<F, Fut>(interval: Duration, timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(interval).await;
    }
}

/// The environment of a service under test: `ETCD_ENDPOINTS` of `server`, `ETCD_NAMESPACE`,
/// then `extra`, whose entries replace earlier ones of the same name. The same as
/// `server.env(namespace).with(extra).into_vars()`.
pub fn service_env(server: &EtcdServer, namespace: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    server.env(namespace).with(extra).into_vars()
}
