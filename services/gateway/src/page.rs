//! Paging one GPU's records: which key range to read next, which records a page keeps, and
//! where the next page starts.
//!
//! A telemetry page is assembled from one or more reads of the GPU's key range, all at one
//! revision. Without a `metric` filter one read usually suffices; with one, records of other
//! metrics are skipped and the range is read on, batch by batch, until the page is full, the
//! range ends, or [`MAX_SCAN`] records were examined (then the page is returned short, with a
//! cursor to continue). One record beyond the page is looked for, so that `next_cursor` is
//! given exactly when more records follow.
//!
//! [`Scan`] decides all of this without any I/O (unit-tested here without etcd; it only
//! reports unreadable records as events); `Store::telemetry_page` is the thin loop that
//! performs the reads it asks for.

use std::sync::Arc;

use crate::record::Record;

use crate::query::{Cursor, Order, TelemetryQuery};

/// Most records one telemetry request examines when a `metric` filter skips records; past it
/// the page is returned short, with a cursor to continue.
pub(crate) const MAX_SCAN: usize = 20_000;

/// Reads of a filtered scan: at least this many records (skipping is cheap, round trips are not).
const MIN_FILTERED_READ: usize = 256;
/// Reads of a filtered scan: at most this many records.
const MAX_FILTERED_READ: usize = 2000;

/// The next read a [`Scan`] needs: up to `n` records of `[lo, hi)`, in the page's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Read<'a> {
    /// Inclusive lower key bound.
    pub lo: &'a [u8],
    /// Exclusive upper key bound.
    pub hi: &'a [u8],
    /// Most records wanted.
    pub n: usize,
}

/// A finished page.
#[derive(Debug, Clone)]
pub(crate) struct Page {
    /// The records, in page order.
    pub records: Vec<Arc<Record>>,
    /// Where the next page starts, if more records follow.
    pub next_cursor: Option<Cursor>,
    /// Records examined.
    pub scanned: usize,
}

/// The state of one page's scan over a GPU's key range.
pub(crate) struct Scan<'q> {
    query: &'q TelemetryQuery,
    prefix: &'q str,
    /// What is left to read.
    lo: Vec<u8>,
    hi: Vec<u8>,
    /// Matching records so far (key, record), in page order.
    matched: Vec<Arc<Record>>,
    last_examined: Option<String>,
    scanned: usize,
    /// Largest read, lowered when a read's response was too large to receive.
    max_read: usize,
    /// `Some(more)` once the scan is over.
    done: Option<bool>,
}

impl<'q> Scan<'q> {
    /// A scan for `query` over the records under `prefix` (a GPU's data prefix). The metric
    /// filter compares each record's metric as text ([`Record::metric`]), exactly as the
    /// WebSocket filter does, so `?metric=7` finds a metric stored as the number 7.
    pub(crate) fn new(query: &'q TelemetryQuery, prefix: &'q str) -> Self {
        let (lo, hi) = query.key_range(prefix);
        Scan {
            query,
            prefix,
            lo,
            hi,
            matched: Vec::new(),
            last_examined: None,
            scanned: 0,
            max_read: usize::MAX,
            done: None,
        }
    }

    /// Matching records needed: the skipped ones, the page, and one to learn if more follow.
    fn needed(&self) -> usize {
        self.query.offset + self.query.limit + 1
    }

