//! `telemetry-admin` against a real etcd holding the sample as the real streamer and collector
//! stored it, plus one malformed message that the collector dead-letters.

use std::{process::Command, time::Duration};

use etcd_client::Client;
use telemetry_admin::AdminError;
use telemetry_harness::{EtcdOptions, EtcdServer, count, eventually};
use telemetry_shared::Keyspace;
use tokio_util::sync::CancellationToken;

const NS: &str = "/a";
const BAD_ID: &str = "01J00000000000000000000000";

fn vars(server: &EtcdServer, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v = vec![
        ("ETCD_ENDPOINTS".to_string(), server.endpoint()),
        ("ETCD_NAMESPACE".to_string(), NS.to_string()),
    ];
    v.extend(extra.iter().map(|(k, val)| (k.to_string(), val.to_string())));
    v
}

fn collector(server: &EtcdServer, client: &Client) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let config = telemetry_collector::CollectorConfig::from_vars(vars(
        server,
        &[("COLLECTOR_ID", "admin-c1"), ("LEASE_TTL", "3s")],
    ))
    .expect("collector config");
    let task = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            let _ = telemetry_collector::run(config, client, stop).await;
        }
    });
    (stop, task)
}

async fn dead_letter_present(client: &Client, keys: &Keyspace) -> bool {
    eventually(Duration::from_secs(20), || async {
        count(client, &keys.deadletter_prefix()).await.unwrap_or(0) == 1
    })
    .await
}

