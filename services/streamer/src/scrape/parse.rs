//! Exposition text → flat samples, one per line a Prometheus server would store.
//!
//! The parsing itself is `openmetrics-parser`'s (a PEG grammar of both formats that passes the
//! OpenMetrics test suite): the Prometheus text format 0.0.4, or OpenMetrics 1.0 when the
//! target answered with `application/openmetrics-text`. A body that does not parse is refused
//! whole, never half-read. Text is parsed a sample line at a time (the format allows one
//! family's samples different label names, which the crate's family model refuses). For
//! OpenMetrics the crate groups samples into families, and this module flattens them back into
//! the series Prometheus would store: a histogram gives `_bucket{le=…}`, `_sum` and
//! `_count`, a summary `{quantile=…}`, `_sum` and `_count`, an OpenMetrics counter `_total`,
//! an info metric `_info`. `_created` samples are metadata, not series, and are left out.

use openmetrics_parser::{
    HistogramValue, MetricFamily, MetricNumber, OpenMetricsValue, PrometheusValue, RenderableMetricValue,
    Sample, SummaryValue,
};

/// One sample of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    /// The metric name.
    pub name: String,
    /// Its labels, sorted by name.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
    /// The sample's own timestamp (Unix milliseconds), when the exposition gave one.
    pub timestamp_ms: Option<i64>,
}

/// Which format a body is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Prometheus text 0.0.4 (timestamps in milliseconds).
    Text,
    /// OpenMetrics 1.0 (timestamps in seconds, `# EOF` at the end).
    OpenMetrics,
}

impl Format {
    /// The format of a response with this `Content-Type` (text unless it says OpenMetrics).
    pub(crate) fn of_content_type(content_type: Option<&str>) -> Format {
        match content_type {
            Some(ct) if ct.trim_start().starts_with("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }
}

/// The `Accept` header of a scrape: OpenMetrics preferred, like Prometheus asks.
pub(crate) const ACCEPT: &str =
    "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not valid {format} exposition text: {reason}")]
pub(crate) struct ParseError {
    format: &'static str,
    reason: String,
}

/// Parses `body` in `format` into its samples, in exposition order.
pub(crate) fn parse(body: &str, format: Format) -> Result<Vec<Series>, ParseError> {
    let mut out = Vec::new();
    match format {
        Format::Text => {
            // The whole body first (what dcgm-exporter serves parses so, fastest); the text
            // format also lets the samples of one family carry different label names
            // (federation leaves empty labels out), which the crate's family model refuses: then
            // each sample line is parsed on its own, which gives the same flat series.
            let whole = if body.ends_with('\n') {
                openmetrics_parser::prometheus::parse_prometheus(body).ok()
            } else {
                None
            };
            match whole {
                Some(exposition) => {
                    for family in exposition.families.values() {
                        flatten(family, 1.0, &mut out, prometheus_value);
                    }
                }
                None => parse_lines(body, &mut out)?,
            }
        }
        Format::OpenMetrics => {
            let exposition =
                openmetrics_parser::openmetrics::parse_openmetrics(body).map_err(|e| ParseError {
                    format: "OpenMetrics",
                    reason: first_line(&e),
                })?;
            for family in exposition.families.values() {
                flatten(family, 1000.0, &mut out, openmetrics_value);
            }
        }
    }
    Ok(out)
}

/// The text format a sample line at a time. `HELP` and `TYPE` lines only describe; a line that
/// is neither a comment nor a sample refuses the whole body.
fn parse_lines(body: &str, out: &mut Vec<Series>) -> Result<(), ParseError> {
    let mut line_text = String::with_capacity(256);
    for (number, line) in body.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        line_text.clear();
        line_text.push_str(line);
        line_text.push('\n');
        let exposition =
            openmetrics_parser::prometheus::parse_prometheus(&line_text).map_err(|e| ParseError {
                format: "Prometheus text",
                reason: format!("line {}: {}", number + 1, first_line(&e)),
            })?;
        for family in exposition.families.values() {
            flatten(family, 1.0, out, prometheus_value);
        }
    }
    Ok(())
}

