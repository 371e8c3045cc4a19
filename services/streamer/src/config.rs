//! The streamer's configuration: environment variables (envy), optionally overridden by the
//! seed-style flags `--csv`, `--workers`, `--rate` and `--once`.

use std::{path::PathBuf, time::Duration};

use sha2::{Digest, Sha256};
use telemetry_shared::{
    CommonConfig, ConfigError,
    config::{EnvSpec as _, EnvVar, LogConfig, RawCommonConfig, RawLogConfig, Setting},
    etcd::MIN_LEASE_TTL,
    keys::is_key_segment,
};

/// The streamer's settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamerConfig {
    /// etcd endpoints and namespace.
    pub common: CommonConfig,
    /// `CSV_PATH`: the file to stream (required unless `SCRAPE_TARGETS` is set; `None`: scrape
    /// only).
    pub csv_path: Option<PathBuf>,
    /// `SCRAPE_TARGETS` and the other `SCRAPE_*` variables: `None` when no target is set.
    pub scrape: Option<ScrapeConfig>,
    /// `WORKERS` (default 1): independent workers, each streaming the whole file.
    pub workers: u32,
    /// `RATE` (default 1.0): messages per second per worker; `None` = unlimited (`RATE=0`).
    pub rate: Option<f64>,
    /// `LOOP` (default true): restart at end of file; `false` = one pass, then exit.
    pub loop_mode: bool,
    /// `BATCH_SIZE` (default 100): rows read before a flush. Each etcd transaction carries at
    /// most 126 of them (etcd's 128-operation limit), so a batch may take several.
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
    /// `RUST_LOG` and `LOG_FORMAT`.
    pub log: LogConfig,
}

telemetry_shared::env_config! {
    /// Every variable the streamer reads: envy's struct, and the table `--help` prints.
    struct RawStreamerConfig {
        flatten common: RawCommonConfig;
        flatten log: RawLogConfig;
        /// The CSV file to stream (--csv overrides it); required unless SCRAPE_TARGETS is set.
        csv_path = Value("");
        /// dcgm-exporter (or any Prometheus exposition) endpoints to scrape: comma-separated
        /// http:// URLs, or the path of a file listing them (one a line or comma-separated, '#'
        /// comments), re-read when it changes. Empty: no scraping.
        scrape_targets = Value("");
        /// How often each target is scraped.
        scrape_interval = Value("15s");
        /// How long one scrape may take (connect and body), at most SCRAPE_INTERVAL.
        scrape_timeout = Computed("10s, or SCRAPE_INTERVAL if that is shorter");
        /// Which samples of a scrape become messages: all, or gpu (only samples with the
        /// Hostname, gpu and UUID labels, which the collector can store).
        scrape_keep = Value("all");
        /// TTL of the lease on which a streamer owns the targets it scrapes; another streamer
        /// takes a target over this long after its owner died.
        scrape_lease_ttl = Value("10s");
        /// Independent workers, 1 to 1024, each streaming the whole file as stream
        /// {STREAM_ID}-w{i} (--workers overrides it).
        workers = Value("1");
        /// Messages per second per worker, fractional; 0 = unlimited (--rate overrides it).
        rate = Value("1.0");
        /// true: restart at end of file (each pass makes new messages); false: one pass, then
        /// exit 0 (--once sets false).
        r#loop = Value("true");
        /// Rows held before a flush, 1 to 100000; one etcd transaction carries at most 126 of
        /// them.
        batch_size = Value("100");
        /// Wait while the queue holds this many messages; 0 = no limit.
        max_queue_depth = Value("10000");
        /// Names the source for checkpoints: 1-200 characters without '/'.
        stream_id = Computed("the CSV file's stem and a hash of its absolute path");
        /// Port of Prometheus /metrics; 0 = off.
        metrics_port = Value("0");
        /// How long an enqueued idempotency key is remembered (at least 2s).
        dedup_ttl = Value("24h");
        /// Comma-separated columns whose values pick the queue partition, so one GPU's rows
        /// stay in order.
        partition_columns = Value("Hostname,gpu_id");
        /// How often a progress line is logged.
        progress_interval = Value("5s");
    }
}

