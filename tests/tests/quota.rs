//! When etcd's backend quota is hit, the pipeline backs off and loses nothing: an etcd with a
//! small quota is filled until its NOSPACE alarm fires, the streamer and a collector run into
//! it, then space is freed and the alarm disarmed, and every row of the sample is stored once.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client, DeleteOptions};
use telemetry_harness::{EtcdOptions, EtcdServer, count, eventually};
use telemetry_shared::Keyspace;
use tokio_util::sync::CancellationToken;

const NS: &str = "/q";
const QUOTA: u64 = 24 * 1024 * 1024;

fn vars(server: &EtcdServer, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut v = vec![
        ("ETCD_ENDPOINTS".to_string(), server.endpoint()),
        ("ETCD_NAMESPACE".to_string(), NS.to_string()),
    ];
    v.extend(extra.iter().map(|(k, val)| (k.to_string(), val.clone())));
    v
}

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
    let keys = Keyspace::new(NS);
    let junk = fill(&mut client).await;
    assert!(junk > 0);

    let stop = CancellationToken::new();
    let collector_config = telemetry_collector::CollectorConfig::from_vars(vars(
        &server,
        &[("COLLECTOR_ID", "quota-c1".into()), ("LEASE_TTL", "3s".into())],
    ))
    .expect("collector config");
    let collector = tokio::spawn(telemetry_collector::run(
        collector_config,
        client.clone(),
        stop.clone(),
    ));
    let csv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dcgm_sample.csv");
    let streamer_config = telemetry_streamer::StreamerConfig::from_vars(
        vars(
            &server,
            &[
                ("CSV_PATH", csv.display().to_string()),
                ("RATE", "0".into()),
                ("LOOP", "false".into()),
                ("STREAM_ID", "dcgm".into()),
                ("MAX_QUEUE_DEPTH", "0".into()),
            ],
        ),
        &telemetry_streamer::Flags::default(),
    )
    .expect("streamer config");
    let streamer = tokio::spawn(telemetry_streamer::run(
        streamer_config,
        client.clone(),
        CancellationToken::new(),
    ));

    // While the alarm is raised nothing can be written, and neither service gives up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(count(&client, &keys.data_prefix()).await.expect("count"), 0);
    assert!(!streamer.is_finished(), "the streamer must wait, not fail");
    assert!(!collector.is_finished(), "the collector must wait, not fail");

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
    assert_eq!(totals.enqueued, 2470);
    let drained = eventually(Duration::from_secs(60), || async {
        count(&client, &keys.data_prefix()).await.unwrap_or(0) >= 2470
            && count(&client, &keys.queue_prefix()).await.unwrap_or(1) == 0
    })
    .await;
    assert!(
        drained,
        "the collector drains the queue after the alarm is disarmed"
    );
    let mut rows: BTreeMap<u64, usize> = BTreeMap::new();
    for message in telemetry_harness::stored_records(&client, &keys)
        .await
        .expect("records decode")
        .into_values()
    {
        *rows.entry(message.source.expect("source").row).or_default() += 1;
    }
    assert_eq!(rows.len(), 2470);
    assert!(rows.values().all(|n| *n == 1), "a row stored twice");
    stop.cancel();
    collector.await.expect("joins").expect("collector ran");
}
