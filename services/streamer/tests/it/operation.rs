//! Operation: loop mode, backpressure, graceful shutdown, rate, configuration errors.

use std::time::Duration;

use etcd_client::{DeleteOptions, GetOptions};
use nix::{sys::signal::Signal, unistd::Pid};
use telemetry_shared::Keyspace;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

#[tokio::test]
async fn loop_mode_produces_new_messages_each_pass_and_stops_cleanly() {
    let (server, client) = etcd().await;
    let csv = temp_csv(b"a,b\n1,x\n2,y\n3,z\n");
    let cfg = config(&server, csv.path(), &[("LOOP", "true")]);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(telemetry_streamer::run(cfg, client.clone(), shutdown.clone()));
    wait_for_depth(&client, 9).await;
    shutdown.cancel();
    let totals = run.await.expect("joins").expect("stops cleanly");
    assert!(totals.passes >= 3, "{totals:?}");
    let queue = queue(&client).await;
    assert_eq!(queue.len() as u64, totals.enqueued);
    for pass in 0..3 {
        assert_rows_exactly_once(&queue, "test-w0", pass, 3);
    }
    // New messages each pass: distinct ids and distinct idempotency keys.
    let keys: std::collections::BTreeSet<&str> = queue.values().map(|m| m.idempotency_key.as_str()).collect();
    assert_eq!(keys.len(), queue.len());
    // The checkpoint is consistent with what is queued.
    let cp = checkpoint(&client, "test-w0").await.expect("checkpoint");
    let in_pass = queue
        .values()
        .filter(|m| m.source.as_ref().is_some_and(|s| s.pass == cp.pass))
        .count() as u64;
    assert_eq!(in_pass, cp.row);
}

#[tokio::test]
async fn backpressure_waits_at_max_queue_depth_and_drops_nothing() {
    let (server, client) = etcd().await;
    let (limit, batch, workers) = (200i64, 10i64, 2i64);
    let cfg = config(
        &server,
        &sample_csv(),
        &[("MAX_QUEUE_DEPTH", "200"), ("BATCH_SIZE", "10"), ("WORKERS", "2")],
    );
    let run = tokio::spawn(telemetry_streamer::run(
        cfg,
        client.clone(),
        CancellationToken::new(),
    ));
    let keys = Keyspace::new(NS);
    let mut max_seen = 0;
    let mut drained = 0i64;
    let mut saw_full_and_waiting = false;
    // A slow stand-in collector: drains 150 entries at a time, and only when the queue is full.
    while !run.is_finished() {
        let depth = queue_depth(&client).await;
        max_seen = max_seen.max(depth);
        if depth >= limit {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let after = queue_depth(&client).await;
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
    assert_eq!(totals.enqueued, 2 * 2470);
    assert!(saw_full_and_waiting, "the streamer waited at the limit");
    assert!(
        max_seen <= limit + workers * batch,
        "depth {max_seen} exceeded the limit by more than one batch per worker"
    );
    assert_eq!(drained + queue_depth(&client).await, 2 * 2470, "no row dropped");
    let _ = client
        .clone()
        .delete(keys.queue_prefix(), Some(DeleteOptions::new().with_prefix()))
        .await;
}

#[tokio::test]
async fn sigterm_finishes_in_flight_work_and_exits_zero() {
    let (server, client) = etcd().await;
    let csv = sample_csv();
    let child = spawn_binary(&server, &csv, &[("RATE", "300")]);
    wait_for_depth(&client, 100).await;
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let out = child.wait_with_output().expect("waits");
    assert!(out.status.success(), "exit 0 on SIGTERM: {:?}", out.status);
    let depth = queue_depth(&client).await;
    assert!(depth < 2470, "stopped before the end ({depth})");
    let cp = checkpoint(&client, "test-w0").await.expect("checkpoint");
    assert_eq!(cp.row as i64, depth, "checkpoint consistent with the queue");
    // And a restart completes the pass exactly once.
    let out = spawn_binary(&server, &csv, &[])
        .wait_with_output()
        .expect("waits");
    assert!(out.status.success());
    assert_rows_exactly_once(&queue(&client).await, "test-w0", 0, 2470);
}

#[tokio::test]
async fn fractional_rate_is_kept_per_worker() {
    let (server, client) = etcd().await;
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
    let queue = queue(&client).await;
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
    let (server, _client) = etcd().await;
    let missing = std::path::Path::new("/nonexistent/telemetry.csv");
    let out = spawn_binary(&server, missing, &[])
        .wait_with_output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/telemetry.csv"));

    let out = spawn_binary(&server, &sample_csv(), &[("RATE", "fast")])
        .wait_with_output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("RATE"));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_telemetry-streamer"))
        .env_clear()
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CSV_PATH"));
}