fn admin(server: &EtcdServer, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_telemetry-admin"))
        .env_clear()
        .envs(vars(server, &[]))
        .args(args)
        .output()
        .expect("admin runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_dead_letters_audit_and_status() {
    let server = EtcdServer::start_with(EtcdOptions::fast()).await.expect("etcd");
    let client = server.client().await.expect("client");
    let keys = Keyspace::new(NS);
    let (stop, task) = collector(&server, &client);
    let csv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/dcgm_sample.csv");
    let config = telemetry_streamer::StreamerConfig::from_vars(
        vars(
            &server,
            &[
                ("CSV_PATH", &csv.display().to_string()),
                ("RATE", "0"),
                ("LOOP", "false"),
                ("STREAM_ID", "dcgm"),
            ],
        ),
        &telemetry_streamer::Flags::default(),
    )
    .expect("streamer config");
    telemetry_streamer::run(config, client.clone(), CancellationToken::new())
        .await
        .expect("streamer");
    client
        .clone()
        .put(keys.queue_entry(0, BAD_ID), "this is not JSON", None)
        .await
        .expect("put");
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&client, &keys.data_prefix()).await.unwrap_or(0) == 2470
                && count(&client, &keys.queue_prefix()).await.unwrap_or(1) == 0
        })
        .await
    );
    assert!(dead_letter_present(&client, &keys).await);

    // status: one collector owning every partition.
    let status = telemetry_admin::status(&client, &keys).await.expect("status");
    assert_eq!(status.collectors.len(), 1);
    assert_eq!(status.collectors[0].id, "admin-c1");
    assert_eq!(status.collectors[0].partitions.len(), 32);
    assert!(status.collectors[0].ttl_s > 0);
    assert!(status.unowned.is_empty());

    // audit: the truth for the sample.
    let audit = telemetry_admin::audit(&client, &keys, Some(2470))
        .await
        .expect("audit");
    assert_eq!(audit.data_keys, 2470);
    assert_eq!(audit.counted_records, 2470);
    assert_eq!((audit.gpus_with_data, audit.indexed_gpus), (247, 247));
    assert!(audit.gpus.iter().all(|g| g.records == 10 && g.indexed));
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
    assert_eq!(audit.dead_letters, 1);
    let wrong = telemetry_admin::audit(&client, &keys, Some(2471))
        .await
        .expect("audit");
    assert_eq!(wrong.problems.len(), 1);

    // dead letters: list and show.
    let letters = telemetry_admin::dead_letters(&client, &keys, 10)
        .await
        .expect("list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, BAD_ID);
    assert!(
        letters[0].letter.reason.contains("JSON"),
        "{}",
        letters[0].letter.reason
    );
    let shown = telemetry_admin::show_dead_letter(&client, &keys, BAD_ID)
        .await
        .expect("show");
    assert_eq!(shown.letter.payload.as_deref(), Some("this is not JSON"));
    assert!(matches!(
        telemetry_admin::show_dead_letter(&client, &keys, "NOPE").await,
        Err(AdminError::NotFound(_))
    ));

    // replay, exactly once: with the collector stopped, two concurrent replays put it back once.
    stop.cancel();
    task.await.expect("collector stops");
    let (a, b) = tokio::join!(
        telemetry_admin::replay(&client, &keys, BAD_ID),
        telemetry_admin::replay(&client, &keys, BAD_ID)
    );
    assert_eq!(
        [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "exactly one replay lands: {a:?} {b:?}"
    );
    assert_eq!(count(&client, &keys.queue_prefix()).await.expect("count"), 1);
    assert_eq!(count(&client, &keys.deadletter_prefix()).await.expect("count"), 0);
    let queue = telemetry_admin::queue(&client, &keys).await.expect("queue");
    assert_eq!(queue.depth, 1);
    assert_eq!(queue.partitions[0].depth, 1);
    assert!(queue.lag_s.is_some());
    assert!(matches!(
        telemetry_admin::replay(&client, &keys, BAD_ID).await,
        Err(AdminError::NotFound(_))
    ));

    // The collector dead-letters it again; purge removes it, once.
    let (stop, task) = collector(&server, &client);
    assert!(dead_letter_present(&client, &keys).await);
    assert_eq!(
        telemetry_admin::purge(&client, &keys, &[BAD_ID.to_string()])
            .await
            .expect("purge"),
        1
    );
    assert!(matches!(
        telemetry_admin::purge(&client, &keys, &[BAD_ID.to_string()]).await,
        Err(AdminError::NotFound(_))
    ));
    assert_eq!(
        telemetry_admin::purge_all(&client, &keys)
            .await
            .expect("purge all"),
        0
    );

    // The binary: exit codes and messages.
    let out = admin(&server, &["audit", "--expect", "2470"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = admin(&server, &["--json", "status"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON status");
    assert_eq!(json["collectors"][0]["id"], "admin-c1");
    let out = admin(&server, &["dead-letters", "show", "NOPE"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dead letter with id NOPE"));
    let out = admin(&server, &["dead-letters", "purge"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap refuses a purge without ids or --all"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_telemetry-admin"))
        .env_clear()
        .env("ETCD_ENDPOINTS", "nonsense")
        .arg("queue")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "a configuration error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ETCD_ENDPOINTS"));
    stop.cancel();
    task.await.expect("collector stops");
}

/// Defect: dead letters cut payloads at 64 KiB and replay re-enqueued the cut text, so a dead
/// letter that became acceptable was lost. A 200 KiB message without the host column is
/// dead-lettered, the collector is reconfigured to read the host from another column, and the
/// replayed message is stored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_dead_letter_is_replayed_whole_after_a_configuration_fix() {
    let server = EtcdServer::start_with(EtcdOptions::fast()).await.expect("etcd");
    let client = server.client().await.expect("client");
    let keys = Keyspace::new(NS);
    let id = ulid::Ulid::from_parts(1_800_000_000_000, 7);
    let pad = "p".repeat(200 * 1024);
    let payload = serde_json::json!({
        "schema_version": "v1",
        "id": id.to_string(),
        "timestamp": "2026-11-30T00:00:00Z",
        "idempotency_key": "cd".repeat(32),
        "fields": {"host": "h-1", "gpu_id": 0.0, "uuid": "GPU-x", "pad": pad}
    });
    let bytes = serde_json::to_vec(&payload).expect("json");
    client
        .clone()
        .put(keys.queue_entry(0, &id.to_string()), bytes.clone(), None)
        .await
        .expect("put");
    let (stop, task) = collector(&server, &client);
    assert!(dead_letter_present(&client, &keys).await);
    stop.cancel();
    let _ = task.await;
    let shown = telemetry_admin::show_dead_letter(&client, &keys, &id.to_string())
        .await
        .expect("show");
    assert_eq!(shown.letter.payload_bytes(), Ok(bytes), "kept whole");

    // Reconfigured to read the host from `host`, the collector accepts the replayed message.
    let stop = CancellationToken::new();
    let config = telemetry_collector::CollectorConfig::from_vars(vars(
        &server,
        &[
            ("COLLECTOR_ID", "admin-c2"),
            ("LEASE_TTL", "3s"),
            ("HOSTNAME_COLUMN", "host"),
        ],
    ))
    .expect("collector config");
    let task = tokio::spawn(telemetry_collector::run(config, client.clone(), stop.clone()));
    telemetry_admin::replay(&client, &keys, &id.to_string())
        .await
        .expect("replay");
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&client, &keys.data_prefix()).await.unwrap_or(0) == 1
        })
        .await
    );
    stop.cancel();
    let _ = task.await;
    let stored = telemetry_harness::stored_records(&client, &keys)
        .await
        .expect("records");
    let message = stored.values().next().expect("one record");
    assert_eq!(message.fields["pad"].as_str().map(str::len), Some(200 * 1024));
    assert_eq!(count(&client, &keys.deadletter_prefix()).await.expect("count"), 0);
}

