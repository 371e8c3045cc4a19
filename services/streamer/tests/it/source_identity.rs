//! A stream is bound to the file it was started with: its checkpoint is a row number, which
//! means nothing in another file, so the same `STREAM_ID` on a different or edited file is
//! refused rather than resumed.

use telemetry_streamer::StreamerError;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const FILE_A: &[u8] = b"gpu,value\n0,1.5\n1,2.5\n2,3.5\n";
/// File A with row 2 edited and a row appended.
const FILE_B: &[u8] = b"gpu,value\n0,1.5\n1,9.9\n2,3.5\n3,4.5\n";

#[tokio::test]
async fn same_stream_id_on_an_edited_file_is_refused_and_enqueues_nothing() {
    let (server, client, probe) = etcd().await;
    let csv = temp_csv(FILE_A);
    let totals = telemetry_streamer::run(
        config(&server, csv.path(), &[]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("first run on file A");
    assert_eq!(totals.enqueued, 3);
    let before = probe.checkpoint("test-w0").await.expect("checkpoint");

    // The same path, edited: the stored row number no longer describes this content.
    std::fs::write(csv.path(), FILE_B).expect("edit the file");
    let err = telemetry_streamer::run(
        config(&server, csv.path(), &[]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect_err("a stream started on file A refuses file B");
    let text = err.to_string();
    assert!(text.contains("test-w0"), "names the stream id: {text}");
    assert!(text.contains("different file"), "says the file differs: {text}");
    assert!(
        text.contains("STREAM_ID"),
        "says how to start a new stream: {text}"
    );
    assert_eq!(probe.queue_depth().await, 3, "nothing more enqueued");
    assert_eq!(probe.checkpoint("test-w0").await, Some(before));

    // The binary says the same and exits non-zero.
    let mut binary = spawn_binary(&server, csv.path(), &[]);
    let status = binary.wait().await;
    let stderr = binary.log();
    assert!(!status.success(), "exits non-zero: {stderr}");
    assert!(
        stderr.contains("test-w0") && stderr.contains("STREAM_ID"),
        "{stderr}"
    );
    assert_eq!(probe.queue_depth().await, 3, "nothing more enqueued");

    // Another STREAM_ID streams file B from its first row.
    let totals = telemetry_streamer::run(
        config(&server, csv.path(), &[("STREAM_ID", "test-b")]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("a new stream takes file B");
    assert_eq!(totals.enqueued, 4);
}

#[tokio::test]
async fn of_two_concurrent_streamers_with_the_same_id_on_different_files_the_first_to_commit_wins() {
    let (server, client, probe) = etcd().await;
    let a = temp_csv(FILE_A);
    let b = temp_csv(FILE_B);
    // Both start on a new stream, so both pass the start-up check. Whichever commits first
    // binds the stream to its file; the other is refused, either when it reads the checkpoint
    // or when its commit loses the fence and it checks the position it would adopt.
    let run = |path: &std::path::Path| {
        tokio::spawn(telemetry_streamer::run(
            config(&server, path, &[("BATCH_SIZE", "1")]),
            client.clone(),
            CancellationToken::new(),
        ))
    };
    let (ra, rb) = (run(a.path()), run(b.path()));
    let (ra, rb) = (ra.await.expect("joins"), rb.await.expect("joins"));
    let (winner, loser) = match (ra, rb) {
        (Ok(totals), Err(err)) => ((totals, FILE_A), err),
        (Err(err), Ok(totals)) => ((totals, FILE_B), err),
        other => panic!("exactly one must be refused: {other:?}"),
    };
    assert!(
        matches!(&loser, StreamerError::DifferentFile { stream, .. } if stream == "test-w0"),
        "{loser}"
    );
    // The queue holds exactly the winner's file, each row once.
    let rows = winner.1.iter().filter(|&&b| b == b'\n').count() as u64 - 1;
    assert_eq!(winner.0.enqueued, rows);
    let queue = probe.queue().await;
    assert_rows_exactly_once(queue.values(), "test-w0", 0, rows);
    let expected = format!("{}", String::from_utf8_lossy(winner.1));
    for msg in queue.values() {
        let row = msg.source.as_ref().expect("source").row as usize;
        let line = expected
            .lines()
            .nth(row)
            .expect("the row exists in the winner's file");
        let value = line.split(',').nth(1).expect("value column");
        assert_eq!(
            msg.fields["value"],
            serde_json::json!(value.parse::<f64>().expect("number"))
        );
    }
}

#[tokio::test]
async fn a_checkpoint_without_a_fingerprint_adopts_the_current_file() {
    let (server, client, probe) = etcd().await;
    let csv = temp_csv(FILE_A);
    // A checkpoint as the previous release wrote it: row 1 of pass 0 done, no fingerprint.
    put_checkpoint(&probe, "test-w0", r#"{"pass":0,"row":1,"pass_complete":false}"#).await;
    let totals = telemetry_streamer::run(
        config(&server, csv.path(), &[]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("resumes");
    assert_eq!(totals.enqueued, 2, "rows 2 and 3");
    let cp = probe.checkpoint("test-w0").await.expect("checkpoint");
    assert_eq!((cp.row, cp.pass_complete), (3, true));
    assert!(
        cp.source_fingerprint.is_some(),
        "the file's fingerprint is recorded"
    );

    // From now on the stream is bound to file A.
    std::fs::write(csv.path(), FILE_B).expect("edit the file");
    let err = telemetry_streamer::run(
        config(&server, csv.path(), &[]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect_err("edited file refused");
    assert!(err.to_string().contains("different file"), "{err}");
}

async fn put_checkpoint(probe: &Probe, stream: &str, json: &str) {
    probe
        .client()
        .clone()
        .put(probe.keys().stream_checkpoint(stream), json, None)
        .await
        .expect("put checkpoint");
}