/// Command-line overrides, in the style of the original seed program.
#[derive(Debug, Default, Clone, clap::Parser)]
#[command(
    name = "telemetry-streamer",
    version,
    about = "Streams CSV rows into the etcd telemetry queue exactly once. \
Configured by the environment variables listed below; these flags override them.",
    after_help = StreamerConfig::env_help()
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

    /// Every variable with its default and meaning (the same struct, for `--help`).
    pub fn env_spec() -> Vec<EnvVar> {
        RawStreamerConfig::vars()
    }

    /// The environment section of `--help`.
    pub fn env_help() -> String {
        telemetry_shared::config::env_help::<RawStreamerConfig>()
    }

    /// Reads the process environment and applies `flags`.
    pub fn load(flags: &Flags) -> Result<Self, ConfigError> {
        Self::from_vars(telemetry_shared::config::process_vars(), flags)
    }

    /// Reads the given variables and applies `flags` (tests use this).
    pub fn from_vars<I>(vars: I, flags: &Flags) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut raw: RawStreamerConfig = telemetry_shared::config::from_iter(vars)?;
        flags.apply(&mut raw);
        Self::validate(&raw)
    }

    fn validate(raw: &RawStreamerConfig) -> Result<Self, ConfigError> {
        let scrape = ScrapeConfig::validate(raw)?;
        let csv_path = match raw.csv_path().text()?.trim() {
            "" if scrape.is_none() => return Err(ConfigError::Missing("CSV_PATH or SCRAPE_TARGETS".into())),
            "" => None,
            path => Some(PathBuf::from(path)),
        };
        Ok(StreamerConfig {
            common: CommonConfig::try_from(&raw.common)?,
            scrape,
            workers: raw.workers().number(1..=1024)?,
            rate: rate(&raw.rate())?,
            loop_mode: raw.r#loop().boolean()?,
            batch_size: raw.batch_size().number(1..=100_000)?,
            max_queue_depth: raw
                .max_queue_depth()
                .parse_with("a whole number of messages (0 = no limit)", |t| t.parse().ok())?,
            stream_id: stream_id(&raw.stream_id(), csv_path.as_deref())?,
            csv_path,
            metrics_port: raw.metrics_port().number(0..=u16::MAX)?,
            dedup_ttl: raw.dedup_ttl().duration(MIN_LEASE_TTL)?,
            partition_columns: partition_columns(raw.partition_columns().text()?),
            progress_interval: raw.progress_interval().duration(Duration::from_millis(1))?,
            log: LogConfig::try_from(&raw.log)?,
        })
    }

    /// The stream id of worker `index`: `{STREAM_ID}-w{index}`.
    pub fn worker_stream_id(&self, index: u32) -> String {
        format!("{}-w{index}", self.stream_id)
    }
}

/// Where the scrape targets come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetList {
    /// The URLs given in `SCRAPE_TARGETS`.
    Urls(Vec<String>),
    /// A file listing them, re-read when it changes.
    File(PathBuf),
}

/// What to keep of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Every sample.
    All,
    /// Samples with `Hostname`, `gpu` and `UUID` labels only.
    Gpu,
}

/// The scrape source's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ScrapeConfig {
    /// `SCRAPE_TARGETS`.
    pub targets: TargetList,
    /// `SCRAPE_INTERVAL` (default 15s).
    pub interval: Duration,
    /// `SCRAPE_TIMEOUT` (default 10s, at most the interval).
    pub timeout: Duration,
    /// `SCRAPE_KEEP` (default all).
    pub keep: Keep,
    /// `SCRAPE_LEASE_TTL` (default 10s).
    pub lease_ttl: Duration,
}

