//! The exporter's configuration, from environment variables (envy).

use std::time::Duration;

pub use telemetry_shared::config::Columns;
use telemetry_shared::{
    CommonConfig, ConfigError,
    config::{EnvSpec as _, EnvVar, LogConfig, RawColumns, RawCommonConfig, RawLogConfig},
    etcd::MIN_LEASE_TTL,
    keys::is_key_segment,
};

/// What to do about what the TSDB says of its own configuration at start-up (see
/// `server.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCheck {
    /// Refuse to start against a server known to store re-sent samples twice; warn about
    /// anything else that is unsafe or cannot be checked.
    Require,
    /// Warn only.
    Warn,
    /// Do not ask the server.
    Off,
}

/// The exporter's settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ExporterConfig {
    /// etcd endpoints and namespace.
    pub common: CommonConfig,
    /// `REMOTE_WRITE_URL` (required): where remote-write requests go.
    pub remote_write_url: reqwest::Url,
    /// `EXPORTER_NAME` (default `default`): exporters with one name share one checkpoint and one
    /// of them is active.
    pub name: String,
    /// `EXPORTER_ID` (default `{hostname}-{pid}`): this process, in the owner key.
    pub exporter_id: String,
    /// `LEASE_TTL` (default 30s): a standby takes over about this long after the active
    /// exporter died.
    pub lease_ttl: Duration,
    /// `BATCH_SAMPLES` (default 2000): most samples per request.
    pub batch_samples: usize,
    /// `BATCH_WAIT` (default 250ms): how long a record waits for others to share its request.
    pub batch_wait: Duration,
    /// `REMOTE_WRITE_TIMEOUT` (default 30s): one request's time limit.
    pub request_timeout: Duration,
    /// `RETENTION` (default 24h): how long the collector keeps records (for lag warnings).
    pub retention: Duration,
    /// `COMPACTION_WINDOW` (default 0s = unknown): how much history etcd keeps (for lag
    /// warnings).
    pub compaction_window: Duration,
    /// `REJECTED_KEEP` (default 1000): how many rejected records stay listed in etcd.
    pub rejected_keep: usize,
    /// `SERVER_CHECK` (default `require`).
    pub server_check: ServerCheck,
    /// `METRICS_PORT` (default 0 = off): Prometheus `/metrics`.
    pub metrics_port: u16,
    /// Column names of the GPU identity, the metric and the value.
    pub columns: Columns,
    /// `RUST_LOG` and `LOG_FORMAT`.
    pub log: LogConfig,
}

/// Most samples one request may carry.
pub const MAX_BATCH_SAMPLES: usize = 100_000;

telemetry_shared::env_config! {
    /// Every variable the exporter reads: envy's struct, and the table `--help` prints.
    struct Raw {
        flatten common: RawCommonConfig;
        flatten columns: RawColumns;
        flatten log: RawLogConfig;
        /// Prometheus remote-write endpoint (http://host:port/api/v1/write for Prometheus and
        /// VictoriaMetrics). Plain HTTP: terminate TLS in a proxy beside the exporter.
        remote_write_url = Required;
        /// Names the export (its checkpoint, owner key and rejected records): 1-128 characters
        /// without '/'. Exporters with one name share the work: one is active, the others
        /// stand by.
        exporter_name = Value("default");
        /// Names this process in the owner key: 1-128 characters without '/'.
        exporter_id = Computed("{hostname}-{pid}");
        /// Owner lease (at least 2s): a standby takes over about this long after the active
        /// exporter stopped renewing it.
        lease_ttl = Value("30s");
        /// Most samples per remote-write request (1 to 100000); a request also never holds two
        /// samples of one series.
        batch_samples = Value("2000");
        /// How long a record waits for more to share its request (at most 10s).
        batch_wait = Value("250ms");
        /// Time limit of one remote-write request (at least 1s); it is then retried.
        remote_write_timeout = Value("30s");
        /// How long the collector keeps records (its RETENTION): the exporter warns when its lag
        /// approaches it.
        retention = Value("24h");
        /// How much history etcd keeps (its --auto-compaction-retention), 0s if unknown: the
        /// exporter warns when its lag approaches it.
        compaction_window = Value("0s");
        /// How many rejected records stay listed in etcd (the newest; 1 to 100000).
        rejected_keep = Value("1000");
        /// require: refuse to start when the server says it would store a re-sent sample twice
        /// (VictoriaMetrics without -dedup.minScrapeInterval), warn about anything else unsafe;
        /// warn: only warn; off: do not ask the server.
        server_check = Value("require");
        /// Port of Prometheus /metrics; 0 = off.
        metrics_port = Value("0");
    }
}