/// Rows the streamer enqueued (each holding its dedup marker) are dead-lettered because the host
/// column has another name; after the collector is told the right column, replay moves each
/// message's marker to the replayed entry and every row is stored once. A dead letter whose
/// idempotency key another message took meanwhile is refused, not stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_carries_the_dedup_marker_and_refuses_a_key_taken_since() {
    let server = EtcdServer::start_with(EtcdOptions::fast()).await.expect("etcd");
    let client = server.client().await.expect("client");
    let keys = Keyspace::new(NS);
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("hosts.csv");
    let mut rows = String::from("host,gpu_id,uuid,metric_name,value\n");
    for i in 0..5 {
        rows.push_str(&format!("h-{i},0,GPU-{i},DCGM_FI_DEV_GPU_UTIL,{i}\n"));
    }
    std::fs::write(&csv, rows).expect("csv");
    let config = telemetry_streamer::StreamerConfig::from_vars(
        vars(
            &server,
            &[
                ("CSV_PATH", &csv.display().to_string()),
                ("RATE", "0"),
                ("LOOP", "false"),
                ("STREAM_ID", "hosts"),
            ],
        ),
        &telemetry_streamer::Flags::default(),
    )
    .expect("streamer config");
    telemetry_streamer::run(config, client.clone(), CancellationToken::new())
        .await
        .expect("streamer");
    let (stop, task) = collector(&server, &client);
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&client, &keys.deadletter_prefix()).await.unwrap_or(0) == 5
        })
        .await
    );
    stop.cancel();
    let _ = task.await;
    let letters = telemetry_admin::dead_letters(&client, &keys, 10)
        .await
        .expect("list");
    // Another message takes the first letter's idempotency key (its marker is rewritten).
    let taken = &letters[0];
    let marker = keys.dedup_marker(taken.letter.idempotency_key.as_deref().expect("key known"));
    client.clone().put(marker.as_str(), "", None).await.expect("put");
    let err = telemetry_admin::replay(&client, &keys, &taken.id)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("stored since"), "{err}");

    let stop = CancellationToken::new();
    let config = telemetry_collector::CollectorConfig::from_vars(vars(
        &server,
        &[
            ("COLLECTOR_ID", "admin-c3"),
            ("LEASE_TTL", "3s"),
            ("HOSTNAME_COLUMN", "host"),
        ],
    ))
    .expect("collector config");
    let task = tokio::spawn(telemetry_collector::run(config, client.clone(), stop.clone()));
    for letter in &letters[1..] {
        telemetry_admin::replay(&client, &keys, &letter.id)
            .await
            .expect("replay");
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&client, &keys.data_prefix()).await.unwrap_or(0) == 4
                && count(&client, &keys.queue_prefix()).await.unwrap_or(1) == 0
        })
        .await
    );
    stop.cancel();
    let _ = task.await;
    let stored = telemetry_harness::stored_records(&client, &keys)
        .await
        .expect("records");
    let mut rows: Vec<u64> = stored
        .values()
        .filter_map(|m| m.source.as_ref().map(|s| s.row))
        .collect();
    rows.sort();
    let expected: Vec<u64> = letters[1..]
        .iter()
        .map(|l| {
            let (_, id) = keys.parse_queue_entry(&l.letter.queue_key).expect("queue key");
            stored
                .values()
                .find(|m| m.id.to_string() == id)
                .and_then(|m| m.source.as_ref().map(|s| s.row))
                .expect("replayed message stored")
        })
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .collect();
    assert_eq!(rows, expected, "each replayed row once");
}
