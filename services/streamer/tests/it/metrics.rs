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