fn first_line(err: &impl std::fmt::Debug) -> String {
    let text = format!("{err:?}");
    let text: String = text.split("\\n").collect::<Vec<_>>().join(" ");
    text.chars().take(300).collect()
}

/// One sample of a family: its name suffix, extra label, and value.
type Part = (&'static str, Option<(&'static str, String)>, f64);

fn flatten<T, V: RenderableMetricValue + Clone>(
    family: &MetricFamily<T, V>,
    ms_per_unit: f64,
    out: &mut Vec<Series>,
    parts: fn(&V, &str, &mut Vec<Part>),
) where
    T: Clone,
{
    let mut buf = Vec::new();
    for sample in family.iter_samples() {
        let labels = labels_of(sample);
        buf.clear();
        parts(&sample.value, &family.family_name, &mut buf);
        let timestamp_ms = sample
            .timestamp
            .filter(|t| t.is_finite())
            .map(|t| (t * ms_per_unit).round() as i64);
        for (suffix, extra, value) in buf.drain(..) {
            let mut labels = labels.clone();
            if let Some((name, value)) = extra {
                labels.push((name.to_string(), value));
                labels.sort();
            }
            out.push(Series {
                name: format!("{}{suffix}", family.family_name),
                labels,
                value,
                timestamp_ms,
            });
        }
    }
}

fn labels_of<V: RenderableMetricValue + Clone>(sample: &Sample<V>) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = sample
        .get_labelset()
        .map(|set| set.iter().map(|(n, v)| (n.clone(), v.clone())).collect())
        .unwrap_or_default();
    labels.sort();
    labels
}

fn number(n: &MetricNumber) -> f64 {
    n.as_f64()
}

/// Formats a bound like Prometheus (`+Inf`, `0.5`, `1`).
fn bound(value: f64) -> String {
    if value == f64::INFINITY {
        "+Inf".into()
    } else if value == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{value}")
    }
}

fn histogram(h: &HistogramValue, sum: &'static str, count: &'static str, out: &mut Vec<Part>) {
    for bucket in &h.buckets {
        out.push((
            "_bucket",
            Some(("le", bound(bucket.upper_bound))),
            number(&bucket.count),
        ));
    }
    if let Some(s) = &h.sum {
        out.push((sum, None, number(s)));
    }
    if let Some(c) = h.count {
        out.push((count, None, c as f64));
    }
}

fn summary(s: &SummaryValue, out: &mut Vec<Part>) {
    for q in &s.quantiles {
        out.push(("", Some(("quantile", bound(q.quantile))), number(&q.value)));
    }
    if let Some(sum) = &s.sum {
        out.push(("_sum", None, number(sum)));
    }
    if let Some(c) = s.count {
        out.push(("_count", None, c as f64));
    }
}

fn prometheus_value(value: &PrometheusValue, _family: &str, out: &mut Vec<Part>) {
    match value {
        PrometheusValue::Unknown(n) | PrometheusValue::Gauge(n) => out.push(("", None, number(n))),
        PrometheusValue::Counter(c) => out.push(("", None, number(&c.value))),
        PrometheusValue::Histogram(h) => histogram(h, "_sum", "_count", out),
        PrometheusValue::Summary(s) => summary(s, out),
    }
}

