//! The collector's configuration, from environment variables (envy).

use std::time::Duration;

use serde::Deserialize;
/// Re-exported: the column names live in `shared/` because the gateway reads them too.
pub use telemetry_shared::config::Columns;
use telemetry_shared::{
    CommonConfig, ConfigError,
    config::{RawColumns, RawCommonConfig, duration_at_least},
    etcd::MIN_LEASE_TTL,
    keys::is_key_segment,
};

/// Most messages one commit transaction can carry: three operations each (data put, processed
/// marker put, queue delete) within etcd's 128, leaving room for the stats counter.
pub const MAX_BATCH: usize = 42;

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
    /// `BATCH_SIZE` (default 42, at most 42): messages per commit transaction.
    pub batch_size: usize,
    /// `DEDUP_TTL` (default 24h): how long a processed idempotency key is remembered.
    pub dedup_ttl: Duration,
    /// `RETENTION` (default 24h): how long telemetry records are kept.
    pub retention: Duration,
    /// `METRICS_PORT` (default 0 = off): Prometheus `/metrics`.
    pub metrics_port: u16,
    /// Column names of the GPU identity and description.
    pub columns: Columns,
}

#[derive(Debug, Default, Deserialize, serde::Serialize)]
struct Raw {
    #[serde(flatten)]
    common: RawCommonConfig,
    collector_id: Option<String>,
    lease_ttl: Option<String>,
    batch_size: Option<u32>,
    dedup_ttl: Option<String>,
    retention: Option<String>,
    metrics_port: Option<u16>,
    #[serde(flatten)]
    columns: RawColumns,
}

impl CollectorConfig {
    /// Every environment variable this binary reads (derived from its raw config struct).
    pub fn env_vars() -> Vec<String> {
        telemetry_shared::config::var_names::<Raw>()
    }

    /// Reads the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the given variables (tests use this).
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(vars: I) -> Result<Self, ConfigError> {
        let raw: Raw = telemetry_shared::config::from_iter(vars)?;
        let common = CommonConfig::try_from(raw.common)?;
        let collector_id = match raw.collector_id {
            Some(id) if is_key_segment(&id) && id.len() <= 128 => id,
            Some(id) => {
                return Err(ConfigError::invalid(
                    "COLLECTOR_ID",
                    id,
                    "must be 1-128 characters without '/' or control characters",
                ));
            }
            None => default_collector_id(),
        };
        let batch_size = raw.batch_size.unwrap_or(MAX_BATCH as u32) as usize;
        if !(1..=MAX_BATCH).contains(&batch_size) {
            return Err(ConfigError::invalid(
                "BATCH_SIZE",
                batch_size.to_string(),
                format!("must be between 1 and {MAX_BATCH} (etcd's 128-operation limit)"),
            ));
        }
        let day = Duration::from_secs(24 * 3600);
        Ok(CollectorConfig {
            common,
            collector_id,
            lease_ttl: duration_at_least(
                "LEASE_TTL",
                raw.lease_ttl.as_deref(),
                Duration::from_secs(30),
                MIN_LEASE_TTL,
            )?,
            batch_size,
            dedup_ttl: duration_at_least("DEDUP_TTL", raw.dedup_ttl.as_deref(), day, MIN_LEASE_TTL)?,
            retention: duration_at_least("RETENTION", raw.retention.as_deref(), day, MIN_LEASE_TTL)?,
            metrics_port: raw.metrics_port.unwrap_or(0),
            columns: Columns::try_from(raw.columns)?,
        })
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
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("LEASE_TTL", "1s"),
            ("LEASE_TTL", "forever"),
            ("BATCH_SIZE", "0"),
            ("BATCH_SIZE", "500"),
            ("DEDUP_TTL", "x"),
            ("RETENTION", "100ms"),
            ("COLLECTOR_ID", "a/b"),
            ("METRICS_PORT", "-1"),
            ("HOSTNAME_COLUMN", " "),
        ] {
            let err = load(&[(var, value)]).expect_err(var);
            assert!(err.to_string().contains(var), "{var}: {err}");
        }
    }
}
