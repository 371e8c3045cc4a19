//! Message-level behaviour: duplicates under two ids, dead letters, schema migration.

use std::time::Duration;

use serde_json::json;
use telemetry_shared::{Fields, Message, SchemaVersion, Timestamp, keys::partition_of, model::DeadLetter};
use ulid::Ulid;

use crate::helpers::*;

fn message(id: Ulid, key: &str, host: Option<&str>) -> Message {
    let mut fields = Fields::new();
    if let Some(host) = host {
        fields.insert("Hostname".into(), json!(host));
    }
    fields.insert("gpu_id".into(), json!(1.0));
    fields.insert("uuid".into(), json!("GPU-test-1"));
    fields.insert("metric_name".into(), json!("DCGM_FI_DEV_GPU_TEMP"));
    fields.insert("value".into(), json!(41.0));
    Message {
        schema_version: SchemaVersion::V1,
        id,
        timestamp: Timestamp::now(),
        idempotency_key: key.repeat(64 / key.len()),
        source: None,
        fields,
    }
}

async fn enqueue(probe: &Probe, id: Ulid, payload: Vec<u8>) {
    let partition = partition_of(b"host-a/1");
    probe
        .client()
        .clone()
        .put(
            probe.keys().queue_entry(partition, &id.to_string()),
            payload,
            None,
        )
        .await
        .expect("put");
}

#[tokio::test]
async fn the_same_message_enqueued_twice_under_two_ids_has_one_effect() {
    let (server, client, probe) = etcd().await;
    let (id1, id2) = (
        Ulid::from_parts(1_800_000_000_000, 1),
        Ulid::from_parts(1_800_000_000_000, 2),
    );
    for id in [id1, id2] {
        enqueue(
            &probe,
            id,
            serde_json::to_vec(&message(id, "ab", Some("host-a"))).expect("json"),
        )
        .await;
    }
    // A third copy arrives after the first two are processed.
    let collector = spawn_collector(&server, &client, "c", &[]);
    probe.wait_drained(1, Duration::from_secs(30)).await;
    let id3 = Ulid::from_parts(1_800_000_000_000, 3);
    enqueue(
        &probe,
        id3,
        serde_json::to_vec(&message(id3, "ab", Some("host-a"))).expect("json"),
    )
    .await;
    probe.wait_drained(1, Duration::from_secs(30)).await;
    let totals = collector.shutdown().await;
    assert_eq!(probe.data_count().await, 1);
    assert_eq!((totals.processed, totals.duplicates), (1, 2));
    let s = probe.stats().await;
    assert_eq!((s.records, s.duplicates), (1, 2));
}

#[tokio::test]
async fn invalid_messages_are_dead_lettered_with_a_reason_and_old_versions_are_migrated() {
    let (server, client, probe) = etcd().await;
    let ids: Vec<Ulid> = (0..5).map(|i| Ulid::from_parts(1_800_000_000_000, i)).collect();
    // 0: not JSON. 1: no Hostname. 2: valid v1beta1. 3: valid v1beta2. 4: id mismatch.
    enqueue(&probe, ids[0], b"\xff not json".to_vec()).await;
    enqueue(
        &probe,
        ids[1],
        serde_json::to_vec(&message(ids[1], "01", None)).expect("json"),
    )
    .await;
    let v1beta1 = message(ids[2], "02", Some("host-a")).to_version(SchemaVersion::V1beta1);
    enqueue(&probe, ids[2], serde_json::to_vec(&v1beta1).expect("json")).await;
    let v1beta2 = message(ids[3], "03", Some("host-a")).to_version(SchemaVersion::V1beta2);
    enqueue(&probe, ids[3], serde_json::to_vec(&v1beta2).expect("json")).await;
    enqueue(
        &probe,
        ids[4],
        serde_json::to_vec(&message(ids[0], "04", Some("host-a"))).expect("json"),
    )
    .await;

    let collector = spawn_collector(&server, &client, "c", &[]);
    probe.wait_drained(2, Duration::from_secs(30)).await;
    let totals = collector.shutdown().await;
    assert_eq!((totals.processed, totals.dead_lettered), (2, 3));

    let letters: Vec<(String, DeadLetter)> = probe
        .range(&probe.keys().deadletter_prefix())
        .await
        .into_iter()
        .map(|(k, v)| (k, serde_json::from_slice(&v).expect("dead letter JSON")))
        .collect();
    assert_eq!(letters.len(), 3);
    let reason = |i: usize| {
        letters
            .iter()
            .find(|(k, _)| k.ends_with(&ids[i].to_string()))
            .map(|(_, l)| l.reason.clone())
            .expect("dead letter present")
    };
    assert!(reason(0).contains("not JSON"), "{}", reason(0));
    assert!(reason(1).contains("missing field \"Hostname\""), "{}", reason(1));
    assert!(
        reason(4).contains("does not match its queue key"),
        "{}",
        reason(4)
    );
    assert!(
        letters
            .iter()
            .all(|(_, l)| l.collector == "c" && l.payload_bytes().is_ok_and(|p| !p.is_empty()))
    );

    for msg in probe.records().await.values() {
        assert_eq!(
            msg.schema_version,
            SchemaVersion::V1,
            "stored as v1 after migration"
        );
    }
    assert_eq!(probe.stats().await.dead_letters, 3);
}

