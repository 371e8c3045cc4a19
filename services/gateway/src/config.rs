//! The gateway's configuration, from environment variables (envy).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use telemetry_shared::{
    CommonConfig, ConfigError,
    config::{Columns, EnvSpec as _, EnvVar, LogConfig, RawColumns, RawCommonConfig, RawLogConfig, Setting},
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

/// The certificate and key the gateway serves HTTPS with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `GATEWAY_TLS_CERT_FILE`: the certificate chain (PEM), the server's own first.
    pub cert: PathBuf,
    /// `GATEWAY_TLS_KEY_FILE`: its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// What one API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLimits {
    /// `GATEWAY_TOKEN_RATE` (default 50): requests per second; 0 = unlimited.
    pub rate: u32,
    /// `GATEWAY_TOKEN_BURST` (default 100): requests at once above the rate.
    pub burst: u32,
    /// `GATEWAY_TOKEN_MAX_SUBSCRIPTIONS` (default 16): WebSocket subscriptions open at once;
    /// 0 = unlimited (WS_MAX_CONNECTIONS still bounds them all).
    pub max_subscriptions: u32,
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
    /// `WINDOW_POINTS` (default 256; 0 = off): records kept in memory per GPU for reads.
    pub window_points: usize,
    /// `WINDOW_BYTES` (default 256MiB): most memory the window may use (records' JSON size).
    pub window_bytes: usize,
    /// `GPU_METRICS_MAX_AGE` (default 5m): a GPU whose newest record is older is left out of
    /// `/metrics/gpus` (it stopped reporting; Prometheus marks its series stale).
    pub gpu_metrics_max_age: Duration,
    /// `GATEWAY_TLS_CERT_FILE` and `GATEWAY_TLS_KEY_FILE`: HTTPS when both are set.
    pub tls: Option<TlsFiles>,
    /// `GATEWAY_API_TOKENS_FILE`: when set, the API needs one of the file's tokens.
    pub api_tokens_file: Option<PathBuf>,
    /// `GATEWAY_TOKEN_RATE`, `GATEWAY_TOKEN_BURST`, `GATEWAY_TOKEN_MAX_SUBSCRIPTIONS`.
    pub token_limits: TokenLimits,
    /// `GATEWAY_METRICS_REQUIRE_TOKEN` (default false): `/metrics` and `/metrics/gpus` need a
    /// token too (when tokens are configured).
    pub metrics_require_token: bool,
    /// `GATEWAY_RELOAD_INTERVAL` (default 10s): how often the certificate, key and tokens
    /// files are checked for changes.
    pub reload_interval: Duration,
    /// Column names of the GPU identity and the metric (shared with the collector).
    pub columns: Columns,
    /// `RUST_LOG` and `LOG_FORMAT`.
    pub log: LogConfig,
}

telemetry_shared::env_config! {
    /// Every variable the gateway reads: envy's struct, and the table `--help` prints.
    struct Raw {
        flatten common: RawCommonConfig;
        flatten columns: RawColumns;
        flatten log: RawLogConfig;
        /// IP address to listen on.
        gateway_host = Value("0.0.0.0");
        /// Port to listen on (REST, WebSocket, /docs and Prometheus /metrics); 0 = any free port.
        gateway_port = Value("8080");
        /// WebSocket subscribers at once; the next one gets a 503 JSON refusal.
        ws_max_connections = Value("1000");
        /// Revisions queued per subscriber before it counts as slow and is closed (with the
        /// last revision it was sent, so it can resume).
        ws_buffer = Value("1024");
        /// How often subscribers are pinged (at least 100ms); no pong for two intervals closes
        /// the socket.
        ws_ping_interval = Value("20s");
        /// Longest one WebSocket frame may take to write (at least 100ms).
        ws_send_timeout = Value("10s");
        /// Browser origins that may call the API: comma-separated origins such as
        /// https://grafana.example.com, or *; empty = no cross-origin access.
        gateway_cors_origins = Value("");
        /// A REST request taking longer gets a 503 JSON error (at least 100ms).
        gateway_request_timeout = Value("10s");
        /// Records kept in memory per GPU (the newest), to answer reads without etcd; 0 turns
        /// the window off.
        window_points = Value("256");
        /// Most memory the window may use, counted as the records' JSON size (e.g. 256MiB).
        window_bytes = Value("256MiB");
        /// /metrics/gpus leaves out a GPU whose newest record is older than this (at least 1s).
        gpu_metrics_max_age = Value("5m");
        /// PEM certificate chain (the server's certificate first); with GATEWAY_TLS_KEY_FILE the
        /// gateway serves HTTPS (and wss://) only. A renewed file is picked up without a
        /// restart (see GATEWAY_RELOAD_INTERVAL).
        gateway_tls_cert_file = Value("");
        /// PEM private key of GATEWAY_TLS_CERT_FILE (PKCS#8, PKCS#1 or SEC1).
        gateway_tls_key_file = Value("");
        /// File of API tokens, one per line (blank lines and # comments ignored; each at least
        /// 16 printable characters). When set, /api/v1/ needs Authorization: Bearer <token>
        /// (401 otherwise); changes are picked up without a restart. Empty = no authentication.
        gateway_api_tokens_file = Value("");
        /// Requests per second each token may make (429 with Retry-After past it); 0 = no limit.
        gateway_token_rate = Value("50");
        /// Requests a token may make at once above GATEWAY_TOKEN_RATE (at least 1).
        gateway_token_burst = Value("100");
        /// WebSocket subscriptions each token may hold open at once (429 past it); 0 = no limit
        /// per token (WS_MAX_CONNECTIONS still applies).
        gateway_token_max_subscriptions = Value("16");
        /// true: /metrics and /metrics/gpus need a token too (when GATEWAY_API_TOKENS_FILE is
        /// set); false: they stay open for Prometheus.
        gateway_metrics_require_token = Value("false");
        /// How often the certificate, key and tokens files are checked for changes (at least
        /// 100ms).
        gateway_reload_interval = Value("10s");
    }
}

