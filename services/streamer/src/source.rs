//! The source: reads a CSV file row by row.
//!
//! RFC 4180 parsing (quoted fields, embedded commas and newlines, doubled quotes) is the `csv`
//! crate's; this module adds what the pipeline needs on top: 1-based row numbers that count
//! malformed rows too (so checkpoints are positions in the file), the line each row starts on
//! (for error messages), validation of field count and UTF-8, and the per-column type
//! inference of [`ColumnTypes`] and the file's fingerprint, both from one read at start-up.
//!
//! The module is public for the benchmarks, which parse and build messages without etcd.

use std::{
    fs::File,
    io::{self, Read},
    path::Path,
};

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Errors that stop the source as a whole (a bad row is not one of them: see [`SourceItem`]).
#[derive(Debug, Error)]
pub enum SourceError {
    /// The file cannot be opened or read.
    #[error("cannot read CSV file {path}: {source}")]
    Io {
        /// The path as configured.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The header row is missing or unusable.
    #[error("CSV file {path} has no usable header row: {reason}")]
    Header {
        /// The path as configured.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// A data row, validated: as many fields as the header, all UTF-8.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1-based data row number (the header is row 0).
    pub row: u64,
    /// Line of the file the row starts on (1-based).
    pub line: u64,
    /// The row's values, one per header column.
    pub values: Vec<String>,
}

/// A row that cannot become a message; it is logged, counted and skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    /// 1-based data row number.
    pub row: u64,
    /// Line of the file the row starts on (1-based).
    pub line: u64,
    /// Why it was rejected.
    pub reason: String,
}

/// What the source yields for each data row.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceItem {
    /// A usable row.
    Row(Row),
    /// A malformed row.
    Malformed(Malformed),
}

impl SourceItem {
    /// The row number of either variant.
    pub fn row(&self) -> u64 {
        match self {
            SourceItem::Row(r) => r.row,
            SourceItem::Malformed(m) => m.row,
        }
    }
}

/// An open CSV file positioned after its header.
pub struct CsvSource<R = File> {
    reader: csv::Reader<R>,
    path: String,
    headers: Vec<String>,
    record: csv::ByteRecord,
    next_row: u64,
    done: bool,
}

