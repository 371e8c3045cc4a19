//! The streamer's configuration: environment variables (envy), optionally overridden by the
//! seed-style flags `--csv`, `--workers`, `--rate` and `--once`.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use telemetry_shared::{
    CommonConfig, ConfigError,
    config::{RawCommonConfig, duration, duration_at_least},
    etcd::MIN_LEASE_TTL,
    keys::is_key_segment,
};

/// The streamer's settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamerConfig {
    /// etcd endpoints and namespace.
    pub common: CommonConfig,
    /// `CSV_PATH`: the file to stream (required).
    pub csv_path: PathBuf,
    /// `WORKERS` (default 1): independent workers, each streaming the whole file.
    pub workers: u32,
    /// `RATE` (default 1.0): messages per second per worker; `None` = unlimited (`RATE=0`).
    pub rate: Option<f64>,
    /// `LOOP` (default true): restart at end of file; `false` = one pass, then exit.
    pub loop_mode: bool,
    /// `BATCH_SIZE` (default 100): rows read before a flush. Each etcd transaction carries at
    /// most 63 of them (etcd's 128-operation limit), so a batch may take several.
    pub batch_size: usize,
    /// `MAX_QUEUE_DEPTH` (default 10000): wait while the queue holds this many; 0 = no limit.
    pub max_queue_depth: u64,
    /// `STREAM_ID` (default derived from the CSV path): names the source for checkpoints.
    pub stream_id: String,
    /// `METRICS_PORT` (default 0 = off): Prometheus `/metrics`.
    pub metrics_port: u16,
    /// `DEDUP_TTL` (default 24h): how long an enqueued idempotency key is remembered.
    pub dedup_ttl: Duration,
    /// `PARTITION_COLUMNS` (default `Hostname,gpu_id`): columns whose values pick the queue
    /// partition, so one GPU's rows stay in order.
    pub partition_columns: Vec<String>,
    /// `PROGRESS_INTERVAL` (default 5s): how often progress is logged.
    pub progress_interval: Duration,
}

#[derive(Debug, Default, Deserialize, serde::Serialize)]
struct RawStreamerConfig {
    #[serde(flatten)]
    common: RawCommonConfig,
    csv_path: Option<String>,
    workers: Option<u32>,
    rate: Option<f64>,
    #[serde(rename = "loop")]
    loop_mode: Option<bool>,
    batch_size: Option<u32>,
    max_queue_depth: Option<u64>,
    stream_id: Option<String>,
    metrics_port: Option<u16>,
    dedup_ttl: Option<String>,
    partition_columns: Option<String>,
    progress_interval: Option<String>,
}

/// Command-line overrides, in the style of the original seed program.
#[derive(Debug, Default, Clone, clap::Parser)]
#[command(
    name = "telemetry-streamer",
    about = "Streams CSV rows into the etcd telemetry queue exactly once. \
Configured by environment variables (see README); these flags override them."
)]
pub struct Flags {
    /// The CSV file (overrides CSV_PATH).
    #[arg(long)]
    pub csv: Option<String>,
    /// Number of workers (overrides WORKERS).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Messages per second per worker, fractional; 0 = unlimited (overrides RATE).
    #[arg(long)]
    pub rate: Option<f64>,
    /// One pass over the file, then exit (same as LOOP=false).
    #[arg(long)]
    pub once: bool,
}

impl StreamerConfig {
    /// Every environment variable this binary reads (derived from its raw config struct).
    pub fn env_vars() -> Vec<String> {
        telemetry_shared::config::var_names::<RawStreamerConfig>()
    }

    /// Reads the process environment and applies `flags`.
    pub fn load(flags: &Flags) -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars(), flags)
    }

    /// Reads the given variables and applies `flags` (tests use this).
    pub fn from_vars<I>(vars: I, flags: &Flags) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut raw: RawStreamerConfig = telemetry_shared::config::from_iter(vars)?;
        if let Some(csv) = &flags.csv {
            raw.csv_path = Some(csv.clone());
        }
        if flags.workers.is_some() {
            raw.workers = flags.workers;
        }
        if flags.rate.is_some() {
            raw.rate = flags.rate;
        }
        if flags.once {
            raw.loop_mode = Some(false);
        }
        Self::validate(raw)
    }

    fn validate(raw: RawStreamerConfig) -> Result<Self, ConfigError> {
        let common = CommonConfig::try_from(raw.common)?;
        let csv_path = PathBuf::from(
            raw.csv_path
                .ok_or_else(|| ConfigError::Missing("CSV_PATH".into()))?,
        );
        let workers = raw.workers.unwrap_or(1);
        if !(1..=1024).contains(&workers) {
            return Err(ConfigError::invalid(
                "WORKERS",
                workers.to_string(),
                "must be between 1 and 1024",
            ));
        }
        let rate = raw.rate.unwrap_or(1.0);
        if !rate.is_finite() || rate < 0.0 {
            return Err(ConfigError::invalid(
                "RATE",
                rate.to_string(),
                "must be a non-negative number (0 = unlimited)",
            ));
        }
        // Below one message a day the period would overflow any sane timer.
        if rate > 0.0 && rate < 1.0 / 86_400.0 {
            return Err(ConfigError::invalid(
                "RATE",
                rate.to_string(),
                "must be at least 1/86400 (one a day) or 0",
            ));
        }
        let batch_size = raw.batch_size.unwrap_or(100);
        if !(1..=100_000).contains(&batch_size) {
            return Err(ConfigError::invalid(
                "BATCH_SIZE",
                batch_size.to_string(),
                "must be between 1 and 100000",
            ));
        }
        let stream_id = match raw.stream_id {
            Some(id) => {
                if !is_key_segment(&id) || id.len() > 200 {
                    return Err(ConfigError::invalid(
                        "STREAM_ID",
                        id,
                        "must be 1-200 characters without '/' or control characters",
                    ));
                }
                id
            }
            None => default_stream_id(&csv_path),
        };
        let partition_columns: Vec<String> = raw
            .partition_columns
            .as_deref()
            .unwrap_or("Hostname,gpu_id")
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        Ok(StreamerConfig {
            common,
            csv_path,
            workers,
            rate: (rate > 0.0).then_some(rate),
            loop_mode: raw.loop_mode.unwrap_or(true),
            batch_size: batch_size as usize,
            max_queue_depth: raw.max_queue_depth.unwrap_or(10_000),
            stream_id,
            metrics_port: raw.metrics_port.unwrap_or(0),
            dedup_ttl: duration_at_least(
                "DEDUP_TTL",
                raw.dedup_ttl.as_deref(),
                Duration::from_secs(24 * 3600),
                MIN_LEASE_TTL,
            )?,
            partition_columns,
            progress_interval: {
                let d = duration(
                    "PROGRESS_INTERVAL",
                    raw.progress_interval.as_deref(),
                    Duration::from_secs(5),
                )?;
                if d.is_zero() {
                    return Err(ConfigError::invalid("PROGRESS_INTERVAL", "0", "must be positive"));
                }
                d
            },
        })
    }

    /// The stream id of worker `index`: `{STREAM_ID}-w{index}`.
    pub fn worker_stream_id(&self, index: u32) -> String {
        format!("{}-w{index}", self.stream_id)
    }
}

