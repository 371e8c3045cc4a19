//! `telemetry-admin` against a real etcd holding the sample as the real streamer and collector
//! stored it, plus one malformed message that the collector dead-letters.

use std::{process::Command, time::Duration};

use etcd_client::Client;
use telemetry_admin::AdminError;
use telemetry_harness::{EtcdServer, Probe, eventually, sample};
use telemetry_shared::Keyspace;
use tokio_util::sync::CancellationToken;

const NS: &str = "/a";
const BAD_ID: &str = "01J00000000000000000000000";

/// A strict etcd, a client, and a probe of the test namespace.
async fn etcd() -> (EtcdServer, Client, Probe) {
    let (server, client) = telemetry_harness::strict_etcd().await.expect("etcd starts");
    let probe = Probe::new(&client, NS);
    (server, client, probe)
}

/// Collector `id` in process, then `extra`; stopped by the token.
fn collector(
    server: &EtcdServer,
    client: &Client,
    id: &str,
    extra: &[(&str, &str)],
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let config = telemetry_collector::CollectorConfig::from_vars(server.env(NS).collector(id).with(extra))
        .expect("collector config");
    let task = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            let _ = telemetry_collector::run(config, client, stop).await;
        }
    });
    (stop, task)
}

async fn dead_letter_present(probe: &Probe) -> bool {
    eventually(Duration::from_secs(20), || async {
        probe.dead_letter_count().await == 1
    })
    .await
}