fn open_file(path: &Path) -> Result<File, SourceError> {
    File::open(path).map_err(|source| SourceError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl CsvSource {
    /// Opens `path` and reads its header row. A UTF-8 byte-order mark is ignored.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        CsvSource::from_reader(open_file(path)?, path)
    }
}

impl<R: Read> CsvSource<R> {
    /// Reads the header row of the CSV text `input` (read from `path`, which errors name).
    fn from_reader(input: R, path: &Path) -> Result<Self, SourceError> {
        let path = path.display().to_string();
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            // Field-count mismatches are reported per row by us, not as reader errors.
            .flexible(true)
            .buffer_capacity(256 * 1024)
            .from_reader(input);
        let header_err = |reason: String| SourceError::Header {
            path: path.clone(),
            reason,
        };
        let raw = reader
            .byte_headers()
            .map_err(|e| header_err(e.to_string()))?
            .clone();
        if raw.is_empty() || (raw.len() == 1 && raw[0].is_empty()) {
            return Err(header_err("the file is empty".into()));
        }
        let mut headers = Vec::with_capacity(raw.len());
        for (i, field) in raw.iter().enumerate() {
            let name = std::str::from_utf8(field)
                .map_err(|_| header_err(format!("column {} is not valid UTF-8", i + 1)))?;
            let name = name.strip_prefix('\u{feff}').unwrap_or(name).to_string();
            if name.is_empty() {
                return Err(header_err(format!("column {} has an empty name", i + 1)));
            }
            if headers.contains(&name) {
                return Err(header_err(format!("column name {name:?} appears twice")));
            }
            headers.push(name);
        }
        Ok(CsvSource {
            reader,
            path,
            headers,
            record: csv::ByteRecord::new(),
            next_row: 1,
            done: false,
        })
    }

    /// The column names from the header row.
    pub fn headers(&self) -> &[String] {
        &self.headers
    }

    /// The next data row, or `None` at end of file. An I/O error mid-file is an `Err` (the
    /// stream cannot go on); a malformed row is an `Ok(SourceItem::Malformed)`.
    pub fn next_item(&mut self) -> Result<Option<SourceItem>, SourceError> {
        if self.done {
            return Ok(None);
        }
        let row = self.next_row;
        match self.reader.read_byte_record(&mut self.record) {
            Ok(false) => {
                self.done = true;
                Ok(None)
            }
            Ok(true) => {
                self.next_row += 1;
                let line = self.record.position().map_or(0, csv::Position::line);
                Ok(Some(self.validate(row, line)))
            }
            Err(err) => {
                let line = err.position().map_or(0, csv::Position::line);
                match err.into_kind() {
                    csv::ErrorKind::Io(source) => Err(SourceError::Io {
                        path: self.path.clone(),
                        source,
                    }),
                    other => {
                        // The csv crate reports e.g. invalid quoting here and resumes after the
                        // record; we count it as a malformed row.
                        self.next_row += 1;
                        Ok(Some(SourceItem::Malformed(Malformed {
                            row,
                            line,
                            reason: format!("{other:?}"),
                        })))
                    }
                }
            }
        }
    }

    /// The reader the CSV text comes from.
    fn into_inner(self) -> R {
        self.reader.into_inner()
    }

    fn validate(&self, row: u64, line: u64) -> SourceItem {
        if self.record.len() != self.headers.len() {
            return SourceItem::Malformed(Malformed {
                row,
                line,
                reason: format!(
                    "has {} fields, the header has {}",
                    self.record.len(),
                    self.headers.len()
                ),
            });
        }
        let mut values = Vec::with_capacity(self.record.len());
        for (i, field) in self.record.iter().enumerate() {
            match std::str::from_utf8(field) {
                Ok(text) => values.push(text.to_string()),
                Err(_) => {
                    return SourceItem::Malformed(Malformed {
                        row,
                        line,
                        reason: format!("field {:?} is not valid UTF-8", self.headers[i]),
                    });
                }
            }
        }
        SourceItem::Row(Row { row, line, values })
    }
}

/// How a column's values become JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColumnKind {
    /// A boolean column: `true`/`false`/`1`/`0` (any case) become booleans.
    Bool,
    /// Anything else, per cell: a finite number becomes an f64, `true`/`false` a boolean,
    /// everything else (including the empty string) a string.
    Auto,
}

/// Per-column typing, decided by looking at the whole file once.
///
/// The rule for `1`/`0`: a column is [`ColumnKind::Bool`] only if every non-empty value in it is
/// one of `true`, `false`, `1`, `0` (any case) and at least one is a literal `true` or `false`.
/// Otherwise `1` and `0` are the numbers 1.0 and 0.0. This keeps `gpu_id = 0` or `value = 1`
/// numeric (they are numbers in a numeric column) while a column such as `throttled` holding
/// `true`, `0`, `1`, `false` comes out as booleans throughout, never mixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnTypes {
    kinds: Vec<ColumnKind>,
    data_rows: u64,
}

impl ColumnTypes {
    /// Scans the file (one sequential read) and decides each column's kind. Also counts the
    /// data rows, which the progress bar uses.
    pub fn scan(path: &Path) -> Result<Self, SourceError> {
        Ok(scan(path)?.types)
    }

    /// Decides each column's kind from every row of `source`.
    fn from_rows<R: Read>(source: &mut CsvSource<R>) -> Result<Self, SourceError> {
        let n = source.headers().len();
        // Per column: (all values bool-like, saw a true/false literal).
        let mut bool_like = vec![true; n];
        let mut saw_literal = vec![false; n];
        let mut data_rows = 0;
        while let Some(item) = source.next_item()? {
            data_rows += 1;
            let SourceItem::Row(row) = item else { continue };
            for (i, value) in row.values.iter().enumerate() {
                if value.is_empty() || !bool_like[i] {
                    continue;
                }
                if value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("false") {
                    saw_literal[i] = true;
                } else if value != "1" && value != "0" {
                    bool_like[i] = false;
                }
            }
        }
        let kinds = (0..n)
            .map(|i| {
                if bool_like[i] && saw_literal[i] {
                    ColumnKind::Bool
                } else {
                    ColumnKind::Auto
                }
            })
            .collect();
        Ok(ColumnTypes { kinds, data_rows })
    }

