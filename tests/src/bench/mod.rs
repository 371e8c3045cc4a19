//! The measurements behind `telemetry-bench` (`src/bin/bench.rs`), one module per side of the
//! pipeline, and the one table they all report into.
//!
//! - [`raw`]: etcd's own ceiling (128-put transactions, single puts) and the reset between
//!   phases;
//! - [`pipeline`]: the streamer alone, end to end through collectors, enqueue-to-commit latency;
//! - [`export`]: the exporter following the pipeline into a real Prometheus, its throughput
//!   against the pipeline's and its etcd CPU per 1,000 records;
//! - [`rss`]: peak memory of each service run as a real process;
//! - [`scrape`]: the streamer scraping 1,000 simulated dcgm-exporters: samples/s and its CPU
//!   per 1,000 samples;
//! - [`gateway`]: "last 100 points", WebSocket delivery, and the REST and WebSocket load tests;
//! - [`ideal`]: the reference exactly-once design, and etcd's CPU time;
//! - [`limits`]: the open-file limit the load tests need, and where the service binaries are.
//!
//! Every figure is a [`Measure`] in one [`Table`], printed once and written to
//! `target/bench.json`.

use std::path::Path;

use serde::Serialize;

pub mod export;
pub mod gateway;
pub mod ideal;
pub mod limits;
pub mod pipeline;
pub mod raw;
pub mod rss;
pub mod scrape;

/// One figure of the bench: a row of the printed table and of `bench.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Measure {
    /// Stable name, e.g. `e2e_2_collectors`.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// `keys/s`, `msgs/s`, `req/s`, `ms`, `MiB`, `ratio` or `count`.
    pub unit: &'static str,
    /// What was measured, in words.
    pub note: String,
}

/// The bench's results, in the order they were measured.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Measure>,
}

impl Table {
    /// Adds one figure.
    pub fn push(&mut self, name: impl Into<String>, value: f64, unit: &'static str, note: impl Into<String>) {
        self.rows.push(Measure {
            name: name.into(),
            value,
            unit,
            note: note.into(),
        });
    }

    /// Adds `{prefix}_p50` and `{prefix}_p99` in milliseconds, with the same note.
    pub fn push_percentiles(&mut self, prefix: &str, p: &Percentiles, note: &str) {
        for (q, v) in [("p50", p.p50), ("p99", p.p99)] {
            self.push(format!("{prefix}_{q}"), v, "ms", note);
        }
    }

    /// The figures so far.
    pub fn rows(&self) -> &[Measure] {
        &self.rows
    }

    /// The table as printed at the end of a run.
    pub fn render(&self) -> String {
        let mut out = format!("{:<42} {:>12}  {:<7} note\n", "measure", "value", "unit");
        for row in &self.rows {
            let value = match row.unit {
                "ratio" | "ms" => format!("{:.2}", row.value),
                "MiB" => format!("{:.1}", row.value),
                _ => format!("{:.0}", row.value),
            };
            out.push_str(&format!(
                "{:<42} {:>12}  {:<7} {}\n",
                row.name, value, row.unit, row.note
            ));
        }
        out
    }

    /// Writes the figures as a JSON array to `path` (creating its directory).
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&self.rows)?)?;
        Ok(())
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Samples.
    pub n: usize,
}

/// Percentiles of `samples` (milliseconds).
pub fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if samples.is_empty() {
            return f64::NAN;
        }
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i]
    };
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
        n: samples.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let p = percentiles((1..=100).rev().map(f64::from).collect());
        assert_eq!((p.p50, p.p99, p.n), (51.0, 99.0, 100));
        assert!(percentiles(Vec::new()).p50.is_nan());
    }

    #[test]
    fn the_table_formats_by_unit_and_serializes_every_field() {
        let mut table = Table::default();
        table.push("a", 1234.567, "keys/s", "n");
        table.push_percentiles("lat", &percentiles(vec![1.0, 2.0, 3.0]), "x");
        table.push("m", 12.345, "MiB", "");
        let text = table.render();
        assert!(text.contains("1235  keys/s"), "{text}");
        assert!(text.contains("lat_p50") && text.contains("2.00  ms"), "{text}");
        assert!(text.contains("12.3  MiB"), "{text}");
        let json = serde_json::to_value(table.rows()).expect("json");
        assert_eq!(
            json[0],
            serde_json::json!({"name": "a", "value": 1234.567, "unit": "keys/s", "note": "n"})
        );
    }
}
