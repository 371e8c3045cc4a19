//! Configuration from environment variables.
//!
//! Every binary reads its settings with [`envy`] into a *raw* struct of primitives and strings,
//! then converts the values that need parsing (durations, endpoint lists) with the helpers here.
//! Both steps produce a [`ConfigError`] that names the offending variable, so a binary can fail
//! fast with a message an operator can act on. envy itself only names the variable for
//! primitive types, which is why durations are read as strings and parsed here.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A configuration problem, always naming the environment variable at fault.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("missing required environment variable {0}")]
    Missing(String),
    /// A variable is set but its value cannot be used.
    #[error("invalid value {value:?} for environment variable {var}: {reason}")]
    Invalid {
        /// The variable's name, e.g. `LEASE_TTL`.
        var: String,
        /// The value as found in the environment.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// envy rejected a variable (its message names the variable).
    #[error("invalid environment: {0}")]
    Env(String),
}

impl ConfigError {
    /// Builds an [`ConfigError::Invalid`].
    pub fn invalid(var: &str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            var: var.to_string(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

impl From<envy::Error> for ConfigError {
    fn from(err: envy::Error) -> Self {
        match err {
            envy::Error::MissingValue(field) => ConfigError::Missing(field.to_uppercase()),
            envy::Error::Custom(msg) => ConfigError::Env(msg),
        }
    }
}

/// The environment variables a raw config struct reads: its field names (flattened parts
/// included) upper-cased, plus `RUST_LOG`, which every binary honours. Derived from the struct
/// itself, so a deploy file can be checked against what the binary really accepts.
pub fn var_names<T: Serialize + Default>() -> Vec<String> {
    let mut names: Vec<String> = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().map(|k| k.to_uppercase()).collect(),
        _ => Vec::new(),
    };
    names.push("RUST_LOG".into());
    names.sort();
    names
}

/// Deserializes `T` from the process environment with envy.
pub fn from_env<T: for<'de> Deserialize<'de>>() -> Result<T, ConfigError> {
    from_iter(std::env::vars())
}

/// Deserializes `T` from the given variables (tests use this instead of mutating the process
/// environment, which is shared between threads).
pub fn from_iter<T, I>(vars: I) -> Result<T, ConfigError>
where
    T: for<'de> Deserialize<'de>,
    I: IntoIterator<Item = (String, String)>,
{
    // An empty variable means "unset": `FOO= cmd` is a common way to clear a setting.
    let vars = vars.into_iter().filter(|(_, v)| !v.is_empty());
    Ok(envy::from_iter(vars)?)
}

/// Parses a human duration (`500ms`, `30s`, `24h`) read from `var`, or returns `default`.
pub fn duration(var: &str, raw: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text.trim()).map_err(|e| {
            ConfigError::invalid(var, text, format!("{e} (write durations like 500ms, 30s, 24h)"))
        }),
    }
}

/// The longest TTL the services accept (etcd's own maximum lease TTL is about 285 years; ten
/// years keeps every sum of durations far from overflow).
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Like [`duration`] but rejects values below `min` (e.g. etcd's minimum lease TTL) or above
/// [`MAX_TTL`].
pub fn duration_at_least(
    var: &str,
    raw: Option<&str>,
    default: Duration,
    min: Duration,
) -> Result<Duration, ConfigError> {
    let value = duration(var, raw, default)?;
    if value < min {
        return Err(ConfigError::invalid(
            var,
            raw.unwrap_or_default(),
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    if value > MAX_TTL {
        return Err(ConfigError::invalid(
            var,
            raw.unwrap_or_default(),
            "must be at most 3650 days",
        ));
    }
    Ok(value)
}

/// The settings every service shares: where etcd is and which key prefix to use.
#[derive(Debug, Clone, PartialEq)]
pub struct CommonConfig {
    /// etcd client endpoints (`ETCD_ENDPOINTS`, comma-separated `host:port`).
    pub etcd_endpoints: Vec<String>,
    /// Prefix put before every key (`ETCD_NAMESPACE`), so several pipelines can share one etcd.
    pub etcd_namespace: String,
}

/// The raw form of [`CommonConfig`] as envy reads it. Services flatten this into their own raw
/// struct with `#[serde(flatten)]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RawCommonConfig {
    /// `ETCD_ENDPOINTS`.
    pub etcd_endpoints: Option<String>,
    /// `ETCD_NAMESPACE`.
    pub etcd_namespace: Option<String>,
}

/// Default etcd endpoint when `ETCD_ENDPOINTS` is unset.
pub const DEFAULT_ETCD_ENDPOINT: &str = "127.0.0.1:2379";

impl TryFrom<RawCommonConfig> for CommonConfig {
    type Error = ConfigError;

    fn try_from(raw: RawCommonConfig) -> Result<Self, ConfigError> {
        let etcd_endpoints = match raw.etcd_endpoints.as_deref() {
            None => vec![DEFAULT_ETCD_ENDPOINT.to_string()],
            Some(list) => parse_endpoints(list)?,
        };
        let etcd_namespace = raw.etcd_namespace.unwrap_or_default();
        if etcd_namespace.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "ETCD_NAMESPACE",
                etcd_namespace,
                "must not contain white space",
            ));
        }
        Ok(CommonConfig {
            etcd_endpoints,
            etcd_namespace: etcd_namespace.trim_end_matches('/').to_string(),
        })
    }
}

