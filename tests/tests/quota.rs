//! When etcd's backend quota is hit, the pipeline backs off and loses nothing: an etcd with a
//! small quota is filled until its NOSPACE alarm fires, the streamer and a collector run into
//! it, then space is freed and the alarm disarmed, and every row of the sample is stored once.

use std::time::Duration;

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client, DeleteOptions};
use telemetry_harness::{EtcdOptions, EtcdServer, assert_rows_exactly_once, sample};
use telemetry_tests::Pipeline;

const QUOTA: u64 = 24 * 1024 * 1024;

/// Writes 256 KiB values until etcd refuses for lack of space.
async fn fill(client: &mut Client) -> usize {
    let value = vec![b'x'; 256 * 1024];
    for i in 0.. {
        match client.put(format!("/junk/{i:06}"), value.clone(), None).await {
            Ok(_) => {}
            Err(err) => {
                assert!(
                    err.to_string().contains("database space exceeded"),
                    "unexpected: {err}"
                );
                return i;
            }
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_stalls_the_pipeline_without_loss_until_space_is_freed() {
    let server = EtcdServer::start_with(EtcdOptions {
        quota_backend_bytes: Some(QUOTA),
        ..EtcdOptions::fast()
    })
    .await
    .expect("etcd");
    let mut client = server.client().await.expect("client");
    let junk = fill(&mut client).await;
    assert!(junk > 0);

    let pipeline = Pipeline::builder()
        .etcd(server)
        .namespace("/q")
        .collectors(1)
        .start()
        .await
        .expect("the pipeline starts");
    let streamer = pipeline
        .spawn_stream(pipeline.streamer_env())
        .expect("streamer config");
    let probe = pipeline.probe();

    // While the alarm is raised nothing can be written, and neither service gives up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(probe.data_count().await, 0);
    assert!(!streamer.is_finished(), "the streamer must wait, not fail");
    assert_eq!(
        pipeline.running_collectors(),
        1,
        "the collector must wait, not fail"
    );

    // The operator frees space: delete, compact, defragment, disarm.
    client
        .delete("/junk/", Some(DeleteOptions::new().with_prefix()))
        .await
        .expect("delete junk");
    let status = client.status().await.expect("status");
    let revision = status.header().expect("header").revision();
    let member = status.header().expect("header").member_id();
    client.compact(revision, None).await.expect("compact");
    client.defragment().await.expect("defragment");
    let mut options = AlarmOptions::new();
    options.with_member(member);
    client
        .alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(options))
        .await
        .expect("disarm");

    let totals = tokio::time::timeout(Duration::from_secs(60), streamer)
        .await
        .expect("the streamer finishes after the alarm is disarmed")
        .expect("joins")
        .expect("streamer ran");
    assert_eq!(totals.enqueued, sample::ROWS);
    // The collector drains the queue after the alarm is disarmed.
    pipeline
        .wait_drained(sample::ROWS as i64, Duration::from_secs(60))
        .await;
    let records = probe.records().await;
    assert_rows_exactly_once(records.values(), "dcgm-w0", 0, sample::ROWS);
    assert_eq!(records.len() as u64, sample::ROWS, "a row stored twice");
    pipeline.shutdown().await.expect("the collector ran");
}