impl ExporterConfig {
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
        Ok(ExporterConfig {
            common: CommonConfig::try_from(&raw.common)?,
            remote_write_url: remote_write_url(&raw)?,
            name: segment(&raw.exporter_name())?,
            exporter_id: exporter_id(&raw)?,
            lease_ttl: raw.lease_ttl().duration(MIN_LEASE_TTL)?,
            batch_samples: raw.batch_samples().number(1..=MAX_BATCH_SAMPLES)?,
            batch_wait: at_most(&raw.batch_wait(), Duration::ZERO, Duration::from_secs(10))?,
            request_timeout: raw.remote_write_timeout().duration(Duration::from_secs(1))?,
            retention: raw.retention().duration(MIN_LEASE_TTL)?,
            compaction_window: raw.compaction_window().duration(Duration::ZERO)?,
            rejected_keep: raw.rejected_keep().number(1..=100_000)?,
            server_check: raw.server_check().parse_with("require, warn or off", |t| {
                match t.to_ascii_lowercase().as_str() {
                    "require" => Some(ServerCheck::Require),
                    "warn" => Some(ServerCheck::Warn),
                    "off" => Some(ServerCheck::Off),
                    _ => None,
                }
            })?,
            metrics_port: raw.metrics_port().number(0..=u16::MAX)?,
            columns: Columns::try_from(&raw.columns)?,
            log: LogConfig::try_from(&raw.log)?,
        })
    }
}

fn remote_write_url(raw: &Raw) -> Result<reqwest::Url, ConfigError> {
    let setting = raw.remote_write_url();
    let accepted = "an http:// URL with a host, like http://127.0.0.1:9090/api/v1/write";
    let url = setting.parse_with(accepted, |t| reqwest::Url::parse(t).ok())?;
    if url.scheme() == "https" {
        return Err(setting.invalid(
            "must be plain http:// (this build has no TLS; terminate TLS in a proxy beside the exporter)",
        ));
    }
    if url.scheme() != "http" || url.host_str().is_none_or(str::is_empty) {
        return Err(setting.invalid(format!("must be {accepted}")));
    }
    Ok(url)
}

fn segment(setting: &telemetry_shared::config::Setting<'_>) -> Result<String, ConfigError> {
    let text = setting.text()?.trim();
    if is_key_segment(text) && text.len() <= 128 {
        Ok(text.to_string())
    } else {
        Err(setting.invalid("must be 1-128 characters without '/' or control characters"))
    }
}

fn at_most(
    setting: &telemetry_shared::config::Setting<'_>,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let value = setting.duration(min)?;
    if value > max {
        return Err(setting.invalid(format!(
            "must be at most {} (a duration like 500ms, 30s, 24h)",
            humantime::format_duration(max)
        )));
    }
    Ok(value)
}

fn exporter_id(raw: &Raw) -> Result<String, ConfigError> {
    let setting = raw.exporter_id();
    match setting.value() {
        None => Ok(default_exporter_id()),
        Some(_) => segment(&setting),
    }
}

/// `{hostname}-{pid}`, with characters that cannot appear in a key replaced.
pub fn default_exporter_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "exporter".into());
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

    const URL: (&str, &str) = ("REMOTE_WRITE_URL", "http://127.0.0.1:9090/api/v1/write");

    fn load(pairs: &[(&str, &str)]) -> Result<ExporterConfig, ConfigError> {
        let mut all = vec![URL];
        all.retain(|(k, _)| !pairs.iter().any(|(p, _)| p == k));
        all.extend_from_slice(pairs);
        ExporterConfig::from_vars(all.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults() {
        let cfg = load(&[]).expect("valid");
        assert_eq!(cfg.name, "default");
        assert_eq!(cfg.lease_ttl, Duration::from_secs(30));
        assert_eq!(cfg.batch_samples, 2000);
        assert_eq!(cfg.batch_wait, Duration::from_millis(250));
        assert_eq!(cfg.compaction_window, Duration::ZERO);
        assert_eq!(cfg.server_check, ServerCheck::Require);
        assert_eq!(cfg.columns, Columns::default());
        assert!(cfg.exporter_id.ends_with(&format!("-{}", std::process::id())));
    }

    #[test]
    fn the_url_is_required() {
        let err = ExporterConfig::from_vars(Vec::<(String, String)>::new()).expect_err("required");
        assert_eq!(err.to_string(), "REMOTE_WRITE_URL is required but not set");
    }

    #[test]
    fn bad_values_name_their_variable_and_what_is_accepted() {
        let cases = [
            ("REMOTE_WRITE_URL", "localhost:9090"),
            ("REMOTE_WRITE_URL", "https://tsdb/api/v1/write"),
            ("EXPORTER_NAME", "a/b"),
            ("EXPORTER_ID", "a/b"),
            ("LEASE_TTL", "1s"),
            ("BATCH_SAMPLES", "0"),
            ("BATCH_WAIT", "1m"),
            ("REMOTE_WRITE_TIMEOUT", "10ms"),
            ("RETENTION", "1s"),
            ("COMPACTION_WINDOW", "soon"),
            ("REJECTED_KEEP", "0"),
            ("SERVER_CHECK", "maybe"),
            ("METRICS_PORT", "-1"),
            ("HOSTNAME_COLUMN", " "),
            ("GPU_ID_COLUMN", " "),
            ("UUID_COLUMN", " "),
            ("DEVICE_COLUMN", " "),
            ("MODEL_COLUMN", " "),
            ("METRIC_COLUMN", " "),
            ("VALUE_COLUMN", " "),
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
        for var in ExporterConfig::env_vars() {
            assert!(
                cases.iter().chain(COMMON_REJECTIONS).any(|(v, _)| *v == var),
                "no rejection of {var} tested"
            );
        }
    }

    #[test]
    fn every_variable_read_is_documented() {
        let mut documented: Vec<String> = ExporterConfig::env_spec().into_iter().map(|v| v.name).collect();
        documented.sort();
        assert_eq!(documented, ExporterConfig::env_vars());
    }
}