/// The shortest accepted WebSocket interval and request timeout.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

impl GatewayConfig {
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
        Ok(GatewayConfig {
            common: CommonConfig::try_from(&raw.common)?,
            host: raw
                .gateway_host()
                .parse_with("an IP address like 0.0.0.0 or ::1", |t| t.parse().ok())?,
            port: raw.gateway_port().number(0..=u16::MAX)?,
            ws_max_connections: raw.ws_max_connections().number(1..=u32::MAX)? as usize,
            ws_buffer: raw.ws_buffer().number(1..=u32::MAX)? as usize,
            ws_ping_interval: raw.ws_ping_interval().duration(MIN_INTERVAL)?,
            ws_send_timeout: raw.ws_send_timeout().duration(MIN_INTERVAL)?,
            cors_origins: parse_origins(&raw.gateway_cors_origins())?,
            request_timeout: raw.gateway_request_timeout().duration(MIN_INTERVAL)?,
            window_points: raw.window_points().number(0..=1_000_000u32)? as usize,
            window_bytes: raw.window_bytes().bytes()?,
            gpu_metrics_max_age: raw.gpu_metrics_max_age().duration(Duration::from_secs(1))?,
            tls: tls_files(&raw)?,
            api_tokens_file: optional_path(&raw.gateway_api_tokens_file())?,
            token_limits: TokenLimits {
                rate: raw.gateway_token_rate().number(0..=1_000_000)?,
                burst: raw.gateway_token_burst().number(1..=1_000_000)?,
                max_subscriptions: raw.gateway_token_max_subscriptions().number(0..=1_000_000)?,
            },
            metrics_require_token: raw.gateway_metrics_require_token().boolean()?,
            reload_interval: raw.gateway_reload_interval().duration(MIN_INTERVAL)?,
            columns: Columns::try_from(&raw.columns)?,
            log: LogConfig::try_from(&raw.log)?,
        })
    }
}

/// A file path, or `None` when the variable is unset or empty.
fn optional_path(setting: &Setting<'_>) -> Result<Option<PathBuf>, ConfigError> {
    match setting.text()? {
        "" => Ok(None),
        text if text.trim().is_empty() => Err(setting.invalid("must be a file path (not blank)")),
        text => Ok(Some(PathBuf::from(text.trim()))),
    }
}

/// Both TLS files, or neither.
fn tls_files(raw: &Raw) -> Result<Option<TlsFiles>, ConfigError> {
    let (cert, key) = (raw.gateway_tls_cert_file(), raw.gateway_tls_key_file());
    match (optional_path(&cert)?, optional_path(&key)?) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(cert.invalid("must be set together with GATEWAY_TLS_KEY_FILE")),
        (None, Some(_)) => Err(key.invalid("must be set together with GATEWAY_TLS_CERT_FILE")),
    }
}

