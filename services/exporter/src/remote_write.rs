//! The remote-write 1.0 wire format: a protobuf `WriteRequest` compressed with snappy's block
//! format, and the headers the specification requires.
//!
//! Only the messages the exporter sends are declared (prost derives their encoding; no
//! `protoc` and no build script). A request holds one time series per series, with its samples
//! in time order, and labels sorted by name, `__name__` among them.

use telemetry_shared::exposition::Sample;

/// `prometheus.WriteRequest` (field 1; metadata, field 3, is never sent).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<WireSample>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WireSample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The headers of every request (besides `User-Agent`, which the HTTP client sets).
pub(crate) const HEADERS: [(&str, &str); 3] = [
    ("Content-Encoding", "snappy"),
    ("Content-Type", "application/x-protobuf"),
    ("X-Prometheus-Remote-Write-Version", "0.1.0"),
];

/// The `User-Agent` of every request.
pub(crate) const USER_AGENT: &str = concat!("telemetry-exporter/", env!("CARGO_PKG_VERSION"));

/// One series of `sample`: its labels with `__name__`, sorted by name (byte order, as
/// Prometheus sorts them).
pub(crate) fn time_series(sample: &Sample) -> TimeSeries {
    let mut labels: Vec<Label> = sample
        .labels
        .iter()
        .map(|(name, value)| Label {
            name: name.clone(),
            value: value.clone(),
        })
        .collect();
    labels.push(Label {
        name: "__name__".into(),
        value: sample.name.clone(),
    });
    labels.sort_by(|a, b| a.name.cmp(&b.name));
    TimeSeries {
        labels,
        samples: vec![WireSample {
            value: sample.value,
            timestamp: sample.timestamp_ms,
        }],
    }
}

/// A series' identity: its name and labels.
type SeriesId<'a> = (&'a str, &'a [(String, String)]);

/// The body of a request carrying `samples`: one time series per series (in the order each
/// first appears), its samples in time order; protobuf, then snappy (block format).
pub(crate) fn encode<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Vec<u8> {
    use prost::Message as _;
    let mut timeseries: Vec<TimeSeries> = Vec::new();
    let mut index: std::collections::HashMap<SeriesId<'_>, usize> = std::collections::HashMap::new();
    for sample in samples {
        match index.entry((sample.name.as_str(), sample.labels.as_slice())) {
            std::collections::hash_map::Entry::Occupied(at) => {
                timeseries[*at.get()].samples.push(WireSample {
                    value: sample.value,
                    timestamp: sample.timestamp_ms,
                })
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(timeseries.len());
                timeseries.push(time_series(sample));
            }
        }
    }
    for series in &mut timeseries {
        series.samples.sort_by_key(|s| s.timestamp);
    }
    let request = WriteRequest { timeseries };
    let raw = request.encode_to_vec();
    // Compressing into a Vec cannot fail for input below snap's 4 GiB limit, and a request
    // is far smaller (a failure would be answered as a refused request and bisected).
    snap::raw::Encoder::new().compress_vec(&raw).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn sample() -> Sample {
        Sample {
            name: "DCGM_FI_DEV_GPU_UTIL".into(),
            labels: vec![
                ("Hostname".into(), "h".into()),
                ("gpu".into(), "0".into()),
                ("UUID".into(), "GPU-1".into()),
            ],
            value: 87.5,
            timestamp_ms: 1_795_996_800_500,
        }
    }

    #[test]
    fn labels_are_sorted_with_the_name_among_them() {
        let names: Vec<String> = time_series(&sample())
            .labels
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(names, vec!["Hostname", "UUID", "__name__", "gpu"]);
    }

    #[test]
    fn the_body_is_snappy_block_compressed_protobuf_that_decodes_back() {
        let body = encode([&sample(), &sample()]);
        let raw = snap::raw::Decoder::new()
            .decompress_vec(&body)
            .expect("snappy block format");
        let request = WriteRequest::decode(raw.as_slice()).expect("protobuf");
        assert_eq!(request.timeseries.len(), 1, "one series");
        let series = &request.timeseries[0];
        assert_eq!(series.samples.len(), 2);
        assert_eq!(
            series.samples[0],
            WireSample {
                value: 87.5,
                timestamp: 1_795_996_800_500
            }
        );
        assert!(series.labels.contains(&Label {
            name: "__name__".into(),
            value: "DCGM_FI_DEV_GPU_UTIL".into()
        }));
    }

    #[test]
    fn samples_of_one_series_share_it_in_time_order() {
        let mut later = sample();
        later.timestamp_ms += 10;
        later.value = 1.0;
        let mut other = sample();
        other.name = "DCGM_FI_DEV_FB_USED".into();
        let body = encode([&later, &other, &sample()]);
        let raw = snap::raw::Decoder::new().decompress_vec(&body).expect("snappy");
        let request = WriteRequest::decode(raw.as_slice()).expect("protobuf");
        assert_eq!(request.timeseries.len(), 2);
        let stamps: Vec<i64> = request.timeseries[0]
            .samples
            .iter()
            .map(|s| s.timestamp)
            .collect();
        assert_eq!(stamps, vec![1_795_996_800_500, 1_795_996_800_510]);
    }

    #[test]
    fn the_encoding_matches_the_protobuf_definition() {
        // Label{name: "a", value: "b"}: field 1 (len 1) "a", field 2 (len 1) "b".
        let label = Label {
            name: "a".into(),
            value: "b".into(),
        };
        assert_eq!(label.encode_to_vec(), vec![0x0a, 1, b'a', 0x12, 1, b'b']);
        // Sample{value: 1.0, timestamp: 1}: field 1 fixed64, field 2 varint.
        let s = WireSample {
            value: 1.0,
            timestamp: 1,
        };
        assert_eq!(
            s.encode_to_vec(),
            vec![0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f, 0x10, 1]
        );
    }
}