impl ScrapeConfig {
    fn validate(raw: &RawStreamerConfig) -> Result<Option<Self>, ConfigError> {
        let setting = raw.scrape_targets();
        let text = setting.text()?.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let targets = if text.contains("://") {
            let urls = parse_target_list(text);
            if let Some(bad) = urls.iter().find(|u| !is_target_url(u)) {
                return Err(setting.invalid(format!(
                    "must be comma-separated http:// URLs (or a file of them; https is not supported: \
                     put a TLS-terminating proxy in front); {bad:?} is not one"
                )));
            }
            TargetList::Urls(urls)
        } else {
            TargetList::File(PathBuf::from(text))
        };
        let interval = raw.scrape_interval().duration(Duration::from_millis(100))?;
        let timeout = match raw.scrape_timeout().value() {
            None => interval.min(Duration::from_secs(10)),
            Some(_) => raw.scrape_timeout().duration(Duration::from_millis(10))?,
        };
        if timeout > interval {
            return Err(raw.scrape_timeout().invalid("must be at most SCRAPE_INTERVAL"));
        }
        let keep = match raw.scrape_keep().text()? {
            "all" => Keep::All,
            "gpu" => Keep::Gpu,
            _ => return Err(raw.scrape_keep().invalid("must be all or gpu")),
        };
        Ok(Some(ScrapeConfig {
            targets,
            interval,
            timeout,
            keep,
            lease_ttl: raw.scrape_lease_ttl().duration(MIN_LEASE_TTL)?,
        }))
    }
}

/// The URLs of a target list: separated by commas, white space or new lines; `#` starts a
/// comment that runs to the end of its line; duplicates are listed once.
pub fn parse_target_list(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        for url in line
            .split([',', ' ', '\t'])
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            if !out.iter().any(|o| o == url) {
                out.push(url.to_string());
            }
        }
    }
    out
}

/// Is `url` an `http://` URL with a host? (The streamer's HTTP client is built without TLS.)
pub fn is_target_url(url: &str) -> bool {
    let rest = url.strip_prefix("http://");
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/') && !r.chars().any(char::is_whitespace))
}

impl Flags {
    /// Writes the flags given over the variables they override, so that they are validated
    /// (and named in errors) like the variables.
    fn apply(&self, raw: &mut RawStreamerConfig) {
        if let Some(csv) = &self.csv {
            raw.csv_path = Some(csv.clone());
        }
        if let Some(workers) = self.workers {
            raw.workers = Some(workers.to_string());
        }
        if let Some(rate) = self.rate {
            raw.rate = Some(rate.to_string());
        }
        if self.once {
            raw.r#loop = Some("false".into());
        }
    }
}

/// `RATE`: `None` for 0 (unlimited); otherwise at least one message a day, since a longer
/// period would overflow any sane timer.
fn rate(setting: &Setting<'_>) -> Result<Option<f64>, ConfigError> {
    let rate: f64 = setting.parse_with(
        "a number of messages per second: 0 (unlimited) or from 1/86400 (one a day) up",
        |t| {
            t.parse::<f64>()
                .ok()
                .filter(|r| *r == 0.0 || (r.is_finite() && *r >= 1.0 / 86_400.0))
        },
    )?;
    Ok((rate > 0.0).then_some(rate))
}

/// `STREAM_ID`, or the default derived from the CSV path (`scrape` without one: scraped
/// targets have stream ids of their own).
fn stream_id(setting: &Setting<'_>, csv_path: Option<&std::path::Path>) -> Result<String, ConfigError> {
    match setting.value() {
        None => Ok(csv_path.map_or_else(|| "scrape".to_string(), default_stream_id)),
        Some(id) if is_key_segment(id) && id.len() <= 200 => Ok(id.to_string()),
        Some(_) => Err(setting.invalid("must be 1-200 characters without '/' or control characters")),
    }
}

