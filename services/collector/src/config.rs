//! The collector's configuration, from environment variables (envy).

use std::time::Duration;

/// Re-exported: the column names live in `shared/` because the gateway reads them too.
pub use telemetry_shared::config::Columns;
use telemetry_shared::{
    CommonConfig, ConfigError,
    config::{EnvSpec as _, EnvVar, LogConfig, RawColumns, RawCommonConfig, RawLogConfig},
    etcd::MIN_LEASE_TTL,
    keys::is_key_segment,
};

/// Most messages one commit transaction can carry: two compares each (the queue entry's and
/// the dedup marker's revisions) plus the fence and the counter within etcd's 128. Each record
/// is two writes (data put, queue delete; three when it claims its marker), and a batch is cut
/// earlier when its writes would not fit.
pub const MAX_BATCH: usize = 63;

/// The collector's settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectorConfig {
    /// etcd endpoints and namespace.
    pub common: CommonConfig,
    /// `COLLECTOR_ID` (default `{hostname}-{pid}`): names this collector in etcd.
    pub collector_id: String,
    /// `LEASE_TTL` (default 30s, at least 2s): session lease; a crashed collector's partitions
    /// move after about this long.
    pub lease_ttl: Duration,
    /// `BATCH_SIZE` (default 63, at most 63): messages per commit transaction.
    pub batch_size: usize,
    /// `DEDUP_TTL` (default 24h): how long a processed idempotency key is remembered.
    pub dedup_ttl: Duration,
    /// `RETENTION` (default 24h): how long telemetry records are kept.
    pub retention: Duration,
    /// `METRICS_PORT` (default 0 = off): Prometheus `/metrics`.
    pub metrics_port: u16,
    /// Column names of the GPU identity and description.
    pub columns: Columns,
    /// `RUST_LOG` and `LOG_FORMAT`.
    pub log: LogConfig,
}

telemetry_shared::env_config! {
    /// Every variable the collector reads: envy's struct, and the table `--help` prints.
    struct Raw {
        flatten common: RawCommonConfig;
        flatten columns: RawColumns;
        flatten log: RawLogConfig;
        /// Names this collector in etcd (registration, partition ownership, dead letters):
        /// 1-128 characters without '/'.
        collector_id = Computed("{hostname}-{pid}");
        /// Session lease (at least 2s): a crashed collector's partitions move after about this
        /// long.
        lease_ttl = Value("30s");
        /// Most messages per commit transaction (two compares each within etcd's 128-operation
        /// limit; this default is the most).
        batch_size = Value(MAX_BATCH.to_string());
        /// How long a dedup marker the collector writes (for producers that write none) is kept
        /// (at least 2s).
        dedup_ttl = Value("24h");
        /// How long telemetry records are kept (leases per time bucket, never one per record).
        retention = Value("24h");
        /// Port of Prometheus /metrics; 0 = off.
        metrics_port = Value("0");
    }
}

impl CollectorConfig {
    /// Every environment variable this binary reads (derived from its raw config struct).
    pub fn env_vars() -> Vec<String> {
        telemetry_shared::config::var_names::<Raw>()
    }

    /// Every variable with its default and meaning (the same struct, for `--help`).
    pub fn env_spec() -> Vec<EnvVar> {
        Raw::vars()
    }

    /// The environment section of `--help`.
    pub fn env_help() -> String {
        telemetry_shared::config::env_help::<Raw>()
    }

    /// Reads the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_vars(telemetry_shared::config::process_vars())
    }

    /// Reads the given variables (tests use this).
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(vars: I) -> Result<Self, ConfigError> {
        let raw: Raw = telemetry_shared::config::from_iter(vars)?;
        Ok(CollectorConfig {
            common: CommonConfig::try_from(&raw.common)?,
            collector_id: collector_id(&raw)?,
            lease_ttl: raw.lease_ttl().duration(MIN_LEASE_TTL)?,
            batch_size: raw.batch_size().number(1..=MAX_BATCH)?,
            dedup_ttl: raw.dedup_ttl().duration(MIN_LEASE_TTL)?,
            retention: raw.retention().duration(MIN_LEASE_TTL)?,
            metrics_port: raw.metrics_port().number(0..=u16::MAX)?,
            columns: Columns::try_from(&raw.columns)?,
            log: LogConfig::try_from(&raw.log)?,
        })
    }
}

fn collector_id(raw: &Raw) -> Result<String, ConfigError> {
    let setting = raw.collector_id();
    match setting.value() {
        None => Ok(default_collector_id()),
        Some(id) if is_key_segment(id) && id.len() <= 128 => Ok(id.to_string()),
        Some(_) => Err(setting.invalid("must be 1-128 characters without '/' or control characters")),
    }
}

/// `{hostname}-{pid}`, with characters that cannot appear in a key replaced.
pub fn default_collector_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "collector".into());
    let host: String = host
        .chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .collect();
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry_shared::config::COMMON_REJECTIONS;

    fn load(pairs: &[(&str, &str)]) -> Result<CollectorConfig, ConfigError> {
        CollectorConfig::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults() {
        let cfg = load(&[]).expect("valid");
        assert_eq!(cfg.lease_ttl, Duration::from_secs(30));
        assert_eq!(cfg.batch_size, MAX_BATCH);
        assert_eq!(cfg.retention, Duration::from_secs(86_400));
        assert_eq!(cfg.columns, Columns::default());
        assert!(cfg.collector_id.ends_with(&format!("-{}", std::process::id())));
    }

    #[test]
    fn bad_values_name_their_variable_and_what_is_accepted() {
        let cases = [
            ("LEASE_TTL", "1s"),
            ("LEASE_TTL", "forever"),
            ("BATCH_SIZE", "0"),
            ("BATCH_SIZE", "500"),
            ("BATCH_SIZE", "two"),
            ("DEDUP_TTL", "x"),
            ("RETENTION", "100ms"),
            ("COLLECTOR_ID", "a/b"),
            ("METRICS_PORT", "-1"),
            ("HOSTNAME_COLUMN", " "),
            ("GPU_ID_COLUMN", " "),
            ("UUID_COLUMN", " "),
            ("DEVICE_COLUMN", " "),
            ("MODEL_COLUMN", " "),
            ("METRIC_COLUMN", " "),
            ("VALUE_COLUMN", " "),
            ("ETCD_ENDPOINTS", "nohost"),
            ("ETCD_NAMESPACE", "a b"),
            ("LOG_FORMAT", "xml"),
            ("RUST_LOG", "info,x=loud"),
        ];
        for &(var, value) in cases.iter().chain(COMMON_REJECTIONS) {
            let err = load(&[(var, value)]).expect_err(var).to_string();
            assert!(
                err.starts_with(&format!("{var}={value:?} is invalid: must ")),
                "{err}"
            );
        }
        for var in CollectorConfig::env_vars() {
            assert!(
                cases.iter().chain(COMMON_REJECTIONS).any(|(v, _)| *v == var),
                "no rejection of {var} tested"
            );
        }
    }

    #[test]
    fn every_variable_read_is_documented() {
        let mut documented: Vec<String> = CollectorConfig::env_spec().into_iter().map(|v| v.name).collect();
        documented.sort();
        assert_eq!(documented, CollectorConfig::env_vars());
        for var in [
            "LEASE_TTL",
            "LOG_FORMAT",
            "RUST_LOG",
            "ETCD_ENDPOINTS",
            "UUID_COLUMN",
        ] {
            assert!(documented.iter().any(|d| d == var), "{var}");
        }
    }
}