/// Defect: the KV client kept tonic's 4 MiB decode limit while the streamer accepts messages up
/// to 512 KiB, so a partition holding a few large messages failed its first read for ever while
/// keeping its owner key. Twelve messages of about 450 KiB in one partition now all land.
#[tokio::test]
async fn a_partition_of_large_messages_is_read_and_stored() {
    let (server, client, probe) = etcd().await;
    let pad = "x".repeat(450 * 1024);
    for n in 0..12u128 {
        let id = Ulid::from_parts(1_800_000_000_000, 100 + n);
        let mut msg = message(id, &format!("{:02x}", 0x10 + n), Some("host-a"));
        msg.fields.insert("note".into(), json!(pad));
        enqueue(&probe, id, serde_json::to_vec(&msg).expect("json")).await;
    }
    let collector = spawn_collector(&server, &client, "c", &[]);
    probe.wait_drained(12, Duration::from_secs(60)).await;
    let totals = collector.shutdown().await;
    assert_eq!(totals.processed, 12, "{totals:?}");
    assert_eq!(probe.stats().await.records, 12);
}

/// Defect: an unreadable stats counter silently restarted at zero. The partition now waits
/// (its entries stay queued, the counter is not overwritten) until an operator restores or
/// deletes it, and then everything lands once.
#[tokio::test]
async fn an_unreadable_counter_holds_its_partition_instead_of_restarting_at_zero() {
    let (server, client, probe) = etcd().await;
    let partition = partition_of(b"host-a/1");
    let counter = probe.keys().partition_stats(partition);
    client
        .clone()
        .put(counter.as_str(), "garbage", None)
        .await
        .expect("put");
    let ids: Vec<Ulid> = (0..3)
        .map(|n| Ulid::from_parts(1_800_000_000_000, 200 + n))
        .collect();
    for (n, id) in ids.iter().enumerate() {
        let msg = message(*id, &format!("{:02x}", 0xa0 + n), Some("host-a"));
        enqueue(&probe, *id, serde_json::to_vec(&msg).expect("json")).await;
    }
    let collector = spawn_collector(&server, &client, "c", &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        probe.queue_depth().await,
        3,
        "nothing settled on a guessed counter"
    );
    let (_, value) = probe.range(&counter).await.remove(0);
    assert_eq!(value, b"garbage", "the counter is not overwritten");
    // The operator deletes it: counts restart at zero, knowingly.
    client
        .clone()
        .delete(counter.as_str(), None)
        .await
        .expect("delete");
    probe.wait_drained(3, Duration::from_secs(30)).await;
    collector.shutdown().await;
    assert_eq!(probe.stats().await.records, 3);
}
