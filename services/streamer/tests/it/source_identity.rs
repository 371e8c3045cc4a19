//! A stream is bound to the file it was started with: its checkpoint is a row number, which
//! means nothing in another file, so the same `STREAM_ID` on a different or edited file is
//! refused rather than resumed.

use etcd_client::Client;
use telemetry_shared::Keyspace;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const FILE_A: &[u8] = b"gpu,value\n0,1.5\n1,2.5\n2,3.5\n";
/// File A with row 2 edited and a row appended.
const FILE_B: &[u8] = b"gpu,value\n0,1.5\n1,9.9\n2,3.5\n3,4.5\n";

#[tokio::test]
async fn same_stream_id_on_an_edited_file_is_refused_and_enqueues_nothing() {
    let (server, client) = etcd().await;
    let csv = temp_csv(FILE_A);
    let totals = telemetry_streamer::run(
        config(&server, csv.path(), &[]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("first run on file A");
    assert_eq!(totals.enqueued, 3);
    let before = checkpoint(&client, "test-w0").await.expect("checkpoint");

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
    assert_eq!(queue_depth(&client).await, 3, "nothing more enqueued");
    assert_eq!(checkpoint(&client, "test-w0").await, Some(before));

    // The binary says the same and exits non-zero.
    let out = spawn_binary(&server, csv.path(), &[])
        .wait_with_output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exits non-zero: {stderr}");
    assert!(
        stderr.contains("test-w0") && stderr.contains("STREAM_ID"),
        "{stderr}"
    );
    assert_eq!(queue_depth(&client).await, 3, "nothing more enqueued");

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
async fn a_concurrent_streamer_with_the_same_id_on_another_file_is_refused() {
    let (server, client) = etcd().await;
    let a = temp_csv(FILE_A);
    let b = temp_csv(FILE_B);
    // Stream A half way (rate-limited), then start B under the same id while A still runs.
    let shutdown = CancellationToken::new();
    let first = tokio::spawn(telemetry_streamer::run(
        config(&server, a.path(), &[("RATE", "5")]),
        client.clone(),
        shutdown.clone(),
    ));
    wait_for_depth(&client, 1).await;
    let err = telemetry_streamer::run(
        config(&server, b.path(), &[]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect_err("file B is not the stream's file");
    assert!(err.to_string().contains("test-w0"), "{err}");
    let totals = first
        .await
        .expect("joins")
        .expect("file A's streamer is unaffected");
    assert_eq!(totals.enqueued, 3);
    assert_eq!(queue_depth(&client).await, 3);
    let _ = shutdown;
}

#[tokio::test]
async fn a_checkpoint_without_a_fingerprint_adopts_the_current_file() {
    let (server, client) = etcd().await;
    let csv = temp_csv(FILE_A);
    // A checkpoint as the previous release wrote it: row 1 of pass 0 done, no fingerprint.
    put_checkpoint(&client, "test-w0", r#"{"pass":0,"row":1,"pass_complete":false}"#).await;
    let totals = telemetry_streamer::run(
        config(&server, csv.path(), &[]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("resumes");
    assert_eq!(totals.enqueued, 2, "rows 2 and 3");
    let cp = checkpoint(&client, "test-w0").await.expect("checkpoint");
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

async fn put_checkpoint(client: &Client, stream: &str, json: &str) {
    client
        .clone()
        .put(Keyspace::new(NS).stream_checkpoint(stream), json, None)
        .await
        .expect("put checkpoint");
}
