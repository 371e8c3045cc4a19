//! The sample through 1 and 3 collectors: exact counts, indexes and counters.

use std::{collections::BTreeSet, time::Duration};

use telemetry_harness::{count, range_all};
use telemetry_shared::model::GpuInfo;

use crate::helpers::*;

#[tokio::test]
async fn sample_through_one_collector_lands_exactly_once_with_indexes_and_counters() {
    let (server, client) = etcd().await;
    stream_sample(&server, &client).await;
    let collector = spawn_collector(&server, &client, "c1", &[]);
    wait_drained(&client, 2470, Duration::from_secs(60)).await;
    let totals = collector.shutdown().await;
    assert_eq!(totals.processed, 2470);
    assert_sample_exactly_once(&client).await;

    // Data keys follow the layout and sort by time within a GPU.
    let records = records(&client).await;
    for (key, msg) in &records {
        let host = msg.fields["Hostname"].as_str().expect("host");
        let gpu = msg.fields["gpu_id"].as_f64().expect("gpu id") as i64;
        assert_eq!(
            key,
            &keys().data_record(
                host,
                &gpu.to_string(),
                &msg.timestamp.to_string(),
                &msg.id.to_string()
            )
        );
    }

    // Indexes and counters answer the gateway's questions without a scan.
    let gpus: Vec<GpuInfo> = range_all(&client, &keys().gpu_index_prefix())
        .await
        .expect("range")
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).expect("gpu info"))
        .collect();
    assert_eq!(gpus.len(), 247, "247 GPUs (gpu_id is unique only per host)");
    let pairs: BTreeSet<(String, String)> = gpus
        .iter()
        .map(|g| (g.hostname.clone(), g.gpu_id.clone()))
        .collect();
    assert_eq!(pairs.len(), 247);
    assert!(
        gpus.iter()
            .all(|g| g.model.as_deref() == Some("NVIDIA H100 80GB HBM3"))
    );
    assert_eq!(
        count(&client, &keys().host_index_prefix()).await.expect("count"),
        31
    );
    let s = stats(&client).await;
    assert_eq!((s.records, s.duplicates, s.dead_letters), (2470, 0, 0));
    // Graceful shutdown revoked the lease: no registration or ownership left behind.
    assert_eq!(
        count(&client, &keys().collectors_prefix()).await.expect("count"),
        0
    );
}

#[tokio::test]
async fn sample_through_three_collectors_shares_the_load_exactly_once() {
    let (server, client) = etcd().await;
    let collectors: Vec<_> = (0..3)
        .map(|i| spawn_collector(&server, &client, &format!("c{i}"), &[]))
        .collect();
    // Let the group settle so that every collector owns its share before data flows.
    let settled = telemetry_harness::eventually(Duration::from_secs(20), || async {
        let owners = range_all(&client, &keys().owners_prefix()).await.expect("range");
        let holders: BTreeSet<Vec<u8>> = owners.iter().map(|(_, v)| v.clone()).collect();
        owners.len() == 32 && holders.len() == 3
    })
    .await;
    assert!(settled, "32 partitions split over 3 collectors");
    stream_sample(&server, &client).await;
    wait_drained(&client, 2470, Duration::from_secs(60)).await;
    let mut processed = Vec::new();
    for c in collectors {
        processed.push(c.shutdown().await.processed);
    }
    assert_eq!(processed.iter().sum::<u64>(), 2470, "{processed:?}");
    assert!(
        processed.iter().all(|p| *p > 0),
        "every collector did some work: {processed:?}"
    );
    assert_sample_exactly_once(&client).await;
    assert_eq!(stats(&client).await.records, 2470);
}

async fn ownership(client: &etcd_client::Client) -> std::collections::BTreeMap<String, usize> {
    let mut held = std::collections::BTreeMap::new();
    for (_, v) in range_all(client, &keys().owners_prefix()).await.expect("range") {
        *held.entry(String::from_utf8_lossy(&v).into_owned()).or_default() += 1;
    }
    held
}

#[tokio::test]
async fn partitions_rebalance_fairly_as_collectors_join_and_move_at_once_when_one_leaves() {
    let (server, client) = etcd().await;
    // A long TTL: if partitions moved only by lease expiry, this test would time out.
    let ttl = [("LEASE_TTL", "30s")];
    let c1 = spawn_collector(&server, &client, "c1", &ttl);
    assert!(
        telemetry_harness::eventually(Duration::from_secs(20), || async {
            ownership(&client).await.get("c1") == Some(&32)
        })
        .await
    );
    let c2 = spawn_collector(&server, &client, "c2", &ttl);
    let c3 = spawn_collector(&server, &client, "c3", &ttl);
    let fair = telemetry_harness::eventually(Duration::from_secs(20), || async {
        let held = ownership(&client).await;
        let mut sizes: Vec<usize> = held.values().copied().collect();
        sizes.sort_unstable();
        held.len() == 3 && sizes == vec![10, 11, 11]
    })
    .await;
    assert!(fair, "3 collectors hold 10/11/11: {:?}", ownership(&client).await);

    // c2 leaves gracefully: it revokes its lease, so its partitions move at once.
    let left = std::time::Instant::now();
    c2.shutdown().await;
    let moved = telemetry_harness::eventually(Duration::from_secs(10), || async {
        let held = ownership(&client).await;
        held.get("c1") == Some(&16) && held.get("c3") == Some(&16)
    })
    .await;
    assert!(moved, "c1 and c3 hold 16 each: {:?}", ownership(&client).await);
    assert!(
        left.elapsed() < Duration::from_secs(10),
        "moved long before the 30 s TTL"
    );

    // Data still flows exactly once after the rebalance.
    stream_sample(&server, &client).await;
    wait_drained(&client, 2470, Duration::from_secs(60)).await;
    c1.shutdown().await;
    c3.shutdown().await;
    assert_sample_exactly_once(&client).await;
}

/// Scrapes `/metrics` with a bare HTTP/1.0 request (no client library needed for a test).
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port answers");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    // The body, after the status line and headers.
    match response.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => response,
    }
}

#[tokio::test]
async fn the_collector_binary_serves_prometheus_metrics() {
    let (server, client) = etcd().await;
    stream_sample(&server, &client).await;
    let port = telemetry_harness::free_port().expect("free port");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn_collector_process(
        &server,
        "m",
        &dir.path().join("m.log"),
        &[("METRICS_PORT", &port.to_string())],
    );
    wait_drained(&client, 2470, Duration::from_secs(60)).await;
    // The queue depth and lag gauges are refreshed every 5 s.
    let ok = telemetry_harness::eventually(Duration::from_secs(15), || async {
        let body = scrape(port);
        body.contains("collector_processed_total 2470") && body.contains("collector_queue_depth")
    })
    .await;
    let body = scrape(port);
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "metrics:\n{body}");
    for name in [
        "collector_duplicates_total",
        "collector_dead_lettered_total",
        "collector_lag_seconds",
        "collector_partitions_owned",
        "collector_commit_seconds_bucket",
        "collector_build_info",
        "# HELP collector_processed_total",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    // Every metric has help and type, histograms have buckets: what promtool checks.
    if let Err(complaints) = telemetry_harness::promtool_check_metrics(&body) {
        panic!("promtool check metrics:\n{complaints}\n{body}");
    }
}