fn admin(server: &EtcdServer, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_telemetry-admin"))
        .env_clear()
        .envs(server.env(NS))
        .args(args)
        .output()
        .expect("admin runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_dead_letters_audit_and_status() {
    let (server, client, probe) = etcd().await;
    let keys = Keyspace::new(NS);
    let (stop, task) = collector(&server, &client, "admin-c1", &[]);
    store_the_sample_and_one_bad_message(&server, &client, &probe).await;
    status_shows_one_collector_owning_every_partition(&client, &keys).await;
    audit_tells_the_truth_about_the_sample(&client, &keys).await;
    dead_letters_are_listed_and_shown(&client, &keys).await;
    // Replay with the collector stopped, so that the replayed message stays queued.
    stop.cancel();
    task.await.expect("collector stops");
    concurrent_replays_put_the_message_back_once(&client, &keys, &probe).await;
    // The collector dead-letters it again.
    let (stop, task) = collector(&server, &client, "admin-c1", &[]);
    assert!(dead_letter_present(&probe).await);
    purge_removes_a_dead_letter_once(&client, &keys).await;
    the_binary_exits_with_meaningful_codes(&server);
    stop.cancel();
    task.await.expect("collector stops");
}

/// The sample as the real streamer and collector store it, plus one message that is not JSON.
async fn store_the_sample_and_one_bad_message(server: &EtcdServer, client: &Client, probe: &Probe) {
    let config = telemetry_streamer::StreamerConfig::from_vars(
        server.env(NS).streamer(sample::path(), sample::STREAM_ID),
        &telemetry_streamer::Flags::default(),
    )
    .expect("streamer config");
    telemetry_streamer::run(config, client.clone(), CancellationToken::new())
        .await
        .expect("streamer");
    client
        .clone()
        .put(probe.keys().queue_entry(0, BAD_ID), "this is not JSON", None)
        .await
        .expect("put");
    probe
        .wait_drained(sample::ROWS as i64, Duration::from_secs(30))
        .await;
    assert_eq!(probe.data_count().await as u64, sample::ROWS);
    assert!(dead_letter_present(probe).await);
}

async fn status_shows_one_collector_owning_every_partition(client: &Client, keys: &Keyspace) {
    let status = telemetry_admin::status(client, keys).await.expect("status");
    assert_eq!(status.collectors.len(), 1);
    assert_eq!(status.collectors[0].id, "admin-c1");
    assert_eq!(status.collectors[0].partitions.len(), 32);
    assert!(status.collectors[0].ttl_s > 0);
    assert!(status.unowned.is_empty());
}

async fn audit_tells_the_truth_about_the_sample(client: &Client, keys: &Keyspace) {
    let audit = telemetry_admin::audit(client, keys, Some(sample::ROWS))
        .await
        .expect("audit");
    assert_eq!(audit.data_keys, sample::ROWS);
    assert_eq!(audit.counted_records, sample::ROWS);
    assert_eq!(
        (audit.gpus_with_data, audit.indexed_gpus),
        (sample::GPUS, sample::GPUS)
    );
    assert!(
        audit
            .gpus
            .iter()
            .all(|g| g.records == sample::METRICS as u64 && g.indexed)
    );
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
    assert_eq!(audit.dead_letters, 1);
    let wrong = telemetry_admin::audit(client, keys, Some(sample::ROWS + 1))
        .await
        .expect("audit");
    assert_eq!(wrong.problems.len(), 1);
}

async fn dead_letters_are_listed_and_shown(client: &Client, keys: &Keyspace) {
    let letters = telemetry_admin::dead_letters(client, keys, 10)
        .await
        .expect("list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, BAD_ID);
    assert!(
        letters[0].letter.reason.contains("JSON"),
        "{}",
        letters[0].letter.reason
    );
    let shown = telemetry_admin::show_dead_letter(client, keys, BAD_ID)
        .await
        .expect("show");
    assert_eq!(shown.letter.payload.as_deref(), Some("this is not JSON"));
    assert!(matches!(
        telemetry_admin::show_dead_letter(client, keys, "NOPE").await,
        Err(AdminError::NotFound(_))
    ));
}

/// Two concurrent replays: exactly one lands, and a third finds nothing to replay.
async fn concurrent_replays_put_the_message_back_once(client: &Client, keys: &Keyspace, probe: &Probe) {
    let (a, b) = tokio::join!(
        telemetry_admin::replay(client, keys, BAD_ID),
        telemetry_admin::replay(client, keys, BAD_ID)
    );
    assert_eq!(
        [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "exactly one replay lands: {a:?} {b:?}"
    );
    assert_eq!(probe.queue_depth().await, 1);
    assert_eq!(probe.dead_letter_count().await, 0);
    let queue = telemetry_admin::queue(client, keys).await.expect("queue");
    assert_eq!(queue.depth, 1);
    assert_eq!(queue.partitions[0].depth, 1);
    assert!(queue.lag_s.is_some());
    assert!(matches!(
        telemetry_admin::replay(client, keys, BAD_ID).await,
        Err(AdminError::NotFound(_))
    ));
}

async fn purge_removes_a_dead_letter_once(client: &Client, keys: &Keyspace) {
    assert_eq!(
        telemetry_admin::purge(client, keys, &[BAD_ID.to_string()])
            .await
            .expect("purge"),
        1
    );
    assert!(matches!(
        telemetry_admin::purge(client, keys, &[BAD_ID.to_string()]).await,
        Err(AdminError::NotFound(_))
    ));
    assert_eq!(
        telemetry_admin::purge_all(client, keys).await.expect("purge all"),
        0
    );
}

/// Exit codes and messages of the binary.
fn the_binary_exits_with_meaningful_codes(server: &EtcdServer) {
    let expect = sample::ROWS.to_string();
    let out = admin(server, &["audit", "--expect", &expect]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = admin(server, &["--json", "status"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON status");
    assert_eq!(json["collectors"][0]["id"], "admin-c1");
    let out = admin(server, &["dead-letters", "show", "NOPE"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dead letter with id NOPE"));
    let out = admin(server, &["dead-letters", "purge"]);
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
}

/// Defect: dead letters cut payloads at 64 KiB and replay re-enqueued the cut text, so a dead
/// letter that became acceptable was lost. A 200 KiB message without the host column is
/// dead-lettered, the collector is reconfigured to read the host from another column, and the
/// replayed message is stored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_dead_letter_is_replayed_whole_after_a_configuration_fix() {
    let (server, client, probe) = etcd().await;
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
    let (stop, task) = collector(&server, &client, "admin-c1", &[]);
    assert!(dead_letter_present(&probe).await);
    stop.cancel();
    let _ = task.await;
    let shown = telemetry_admin::show_dead_letter(&client, &keys, &id.to_string())
        .await
        .expect("show");
    assert_eq!(shown.letter.payload_bytes(), Ok(bytes), "kept whole");

    // Reconfigured to read the host from `host`, the collector accepts the replayed message.
    let (stop, task) = collector(&server, &client, "admin-c2", &[("HOSTNAME_COLUMN", "host")]);
    telemetry_admin::replay(&client, &keys, &id.to_string())
        .await
        .expect("replay");
    assert!(
        eventually(Duration::from_secs(30), || async {
            probe.data_count().await == 1
        })
        .await
    );
    stop.cancel();
    let _ = task.await;
    let stored = probe.records().await;
    let message = stored.values().next().expect("one record");
    assert_eq!(message.fields["pad"].as_str().map(str::len), Some(200 * 1024));
    assert_eq!(probe.dead_letter_count().await, 0);
}

/// Rows the streamer enqueued are dead-lettered because the host column has another name; after
/// the collector is told the right column, replay puts each one back and every row is stored
/// once. A dead letter whose idempotency key another message took meanwhile (a marker of
/// another revision) is refused, not stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_carries_the_dedup_marker_and_refuses_a_key_taken_since() {
    let (server, client, probe) = etcd().await;
    let keys = Keyspace::new(NS);
    let mut rows = String::from("host,gpu_id,uuid,metric_name,value\n");
    for i in 0..5 {
        rows.push_str(&format!("h-{i},0,GPU-{i},DCGM_FI_DEV_GPU_UTIL,{i}\n"));
    }
    let csv = sample::temp_csv(rows.as_bytes());
    let config = telemetry_streamer::StreamerConfig::from_vars(
        server.env(NS).streamer(csv.path(), "hosts"),
        &telemetry_streamer::Flags::default(),
    )
    .expect("streamer config");
    telemetry_streamer::run(config, client.clone(), CancellationToken::new())
        .await
        .expect("streamer");
    let (stop, task) = collector(&server, &client, "admin-c1", &[]);
    assert!(
        eventually(Duration::from_secs(20), || async {
            probe.dead_letter_count().await == 5
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

    let (stop, task) = collector(&server, &client, "admin-c3", &[("HOSTNAME_COLUMN", "host")]);
    for letter in &letters[1..] {
        telemetry_admin::replay(&client, &keys, &letter.id)
            .await
            .expect("replay");
    }
    probe.wait_drained(4, Duration::from_secs(30)).await;
    assert_eq!(probe.data_count().await, 4);
    stop.cancel();
    let _ = task.await;
    let stored = probe.records().await;
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

/// `exporter status` shows what an exporter's keys say: its owner, checkpoint, losses (with each
/// gap's span) and newest rejected records, as a table and as JSON; a name without a
/// checkpoint is an error (status 1).
#[tokio::test]
async fn exporter_status_shows_position_losses_and_rejected_records() {
    use telemetry_shared::{
        Timestamp,
        model::{ExportCheckpoint, ExportGap, Member, RejectedRecord},
    };
    let (server, client, _probe) = etcd().await;
    let keys = Keyspace::new(NS);
    let now = Timestamp::now();
    let checkpoint = ExportCheckpoint {
        revision: 5,
        records: 120,
        samples: 120,
        rejected: 1,
        expired: 7,
        gaps: vec![ExportGap {
            from_revision: 3,
            to_revision: 5,
            expired: Some(7),
            after: Some(now),
            before: Some(now),
            found_at: now,
        }],
        last_record_time: Some(now),
        ..ExportCheckpoint::default()
    };
    let rejected = RejectedRecord {
        key: "/a/telemetry/data/h/0/x_1".into(),
        revision: 4,
        reason: "HTTP 400: out of order sample".into(),
        rejected_at: now,
        exporter: "e-1".into(),
    };
    let owner = Member {
        id: "e-1".into(),
        lease: 0x42,
        started_at: now,
    };
    let mut kv = client.clone();
    kv.put(
        keys.exporter_checkpoint("tsdb"),
        serde_json::to_vec(&checkpoint).expect("json"),
        None,
    )
    .await
    .expect("put");
    kv.put(
        keys.exporter_rejected("tsdb", 4, &rejected.key),
        serde_json::to_vec(&rejected).expect("json"),
        None,
    )
    .await
    .expect("put");
    kv.put(
        keys.exporter_owner("tsdb"),
        serde_json::to_vec(&owner).expect("json"),
        None,
    )
    .await
    .expect("put");

    let out = admin(&server, &["exporter", "status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "exporter tsdb   active: e-1",
        "exported 120 records (120 samples)   rejected 1   expired before export 7",
        "gap: 7 records expired between",
        "HTTP 400: out of order sample",
    ] {
        assert!(table.contains(expected), "{expected:?} in\n{table}");
    }
    let out = admin(&server, &["--json", "exporter", "status", "--name", "tsdb"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report[0]["checkpoint"]["expired"], 7);
    assert_eq!(report[0]["rejected"][0]["revision"], 4);
    let out = admin(&server, &["exporter", "status", "--name", "other"]);
    assert_eq!(out.status.code(), Some(1));
}
