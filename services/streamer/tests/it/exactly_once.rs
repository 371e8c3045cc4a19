//! Exactly-once enqueue: every row once, across crashes, concurrent same-id streamers and
//! re-sends.

use std::time::Duration;

use telemetry_shared::SchemaVersion;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

#[tokio::test]
async fn one_shot_sample_enqueues_every_row_once_in_bounded_transactions() {
    let (server, client, probe) = etcd().await;
    // A batch far above the per-transaction limit: the sink must split it into <= 128-op txns.
    let cfg = config(&server, &sample::path(), &[("BATCH_SIZE", "1000")]);
    let totals = telemetry_streamer::run(cfg, client.clone(), CancellationToken::new())
        .await
        .expect("run succeeds");
    assert_eq!(totals.enqueued, sample::ROWS);
    assert_eq!((totals.duplicates, totals.skipped, totals.passes), (0, 0, 1));

    let queue = probe.queue().await;
    assert_eq!(queue.len() as u64, sample::ROWS);
    assert_rows_exactly_once(queue.values(), "test-w0", 0, sample::ROWS);
    let cp = probe.checkpoint("test-w0").await.expect("checkpoint");
    assert_eq!((cp.pass, cp.row, cp.pass_complete), (0, sample::ROWS, true));

    // The checkpoint alone deduplicates a CSV stream: no marker per message. Its origin (the
    // first checkpoint) stays, so a deleted checkpoint is noticed.
    assert_eq!(probe.count(&probe.keys().dedup_prefix()).await, 0);
    assert_eq!(probe.count(&probe.keys().stream_origin("test-w0")).await, 1);

    // Every message validates against the shipped JSON Schema and is typed per the rules.
    let schema: serde_json::Value = serde_json::from_str(SchemaVersion::V1.json_schema()).expect("schema");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    for (key, msg) in &queue {
        let (partition, id) = probe.keys().parse_queue_entry(key).expect("queue key layout");
        assert_eq!(id, msg.id.to_string());
        assert!(partition < telemetry_shared::keys::QUEUE_PARTITIONS);
        let value = serde_json::to_value(msg).expect("encodes");
        assert!(
            validator.is_valid(&value),
            "message {key} does not match schemas/v1.json"
        );
        assert_eq!(msg.fields.len(), sample::COLUMNS);
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
    let (server, _client, probe) = etcd().await;
    let csv = sample::path();
    // Rate-limited so that the kill lands mid-file.
    let mut child = spawn_binary(&server, &csv, &[("RATE", "400"), ("BATCH_SIZE", "7")]);
    probe.wait_for_depth(300, Duration::from_secs(30)).await;
    child.kill();

    let depth = probe.queue_depth().await;
    assert!(
        depth > 0 && (depth as u64) < sample::ROWS,
        "killed mid-file (depth {depth})"
    );
    let cp = probe.checkpoint("test-w0").await.expect("checkpoint");
    assert_eq!(
        cp.row as i64, depth,
        "the checkpoint is exactly what was enqueued"
    );
    assert!(!cp.pass_complete);

    let mut restarted = spawn_binary(&server, &csv, &[]);
    assert!(
        restarted.wait().await.success(),
        "restart exits 0: {}",
        restarted.log()
    );
    let queue = probe.queue().await;
    assert_eq!(queue.len() as u64, sample::ROWS);
    assert_rows_exactly_once(queue.values(), "test-w0", 0, sample::ROWS);
}

#[tokio::test]
async fn two_concurrent_streamers_with_the_same_id_enqueue_each_row_once() {
    let (server, client, probe) = etcd().await;
    let cfg = config(&server, &sample::path(), &[("BATCH_SIZE", "13")]);
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
    assert_eq!(ta.enqueued + tb.enqueued, sample::ROWS, "a {ta:?} b {tb:?}");
    let queue = probe.queue().await;
    assert_eq!(queue.len() as u64, sample::ROWS);
    assert_rows_exactly_once(queue.values(), "test-w0", 0, sample::ROWS);
}

#[tokio::test]
async fn two_concurrent_processes_with_the_same_id_enqueue_each_row_once() {
    let (server, _client, probe) = etcd().await;
    let csv = sample::path();
    let a = spawn_binary(&server, &csv, &[("BATCH_SIZE", "5"), ("RATE", "2000")]);
    let b = spawn_binary(&server, &csv, &[("BATCH_SIZE", "5"), ("RATE", "2000")]);
    for mut child in [a, b] {
        assert!(child.wait().await.success(), "{}", child.log());
    }
    let queue = probe.queue().await;
    assert_eq!(queue.len() as u64, sample::ROWS);
    assert_rows_exactly_once(queue.values(), "test-w0", 0, sample::ROWS);
}

#[tokio::test]
async fn a_deleted_checkpoint_is_refused_instead_of_sending_the_file_again() {
    let (server, client, probe) = etcd().await;
    let cfg = config(&server, &sample::path(), &[]);
    let first = telemetry_streamer::run(cfg.clone(), client.clone(), CancellationToken::new())
        .await
        .expect("first run");
    assert_eq!(first.enqueued, sample::ROWS);
    // Forget the checkpoint: without it every row of pass 0 would go again with new message ids.
    client
        .clone()
        .delete(probe.keys().stream_checkpoint("test-w0"), None)
        .await
        .expect("delete checkpoint");
    let err = telemetry_streamer::run(cfg, client.clone(), CancellationToken::new())
        .await
        .expect_err("the stream's origin says its checkpoint was deleted");
    let text = err.to_string();
    assert!(
        text.contains("test-w0") && text.contains("deleted") && text.contains("STREAM_ID"),
        "{text}"
    );
    assert_eq!(
        probe.queue_depth().await as u64,
        sample::ROWS,
        "nothing sent twice"
    );
}

#[tokio::test]
async fn each_worker_streams_the_whole_file_under_its_own_stream_id() {
    let (server, client, probe) = etcd().await;
    let cfg = config(&server, &sample::path(), &[("WORKERS", "3")]);
    let totals = telemetry_streamer::run(cfg, client.clone(), CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(totals.enqueued, 3 * sample::ROWS);
    let queue = probe.queue().await;
    for w in 0..3 {
        assert_rows_exactly_once(queue.values(), &format!("test-w{w}"), 0, sample::ROWS);
    }
    // Idempotency keys differ between workers (they are different streams).
    let keys: std::collections::BTreeSet<&str> = queue.values().map(|m| m.idempotency_key.as_str()).collect();
    assert_eq!(keys.len() as u64, 3 * sample::ROWS);
}