    /// The next read, or `None` when the page is decided.
    pub(crate) fn next_read(&self) -> Option<Read<'_>> {
        if self.done.is_some() {
            return None;
        }
        let want = self.needed().saturating_sub(self.matched.len()).max(1);
        let n = if self.query.metric.is_some() {
            (want * 2).clamp(MIN_FILTERED_READ, MAX_FILTERED_READ)
        } else {
            want
        };
        Some(Read {
            lo: &self.lo,
            hi: &self.hi,
            n: n.min(self.max_read),
        })
    }

    /// The last read's response was too large to receive: read fewer records at a time.
    /// Returns false if reads are already single records (nothing smaller to try).
    pub(crate) fn shrink_reads(&mut self, last: usize) -> bool {
        if last <= 1 {
            return false;
        }
        self.max_read = (last / 4).max(1);
        true
    }

    /// Takes in one read's records, in page order: each key with its record, or `None` for
    /// one that could not be read (it counts as examined); `range_has_more` says whether the
    /// range held records beyond them.
    pub(crate) fn absorb(
        &mut self,
        records: impl IntoIterator<Item = (String, Option<Arc<Record>>)>,
        range_has_more: bool,
    ) {
        let mut fetched = 0;
        for (key, record) in records {
            fetched += 1;
            self.examine(key, record);
            if self.matched.len() >= self.needed() {
                self.done = Some(true);
                return;
            }
        }
        if !range_has_more || fetched == 0 {
            self.done = Some(false);
        } else if self.query.metric.is_some() && self.scanned >= MAX_SCAN {
            self.done = Some(true);
        } else if let Some(last) = &self.last_examined {
            let last = last.as_bytes().to_vec();
            match self.query.order {
                Order::Asc => {
                    self.lo = last;
                    self.lo.push(0);
                }
                Order::Desc => self.hi = last,
            }
        }
    }

    fn examine(&mut self, key: String, record: Option<Arc<Record>>) {
        self.scanned += 1;
        if let Some(record) = record
            && self.matches(&record)
        {
            self.matched.push(record);
        }
        self.last_examined = Some(key);
    }

    fn matches(&self, record: &Record) -> bool {
        self.query
            .metric
            .as_deref()
            .is_none_or(|want| record.metric.as_deref() == Some(want))
    }

    /// The page: `limit` records after `offset`, and a cursor if more follow. The cursor points
    /// at the last record returned, or at the last one examined if the scan stopped short of a
    /// full page (so the next page does not examine those records again).
    pub(crate) fn finish(self) -> Page {
        let more = self.done.unwrap_or(false);
        let (limit, offset) = (self.query.limit, self.query.offset);
        let returned: Vec<Arc<Record>> = self.matched.into_iter().skip(offset).take(limit).collect();
        let boundary = if returned.len() == limit {
            returned.last().map(|r| r.key.clone())
        } else {
            self.last_examined
        };
        let next_cursor = boundary.filter(|_| more).and_then(|key| {
            key.strip_prefix(self.prefix).map(|suffix| Cursor {
                order: self.query.order,
                suffix: suffix.to_string(),
            })
        });
        Page {
            records: returned,
            next_cursor,
            scanned: self.scanned,
        }
    }
}

#[cfg(test)]
mod tests {
    use telemetry_shared::{Fields, Message, SchemaVersion, Timestamp, config::Columns};

    use super::*;

    const PREFIX: &str = "/d/h/0/";

    fn query(limit: usize, offset: usize, metric: Option<&str>, order: Order) -> TelemetryQuery {
        TelemetryQuery {
            hostname: None,
            start: None,
            end: None,
            metric: metric.map(str::to_string),
            limit,
            offset,
            cursor: None,
            order,
            at: None,
        }
    }

    /// Record `i`: key `{PREFIX}{i:06}`, metric `A` for even i and the number 7 for odd i.
    fn record(i: usize) -> (String, Option<Arc<Record>>) {
        let mut fields = Fields::new();
        let metric = if i.is_multiple_of(2) {
            "A".into()
        } else {
            serde_json::json!(7.0)
        };
        fields.insert("metric_name".into(), metric);
        let message = Message {
            schema_version: SchemaVersion::V1,
            id: ulid::Ulid::from_parts(1, i as u128),
            timestamp: Timestamp::now(),
            idempotency_key: "ab".repeat(32),
            source: None,
            fields,
        };
        let key = format!("{PREFIX}{i:06}");
        let record = Record::new(key.clone(), 1, "h", "0", message, &Columns::default());
        (key, Some(Arc::new(record)))
    }

    /// Runs a scan over `total` records, answering each read like etcd would (ascending keys).
    fn run(q: &TelemetryQuery, total: usize) -> (Page, Vec<usize>) {
        let store: Vec<(String, Option<Arc<Record>>)> = (0..total).map(record).collect();
        let mut scan = Scan::new(q, PREFIX);
        let mut reads = Vec::new();
        while let Some(read) = scan.next_read() {
            reads.push(read.n);
            let mut inside: Vec<&(String, Option<Arc<Record>>)> = store
                .iter()
                .filter(|(k, _)| k.as_bytes() >= read.lo && k.as_bytes() < read.hi)
                .collect();
            if q.order == Order::Desc {
                inside.reverse();
            }
            let more = inside.len() > read.n;
            let batch: Vec<(String, Option<Arc<Record>>)> =
                inside.into_iter().take(read.n).cloned().collect();
            scan.absorb(batch, more);
        }
        (scan.finish(), reads)
    }

