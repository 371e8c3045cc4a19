//! What the exporter asks the TSDB about itself at start-up, and what it concludes.
//!
//! Exactly-once rests on the server dropping a re-sent sample that is identical to its series'
//! newest (`batch.rs`). Prometheus does that always; VictoriaMetrics only with
//! `-dedup.minScrapeInterval` (otherwise a re-send after a crash is stored twice). Records
//! written out of time order (two streamer workers feeding one GPU, a slow collector
//! partition) need Prometheus' `out_of_order_time_window`, or the server refuses them and they
//! are rejected. Other servers (Mimir, Thanos, Cortex) cannot be asked; the exporter says so.
//!
//! - Prometheus: `GET /api/v1/status/flags` (its remote-write receiver) and
//!   `GET /api/v1/status/config` (`storage.tsdb.out_of_order_time_window`);
//! - VictoriaMetrics: `GET /flags` (lists the flags set; `-dedup.minScrapeInterval`).
//!
//! Parsing and judging are pure; `detect` does the two or three GETs.

use std::time::Duration;

use crate::batch::SeriesRule;

/// What the server is, as far as it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Server {
    /// Prometheus, with its out-of-order window and whether its receiver is on.
    Prometheus {
        out_of_order_window: Duration,
        receiver: bool,
    },
    /// VictoriaMetrics, with its deduplication interval (zero: off).
    VictoriaMetrics { dedup: Duration },
    /// Something that did not answer the questions (why).
    Unknown(String),
}

impl Server {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Server::Prometheus { .. } => "prometheus",
            Server::VictoriaMetrics { .. } => "victoria-metrics",
            Server::Unknown(_) => "unknown",
        }
    }
}

/// What the check concludes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Findings {
    /// The server would store a re-sent sample twice: exactly-once does not hold.
    pub unsafe_: Vec<String>,
    /// Worth an operator's attention.
    pub warnings: Vec<String>,
}

/// Judges a server for an exporter that may lag up to `retention` behind.
pub(crate) fn judge(server: &Server, retention: Duration) -> Findings {
    let mut f = Findings::default();
    match server {
        Server::Prometheus {
            out_of_order_window,
            receiver,
        } => {
            if !receiver {
                f.warnings.push(
                    "Prometheus' remote-write receiver is off: every request will be refused until it \
                     runs with --web.enable-remote-write-receiver"
                        .into(),
                );
            }
            if out_of_order_window.is_zero() {
                f.warnings.push(
                    "Prometheus has no storage.tsdb.out_of_order_time_window: a record older than its \
                     series' newest sample (records written out of time order) is refused and rejected"
                        .into(),
                );
            } else if *out_of_order_window < retention {
                f.warnings.push(format!(
                    "Prometheus' out_of_order_time_window ({}) is shorter than RETENTION ({}): after \
                     falling further behind than the window, records are refused and rejected",
                    humantime::format_duration(*out_of_order_window),
                    humantime::format_duration(retention)
                ));
            }
        }
        Server::VictoriaMetrics { dedup } if dedup.is_zero() => f.unsafe_.push(
            "VictoriaMetrics runs without -dedup.minScrapeInterval: a request re-sent after a crash \
             would be stored twice; start it with -dedup.minScrapeInterval=1ms"
                .into(),
        ),
        Server::VictoriaMetrics { .. } => {}
        Server::Unknown(why) => f.warnings.push(format!(
            "cannot tell how the server treats a re-sent sample ({why}); exactly-once needs it to \
             drop a sample identical to its series' newest (Prometheus does, VictoriaMetrics with \
             -dedup.minScrapeInterval)"
        )),
    }
    f
}

/// Whether requests may hold several samples of one series (`batch.rs`): only for a server
/// known to drop, or read once, a re-sent sample older than its series' newest.
pub(crate) fn series_rule(server: &Server) -> SeriesRule {
    match server {
        Server::Prometheus {
            out_of_order_window, ..
        } if !out_of_order_window.is_zero() => SeriesRule::Repeats,
        Server::VictoriaMetrics { dedup } if !dedup.is_zero() => SeriesRule::Repeats,
        _ => SeriesRule::OnePerSeries,
    }
}

/// The server's base URL: the remote-write URL without its `/api/v1/write` path.
pub(crate) fn base_url(write_url: &reqwest::Url) -> Option<reqwest::Url> {
    let path = write_url.path().trim_end_matches('/');
    let base = path.strip_suffix("/api/v1/write")?;
    let mut url = write_url.clone();
    url.set_path(&format!("{base}/"));
    url.set_query(None);
    Some(url)
}

/// Prometheus' `/api/v1/status/flags`: is the remote-write receiver on? `None` if this is not
/// such an answer.
pub(crate) fn prometheus_receiver(body: &str) -> Option<bool> {
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    let flag = json
        .get("data")?
        .get("web.enable-remote-write-receiver")?
        .as_str()?;
    Some(flag == "true")
}

/// Prometheus' `/api/v1/status/config`: the out-of-order window (zero when not set).
pub(crate) fn prometheus_window(body: &str) -> Result<Duration, String> {
    let json: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let yaml = json
        .pointer("/data/yaml")
        .and_then(|y| y.as_str())
        .ok_or("no data.yaml")?;
    let config: serde_norway::Value = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
    match &config["storage"]["tsdb"]["out_of_order_time_window"] {
        serde_norway::Value::Null => Ok(Duration::ZERO),
        serde_norway::Value::String(text) => {
            humantime::parse_duration(text).map_err(|e| format!("out_of_order_time_window {text:?}: {e}"))
        }
        other => Err(format!("out_of_order_time_window is {other:?}")),
    }
}

