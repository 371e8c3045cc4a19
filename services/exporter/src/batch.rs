//! Which records go into the next remote-write request. Pure, unit-tested.
//!
//! The rule that makes a re-sent request harmless: **a request never holds two samples of one
//! series.** Requests are sent one at a time, and the checkpoint advances after each is
//! acknowledged, so at most one request can have landed without its checkpoint (a crash between
//! the TSDB's acknowledgement and the checkpoint write). The next exporter builds its first
//! request from the same checkpoint; every sample in it that had landed is then, for its
//! series, the newest sample the TSDB has (nothing was sent after it), and a TSDB drops a sample
//! identical to a series' newest without storing it again. With two samples of one series in a
//! request, the older one would be re-sent behind the newer and refused as out of order.
//!
//! A server that also drops (or reads once) a re-sent sample *older* than its series' newest
//! lifts the rule ([`SeriesRule::Repeats`]): Prometheus with an out-of-order window stores such a
//! sample in its out-of-order head and a query reads one sample per timestamp;
//! VictoriaMetrics with `-dedup.minScrapeInterval` removes it. The server check at start
//! decides (`server.rs`); a server it cannot check keeps the rule.
//!
//! Where requests are cut does not otherwise matter: any request that starts at the checkpoint
//! and keeps the rule is safe, so waiting for more records (`BATCH_WAIT`) or a changed
//! `BATCH_SAMPLES` after a restart cannot break exactly-once.

use std::collections::{HashSet, VecDeque};

use telemetry_shared::model::ExportGap;

use crate::convert::Item;

/// A position the export passes once everything before it has been exported: the end of a
/// catch-up from the data keys, which the checkpoint records (with the gap, if records had
/// expired) even when no record sits at that revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mark {
    /// Every record at or before this revision has been read.
    pub revision: i64,
    /// Records found expired while catching up.
    pub gap: Option<ExportGap>,
}

/// What waits to be exported, in export order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Pending {
    /// A converted record.
    Record(Item),
    /// A mark to pass.
    Mark(Mark),
}

/// The next request: the first `records` pending records (never past a mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Cut {
    /// Records taken (rejected ones included; they cost nothing to send).
    pub records: usize,
    /// Samples they carry.
    pub samples: usize,
    /// The request cannot grow: a limit, a repeated series or a mark ends it. Otherwise more
    /// records arriving could still join it.
    pub complete: bool,
}

/// Whether a request may hold several samples of one series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeriesRule {
    /// At most one sample per series: a re-sent request holds only series' newest samples,
    /// which every TSDB drops. The rule for a server not known to do more.
    OnePerSeries,
    /// Any number, each series' samples sent in time order: for a server known to drop (or read
    /// once) a re-sent sample older than its series' newest too (Prometheus with an
    /// out-of-order window, VictoriaMetrics with deduplication). Requests stay large when one
    /// series' records come in bursts.
    Repeats,
}

/// Most records one request takes, rejected ones included (bounds the checkpoint transaction
/// work and the memory of one request).
pub(crate) const MAX_RECORDS: usize = 20_000;

/// Cuts the next request from the front of `pending`: records in order until one would repeat
/// a series already in the request (under [`SeriesRule::OnePerSeries`]), or push it past
/// `max_samples` (a record with more samples than that goes alone), or a mark comes.
pub(crate) fn cut(pending: &VecDeque<Pending>, max_samples: usize, rule: SeriesRule) -> Cut {
    let mut cut = Cut::default();
    let mut series: HashSet<u64> = HashSet::new();
    for entry in pending {
        let Pending::Record(item) = entry else {
            cut.complete = true;
            return cut;
        };
        if cut.records == MAX_RECORDS {
            cut.complete = true;
            return cut;
        }
        if let Ok(converted) = &item.outcome {
            let repeats =
                rule == SeriesRule::OnePerSeries && converted.series.iter().any(|s| series.contains(s));
            let too_many = cut.samples > 0 && cut.samples + converted.samples.len() > max_samples;
            if repeats || too_many {
                cut.complete = true;
                return cut;
            }
            series.extend(converted.series.iter().copied());
            cut.samples += converted.samples.len();
        }
        cut.records += 1;
        if cut.samples >= max_samples {
            cut.complete = true;
            return cut;
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::Converted;
    use telemetry_shared::exposition::Sample;

    fn item(series: &[u64]) -> Pending {
        let samples: Vec<Sample> = series
            .iter()
            .map(|s| Sample {
                name: format!("m{s}"),
                labels: Vec::new(),
                value: 1.0,
                timestamp_ms: 0,
            })
            .collect();
        Pending::Record(Item {
            revision: 1,
            key: String::new(),
            time: None,
            outcome: Ok(Converted {
                samples,
                series: series.to_vec(),
            }),
        })
    }

    fn rejected() -> Pending {
        Pending::Record(Item {
            revision: 1,
            key: String::new(),
            time: None,
            outcome: Err("no".into()),
        })
    }

    fn mark() -> Pending {
        Pending::Mark(Mark {
            revision: 9,
            gap: None,
        })
    }

    #[test]
    fn a_request_never_holds_two_samples_of_one_series() {
        let pending: VecDeque<Pending> = [item(&[1]), item(&[2]), item(&[1]), item(&[3])].into();
        assert_eq!(
            cut(&pending, 100, SeriesRule::OnePerSeries),
            Cut {
                records: 2,
                samples: 2,
                complete: true
            }
        );
        // A record with several samples is judged by all of them.
        let pending: VecDeque<Pending> = [item(&[1, 2]), item(&[3, 2])].into();
        assert_eq!(cut(&pending, 100, SeriesRule::OnePerSeries).records, 1);
    }

    #[test]
    fn a_server_that_drops_older_resent_samples_lets_a_series_repeat() {
        let pending: VecDeque<Pending> = [item(&[1]), item(&[2]), item(&[1]), item(&[3])].into();
        assert_eq!(
            cut(&pending, 100, SeriesRule::Repeats),
            Cut {
                records: 4,
                samples: 4,
                complete: false
            }
        );
        assert_eq!(cut(&pending, 3, SeriesRule::Repeats).records, 3);
    }

    #[test]
    fn the_sample_limit_ends_a_request_but_a_large_record_goes_alone() {
        let pending: VecDeque<Pending> = [item(&[1]), item(&[2]), item(&[3])].into();
        assert_eq!(
            cut(&pending, 2, SeriesRule::OnePerSeries),
            Cut {
                records: 2,
                samples: 2,
                complete: true
            }
        );
        let pending: VecDeque<Pending> = [item(&[1, 2, 3]), item(&[4])].into();
        assert_eq!(
            cut(&pending, 2, SeriesRule::OnePerSeries),
            Cut {
                records: 1,
                samples: 3,
                complete: true
            }
        );
    }

    #[test]
    fn rejected_records_ride_along_and_marks_end_a_request() {
        let pending: VecDeque<Pending> = [item(&[1]), rejected(), item(&[2])].into();
        assert_eq!(
            cut(&pending, 100, SeriesRule::OnePerSeries),
            Cut {
                records: 3,
                samples: 2,
                complete: false
            },
            "may still grow"
        );
        let pending: VecDeque<Pending> = [rejected(), mark(), item(&[2])].into();
        assert_eq!(
            cut(&pending, 100, SeriesRule::OnePerSeries),
            Cut {
                records: 1,
                samples: 0,
                complete: true
            }
        );
        let pending: VecDeque<Pending> = [mark()].into();
        assert_eq!(cut(&pending, 100, SeriesRule::OnePerSeries).records, 0);
    }
}
