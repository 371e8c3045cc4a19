//! Exactly-once enqueue: every row once, across crashes, concurrent same-id streamers and
//! re-sends.

use std::time::Duration;

use telemetry_shared::{Keyspace, SchemaVersion};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

#[tokio::test]
async fn one_shot_sample_enqueues_every_row_once_in_bounded_transactions() {
    let (server, client) = etcd().await;
    // A batch far above the per-transaction limit: the sink must split it into <= 128-op txns.
    let cfg = config(&server, &sample_csv(), &[("BATCH_SIZE", "1000")]);
    let totals = telemetry_streamer::run(cfg, client.clone(), CancellationToken::new())
        .await
        .expect("run succeeds");
    assert_eq!(totals.enqueued, 2470);
    assert_eq!((totals.duplicates, totals.skipped, totals.passes), (0, 0, 1));

    let queue = queue(&client).await;
    assert_eq!(queue.len(), 2470);
    assert_rows_exactly_once(&queue, "test-w0", 0, 2470);
    let cp = checkpoint(&client, "test-w0").await.expect("checkpoint");
    assert_eq!((cp.pass, cp.row, cp.pass_complete), (0, 2470, true));

    // One dedup marker per message, all attached to one shared (bucket) lease.
    let keys = Keyspace::new(NS);
    let markers = client
        .clone()
        .get(
            keys.dedup_prefix(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("markers");
    assert_eq!(markers.kvs().len(), 2470);
    let leases: std::collections::BTreeSet<i64> = markers.kvs().iter().map(|kv| kv.lease()).collect();
    assert!(
        leases.len() <= 2 && !leases.contains(&0),
        "markers share a bucket lease: {leases:?}"
    );

    // Every message validates against the shipped JSON Schema and is typed per the rules.
    let schema: serde_json::Value = serde_json::from_str(SchemaVersion::V1.json_schema()).expect("schema");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    for (key, msg) in &queue {
        let (partition, id) = keys.parse_queue_entry(key).expect("queue key layout");
        assert_eq!(id, msg.id.to_string());
        assert!(partition < telemetry_shared::keys::QUEUE_PARTITIONS);
        let value = serde_json::to_value(msg).expect("encodes");
        assert!(
            validator.is_valid(&value),
            "message {key} does not match schemas/v1.json"
        );
        assert_eq!(msg.fields.len(), 12);
        assert!(msg.fields["gpu_id"].is_f64());
        assert!(msg.fields["value"].is_f64());
        assert_eq!(msg.fields["container"], serde_json::json!(""));
        assert!(
            msg.fields["labels_raw"]
                .as_str()
                .expect("string")
                .contains("DCGM_FI_DRIVER_VERSION=\"535.129.03\"")
        );
        assert_eq!(msg.timestamp.to_string().len(), 27, "fixed-width timestamp");
    }
}

#[tokio::test]
async fn sigkill_mid_file_then_restart_enqueues_each_row_exactly_once() {
    let (server, client) = etcd().await;
    let csv = sample_csv();
    // Rate-limited so that the kill lands mid-file.
    let mut child = spawn_binary(&server, &csv, &[("RATE", "400"), ("BATCH_SIZE", "7")]);
    wait_for_depth(&client, 300).await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();

    let depth = queue_depth(&client).await;
    assert!(depth > 0 && depth < 2470, "killed mid-file (depth {depth})");
    let cp = checkpoint(&client, "test-w0").await.expect("checkpoint");
    assert_eq!(
        cp.row as i64, depth,
        "the checkpoint is exactly what was enqueued"
    );
    assert!(!cp.pass_complete);

    let restarted = spawn_binary(&server, &csv, &[]);
    let out = restarted.wait_with_output().expect("waits");
    assert!(
        out.status.success(),
        "restart exits 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queue = queue(&client).await;
    assert_eq!(queue.len(), 2470);
    assert_rows_exactly_once(&queue, "test-w0", 0, 2470);
}

#[tokio::test]
async fn two_concurrent_streamers_with_the_same_id_enqueue_each_row_once() {
    let (server, client) = etcd().await;
    let cfg = config(&server, &sample_csv(), &[("BATCH_SIZE", "13")]);
    let a = tokio::spawn(telemetry_streamer::run(
        cfg.clone(),
        client.clone(),
        CancellationToken::new(),
    ));
    let b = tokio::spawn(telemetry_streamer::run(
        cfg,
        client.clone(),
        CancellationToken::new(),
    ));
    let ta = a.await.expect("joins").expect("a succeeds");
    let tb = b.await.expect("joins").expect("b succeeds");
    assert_eq!(ta.enqueued + tb.enqueued, 2470, "a {ta:?} b {tb:?}");
    let queue = queue(&client).await;
    assert_eq!(queue.len(), 2470);
    assert_rows_exactly_once(&queue, "test-w0", 0, 2470);
}

#[tokio::test]
async fn two_concurrent_processes_with_the_same_id_enqueue_each_row_once() {
    let (server, client) = etcd().await;
    let csv = sample_csv();
    let a = spawn_binary(&server, &csv, &[("BATCH_SIZE", "5"), ("RATE", "2000")]);
    let b = spawn_binary(&server, &csv, &[("BATCH_SIZE", "5"), ("RATE", "2000")]);
    for child in [a, b] {
        let out = child.wait_with_output().expect("waits");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let queue = queue(&client).await;
    assert_eq!(queue.len(), 2470);
    assert_rows_exactly_once(&queue, "test-w0", 0, 2470);
}

#[tokio::test]
async fn re_sent_rows_are_absorbed_by_the_dedup_marker() {
    let (server, client) = etcd().await;
    let cfg = config(&server, &sample_csv(), &[]);
    let first = telemetry_streamer::run(cfg.clone(), client.clone(), CancellationToken::new())
        .await
        .expect("first run");
    assert_eq!(first.enqueued, 2470);
    // Forget the checkpoint: the streamer re-sends every row of pass 0 with new message ids.
    client
        .clone()
        .delete(Keyspace::new(NS).stream_checkpoint("test-w0"), None)
        .await
        .expect("delete checkpoint");
    let second = telemetry_streamer::run(cfg, client.clone(), CancellationToken::new())
        .await
        .expect("second run");
    assert_eq!((second.enqueued, second.duplicates), (0, 2470));
    assert_eq!(queue_depth(&client).await, 2470);
}

#[tokio::test]
async fn each_worker_streams_the_whole_file_under_its_own_stream_id() {
    let (server, client) = etcd().await;
    let cfg = config(&server, &sample_csv(), &[("WORKERS", "3")]);
    let totals = telemetry_streamer::run(cfg, client.clone(), CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(totals.enqueued, 3 * 2470);
    let queue = queue(&client).await;
    for w in 0..3 {
        assert_rows_exactly_once(&queue, &format!("test-w{w}"), 0, 2470);
    }
    // Idempotency keys differ between workers (they are different streams).
    let keys: std::collections::BTreeSet<&str> = queue.values().map(|m| m.idempotency_key.as_str()).collect();
    assert_eq!(keys.len(), 3 * 2470);
    let _ = Duration::ZERO;
}
