//! The sample through the real pipeline into a real Prometheus: once, with its values, and
//! what `telemetry-admin` says about it.

use crate::helpers::*;

#[tokio::test]
async fn the_sample_lands_once_with_its_names_labels_and_values() {
    let (server, client, probe) = etcd().await;
    let tsdb = prometheus().await;
    let collector = spawn_collector(&server, &client);
    assert_eq!(
        stream(&server, &client, "dcgm", 1, 0.0).await.expect("streamer"),
        2470
    );
    probe.wait_drained(2470, SLOW).await;
    let exporter = spawn_exporter(&server, &client, &tsdb, &[]);
    let cp = wait_exported(&probe, 2470).await;
    assert_eq!(
        (cp.records, cp.samples, cp.rejected, cp.expired),
        (2470, 2470, 0, 0)
    );
    assert!(cp.gaps.is_empty(), "{:?}", cp.gaps);
    let expected = expected_samples(&probe).await;
    assert_eq!(expected.len(), 2470);
    assert_exactly_once(&tsdb, &expected).await;
    // The series are dcgm-exporter's: its names and labels.
    let gpu_util = tsdb
        .query("DCGM_FI_DEV_GPU_UTIL", query_time())
        .await
        .expect("query");
    assert_eq!(gpu_util.as_array().map(Vec::len), Some(247), "one series per GPU");
    let labels = &gpu_util[0]["metric"];
    for label in [
        "gpu",
        "UUID",
        "device",
        "modelName",
        "Hostname",
        "DCGM_FI_DRIVER_VERSION",
    ] {
        assert!(labels.get(label).is_some(), "{label} in {labels}");
    }

    let totals = exporter.shutdown().await.expect("exporter ran");
    assert_eq!((totals.records, totals.samples, totals.rejected), (2470, 2470, 0));
    collector.shutdown().await.expect("collector ran");
    // Shut down cleanly: the owner key went with the revoked lease.
    let status = telemetry_admin::exporters(&client, &keys(), Some(NAME), 10)
        .await
        .expect("admin");
    assert_eq!(status.len(), 1);
    assert!(status[0].owner.is_none(), "{:?}", status[0].owner);
    assert_eq!(status[0].checkpoint.records, 2470);
    assert!(status[0].rejected.is_empty());
}

#[tokio::test]
async fn a_second_pass_and_two_workers_out_of_time_order_land_once_each() {
    // Two workers stream the same rows, so one series gets samples from both, and a partition
    // commits them in ULID order, which is not always time order: Prometheus' out-of-order
    // window takes them. The exporter follows while they are written.
    let (server, client, probe) = etcd().await;
    let tsdb = prometheus().await;
    let collector = spawn_collector(&server, &client);
    let exporter = spawn_exporter(&server, &client, &tsdb, &[("BATCH_SAMPLES", "500")]);
    assert_eq!(
        stream(&server, &client, "two", 2, 2000.0)
            .await
            .expect("streamer"),
        4940
    );
    probe.wait_drained(4940, SLOW).await;
    let cp = wait_exported(&probe, 4940).await;
    assert_eq!((cp.records, cp.rejected), (4940, 0), "{cp:?}");
    assert_exactly_once(&tsdb, &expected_samples(&probe).await).await;
    exporter.shutdown().await.expect("exporter ran");
    collector.shutdown().await.expect("collector ran");
}

/// The remote-write messages, declared again here to send hand-made requests.
mod wire {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteRequest {
        #[prost(message, repeated, tag = "1")]
        pub timeseries: Vec<TimeSeries>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TimeSeries {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<Label>,
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<Sample>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(double, tag = "1")]
        pub value: f64,
        #[prost(int64, tag = "2")]
        pub timestamp: i64,
    }
}

async fn write(url: &str, series: &str, samples: &[(i64, f64)]) -> u16 {
    use prost::Message as _;
    let request = wire::WriteRequest {
        timeseries: samples
            .iter()
            .map(|(t, v)| wire::TimeSeries {
                labels: vec![wire::Label {
                    name: "__name__".into(),
                    value: series.into(),
                }],
                samples: vec![wire::Sample {
                    value: *v,
                    timestamp: *t,
                }],
            })
            .collect(),
    };
    let body = snap::raw::Encoder::new()
        .compress_vec(&request.encode_to_vec())
        .expect("snappy");
    reqwest::Client::new()
        .post(url)
        .header("Content-Encoding", "snappy")
        .header("Content-Type", "application/x-protobuf")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(body)
        .send()
        .await
        .expect("answer")
        .status()
        .as_u16()
}

/// What the exactly-once argument assumes of Prometheus, checked against the real one: an
/// identical re-send of a series' newest sample is accepted and not stored again; with an
/// out-of-order window, an identical re-send of an older sample (what a paused exporter's late
/// request can be) is accepted and read once by queries, even after many more out-of-order
/// samples; without a window it is refused (400).
#[tokio::test]
async fn prometheus_reads_a_resent_sample_once() {
    let tsdb = prometheus().await;
    let url = tsdb.write_url();
    let now = chrono::Utc::now().timestamp_millis();
    let t = |minutes_ago: i64| now - minutes_ago * 60_000;
    assert_eq!(write(&url, "probe", &[(t(30), 1.0)]).await, 204);
    assert_eq!(write(&url, "probe", &[(t(20), 2.0)]).await, 204);
    assert_eq!(
        write(&url, "probe", &[(t(20), 2.0)]).await,
        204,
        "newest, identical"
    );
    assert_eq!(
        write(&url, "probe", &[(t(30), 1.0)]).await,
        204,
        "older, identical (window)"
    );
    // Enough out-of-order samples to fill and cut the in-memory out-of-order chunk.
    for i in 0..70 {
        let ms = t(29) + i * 1000;
        assert_eq!(write(&url, "probe", &[(ms, 3.0)]).await, 204);
    }
    assert_eq!(write(&url, "probe", &[(t(30), 1.0)]).await, 204, "older again");
    assert_eq!(write(&url, "probe", &[(t(29), 3.0)]).await, 204);
    let count = tsdb
        .query_number("count_over_time(probe[1h])", query_time())
        .await
        .expect("query");
    assert_eq!(count, 72.0, "each timestamp once");
    assert_eq!(
        write(&url, "probe", &[(t(30), 9.0)]).await,
        204,
        "an out-of-order sample at a stored timestamp with another value is not refused: first write wins"
    );
    let strict = telemetry_harness::Tsdb::start(telemetry_harness::TsdbKind::Prometheus {
        out_of_order_window: None,
    })
    .await
    .expect("prometheus starts");
    let url = strict.write_url();
    assert_eq!(write(&url, "probe", &[(t(30), 1.0)]).await, 204);
    assert_eq!(write(&url, "probe", &[(t(20), 2.0)]).await, 204);
    assert_eq!(
        write(&url, "probe", &[(t(20), 2.0)]).await,
        204,
        "newest, identical"
    );
    assert_eq!(
        write(&url, "probe", &[(t(30), 1.0)]).await,
        400,
        "older: out of order"
    );
}
