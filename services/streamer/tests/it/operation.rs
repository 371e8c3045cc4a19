//! Operation: loop mode, backpressure, graceful shutdown, rate, configuration errors.

use std::time::Duration;

use etcd_client::{DeleteOptions, GetOptions};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

#[tokio::test]
async fn loop_mode_produces_new_messages_each_pass_and_stops_cleanly() {
    let (server, client, probe) = etcd().await;
    let csv = temp_csv(b"a,b\n1,x\n2,y\n3,z\n");
    let cfg = config(&server, csv.path(), &[("LOOP", "true")]);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(telemetry_streamer::run(cfg, client.clone(), shutdown.clone()));
    probe.wait_for_depth(9, Duration::from_secs(30)).await;
    shutdown.cancel();
    let totals = run.await.expect("joins").expect("stops cleanly");
    assert!(totals.passes >= 3, "{totals:?}");
    let queue = probe.queue().await;
    assert_eq!(queue.len() as u64, totals.enqueued);
    for pass in 0..3 {
        assert_rows_exactly_once(queue.values(), "test-w0", pass, 3);
    }
    // New messages each pass: distinct ids and distinct idempotency keys.
    let keys: std::collections::BTreeSet<&str> = queue.values().map(|m| m.idempotency_key.as_str()).collect();
    assert_eq!(keys.len(), queue.len());
    // The checkpoint is consistent with what is queued.
    let cp = probe.checkpoint("test-w0").await.expect("checkpoint");
    let in_pass = queue
        .values()
        .filter(|m| m.source.as_ref().is_some_and(|s| s.pass == cp.pass))
        .count() as u64;
    assert_eq!(in_pass, cp.row);
}

#[tokio::test]
async fn backpressure_waits_at_max_queue_depth_and_drops_nothing() {
    let (server, client, probe) = etcd().await;
    let (limit, batch, workers) = (200i64, 10i64, 2i64);
    let cfg = config(
        &server,
        &sample::path(),
        &[("MAX_QUEUE_DEPTH", "200"), ("BATCH_SIZE", "10"), ("WORKERS", "2")],
    );
    let run = tokio::spawn(telemetry_streamer::run(
        cfg,
        client.clone(),
        CancellationToken::new(),
    ));
    let keys = probe.keys();
    let mut max_seen = 0;
    let mut drained = 0i64;
    let mut saw_full_and_waiting = false;
    // A slow stand-in collector: drains 150 entries at a time, and only when the queue is full.
    while !run.is_finished() {
        let depth = probe.queue_depth().await;
        max_seen = max_seen.max(depth);
        if depth >= limit {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let after = probe.queue_depth().await;
            max_seen = max_seen.max(after);
            saw_full_and_waiting |= after <= limit + workers * batch;
            // Drain up to 150 entries with one range delete.
            let resp = client
                .clone()
                .get(
                    keys.queue_prefix(),
                    Some(GetOptions::new().with_prefix().with_keys_only().with_limit(150)),
                )
                .await
                .expect("range");
            if let (Some(first), Some(last)) = (resp.kvs().first(), resp.kvs().last()) {
                let mut end = last.key().to_vec();
                end.push(0);
                let deleted = client
                    .clone()
                    .delete(first.key(), Some(DeleteOptions::new().with_range(end)))
                    .await
                    .expect("delete");
                drained += deleted.deleted();
            }
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let totals = run.await.expect("joins").expect("run succeeds");
    assert_eq!(totals.enqueued, 2 * sample::ROWS);
    assert!(saw_full_and_waiting, "the streamer waited at the limit");
    assert!(
        max_seen <= limit + workers * batch,
        "depth {max_seen} exceeded the limit by more than one batch per worker"
    );
    assert_eq!(
        (drained + probe.queue_depth().await) as u64,
        2 * sample::ROWS,
        "no row dropped"
    );
    let _ = client
        .clone()
        .delete(keys.queue_prefix(), Some(DeleteOptions::new().with_prefix()))
        .await;
}

#[tokio::test]
async fn sigterm_finishes_in_flight_work_and_exits_zero() {
    let (server, _client, probe) = etcd().await;
    let csv = sample::path();
    let mut child = spawn_binary(&server, &csv, &[("RATE", "300")]);
    probe.wait_for_depth(100, Duration::from_secs(30)).await;
    child.terminate().expect("SIGTERM");
    let status = child.wait().await;
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    let depth = probe.queue_depth().await;
    assert!((depth as u64) < sample::ROWS, "stopped before the end ({depth})");
    let cp = probe.checkpoint("test-w0").await.expect("checkpoint");
    assert_eq!(cp.row as i64, depth, "checkpoint consistent with the queue");
    // And a restart completes the pass exactly once.
    assert!(spawn_binary(&server, &csv, &[]).wait().await.success());
    assert_rows_exactly_once(probe.queue().await.values(), "test-w0", 0, sample::ROWS);
}

#[tokio::test]
async fn fractional_rate_is_kept_per_worker() {
    let (server, client, probe) = etcd().await;
    let mut csv = b"n\n".to_vec();
    for i in 0..11 {
        csv.extend_from_slice(format!("{i}\n").as_bytes());
    }
    let csv = temp_csv(&csv);
    // 2.5 messages/s per worker: 11 messages span 10 intervals of 400 ms = 4 s.
    let cfg = config(&server, csv.path(), &[("RATE", "2.5"), ("WORKERS", "2")]);
    telemetry_streamer::run(cfg, client.clone(), CancellationToken::new())
        .await
        .expect("run");
    let queue = probe.queue().await;
    for w in 0..2 {
        let mut times: Vec<_> = queue
            .values()
            .filter(|m| {
                m.source
                    .as_ref()
                    .is_some_and(|s| s.stream_id == format!("test-w{w}"))
            })
            .map(|m| m.timestamp.as_datetime())
            .collect();
        times.sort();
        assert_eq!(times.len(), 11);
        let span = (times[10] - times[0]).num_milliseconds() as f64 / 1000.0;
        // Never faster than the rate (the limiter's promise); a loaded machine may be slower,
        // so the upper bound only catches a limiter that waits far too long.
        assert!(
            (4.0 * 0.98..=4.0 * 1.5).contains(&span),
            "worker {w}: 11 messages took {span} s, expected 4 s (never less than 3.92 s)"
        );
    }
}

#[tokio::test]
async fn configuration_errors_name_the_variable_and_missing_files_name_the_path() {
    let (server, _client, _probe) = etcd().await;
    let missing = std::path::Path::new("/nonexistent/telemetry.csv");
    let mut p = spawn_binary(&server, missing, &[]);
    assert!(!p.wait().await.success());
    assert!(p.log().contains("/nonexistent/telemetry.csv"), "{}", p.log());

    let mut p = spawn_binary(&server, &sample::path(), &[("RATE", "fast")]);
    assert!(!p.wait().await.success());
    assert!(p.log().contains("RATE"), "{}", p.log());

    let mut p = binary().start().expect("starts");
    assert!(!p.wait().await.success());
    assert!(p.log().contains("CSV_PATH"), "{}", p.log());
}
