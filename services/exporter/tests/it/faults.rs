//! Faults: SIGKILL of the exporter at random moments, the TSDB killed mid-stream and restarted,
//! two exporters of one name (one paused past its lease, then killed), poison records, and
//! history compacted after the checkpoint with records expired meanwhile.

use std::time::Duration;

use etcd_client::{GetOptions, Txn, TxnOp};
use telemetry_shared::{Fields, Message, SchemaVersion, Timestamp};

use crate::helpers::*;

#[tokio::test]
async fn sigkill_at_random_moments_while_data_flows_then_exact_counts() {
    // Prometheus has an out-of-order window: requests hold several samples of a series.
    sigkill_at_random_moments(&[]).await;
}

#[tokio::test]
async fn sigkill_at_random_moments_with_one_sample_per_series() {
    // An unchecked server: every request holds at most one sample per series.
    sigkill_at_random_moments(&[("SERVER_CHECK", "off")]).await;
}

async fn sigkill_at_random_moments(server_check: &[(&str, &str)]) {
    let (server, client, probe) = etcd().await;
    let tsdb = prometheus().await;
    let collector = spawn_collector(&server, &client);
    let streamer = stream(&server, &client, "kill", 2, 400.0);
    let mut small = vec![("BATCH_SAMPLES", "150"), ("BATCH_WAIT", "10ms")];
    small.extend_from_slice(server_check);
    let mut mid_stream = 0;
    for i in 0..5 {
        // Each incarnation is killed a random moment after it became the active exporter.
        let id = format!("x-{i}");
        let mut vars = small.clone();
        vars.push(("EXPORTER_ID", &id));
        let mut exporter = start_exporter_process(&server, &tsdb, &vars);
        wait_active(&probe, &id).await;
        tokio::time::sleep(Duration::from_millis(random_below(600))).await;
        exporter.kill();
        if checkpoint(&probe).await.records < 4940 {
            mid_stream += 1;
        }
    }
    assert!(
        mid_stream >= 3,
        "only {mid_stream} of the 5 kills came mid-stream"
    );
    assert_eq!(streamer.await.expect("streamer"), 4940);
    probe.wait_drained(4940, SLOW).await;

    // The last incarnation serves /metrics, which promtool accepts.
    let port = telemetry_harness::free_port().expect("port");
    let port_text = port.to_string();
    let mut vars = small.clone();
    vars.push(("METRICS_PORT", &port_text));
    let mut exporter = start_exporter_process(&server, &tsdb, &vars);
    let cp = wait_exported(&probe, 4940).await;
    let metrics = telemetry_harness::scrape_metrics(port).await.expect("scrape");
    exporter.kill();
    assert_eq!((cp.records, cp.rejected, cp.expired), (4940, 0, 0), "{cp:?}");
    assert_exactly_once(&tsdb, &expected_samples(&probe).await).await;
    assert!(metrics.contains("exporter_records_exported_total"), "{metrics}");
    assert!(metrics.contains("exporter_active 1"), "{metrics}");
    if let Err(complaints) = telemetry_harness::promtool_check_metrics(&metrics) {
        panic!("promtool check metrics: {complaints}");
    }
    collector.shutdown().await.expect("collector ran");
}

#[tokio::test]
async fn the_tsdb_killed_mid_stream_and_restarted_loses_nothing_and_doubles_nothing() {
    let (server, client, probe) = etcd().await;
    let mut tsdb = prometheus().await;
    let collector = spawn_collector(&server, &client);
    let exporter = spawn_exporter(&server, &client, &tsdb, &[("BATCH_SAMPLES", "200")]);
    let streamer = stream(&server, &client, "restart", 1, 1000.0);
    let exported = telemetry_harness::eventually(Duration::from_secs(20), || async {
        checkpoint(&probe).await.records > 200
    })
    .await;
    assert!(exported, "exporting before the kill");
    tsdb.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stalled = checkpoint(&probe).await;
    tsdb.start_again().await.expect("prometheus starts again");
    assert_eq!(streamer.await.expect("streamer"), 2470);
    let cp = wait_exported(&probe, 2470).await;
    assert!(stalled.records < 2470, "the kill came mid-stream: {stalled:?}");
    assert_eq!((cp.records, cp.rejected), (2470, 0), "{cp:?}");
    assert_exactly_once(&tsdb, &expected_samples(&probe).await).await;
    let totals = exporter.shutdown().await.expect("exporter ran");
    assert!(totals.requests > 0);
    collector.shutdown().await.expect("collector ran");
}