fn openmetrics_value(value: &OpenMetricsValue, _family: &str, out: &mut Vec<Part>) {
    match value {
        OpenMetricsValue::Unknown(n) | OpenMetricsValue::Gauge(n) | OpenMetricsValue::StateSet(n) => {
            out.push(("", None, number(n)))
        }
        OpenMetricsValue::Counter(c) => out.push(("_total", None, number(&c.value))),
        OpenMetricsValue::Histogram(h) => histogram(h, "_sum", "_count", out),
        OpenMetricsValue::GaugeHistogram(h) => histogram(h, "_gsum", "_gcount", out),
        OpenMetricsValue::Summary(s) => summary(s, out),
        OpenMetricsValue::Info => out.push(("_info", None, 1.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DCGM: &str = "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).\n\
# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n\
DCGM_FI_DEV_GPU_UTIL{gpu=\"0\",UUID=\"GPU-5fd4\",device=\"nvidia0\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"h1\",DCGM_FI_DRIVER_VERSION=\"535.129.03\"} 87\n\
DCGM_FI_DEV_GPU_UTIL{gpu=\"1\",UUID=\"GPU-aa\",device=\"nvidia1\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"h1\",DCGM_FI_DRIVER_VERSION=\"535.129.03\"} 0\n";

    #[test]
    fn dcgm_exporter_text_gives_one_series_per_line_with_every_label() {
        let series = parse(DCGM, Format::Text).expect("valid");
        assert_eq!(series.len(), 2);
        let first = series.iter().find(|s| s.value == 87.0).expect("gpu 0");
        assert_eq!(first.name, "DCGM_FI_DEV_GPU_UTIL");
        assert_eq!(first.timestamp_ms, None);
        let names: Vec<&str> = first.labels.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "DCGM_FI_DRIVER_VERSION",
                "Hostname",
                "UUID",
                "device",
                "gpu",
                "modelName"
            ]
        );
        assert!(
            first
                .labels
                .contains(&("modelName".into(), "NVIDIA H100 80GB HBM3".into()))
        );
    }

    #[test]
    fn histograms_summaries_escapes_and_timestamps_flatten_like_prometheus_stores_them() {
        let text = "# TYPE h histogram\n\
h_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 3\nh_sum 2.5\nh_count 3\n\
# TYPE s summary\ns{quantile=\"0.9\"} 7\ns_sum 9\ns_count 2\n\
# TYPE c_total counter\nc_total{path=\"a,b=\\\"c\\\"\"} 4 1700000000123\n\
# TYPE info gauge\ninfo{a=\"1\",b=\"2\"} 1\ninfo{a=\"1\"} 1\n";
        let series = parse(text, Format::Text).expect("valid");
        let names: Vec<String> = series
            .iter()
            .map(|s| format!("{}{:?}={}", s.name, s.labels, s.value))
            .collect();
        for want in [
            "h_bucket[(\"le\", \"0.5\")]=1",
            "h_bucket[(\"le\", \"+Inf\")]=3",
            "h_sum[]=2.5",
            "h_count[]=3",
            "s[(\"quantile\", \"0.9\")]=7",
            "s_sum[]=9",
            "s_count[]=2",
            "c_total[(\"path\", \"a,b=\\\"c\\\"\")]=4",
            "info[(\"a\", \"1\")]=1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        let counter = series.iter().find(|s| s.name == "c_total").expect("counter");
        assert_eq!(counter.timestamp_ms, Some(1_700_000_000_123));
    }

    #[test]
    fn openmetrics_counters_get_total_and_timestamps_are_seconds() {
        let text = "# TYPE c counter\nc_total{a=\"1\"} 4 1700000000.5\n# EOF\n";
        let series = parse(text, Format::OpenMetrics).expect("valid");
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].name, "c_total");
        assert_eq!(series[0].timestamp_ms, Some(1_700_000_000_500));
        assert!(
            parse("# TYPE c counter\nc_total 4\n", Format::OpenMetrics).is_err(),
            "no # EOF"
        );
    }

    #[test]
    fn garbage_is_refused_whole_and_empty_is_nothing() {
        for garbage in [
            "<html><body>502 Bad Gateway</body></html>\n",
            "metric{unclosed=\"x} 1\n",
            "good 1\nbad line here\n",
            "\u{0}\u{1}binary",
        ] {
            assert!(parse(garbage, Format::Text).is_err(), "{garbage:?} accepted");
        }
        assert_eq!(parse("", Format::Text).expect("empty"), vec![]);
        assert_eq!(parse("up 1", Format::Text).expect("no final new line").len(), 1);
        assert_eq!(
            Format::of_content_type(Some("application/openmetrics-text; version=1.0.0")),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::of_content_type(Some("text/plain; version=0.0.4")),
            Format::Text
        );
        assert_eq!(Format::of_content_type(None), Format::Text);
    }
}
