//! The gateway's configuration, from environment variables (envy).

use std::{net::IpAddr, time::Duration};

use serde::Deserialize;
use telemetry_shared::{
    CommonConfig, ConfigError,
    config::{Columns, RawColumns, RawCommonConfig, duration},
};

/// Which browser origins may call the API (`GATEWAY_CORS_ORIGINS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `*`: any origin (no credentials).
    Any,
    /// An explicit list of origins such as `https://grafana.example.com`.
    List(Vec<String>),
    /// Unset or empty: no cross-origin access.
    None,
}

/// The gateway's settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// etcd endpoints and namespace.
    pub common: CommonConfig,
    /// `GATEWAY_HOST` (default `0.0.0.0`): the address to listen on.
    pub host: IpAddr,
    /// `GATEWAY_PORT` (default 8080).
    pub port: u16,
    /// `WS_MAX_CONNECTIONS` (default 1000): concurrent WebSocket subscribers; the next one gets
    /// a 503 with a JSON reason.
    pub ws_max_connections: usize,
    /// `WS_BUFFER` (default 1024): revisions buffered per subscriber before it counts as slow
    /// and is closed (with the last revision it was sent, so it can resume).
    pub ws_buffer: usize,
    /// `WS_PING_INTERVAL` (default 20s): how often a subscriber is pinged; one that has not
    /// answered for two intervals is closed.
    pub ws_ping_interval: Duration,
    /// `WS_SEND_TIMEOUT` (default 10s): longest a single frame may take to write to a socket.
    pub ws_send_timeout: Duration,
    /// `GATEWAY_CORS_ORIGINS` (comma-separated origins, or `*`; default none).
    pub cors_origins: CorsOrigins,
    /// `GATEWAY_REQUEST_TIMEOUT` (default 10s): a REST request taking longer gets a 503.
    pub request_timeout: Duration,
    /// Column names of the GPU identity and the metric (shared with the collector).
    pub columns: Columns,
}

#[derive(Debug, Default, Deserialize, serde::Serialize)]
struct Raw {
    #[serde(flatten)]
    common: RawCommonConfig,
    #[serde(flatten)]
    columns: RawColumns,
    gateway_host: Option<String>,
    gateway_port: Option<u16>,
    ws_max_connections: Option<u32>,
    ws_buffer: Option<u32>,
    ws_ping_interval: Option<String>,
    ws_send_timeout: Option<String>,
    gateway_cors_origins: Option<String>,
    gateway_request_timeout: Option<String>,
}

impl GatewayConfig {
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
        let host = match raw.gateway_host.as_deref().map(str::trim) {
            None | Some("") => IpAddr::from([0, 0, 0, 0]),
            Some(text) => text
                .parse()
                .map_err(|_| ConfigError::invalid("GATEWAY_HOST", text, "must be an IP address"))?,
        };
        let positive = |var: &str, value: Option<u32>, default: u32| -> Result<usize, ConfigError> {
            match value.unwrap_or(default) {
                0 => Err(ConfigError::invalid(var, "0", "must be at least 1")),
                n => Ok(n as usize),
            }
        };
        let at_least = |var: &str, raw: Option<&str>, default: Duration| -> Result<Duration, ConfigError> {
            let value = duration(var, raw, default)?;
            if value < Duration::from_millis(100) {
                return Err(ConfigError::invalid(
                    var,
                    raw.unwrap_or_default(),
                    "must be at least 100ms",
                ));
            }
            Ok(value)
        };
        Ok(GatewayConfig {
            common: CommonConfig::try_from(raw.common)?,
            host,
            port: raw.gateway_port.unwrap_or(8080),
            ws_max_connections: positive("WS_MAX_CONNECTIONS", raw.ws_max_connections, 1000)?,
            ws_buffer: positive("WS_BUFFER", raw.ws_buffer, 1024)?,
            ws_ping_interval: at_least(
                "WS_PING_INTERVAL",
                raw.ws_ping_interval.as_deref(),
                Duration::from_secs(20),
            )?,
            ws_send_timeout: at_least(
                "WS_SEND_TIMEOUT",
                raw.ws_send_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            cors_origins: parse_origins(raw.gateway_cors_origins.as_deref())?,
            request_timeout: at_least(
                "GATEWAY_REQUEST_TIMEOUT",
                raw.gateway_request_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            columns: Columns::try_from(raw.columns)?,
        })
    }
}

fn parse_origins(raw: Option<&str>) -> Result<CorsOrigins, ConfigError> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(CorsOrigins::None);
    };
    if raw == "*" {
        return Ok(CorsOrigins::Any);
    }
    let mut origins = Vec::new();
    for origin in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let scheme_ok = origin.starts_with("http://") || origin.starts_with("https://");
        let valid = scheme_ok
            && !origin.ends_with('/')
            && origin.is_ascii()
            && !origin.contains(char::is_whitespace)
            && axum::http::HeaderValue::from_str(origin).is_ok();
        if !valid {
            return Err(ConfigError::invalid(
                "GATEWAY_CORS_ORIGINS",
                raw,
                format!("{origin:?} is not an origin like https://host:port (or use *)"),
            ));
        }
        origins.push(origin.to_string());
    }
    Ok(CorsOrigins::List(origins))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults() {
        let cfg = load(&[]).expect("valid");
        assert_eq!(cfg.port, 8080);
        assert_eq!(cfg.host, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(cfg.ws_max_connections, 1000);
        assert_eq!(cfg.cors_origins, CorsOrigins::None);
        assert_eq!(cfg.columns.metric, "metric_name");
    }

    #[test]
    fn origins() {
        let cfg = load(&[("GATEWAY_CORS_ORIGINS", "https://a.example, http://b:3000")]).expect("valid");
        assert_eq!(
            cfg.cors_origins,
            CorsOrigins::List(vec!["https://a.example".into(), "http://b:3000".into()])
        );
        assert_eq!(
            load(&[("GATEWAY_CORS_ORIGINS", "*")])
                .expect("valid")
                .cors_origins,
            CorsOrigins::Any
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("GATEWAY_PORT", "http"),
            ("GATEWAY_PORT", "70000"),
            ("GATEWAY_HOST", "localhost:80"),
            ("WS_MAX_CONNECTIONS", "0"),
            ("WS_MAX_CONNECTIONS", "-5"),
            ("WS_BUFFER", "0"),
            ("WS_PING_INTERVAL", "1ms"),
            ("GATEWAY_CORS_ORIGINS", "example.com"),
            ("GATEWAY_REQUEST_TIMEOUT", "soon"),
            ("METRIC_COLUMN", " "),
        ] {
            let err = load(&[(var, value)]).expect_err(var);
            assert!(err.to_string().contains(var), "{var}: {err}");
        }
    }
}