/// The default stream id: the file's stem plus a short hash of its absolute path, so two files
/// with the same name in different directories do not share checkpoints.
pub fn default_stream_id(path: &std::path::Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let digest = Sha256::digest(absolute.to_string_lossy().as_bytes());
    let stem: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "csv".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("{stem}-{}", &hex::encode(digest)[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<StreamerConfig, ConfigError> {
        let vars = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        StreamerConfig::from_vars(vars, &Flags::default())
    }

    #[test]
    fn defaults() {
        let cfg = load(&[("CSV_PATH", "data/x.csv")]).expect("valid");
        assert_eq!(cfg.workers, 1);
        assert_eq!(cfg.rate, Some(1.0));
        assert!(cfg.loop_mode);
        assert_eq!(cfg.batch_size, 100);
        assert_eq!(cfg.max_queue_depth, 10_000);
        assert_eq!(cfg.metrics_port, 0);
        assert!(cfg.stream_id.starts_with("x-"), "{}", cfg.stream_id);
        assert_eq!(cfg.partition_columns, vec!["Hostname", "gpu_id"]);
        assert_eq!(cfg.common.etcd_endpoints, vec!["127.0.0.1:2379"]);
    }

    #[test]
    fn every_bad_variable_is_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "CSV_PATH"),
            (&[("CSV_PATH", "a"), ("WORKERS", "two")], "WORKERS"),
            (&[("CSV_PATH", "a"), ("WORKERS", "0")], "WORKERS"),
            (&[("CSV_PATH", "a"), ("RATE", "-1")], "RATE"),
            (&[("CSV_PATH", "a"), ("RATE", "fast")], "RATE"),
            (&[("CSV_PATH", "a"), ("LOOP", "yes")], "LOOP"),
            (&[("CSV_PATH", "a"), ("BATCH_SIZE", "0")], "BATCH_SIZE"),
            (&[("CSV_PATH", "a"), ("MAX_QUEUE_DEPTH", "-5")], "MAX_QUEUE_DEPTH"),
            (&[("CSV_PATH", "a"), ("STREAM_ID", "a/b")], "STREAM_ID"),
            (&[("CSV_PATH", "a"), ("METRICS_PORT", "70000")], "METRICS_PORT"),
            (&[("CSV_PATH", "a"), ("DEDUP_TTL", "1s")], "DEDUP_TTL"),
            (&[("CSV_PATH", "a"), ("DEDUP_TTL", "soon")], "DEDUP_TTL"),
            (
                &[("CSV_PATH", "a"), ("ETCD_ENDPOINTS", "nohost")],
                "ETCD_ENDPOINTS",
            ),
        ];
        for (vars, name) in cases {
            let err = load(vars).expect_err(name);
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn fractional_rate_zero_and_flags() {
        assert_eq!(
            load(&[("CSV_PATH", "a"), ("RATE", "0.5")]).expect("valid").rate,
            Some(0.5)
        );
        assert_eq!(
            load(&[("CSV_PATH", "a"), ("RATE", "0")]).expect("valid").rate,
            None
        );
        let flags = Flags {
            csv: Some("b.csv".into()),
            workers: Some(3),
            rate: Some(2.5),
            once: true,
        };
        let cfg = StreamerConfig::from_vars(vec![("CSV_PATH".to_string(), "a".to_string())], &flags)
            .expect("valid");
        assert_eq!(cfg.csv_path, PathBuf::from("b.csv"));
        assert_eq!(cfg.workers, 3);
        assert_eq!(cfg.rate, Some(2.5));
        assert!(!cfg.loop_mode);
    }

    #[test]
    fn stream_id_differs_by_directory() {
        assert_ne!(
            default_stream_id(std::path::Path::new("/a/x.csv")),
            default_stream_id(std::path::Path::new("/b/x.csv"))
        );
        assert_eq!(cfg_worker("s", 2), "s-w2");
    }

    fn cfg_worker(id: &str, i: u32) -> String {
        let mut cfg = load(&[("CSV_PATH", "a")]).expect("valid");
        cfg.stream_id = id.into();
        cfg.worker_stream_id(i)
    }
}
