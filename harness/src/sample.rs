//! The DCGM sample (`data/dcgm_sample.csv`), what is known about it, and inputs built from it.
//!
//! The sample is a real dcgm-exporter scrape: 2,470 data rows, one per (GPU, metric), over 247
//! GPUs on 31 hosts and 10 metrics, 12 columns, every GPU an "NVIDIA H100 80GB HBM3". Tests
//! assert against these constants rather than against numbers written inline, so a reader sees
//! where a 2470 comes from.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

/// Data rows (the header excluded).
pub const ROWS: u64 = 2470;
/// Distinct GPUs, by (host, `gpu_id`) and by UUID alike (`gpu_id` is unique only per host).
pub const GPUS: usize = 247;
/// Distinct host names.
pub const HOSTS: usize = 31;
/// Distinct metric names; every GPU reports each once.
pub const METRICS: usize = 10;
/// Columns of the header.
pub const COLUMNS: usize = 12;
/// The `modelName` of every GPU.
pub const MODEL: &str = "NVIDIA H100 80GB HBM3";
/// The `STREAM_ID` tests give a streamer over the sample (its one worker streams as `dcgm-w0`).
pub const STREAM_ID: &str = "dcgm";

/// The path of `data/dcgm_sample.csv` in this checkout.
pub fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dcgm_sample.csv")
}

/// The sample's header line and data lines (as written, quotes included).
pub fn lines() -> std::io::Result<(String, Vec<String>)> {
    let text = std::fs::read_to_string(path())?;
    let mut lines = text.lines().map(str::to_string);
    let header = lines
        .next()
        .ok_or_else(|| std::io::Error::other("the sample has no header"))?;
    Ok((header, lines.collect()))
}

/// Writes a CSV of `rows` data rows: the sample's rows repeated in order, under its header.
pub fn write_repeated(path: &Path, rows: usize) -> std::io::Result<()> {
    write_repeated_with(path, rows, |_, _| Ok::<_, std::io::Error>(None))
}

/// Like [`write_repeated`], but `edit(i, line)` may replace data row `i` (0-based) by returning
/// `Some(new_line)`.
pub fn write_repeated_with<E, F>(path: &Path, rows: usize, mut edit: F) -> Result<(), E>
where
    E: From<std::io::Error>,
    F: FnMut(usize, &str) -> Result<Option<String>, E>,
{
    let (header, lines) = lines()?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "{header}")?;
    for i in 0..rows {
        let line = &lines[i % lines.len()];
        match edit(i, line)? {
            Some(edited) => writeln!(out, "{edited}")?,
            None => writeln!(out, "{line}")?,
        }
    }
    out.flush()?;
    Ok(())
}

/// A temporary `.csv` file holding `bytes`, removed when dropped.
pub fn temp_csv(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".csv")
        .tempfile()
        .expect("a temporary file");
    file.write_all(bytes).expect("writing a temporary file");
    file
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The constants are facts about the file, checked here once (every field is quoted and no
    /// field holds the delimiter inside quotes before `labels_raw`, the last column).
    #[test]
    fn the_constants_describe_the_file() {
        let (header, lines) = lines().expect("the sample reads");
        assert_eq!(header.split(',').count(), COLUMNS);
        assert_eq!(lines.len() as u64, ROWS);
        let field = |line: &str, i: usize| line.split("\",\"").nth(i).map(str::to_string);
        let set = |i: usize| lines.iter().filter_map(|l| field(l, i)).collect::<BTreeSet<_>>();
        assert_eq!(set(1).len(), METRICS, "metric_name");
        assert_eq!(set(4).len(), GPUS, "uuid");
        assert_eq!(set(6).len(), HOSTS, "Hostname");
        assert_eq!(set(5), BTreeSet::from([MODEL.to_string()]), "modelName");
    }

    #[test]
    fn repeated_inputs_cycle_through_the_sample_and_can_be_edited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.csv");
        write_repeated_with(&path, 2 * ROWS as usize + 1, |i, _| {
            Ok::<_, std::io::Error>((i == 3).then(|| "edited".to_string()))
        })
        .expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        let (header, sample) = lines().expect("sample");
        let written: Vec<&str> = text.lines().collect();
        assert_eq!(written.len(), 2 * ROWS as usize + 2);
        assert_eq!(written[0], header);
        assert_eq!(written[4], "edited");
        assert_eq!(written[1 + ROWS as usize], sample[0]);
        assert_eq!(written[2 * ROWS as usize + 1], sample[0]);
    }
}
