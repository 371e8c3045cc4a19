//! The exporter's figures, in the same run as the pipeline's: a real Prometheus (Debian's,
//! started by the harness) receives the records of an end-to-end run.
//!
//! 1. **Live**: collectors drain a full-speed streamer while an exporter follows; the
//!    pipeline's rate is records stored per second, and the exporter's lag is the time from the
//!    last record stored to its last sample acknowledged.
//! 2. **Backlog**: a second exporter (another `EXPORTER_NAME`, a fresh Prometheus) exports the
//!    same records from scratch, alone: its throughput in samples per second against the
//!    pipeline's rate says whether it keeps up at full speed (ratio ≥ 1), and etcd's CPU time
//!    during it (`/proc/<etcd pid>/stat`, utime + stime) per 1,000 records is what the exporter
//!    costs etcd.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use telemetry_harness::{Tsdb, TsdbKind};
use tokio_util::sync::CancellationToken;

use super::pipeline::{E2E_WORKERS, Target};

/// What the export phase measured.
#[derive(Debug, Clone, Copy)]
pub struct ExportFigures {
    /// Records stored.
    pub records: u64,
    /// The pipeline's end-to-end rate with the live exporter following, records/s.
    pub pipeline_per_s: f64,
    /// From the last record stored to the live exporter's last acknowledgement, seconds.
    pub live_lag_s: f64,
    /// The backlog exporter's samples per second.
    pub export_samples_per_s: f64,
    /// etcd CPU milliseconds per 1,000 records while the pipeline (and the live exporter) ran.
    pub etcd_cpu_ms_per_1000_pipeline: f64,
    /// etcd CPU milliseconds per 1,000 records while the backlog exporter ran alone.
    pub etcd_cpu_ms_per_1000_export: f64,
}

/// etcd's CPU time so far (utime + stime of `/proc/<pid>/stat`, in clock ticks of 10 ms).
fn cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading etcd's /proc stat")?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Ok((ticks(11) + ticks(12)) * 10.0)
}

/// An exporter running in process.
struct Exporter {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<telemetry_exporter::Totals, telemetry_exporter::ExporterError>>,
}

impl Exporter {
    async fn shutdown(self) -> anyhow::Result<telemetry_exporter::Totals> {
        self.stop.cancel();
        Ok(self.task.await??)
    }
}

fn exporter(target: &Target, namespace: &str, tsdb: &Tsdb, name: &str) -> anyhow::Result<Exporter> {
    let env = telemetry_harness::Env::etcd(target.endpoint.clone(), namespace)
        .exporter(&tsdb.write_url(), name)
        .set("RETENTION", "24h")
        .set("SERVER_CHECK", "warn");
    let config = telemetry_exporter::ExporterConfig::from_vars(env)?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(telemetry_exporter::run(
        config,
        target.client.clone(),
        stop.clone(),
    ));
    Ok(Exporter { stop, task })
}

async fn wait_exported(probe: &telemetry_harness::Probe, name: &str, n: u64) -> Instant {
    probe.wait_exported(name, n, Duration::from_secs(3600)).await;
    Instant::now()
}

/// Runs both parts over `csv` (streamed by [`E2E_WORKERS`] workers, `collectors` collectors);
/// `etcd_pid` is the bench etcd's process.
pub async fn export_phase(
    target: &Target,
    csv: &Path,
    collectors: usize,
    etcd_pid: u32,
) -> anyhow::Result<ExportFigures> {
    let namespace = "/export";
    let pipeline = crate::Pipeline::builder()
        .shared_etcd(target.endpoint.clone(), &target.client)
        .namespace(namespace)
        .collectors(collectors)
        .collector_ids("bench-")
        .collector_env(&[("LEASE_TTL", "10s")])
        .start()
        .await?;
    let _ = pipeline.wait_owned(Duration::from_secs(20)).await;
    let live_tsdb = Tsdb::start(TsdbKind::prometheus()).await?;
    let live = exporter(target, namespace, &live_tsdb, "live")?;
    let env = pipeline
        .streamer_env_for(csv, "export")
        .set("WORKERS", E2E_WORKERS)
        .set("PROGRESS_INTERVAL", "1h");
    let cpu_before = cpu_ms(etcd_pid)?;
    let started = Instant::now();
    let totals = pipeline.stream(env).await?;
    let records = totals.enqueued;
    pipeline
        .wait_drained(i64::try_from(records)?, Duration::from_secs(3600))
        .await;
    let stored_at = Instant::now();
    let pipeline_secs = started.elapsed().as_secs_f64();
    let probe = pipeline.probe().clone();
    let exported_at = wait_exported(&probe, "live", records).await;
    let cpu_pipeline = cpu_ms(etcd_pid)? - cpu_before;
    live.shutdown().await?;
    pipeline.shutdown().await?;

    let backlog_tsdb = Tsdb::start(TsdbKind::prometheus()).await?;
    let cpu_before = cpu_ms(etcd_pid)?;
    let started = Instant::now();
    let backlog = exporter(target, namespace, &backlog_tsdb, "backlog")?;
    let done = wait_exported(&probe, "backlog", records).await;
    let export_secs = (done - started).as_secs_f64();
    let cpu_export = cpu_ms(etcd_pid)? - cpu_before;
    let samples = probe.export_checkpoint("backlog").await.samples;
    backlog.shutdown().await?;
    let per_1000 = |ms: f64| ms / (records as f64 / 1000.0);
    Ok(ExportFigures {
        records,
        pipeline_per_s: records as f64 / pipeline_secs,
        live_lag_s: exported_at.saturating_duration_since(stored_at).as_secs_f64(),
        export_samples_per_s: samples as f64 / export_secs,
        etcd_cpu_ms_per_1000_pipeline: per_1000(cpu_pipeline),
        etcd_cpu_ms_per_1000_export: per_1000(cpu_export),
    })
}
