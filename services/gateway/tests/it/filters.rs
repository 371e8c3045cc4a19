//! REST and the WebSocket filter by metric the same way: both compare the stored field as text
//! (`telemetry_shared::message::field_text`), so a metric column the streamer typed as a number
//! is found by `?metric=1234` on both.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::*;

fn ids(records: &[Value]) -> BTreeSet<String> {
    records
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_websocket_agree_on_numeric_metric_values() {
    let (server, client) = etcd().await;
    let csv = csv_file(&[
        ("1234", "0", "GPU-num-0", "num-host", ""),
        ("DCGM_FI_DEV_GPU_UTIL", "0", "GPU-num-0", "num-host", ""),
        ("1234", "0", "GPU-num-0", "num-host", "again"),
        ("2.5", "1", "GPU-num-1", "num-host", ""),
    ]);
    load_csv(&server, &client, csv.path(), 4).await;
    let gw = spawn_gateway(&server, &client, &[]).await;
    let http = reqwest::Client::new();

    for (uuid, metric, expected) in [("GPU-num-0", "1234", 2), ("GPU-num-1", "2.5", 1)] {
        let url = format!("{}/api/v1/gpus/{uuid}/telemetry?metric={metric}", gw.base);
        let (status, page) = get(&http, &url).await;
        assert_eq!(status, 200, "{page}");
        let rest = page["items"].as_array().expect("items").clone();
        assert_eq!(rest.len(), expected, "REST ?metric={metric}: {page}");
        assert!(rest.iter().all(|r| r["fields"]["metric_name"].is_number()));

        // The same filter on the WebSocket, replaying the stored history.
        let url = format!(
            "{}/api/v1/ws/telemetry?since_revision=0&uuid={uuid}&metric={metric}",
            gw.ws
        );
        let (mut socket, _) = connect(&url).await;
        let mut live = Vec::new();
        while live.len() < expected {
            match next(&mut socket).await {
                Frame::Json(frame) => live.extend(frame["records"].as_array().expect("records").clone()),
                Frame::Closed(close) => panic!("closed: {close:?}"),
            }
        }
        assert_eq!(ids(&rest), ids(&live), "REST and WebSocket disagree on {metric}");
    }
    gw.shutdown().await;
}