    /// Every column [`ColumnKind::Auto`] (for callers that have not scanned a file).
    #[cfg(test)]
    pub(crate) fn all_auto(columns: usize) -> Self {
        ColumnTypes {
            kinds: vec![ColumnKind::Auto; columns],
            data_rows: 0,
        }
    }

    /// The kind of column `i` (columns past the scanned ones are `Auto`).
    pub(crate) fn kind(&self, i: usize) -> ColumnKind {
        self.kinds.get(i).copied().unwrap_or(ColumnKind::Auto)
    }

    /// Number of data rows seen by the scan (malformed ones included).
    pub fn data_rows(&self) -> u64 {
        self.data_rows
    }
}

/// What the start-up scan learns about the source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scan {
    /// How each column's values become JSON, and how many data rows there are.
    pub types: ColumnTypes,
    /// `sha256:` and the hex SHA-256 of every byte of the file, the same as `sha256sum` prints.
    ///
    /// A checkpoint's row number is a position in this content, so the checkpoint records it
    /// and a streamer refuses to resume a stream on a file with another fingerprint. It catches
    /// any other file and any edit, append or truncation made before the streamer started. It
    /// does not catch a file changed while the streamer runs (each pass re-reads the file, the
    /// fingerprint is taken once), and it refuses harmless changes too (an appended row,
    /// re-saving with other line endings).
    pub fingerprint: String,
}

/// Reads the whole file once: the column types and the fingerprint.
pub(crate) fn scan(path: &Path) -> Result<Scan, SourceError> {
    let mut source = CsvSource::from_reader(Hashing::new(open_file(path)?), path)?;
    let types = ColumnTypes::from_rows(&mut source)?;
    // The CSV reader stops at the end of the last record; read whatever it left unread so the
    // fingerprint covers every byte.
    let mut rest = source.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|source| SourceError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Scan {
        types,
        fingerprint: rest.fingerprint(),
    })
}

/// A reader that hashes every byte it passes on.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn fingerprint(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(bytes).expect("write");
        file
    }

    fn fingerprint(bytes: &[u8]) -> String {
        scan(file(bytes).path()).expect("scan").fingerprint
    }

    #[test]
    fn the_fingerprint_is_the_sha256_of_the_whole_file() {
        let bytes = b"a,b\n1,x\n2,y\n";
        assert_eq!(
            fingerprint(bytes),
            format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
        );
    }

    #[test]
    fn any_edit_changes_the_fingerprint_and_the_same_content_does_not() {
        let a = fingerprint(b"a,b\n1,x\n2,y\n");
        assert_eq!(a, fingerprint(b"a,b\n1,x\n2,y\n"), "same content elsewhere");
        for edited in [
            &b"a,b\n1,x\n2,z\n"[..],  // a value
            b"a,c\n1,x\n2,y\n",       // the header
            b"a,b\n1,x\n2,y\n3,w\n",  // a row appended
            b"a,b\n1,x\n",            // truncated
            b"a,b\n1,x\n2,y",         // the final newline dropped
            b"a,b\r\n1,x\r\n2,y\r\n", // other line endings
        ] {
            assert_ne!(a, fingerprint(edited), "{:?}", String::from_utf8_lossy(edited));
        }
    }

    #[test]
    fn the_scan_still_types_columns_and_counts_rows() {
        let scan = scan(file(b"flag,n\ntrue,1\n0,2\nbad\n").path()).expect("scan");
        assert_eq!(scan.types.data_rows(), 3);
        assert_eq!(scan.types.kind(0), ColumnKind::Bool);
        assert_eq!(scan.types.kind(1), ColumnKind::Auto);
    }
}
