//! The real binary's `/metrics`, scraped while it streams: what `promtool check metrics` says,
//! and that every metric it exports is one the streamer's table describes.

use std::{collections::BTreeSet, time::Duration};

use telemetry_shared::observe::SHARED_METRICS;

use crate::helpers::*;

#[tokio::test]
async fn the_metrics_endpoint_passes_promtool_and_matches_the_table() {
    let (server, _client, probe) = etcd().await;
    let port = telemetry_harness::free_port().expect("a free port");
    let port_var = port.to_string();
    // A malformed row (row 2) so that the skip counter moves too.
    let csv = temp_csv(b"a,b\n1,x\n2\n3,z\n");
    let mut child = spawn_binary(
        &server,
        csv.path(),
        &[
            ("LOOP", "true"),
            ("METRICS_PORT", port_var.as_str()),
            ("BATCH_SIZE", "1"),
        ],
    );
    probe.wait_for_depth(4, Duration::from_secs(30)).await;
    let text = telemetry_harness::scrape_metrics(port)
        .await
        .expect("the metrics endpoint answers");
    child.terminate().expect("SIGTERM");
    assert!(child.wait().await.success(), "{}", child.log());

    if let Err(complaints) = telemetry_harness::promtool_check_metrics(&text) {
        panic!("promtool check metrics:\n{complaints}\n{text}");
    }
    let known: BTreeSet<&str> = telemetry_streamer::events::METRICS
        .iter()
        .chain(SHARED_METRICS)
        .map(|m| m.name)
        .chain(["streamer_build_info"])
        .collect();
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let unknown: Vec<&&str> = exported.difference(&known).collect();
    assert!(unknown.is_empty(), "exported but not in the table: {unknown:?}");
    for name in [
        "streamer_build_info",
        "streamer_rows_enqueued_total",
        "streamer_rows_skipped_total",
        "streamer_passes_total",
        "streamer_txn_seconds",
    ] {
        assert!(exported.contains(name), "{name} missing:\n{text}");
    }
    assert!(text.contains("# TYPE streamer_txn_seconds histogram"), "{text}");
}

/// `/livez` and `/readyz` beside `/metrics`: ready while it streams, not ready (with etcd as the
/// reason) while etcd is down, but still live; ready again once etcd is back.
#[tokio::test]
async fn the_probes_follow_etcd_and_the_workers() {
    let (mut server, _client, probe) = etcd().await;
    let port = telemetry_harness::free_port().expect("a free port");
    let port_var = port.to_string();
    let csv = temp_csv(b"a,b\n1,x\n2,y\n3,z\n");
    let mut child = spawn_binary(
        &server,
        csv.path(),
        &[
            ("LOOP", "true"),
            ("RATE", "20"),
            ("METRICS_PORT", port_var.as_str()),
        ],
    );
    probe.wait_for_depth(3, Duration::from_secs(30)).await;
    let get = |path: &'static str| async move {
        let (status, body) = telemetry_harness::http_get(port, path).await.expect("answers");
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        (status, body)
    };
    let (status, live) = get("/livez").await;
    assert_eq!(
        (status, &live["status"]),
        (200, &serde_json::json!("ok")),
        "{live}"
    );
    assert_eq!(live["checks"]["worker 0"]["ok"], true, "{live}");
    let ready = |want: u16| async move {
        telemetry_harness::eventually(Duration::from_secs(30), || async {
            get("/readyz").await.0 == want
        })
        .await
    };
    assert!(ready(200).await, "{}", get("/readyz").await.1);
    let (_, body) = get("/readyz").await;
    assert_eq!(body["checks"]["stream"]["ok"], true, "{body}");

    server.member().kill();
    assert!(ready(503).await, "{}", get("/readyz").await.1);
    let (_, body) = get("/readyz").await;
    assert_eq!(body["checks"]["etcd"]["ok"], false, "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|r| r.contains("etcd: ")),
        "{body}"
    );
    assert_eq!(
        get("/livez").await.0,
        200,
        "an etcd outage is no reason to restart"
    );

    server.restart().await.expect("etcd restarts");
    assert!(ready(200).await, "{}", get("/readyz").await.1);
    child.terminate().expect("SIGTERM");
    assert!(child.wait().await.success(), "{}", child.log());
}
