//! The sample through 1 and 3 collectors: exact counts, indexes and counters.

use std::{collections::BTreeSet, time::Duration};

use telemetry_shared::model::GpuInfo;

use crate::helpers::*;

#[tokio::test]
async fn sample_through_one_collector_lands_exactly_once_with_indexes_and_counters() {
    let (server, client, probe) = etcd().await;
    stream_sample(&server, &client).await;
    let collector = spawn_collector(&server, &client, "c1", &[]);
    probe.wait_drained(sample::ROWS as i64, DRAIN).await;
    let totals = collector.shutdown().await;
    assert_eq!(totals.processed, sample::ROWS);
    assert_sample_exactly_once(&probe).await;

    // Data keys follow the layout and sort by time within a GPU.
    let keys = probe.keys();
    for (key, msg) in &probe.records().await {
        let host = msg.fields["Hostname"].as_str().expect("host");
        let gpu = msg.fields["gpu_id"].as_f64().expect("gpu id") as i64;
        assert_eq!(
            key,
            &keys.data_record(
                host,
                &gpu.to_string(),
                &msg.timestamp.to_string(),
                &msg.id.to_string()
            )
        );
    }

    // Indexes and counters answer the gateway's questions without a scan.
    let gpus: Vec<GpuInfo> = probe
        .range(&keys.gpu_index_prefix())
        .await
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).expect("gpu info"))
        .collect();
    assert_eq!(
        gpus.len(),
        sample::GPUS,
        "247 GPUs (gpu_id is unique only per host)"
    );
    let pairs: BTreeSet<(String, String)> = gpus
        .iter()
        .map(|g| (g.hostname.clone(), g.gpu_id.clone()))
        .collect();
    assert_eq!(pairs.len(), sample::GPUS);
    assert!(gpus.iter().all(|g| g.model.as_deref() == Some(sample::MODEL)));
    assert_eq!(
        probe.count(&keys.host_index_prefix()).await as usize,
        sample::HOSTS
    );
    let s = probe.stats().await;
    assert_eq!((s.records, s.duplicates, s.dead_letters), (sample::ROWS, 0, 0));
    // Graceful shutdown revoked the lease: no registration or ownership left behind.
    assert_eq!(probe.count(&keys.collectors_prefix()).await, 0);
}

#[tokio::test]
async fn sample_through_three_collectors_shares_the_load_exactly_once() {
    let (server, client, probe) = etcd().await;
    let collectors: Vec<_> = (0..3)
        .map(|i| spawn_collector(&server, &client, &format!("c{i}"), &[]))
        .collect();
    // Let the group settle so that every collector owns its share before data flows.
    let settled = telemetry_harness::eventually(Duration::from_secs(20), || async {
        let owners = probe.owners().await;
        owners.values().sum::<usize>() == 32 && owners.len() == 3
    })
    .await;
    assert!(settled, "32 partitions split over 3 collectors");
    stream_sample(&server, &client).await;
    probe.wait_drained(sample::ROWS as i64, DRAIN).await;
    let mut processed = Vec::new();
    for c in collectors {
        processed.push(c.shutdown().await.processed);
    }
    assert_eq!(processed.iter().sum::<u64>(), sample::ROWS, "{processed:?}");
    assert!(
        processed.iter().all(|p| *p > 0),
        "every collector did some work: {processed:?}"
    );
    assert_sample_exactly_once(&probe).await;
    assert_eq!(probe.stats().await.records, sample::ROWS);
}