fn parse_origins(setting: &Setting<'_>) -> Result<CorsOrigins, ConfigError> {
    let raw = setting.text()?.trim();
    if raw.is_empty() {
        return Ok(CorsOrigins::None);
    }
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
            return Err(setting.invalid(format!(
                "must be comma-separated origins like https://host:port, or *; {origin:?} is not one"
            )));
        }
        origins.push(origin.to_string());
    }
    Ok(CorsOrigins::List(origins))
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry_shared::config::COMMON_REJECTIONS;

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
        assert_eq!((cfg.tls, cfg.api_tokens_file), (None, None));
        assert_eq!(
            cfg.token_limits,
            TokenLimits {
                rate: 50,
                burst: 100,
                max_subscriptions: 16
            }
        );
        assert!(!cfg.metrics_require_token);
    }

    #[test]
    fn tls_takes_both_files() {
        let cfg = load(&[
            ("GATEWAY_TLS_CERT_FILE", "/etc/gw/tls.crt"),
            ("GATEWAY_TLS_KEY_FILE", " /etc/gw/tls.key "),
            ("GATEWAY_API_TOKENS_FILE", "/etc/gw/tokens"),
        ])
        .expect("valid");
        assert_eq!(
            cfg.tls,
            Some(TlsFiles {
                cert: "/etc/gw/tls.crt".into(),
                key: "/etc/gw/tls.key".into()
            })
        );
        assert_eq!(cfg.api_tokens_file, Some(PathBuf::from("/etc/gw/tokens")));
        let err = load(&[("GATEWAY_TLS_KEY_FILE", "k")]).expect_err("alone");
        assert_eq!(
            err.to_string(),
            "GATEWAY_TLS_KEY_FILE=\"k\" is invalid: must be set together with GATEWAY_TLS_CERT_FILE"
        );
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
    fn bad_values_name_their_variable_and_what_is_accepted() {
        let cases = [
            ("GATEWAY_PORT", "http"),
            ("GATEWAY_PORT", "70000"),
            ("GATEWAY_HOST", "localhost:80"),
            ("WS_MAX_CONNECTIONS", "0"),
            ("WS_MAX_CONNECTIONS", "-5"),
            ("WS_BUFFER", "0"),
            ("WS_PING_INTERVAL", "1ms"),
            ("WS_SEND_TIMEOUT", "never"),
            ("GATEWAY_CORS_ORIGINS", "example.com"),
            ("GATEWAY_REQUEST_TIMEOUT", "soon"),
            ("WINDOW_POINTS", "-1"),
            ("WINDOW_BYTES", "a lot"),
            ("GPU_METRICS_MAX_AGE", "10ms"),
            ("GATEWAY_TLS_CERT_FILE", "cert.pem"),
            ("GATEWAY_TLS_KEY_FILE", "key.pem"),
            ("GATEWAY_API_TOKENS_FILE", " "),
            ("GATEWAY_TOKEN_RATE", "-1"),
            ("GATEWAY_TOKEN_BURST", "0"),
            ("GATEWAY_TOKEN_MAX_SUBSCRIPTIONS", "many"),
            ("GATEWAY_METRICS_REQUIRE_TOKEN", "yes"),
            ("GATEWAY_RELOAD_INTERVAL", "1ms"),
            ("HOSTNAME_COLUMN", " "),
            ("GPU_ID_COLUMN", " "),
            ("UUID_COLUMN", " "),
            ("DEVICE_COLUMN", " "),
            ("MODEL_COLUMN", " "),
            ("METRIC_COLUMN", " "),
            ("VALUE_COLUMN", " "),
            ("ETCD_ENDPOINTS", "a:b"),
            ("ETCD_NAMESPACE", "a\tb"),
            ("LOG_FORMAT", "logfmt"),
            ("RUST_LOG", "info,x=loud"),
        ];
        for &(var, value) in cases.iter().chain(COMMON_REJECTIONS) {
            let err = load(&[(var, value)]).expect_err(var).to_string();
            assert!(
                err.starts_with(&format!("{var}={value:?} is invalid: must ")),
                "{err}"
            );
        }
        for var in GatewayConfig::env_vars() {
            assert!(
                cases.iter().chain(COMMON_REJECTIONS).any(|(v, _)| *v == var),
                "no rejection of {var} tested"
            );
        }
    }

    #[test]
    fn every_variable_read_is_documented() {
        let mut documented: Vec<String> = GatewayConfig::env_spec().into_iter().map(|v| v.name).collect();
        documented.sort();
        assert_eq!(documented, GatewayConfig::env_vars());
        assert!(GatewayConfig::env_help().contains("  GATEWAY_PORT [default: 8080]\n"));
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn window_sizes_take_binary_units() {
        let cfg =
            GatewayConfig::from_vars([("WINDOW_BYTES".to_string(), "2GiB".to_string())]).expect("valid");
        assert_eq!(cfg.window_bytes, 2 << 30);
        let cfg =
            GatewayConfig::from_vars([("WINDOW_BYTES".to_string(), "1000".to_string())]).expect("valid");
        assert_eq!((cfg.window_bytes, cfg.window_points), (1000, 256));
    }
}