/// VictoriaMetrics' `/flags` (one `-name="value"` line per flag set): the deduplication
/// interval (zero when not set). `None` if this is not such an answer.
pub(crate) fn victoria_dedup(body: &str) -> Option<Duration> {
    let mut dedup = Duration::ZERO;
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (name, value) = line.strip_prefix('-')?.split_once('=')?;
        if name == "dedup.minScrapeInterval" {
            dedup = humantime::parse_duration(value.trim_matches('"')).ok()?;
        }
    }
    Some(dedup)
}

/// Asks the server what it is (see the module docs).
pub(crate) async fn detect(http: &reqwest::Client, write_url: &reqwest::Url) -> Server {
    let Some(base) = base_url(write_url) else {
        return Server::Unknown("the URL does not end in /api/v1/write".into());
    };
    let get = |path: &str| {
        let url = base.join(path);
        async move {
            let url = url.map_err(|e| e.to_string())?;
            let resp = http.get(url).send().await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status().as_u16()));
            }
            resp.text().await.map_err(|e| e.to_string())
        }
    };
    if let Some(receiver) = get("api/v1/status/flags")
        .await
        .ok()
        .and_then(|b| prometheus_receiver(&b))
    {
        return match get("api/v1/status/config")
            .await
            .and_then(|b| prometheus_window(&b))
        {
            Ok(out_of_order_window) => Server::Prometheus {
                out_of_order_window,
                receiver,
            },
            Err(why) => Server::Unknown(format!("Prometheus' configuration is unreadable: {why}")),
        };
    }
    match get("flags").await {
        Ok(body) => match victoria_dedup(&body) {
            Some(dedup) => Server::VictoriaMetrics { dedup },
            None => Server::Unknown("/flags answers, but not like VictoriaMetrics".into()),
        },
        Err(why) => Server::Unknown(format!(
            "neither Prometheus' nor VictoriaMetrics' status answers ({why})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_base_url_drops_the_write_path() {
        let url = |s: &str| reqwest::Url::parse(s).expect("url");
        assert_eq!(
            base_url(&url("http://p:9090/api/v1/write")).map(|u| u.to_string()),
            Some("http://p:9090/".into())
        );
        assert_eq!(
            base_url(&url("http://p/prom/api/v1/write/?x=1")).map(|u| u.to_string()),
            Some("http://p/prom/".into())
        );
        assert_eq!(base_url(&url("http://mimir/api/v1/push")), None);
    }

    #[test]
    fn prometheus_answers_parse() {
        let config = r#"{"status":"success","data":{"yaml":"global:\n  scrape_interval: 1h\nstorage:\n  tsdb:\n    outofordertimewindow: 3600000\n    out_of_order_time_window: 1h\n"}}"#;
        assert_eq!(prometheus_window(config), Ok(Duration::from_secs(3600)));
        let none = r#"{"status":"success","data":{"yaml":"global:\n  scrape_interval: 1m\n"}}"#;
        assert_eq!(prometheus_window(none), Ok(Duration::ZERO));
        assert!(prometheus_window("<html>").is_err());
        let flags = r#"{"status":"success","data":{"config.file":"p.yml","web.enable-remote-write-receiver":"true"}}"#;
        assert_eq!(prometheus_receiver(flags), Some(true));
        assert_eq!(prometheus_receiver(r#"{"status":"success","data":{}}"#), None);
    }

    #[test]
    fn victoria_metrics_flags_parse() {
        let flags = "-dedup.minScrapeInterval=\"1ms\"\n-httpListenAddr=\"127.0.0.1:8428\"\n";
        assert_eq!(victoria_dedup(flags), Some(Duration::from_millis(1)));
        assert_eq!(victoria_dedup("-retentionPeriod=\"1\"\n"), Some(Duration::ZERO));
        assert_eq!(victoria_dedup(""), Some(Duration::ZERO));
        assert_eq!(victoria_dedup("<html>not flags</html>"), None);
    }

    #[test]
    fn judgements() {
        let safe = Server::Prometheus {
            out_of_order_window: DAY,
            receiver: true,
        };
        assert_eq!(judge(&safe, DAY), Findings::default());
        let short = Server::Prometheus {
            out_of_order_window: Duration::from_secs(600),
            receiver: true,
        };
        assert_eq!(judge(&short, DAY).warnings.len(), 1);
        let none = Server::Prometheus {
            out_of_order_window: Duration::ZERO,
            receiver: false,
        };
        let f = judge(&none, DAY);
        assert_eq!((f.unsafe_.len(), f.warnings.len()), (0, 2));
        let vm = judge(
            &Server::VictoriaMetrics {
                dedup: Duration::ZERO,
            },
            DAY,
        );
        assert_eq!(vm.unsafe_.len(), 1);
        assert!(
            judge(
                &Server::VictoriaMetrics {
                    dedup: Duration::from_millis(1)
                },
                DAY
            ) == Findings::default()
        );
        assert_eq!(judge(&Server::Unknown("x".into()), DAY).warnings.len(), 1);
        assert_eq!(series_rule(&safe), SeriesRule::Repeats);
        assert_eq!(series_rule(&none), SeriesRule::OnePerSeries);
        assert_eq!(
            series_rule(&Server::VictoriaMetrics {
                dedup: Duration::ZERO
            }),
            SeriesRule::OnePerSeries
        );
        assert_eq!(
            series_rule(&Server::Unknown("x".into())),
            SeriesRule::OnePerSeries
        );
    }
}