    fn suffixes(page: &Page) -> Vec<u128> {
        page.records
            .iter()
            .map(|r| u128::from(r.message.id) & 0xffff)
            .collect()
    }

    #[test]
    fn a_full_page_has_a_cursor_at_its_last_record_and_the_last_page_none() {
        let q = query(3, 0, None, Order::Asc);
        let (page, reads) = run(&q, 10);
        assert_eq!(suffixes(&page), vec![0, 1, 2]);
        assert_eq!(page.next_cursor.map(|c| c.suffix), Some("000002".into()));
        assert_eq!(reads, vec![4], "one read of limit + 1");

        let (page, _) = run(&query(10, 0, None, Order::Desc), 10);
        assert_eq!(suffixes(&page)[..2], [9, 8]);
        assert_eq!(page.next_cursor, None, "exactly the range: no more");
        let (page, _) = run(&query(4, 0, None, Order::Desc), 10);
        assert_eq!(
            page.next_cursor.map(|c| (c.order, c.suffix)),
            Some((Order::Desc, "000006".into()))
        );
    }

    #[test]
    fn offset_skips_matches() {
        let (page, _) = run(&query(2, 3, None, Order::Asc), 10);
        assert_eq!(suffixes(&page), vec![3, 4]);
        assert!(page.next_cursor.is_some());
        let (page, _) = run(&query(2, 20, None, Order::Asc), 10);
        assert!(page.records.is_empty() && page.next_cursor.is_none());
    }

    #[test]
    fn the_metric_filter_compares_numbers_as_text_like_the_websocket() {
        let (page, _) = run(&query(100, 0, Some("7"), Order::Asc), 10);
        assert_eq!(suffixes(&page), vec![1, 3, 5, 7, 9]);
        let (page, _) = run(&query(100, 0, Some("A"), Order::Asc), 10);
        assert_eq!(suffixes(&page), vec![0, 2, 4, 6, 8]);
    }

    #[test]
    fn a_filtered_scan_reads_in_batches_and_stops_short_at_max_scan() {
        // Nothing matches: the scan examines MAX_SCAN records, then answers short with a cursor
        // at the last record examined.
        let q = query(10, 0, Some("none"), Order::Asc);
        let (page, reads) = run(&q, MAX_SCAN + 5000);
        assert!(page.records.is_empty());
        assert!((MAX_SCAN..MAX_SCAN + MAX_FILTERED_READ).contains(&page.scanned));
        assert!(
            reads
                .iter()
                .all(|n| (MIN_FILTERED_READ..=MAX_FILTERED_READ).contains(n))
        );
        assert_eq!(
            page.next_cursor.map(|c| c.suffix),
            Some(format!("{:06}", page.scanned - 1))
        );
    }

    #[test]
    fn reads_shrink_after_a_response_too_large() {
        let q = query(100, 0, None, Order::Asc);
        let mut scan = Scan::new(&q, PREFIX);
        let first = scan.next_read().map(|r| r.n);
        assert_eq!(first, Some(101));
        assert!(scan.shrink_reads(101));
        assert_eq!(scan.next_read().map(|r| r.n), Some(25));
        assert!(scan.shrink_reads(2));
        assert_eq!(scan.next_read().map(|r| r.n), Some(1));
        assert!(!scan.shrink_reads(1), "nothing smaller than one record");
        // Small reads still assemble the whole page.
        scan.absorb((0..3).map(record), false);
        assert_eq!(scan.next_read(), None);
        assert_eq!(suffixes(&scan.finish()), vec![0, 1, 2]);
    }

    #[test]
    fn unreadable_records_are_skipped() {
        let q = query(5, 0, None, Order::Asc);
        let mut scan = Scan::new(&q, PREFIX);
        let bad_key = format!("{PREFIX}000000");
        scan.absorb([(bad_key, None), record(1)], false);
        let page = scan.finish();
        assert_eq!((suffixes(&page), page.scanned), (vec![1], 2));
    }
}