#[tokio::test]
async fn two_exporters_of_one_name_one_paused_past_its_lease_then_killed() {
    let (server, client, probe) = etcd().await;
    let tsdb = prometheus().await;
    let collector = spawn_collector(&server, &client);
    let a = start_exporter_process(&server, &tsdb, &[("EXPORTER_ID", "a"), ("BATCH_SAMPLES", "100")]);
    wait_active(&probe, "a").await;
    let mut b = start_exporter_process(&server, &tsdb, &[("EXPORTER_ID", "b"), ("BATCH_SAMPLES", "100")]);
    let streamer = stream(&server, &client, "two", 1, 800.0);
    let exported = telemetry_harness::eventually(Duration::from_secs(20), || async {
        checkpoint(&probe).await.records > 100
    })
    .await;
    assert!(exported, "a exports");
    // a is paused past its lease: b takes over; a, resumed, must not disturb anything.
    a.pause().expect("SIGSTOP");
    wait_active(&probe, "b").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.resume().expect("SIGCONT");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Then b dies: a takes over after b's lease.
    b.kill();
    wait_active(&probe, "a").await;
    assert_eq!(streamer.await.expect("streamer"), 2470);
    probe.wait_drained(2470, SLOW).await;
    let cp = wait_exported(&probe, 2470).await;
    assert_eq!((cp.records, cp.rejected), (2470, 0), "{cp:?}");
    assert_exactly_once(&tsdb, &expected_samples(&probe).await).await;
    let log = a.log();
    assert!(log.contains("no longer the active exporter"), "{log}");
    assert!(b.log().contains("standing by"), "{}", b.log());
    collector.shutdown().await.expect("collector ran");
}

/// A v1 JSON record (the form of earlier releases, still read) for a made-up GPU.
fn record(gpu: &str, time: Timestamp, value: serde_json::Value) -> (String, Vec<u8>) {
    let mut fields = Fields::new();
    fields.insert("metric_name".into(), "DCGM_FI_DEV_GPU_TEMP".into());
    fields.insert("Hostname".into(), "poison-host".into());
    fields.insert("gpu_id".into(), gpu.into());
    fields.insert("uuid".into(), format!("GPU-poison-{gpu}").into());
    fields.insert("value".into(), value);
    let id = ulid::Ulid::generate();
    let message = Message {
        schema_version: SchemaVersion::V1,
        id,
        timestamp: time,
        idempotency_key: "cd".repeat(32),
        source: None,
        fields,
    };
    let key = keys().data_record("poison-host", gpu, &time.to_string(), &id.to_string());
    (key, serde_json::to_vec(&message).expect("json"))
}

