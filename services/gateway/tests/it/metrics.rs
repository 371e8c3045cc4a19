//! `/metrics` after real traffic passes `promtool check metrics`: every metric has help text
//! and a type, counters end in `_total`, histograms have buckets.

use std::collections::BTreeSet;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_after_traffic() {
    let (server, client) = etcd().await;
    load_sample(&server, &client).await;
    let gw = spawn_gateway(&server, &client, &[]).await;
    let http = reqwest::Client::new();

    // REST: pages (with a metric filter), the index, stats, health, and some errors.
    let (_, gpus) = get(&http, &format!("{}/api/v1/gpus", gw.base)).await;
    let uuid = gpus["gpus"][0]["uuid"].as_str().expect("uuid").to_string();
    let telemetry = format!("{}/api/v1/gpus/{uuid}/telemetry", gw.base);
    for query in [
        "",
        "?order=asc&limit=3",
        "?metric=DCGM_FI_DEV_GPU_TEMP",
        "?limit=0",
    ] {
        get(&http, &format!("{telemetry}{query}")).await;
    }
    for path in ["/api/v1/stats", "/health", "/api/v1/nothing"] {
        get(&http, &format!("{}{path}", gw.base)).await;
    }

    // WebSocket: a replay, then a live record and an unreadable one.
    let (mut socket, _) = connect(&format!(
        "{}/api/v1/ws/telemetry?since_revision=0&uuid={uuid}",
        gw.ws
    ))
    .await;
    let stored = telemetry_harness::range_all(&client, &keys().data_prefix())
        .await
        .expect("records");
    // A stored record's value names its profile, not the GPU (lean records): find one by the
    // host and GPU id in its key.
    let gpu = &gpus["gpus"][0];
    let prefix = keys().gpu_data_prefix(
        gpu["hostname"].as_str().expect("hostname"),
        gpu["gpu_id"].as_str().expect("gpu_id"),
    );
    let (key, value) = stored
        .iter()
        .find(|(k, _)| k.starts_with(&prefix))
        .expect("a record of the GPU");
    let copy = format!("{}Z", &key[..key.len() - 1]);
    let mut kv = client.clone();
    kv.put(copy, value.clone(), None).await.expect("put");
    let garbage = format!("{}X", &key[..key.len() - 1]);
    kv.put(garbage, "not a record", None).await.expect("put");
    let mut records = 0;
    while records < 11 {
        match next(&mut socket).await {
            Frame::Json(frame) => records += frame["records"].as_array().map_or(0, Vec::len),
            Frame::Closed(close) => panic!("closed: {close:?}"),
        }
    }
    drop(socket);

    let text = http
        .get(format!("{}/metrics", gw.base))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    if let Err(complaints) = telemetry_harness::promtool_check_metrics(&text) {
        panic!("promtool check metrics:\n{complaints}\n---\n{text}");
    }
    let families: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for expected in [
        "gateway_build_info",
        "gateway_http_requests_total",
        "gateway_http_request_duration_seconds",
        "gateway_telemetry_page_scanned_records",
        "gateway_ws_records_sent_total",
        "gateway_live_records_total",
        "gateway_unreadable_records_total",
        "gateway_ws_subscribers",
    ] {
        assert!(families.contains(expected), "{expected} missing:\n{text}");
    }
    gw.shutdown().await;
}