#[tokio::test]
async fn partitions_rebalance_fairly_as_collectors_join_and_move_at_once_when_one_leaves() {
    let (server, client, probe) = etcd().await;
    // A long TTL: if partitions moved only by lease expiry, this test would time out.
    let ttl = [("LEASE_TTL", "30s")];
    let c1 = spawn_collector(&server, &client, "c1", &ttl);
    probe.wait_owned_by("c1", 32, Duration::from_secs(20)).await;
    let c2 = spawn_collector(&server, &client, "c2", &ttl);
    let c3 = spawn_collector(&server, &client, "c3", &ttl);
    let fair = telemetry_harness::eventually(Duration::from_secs(20), || async {
        let held = probe.owners().await;
        let mut sizes: Vec<usize> = held.values().copied().collect();
        sizes.sort_unstable();
        held.len() == 3 && sizes == vec![10, 11, 11]
    })
    .await;
    assert!(fair, "3 collectors hold 10/11/11: {:?}", probe.owners().await);

    // c2 leaves gracefully: it revokes its lease, so its partitions move at once.
    let left = std::time::Instant::now();
    c2.shutdown().await;
    let moved = telemetry_harness::eventually(Duration::from_secs(10), || async {
        let held = probe.owners().await;
        held.get("c1") == Some(&16) && held.get("c3") == Some(&16)
    })
    .await;
    assert!(moved, "c1 and c3 hold 16 each: {:?}", probe.owners().await);
    assert!(
        left.elapsed() < Duration::from_secs(10),
        "moved long before the 30 s TTL"
    );

    // Data still flows exactly once after the rebalance.
    stream_sample(&server, &client).await;
    probe.wait_drained(sample::ROWS as i64, DRAIN).await;
    c1.shutdown().await;
    c3.shutdown().await;
    assert_sample_exactly_once(&probe).await;
}

#[tokio::test]
async fn the_collector_binary_serves_prometheus_metrics() {
    let (server, client, probe) = etcd().await;
    stream_sample(&server, &client).await;
    let port = telemetry_harness::free_port().expect("free port");
    let mut child = spawn_collector_process(&server, "m", &[("METRICS_PORT", &port.to_string())]);
    probe.wait_drained(sample::ROWS as i64, DRAIN).await;
    let scrape = || async {
        telemetry_harness::scrape_metrics(port)
            .await
            .expect("the metrics port answers")
    };
    // The queue depth and lag gauges are refreshed every 5 s.
    let processed = format!("collector_processed_total {}", sample::ROWS);
    let ok = telemetry_harness::eventually(Duration::from_secs(15), || async {
        let body = scrape().await;
        body.contains(&processed) && body.contains("collector_queue_depth")
    })
    .await;
    let body = scrape().await;
    child.kill();
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

/// `/livez` and `/readyz` beside `/metrics`: ready once its session is up and its partitions
/// are loaded; not ready (etcd, and soon the session) while etcd is down, but still live; ready
/// again once etcd is back.
#[tokio::test]
async fn the_collector_probes_follow_its_session_and_etcd() {
    let (mut server, _client, _probe) = etcd().await;
    let port = telemetry_harness::free_port().expect("free port");
    let mut child = spawn_collector_process(
        &server,
        "p",
        &[("METRICS_PORT", &port.to_string()), ("LEASE_TTL", "3s")],
    );
    let get = |path: &'static str| async move {
        let (status, body) = telemetry_harness::http_get(port, path).await.expect("answers");
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        (status, body)
    };
    let ready = |want: u16| async move {
        telemetry_harness::eventually(Duration::from_secs(30), || async {
            get("/readyz").await.0 == want
        })
        .await
    };
    assert!(ready(200).await, "{}", get("/readyz").await.1);
    let (_, body) = get("/readyz").await;
    for check in ["etcd", "session", "partitions"] {
        assert_eq!(body["checks"][check]["ok"], true, "{check}: {body}");
    }
    let (status, live) = get("/livez").await;
    assert_eq!(status, 200, "{live}");
    assert_eq!(live["checks"]["sessions"]["ok"], true, "{live}");

    server.member().kill();
    assert!(ready(503).await, "{}", get("/readyz").await.1);
    assert_eq!(get("/readyz").await.1["checks"]["etcd"]["ok"], false);
    assert_eq!(
        get("/livez").await.0,
        200,
        "an etcd outage is no reason to restart"
    );

    server.restart().await.expect("etcd restarts");
    assert!(ready(200).await, "{}", get("/readyz").await.1);
    child.kill();
}