#[tokio::test]
async fn poison_records_are_rejected_listed_and_never_block_the_stream() {
    let (server, client, probe) = etcd().await;
    let tsdb = prometheus().await;
    let collector = spawn_collector(&server, &client);
    let exporter = spawn_exporter(&server, &client, &tsdb, &[]);
    assert_eq!(
        stream(&server, &client, "p1", 1, 0.0).await.expect("streamer"),
        2470
    );
    wait_exported(&probe, 2470).await;
    // In one revision: a record without a numeric value, one older than Prometheus'
    // out-of-order window (Prometheus refuses it), and a good one.
    let now = Timestamp::now();
    let old = Timestamp::from_unix_millis(now.unix_millis() - 3 * 3600 * 1000).expect("time");
    let puts = [
        record("0", now, "n/a".into()),
        record("1", old, 40.0.into()),
        record("2", now, 41.0.into()),
    ];
    let ops: Vec<TxnOp> = puts
        .iter()
        .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), None))
        .collect();
    client.clone().txn(Txn::new().and_then(ops)).await.expect("put");
    // The stream goes on behind them.
    assert_eq!(
        stream(&server, &client, "p2", 1, 0.0).await.expect("streamer"),
        2470
    );
    let cp = wait_exported(&probe, 2470 * 2 + 3).await;
    assert_eq!((cp.records, cp.rejected), (2470 * 2 + 1, 2), "{cp:?}");

    let status = telemetry_admin::exporters(&client, &keys(), Some(NAME), 10)
        .await
        .expect("admin");
    let rejected = &status[0].rejected;
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!(status[0].rejected_listed, 2);
    let reason_of = |key: &str| {
        rejected
            .iter()
            .find(|r| r.key == key)
            .map(|r| r.reason.clone())
            .unwrap_or_default()
    };
    assert_eq!(reason_of(&puts[0].0), "field \"value\" is not a number");
    // Prometheus 2.42 says "HTTP 500: too old sample" (later releases 400).
    let refused = reason_of(&puts[1].0);
    assert!(
        refused.starts_with("HTTP ") && refused.contains("too old"),
        "{refused}"
    );
    let good = tsdb
        .query_number(
            "count_over_time(DCGM_FI_DEV_GPU_TEMP{Hostname=\"poison-host\"}[3h])",
            query_time(),
        )
        .await
        .expect("query");
    assert_eq!(good, 1.0, "only the good record of the three landed");
    exporter.shutdown().await.expect("exporter ran");
    collector.shutdown().await.expect("collector ran");
}

#[tokio::test]
async fn after_compaction_it_catches_up_from_the_data_keys_and_counts_what_expired() {
    let (server, client, probe) = etcd().await;
    let tsdb = prometheus().await;
    let collector = spawn_collector(&server, &client);
    let exporter = spawn_exporter(&server, &client, &tsdb, &[]);
    assert_eq!(
        stream(&server, &client, "c1", 1, 0.0).await.expect("streamer"),
        2470
    );
    let first = wait_exported(&probe, 2470).await;
    exporter.shutdown().await.expect("exporter ran");

    // While the exporter is stopped: a second pass, of which 100 records expire, and etcd
    // compacts away the history after the checkpoint.
    assert_eq!(
        stream(&server, &client, "c2", 1, 0.0).await.expect("streamer"),
        2470
    );
    probe.wait_drained(4940, SLOW).await;
    let options = GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_min_mod_revision(first.revision + 1);
    let resp = client
        .clone()
        .get(keys().data_prefix(), Some(options))
        .await
        .expect("list");
    let newer: Vec<Vec<u8>> = resp.kvs().iter().map(|kv| kv.key().to_vec()).collect();
    assert_eq!(newer.len(), 2470);
    for key in newer.iter().take(100) {
        client.clone().delete(key.clone(), None).await.expect("delete");
    }
    let revision = telemetry_shared::etcd::current_revision(&client, &keys().data_prefix())
        .await
        .expect("revision");
    client
        .clone()
        .compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .expect("compact");

    let exporter = spawn_exporter(&server, &client, &tsdb, &[]);
    let cp = wait_exported(&probe, 4940).await;
    assert_eq!((cp.records, cp.rejected, cp.expired), (4840, 0, 100), "{cp:?}");
    assert_eq!(cp.gaps.len(), 1, "{:?}", cp.gaps);
    let gap = &cp.gaps[0];
    assert_eq!((gap.from_revision, gap.expired), (first.revision, Some(100)));
    assert_eq!(gap.after, first.last_record_time);
    assert!(gap.before.is_some());
    assert_exactly_once(&tsdb, &expected_samples(&probe).await).await;
    let totals = exporter.shutdown().await.expect("exporter ran");
    assert_eq!(totals.expired, 100);
    let status = telemetry_admin::exporters(&client, &keys(), None, 10)
        .await
        .expect("admin");
    assert_eq!(status[0].checkpoint.expired, 100);
    collector.shutdown().await.expect("collector ran");
}