/// `PARTITION_COLUMNS`: comma-separated, blanks ignored.
fn partition_columns(list: &str) -> Vec<String> {
    list.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
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
    use telemetry_shared::config::COMMON_REJECTIONS;

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
    fn every_bad_variable_is_named_with_what_is_accepted() {
        let err = load(&[]).expect_err("no CSV_PATH");
        assert_eq!(
            err.to_string(),
            "CSV_PATH or SCRAPE_TARGETS is required but not set"
        );
        let cases: &[(&str, &str)] = &[
            ("WORKERS", "two"),
            ("WORKERS", "0"),
            ("WORKERS", "2000"),
            ("RATE", "-1"),
            ("RATE", "fast"),
            ("RATE", "NaN"),
            ("RATE", "0.000001"),
            ("LOOP", "yes"),
            ("BATCH_SIZE", "0"),
            ("MAX_QUEUE_DEPTH", "-5"),
            ("STREAM_ID", "a/b"),
            ("METRICS_PORT", "70000"),
            ("DEDUP_TTL", "1s"),
            ("DEDUP_TTL", "soon"),
            ("PROGRESS_INTERVAL", "0s"),
            ("ETCD_ENDPOINTS", "nohost"),
            ("ETCD_NAMESPACE", "a b"),
            ("LOG_FORMAT", "pretty"),
            ("RUST_LOG", "info,x=loud"),
            ("SCRAPE_TARGETS", "http://a:9400/metrics,ftp://b"),
            ("SCRAPE_TARGETS", "https://a:9400/metrics"),
            ("SCRAPE_INTERVAL", "0s"),
            ("SCRAPE_TIMEOUT", "0s"),
            ("SCRAPE_KEEP", "some"),
            ("SCRAPE_LEASE_TTL", "1s"),
        ];
        for &(var, value) in cases.iter().chain(COMMON_REJECTIONS) {
            let scraping = var.starts_with("SCRAPE_") && var != "SCRAPE_TARGETS";
            let targets = if scraping { "http://a:9400/metrics" } else { "" };
            let err = load(&[("CSV_PATH", "a"), ("SCRAPE_TARGETS", targets), (var, value)])
                .expect_err(var)
                .to_string();
            assert!(
                err.starts_with(&format!("{var}={value:?} is invalid: must ")),
                "{err}"
            );
        }
        // Free text: any path (a missing file is reported when opened), any column list.
        let free = ["CSV_PATH", "PARTITION_COLUMNS"];
        for var in StreamerConfig::env_vars() {
            let tested =
                cases.iter().chain(COMMON_REJECTIONS).any(|(v, _)| *v == var) || free.contains(&var.as_str());
            assert!(tested, "no rejection of {var} tested");
        }
    }

    #[test]
    fn every_variable_read_is_documented() {
        let mut documented: Vec<String> = StreamerConfig::env_spec().into_iter().map(|v| v.name).collect();
        documented.sort();
        assert_eq!(documented, StreamerConfig::env_vars());
        assert!(documented.contains(&"LOOP".to_string()));
        assert!(StreamerConfig::env_help().contains("  CSV_PATH [default: empty]\n"));
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
        assert_eq!(cfg.csv_path, Some(PathBuf::from("b.csv")));
        assert_eq!(cfg.workers, 3);
        assert_eq!(cfg.rate, Some(2.5));
        assert!(!cfg.loop_mode);
    }

    #[test]
    fn scrape_targets_are_urls_or_a_file() {
        let cfg = load(&[(
            "SCRAPE_TARGETS",
            "http://a:9400/metrics, http://b/federate?match[]=up,http://a:9400/metrics",
        )])
        .expect("scrape only");
        assert_eq!(cfg.csv_path, None);
        let scrape = cfg.scrape.expect("scraping");
        assert_eq!(
            scrape.targets,
            TargetList::Urls(vec![
                "http://a:9400/metrics".into(),
                "http://b/federate?match[]=up".into()
            ])
        );
        assert_eq!(
            (scrape.interval, scrape.timeout, scrape.keep),
            (Duration::from_secs(15), Duration::from_secs(10), Keep::All)
        );
        let short =
            load(&[("SCRAPE_TARGETS", "http://a/metrics"), ("SCRAPE_INTERVAL", "2s")]).expect("valid");
        assert_eq!(short.scrape.expect("scraping").timeout, Duration::from_secs(2));
        let cfg = load(&[("SCRAPE_TARGETS", "/etc/targets"), ("CSV_PATH", "x.csv")]).expect("both");
        assert_eq!(
            cfg.scrape.expect("scraping").targets,
            TargetList::File("/etc/targets".into())
        );
        assert_eq!(
            parse_target_list("# dcgm\nhttp://a/metrics # first\n\nhttp://b/metrics,http://c/metrics\n"),
            vec!["http://a/metrics", "http://b/metrics", "http://c/metrics"]
        );
        let err = load(&[
            ("SCRAPE_TARGETS", "http://a/metrics"),
            ("SCRAPE_INTERVAL", "5s"),
            ("SCRAPE_TIMEOUT", "6s"),
        ])
        .expect_err("timeout over the interval");
        assert!(
            err.to_string().starts_with("SCRAPE_TIMEOUT=\"6s\" is invalid"),
            "{err}"
        );
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