/// Parses `ETCD_ENDPOINTS`: comma-separated `host:port`, optionally with an `http://` scheme.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let host_port = item
            .strip_prefix("http://")
            .or_else(|| item.strip_prefix("https://"))
            .unwrap_or(item);
        let valid = host_port
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if !valid {
            return Err(ConfigError::invalid(
                "ETCD_ENDPOINTS",
                list,
                format!("{item:?} is not host:port"),
            ));
        }
        out.push(item.to_string());
    }
    if out.is_empty() {
        return Err(ConfigError::invalid("ETCD_ENDPOINTS", list, "no endpoint given"));
    }
    Ok(out)
}

/// Which message fields identify a GPU and describe it. The collector keys records by them and
/// the gateway filters by them, so both read them from the same variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// `HOSTNAME_COLUMN` (default `Hostname`).
    pub hostname: String,
    /// `GPU_ID_COLUMN` (default `gpu_id`).
    pub gpu_id: String,
    /// `UUID_COLUMN` (default `uuid`).
    pub uuid: String,
    /// `DEVICE_COLUMN` (default `device`; optional in messages).
    pub device: String,
    /// `MODEL_COLUMN` (default `modelName`; optional in messages).
    pub model: String,
    /// `METRIC_COLUMN` (default `metric_name`): the metric a record measures (gateway filters).
    pub metric: String,
    /// `VALUE_COLUMN` (default `value`): the measured value (the dashboard plots it).
    pub value: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            hostname: "Hostname".into(),
            gpu_id: "gpu_id".into(),
            uuid: "uuid".into(),
            device: "device".into(),
            model: "modelName".into(),
            metric: "metric_name".into(),
            value: "value".into(),
        }
    }
}

/// The raw form of [`Columns`]; services flatten it into their raw config.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RawColumns {
    /// `HOSTNAME_COLUMN`.
    pub hostname_column: Option<String>,
    /// `GPU_ID_COLUMN`.
    pub gpu_id_column: Option<String>,
    /// `UUID_COLUMN`.
    pub uuid_column: Option<String>,
    /// `DEVICE_COLUMN`.
    pub device_column: Option<String>,
    /// `MODEL_COLUMN`.
    pub model_column: Option<String>,
    /// `METRIC_COLUMN`.
    pub metric_column: Option<String>,
    /// `VALUE_COLUMN`.
    pub value_column: Option<String>,
}

impl TryFrom<RawColumns> for Columns {
    type Error = ConfigError;

    fn try_from(raw: RawColumns) -> Result<Self, ConfigError> {
        let column = |var: &str, value: Option<String>, default: String| -> Result<String, ConfigError> {
            match value {
                Some(v) if v.trim().is_empty() => Err(ConfigError::invalid(var, v, "must not be blank")),
                Some(v) => Ok(v.trim().to_string()),
                None => Ok(default),
            }
        };
        let d = Columns::default();
        Ok(Columns {
            hostname: column("HOSTNAME_COLUMN", raw.hostname_column, d.hostname)?,
            gpu_id: column("GPU_ID_COLUMN", raw.gpu_id_column, d.gpu_id)?,
            uuid: column("UUID_COLUMN", raw.uuid_column, d.uuid)?,
            device: column("DEVICE_COLUMN", raw.device_column, d.device)?,
            model: column("MODEL_COLUMN", raw.model_column, d.model)?,
            metric: column("METRIC_COLUMN", raw.metric_column, d.metric)?,
            value: column("VALUE_COLUMN", raw.value_column, d.value)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn common_defaults() {
        let raw: RawCommonConfig = from_iter(vars(&[])).expect("empty env is valid");
        let cfg = CommonConfig::try_from(raw).expect("defaults are valid");
        assert_eq!(cfg.etcd_endpoints, vec!["127.0.0.1:2379"]);
        assert_eq!(cfg.etcd_namespace, "");
    }

    #[test]
    fn endpoints_are_validated_by_name() {
        let raw: RawCommonConfig = from_iter(vars(&[("ETCD_ENDPOINTS", "a:1, nope")])).expect("raw");
        let err = CommonConfig::try_from(raw).expect_err("bad endpoint");
        assert!(err.to_string().contains("ETCD_ENDPOINTS"), "{err}");
        assert_eq!(
            parse_endpoints("http://127.0.0.1:2379,10.0.0.1:2380").expect("valid"),
            vec!["http://127.0.0.1:2379", "10.0.0.1:2380"]
        );
    }

    #[test]
    fn durations_name_their_variable() {
        assert_eq!(
            duration("LEASE_TTL", Some("500ms"), Duration::ZERO).expect("valid"),
            Duration::from_millis(500)
        );
        assert_eq!(
            duration("LEASE_TTL", None, Duration::from_secs(30)).expect("default"),
            Duration::from_secs(30)
        );
        let err = duration("LEASE_TTL", Some("30 parsecs"), Duration::ZERO).expect_err("invalid");
        assert!(err.to_string().contains("LEASE_TTL"), "{err}");
        let err = duration_at_least("LEASE_TTL", Some("1s"), Duration::ZERO, Duration::from_secs(2))
            .expect_err("too small");
        assert!(err.to_string().contains("at least 2s"), "{err}");
    }

    #[test]
    fn var_names_come_from_the_struct() {
        let names = var_names::<RawCommonConfig>();
        assert_eq!(names, vec!["ETCD_ENDPOINTS", "ETCD_NAMESPACE", "RUST_LOG"]);
        assert!(var_names::<RawColumns>().contains(&"METRIC_COLUMN".to_string()));
    }

    #[test]
    fn missing_value_is_upper_cased() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Needs {
            csv_path: String,
        }
        let err = from_iter::<Needs, _>(vars(&[])).expect_err("missing");
        assert_eq!(err, ConfigError::Missing("CSV_PATH".into()));
    }
}
