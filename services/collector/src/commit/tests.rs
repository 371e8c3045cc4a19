//! Commit tests: test data for the pure parts, and the transaction against a real etcd (the
//! fence, group commit, stale counters, and a retry after a lost reply).

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use serde_json::json;
use telemetry_harness::{EtcdServer, count, range_all};
use telemetry_shared::{Fields, Keyspace, Message, SchemaVersion, Timestamp, model::PartitionStats};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{
    config::Columns,
    validate::{Context, Record, validate},
};

/// A `v1` message of GPU `gpu` on `host` as queued JSON, with id number `n`.
pub(crate) fn message_payload(n: u128, host: &str, gpu: u32) -> (String, Vec<u8>) {
    let mut fields = Fields::new();
    fields.insert("Hostname".into(), json!(host));
    fields.insert("gpu_id".into(), json!(f64::from(gpu)));
    fields.insert("uuid".into(), json!(format!("GPU-{host}-{gpu}")));
    fields.insert("metric_name".into(), json!("DCGM_FI_DEV_GPU_UTIL"));
    fields.insert("value".into(), json!(n as f64));
    let id = ulid::Ulid::from_parts(1_700_000_000_000 + n as u64, n);
    let message = Message {
        schema_version: SchemaVersion::V1,
        id,
        timestamp: Timestamp::now(),
        idempotency_key: format!("{:064x}", n + 1),
        source: None,
        fields,
    };
    (id.to_string(), serde_json::to_vec(&message).unwrap_or_default())
}

/// Validates a JSON payload as the collector does.
pub(crate) fn validated(payload: &[u8], id: &str, keys: &Keyspace) -> Record {
    let profiles = telemetry_shared::profiles::ProfileCache::new();
    let mut book = telemetry_shared::record::ProfileBook::new();
    let mut ctx = Context {
        keys,
        columns: &Columns::default(),
        profiles: &profiles,
        book: &mut book,
    };
    validate(payload, id, &mut ctx).unwrap_or_else(|e| panic!("{e}"))
}

fn number(name: &str) -> u128 {
    name.bytes()
        .fold(7u128, |h, b| h.wrapping_mul(31).wrapping_add(u128::from(b)))
        % 1_000_000
}

/// A record item for a message named `name`, read at `revision`.
pub(crate) fn record_item(name: &str, revision: i64) -> Item {
    let keys = Keyspace::new("/t");
    let (id, payload) = message_payload(number(name), "host-1", 0);
    let record = validated(&payload, &id, &keys);
    Item::Record {
        queue_key: keys.queue_entry(1, &id),
        revision,
        record: Box::new(record),
    }
}

/// A dead-letter item for a message named `name`, read at `revision`.
pub(crate) fn dead_item(name: &str, revision: i64) -> Item {
    let keys = Keyspace::new("/t");
    let id = ulid::Ulid::from_parts(1, number(name)).to_string();
    let queue_key = keys.queue_entry(1, &id);
    Item::Dead {
        dead_key: keys.deadletter(&id),
        letter: Box::new(DeadLetter::new(&queue_key, "bad".into(), b"garbage", "c")),
        queue_key,
        revision,
    }
}

/// A batch of `items` for `partition` under lease 7.
pub(crate) fn sub_batch(partition: u32, items: Vec<Item>) -> SubBatch {
    SubBatch {
        partition,
        lease: 7,
        base: PartitionStats::default(),
        stats_rev: 0,
        items,
        index: IndexUpdates::default(),
        profiles: Vec::new(),
        uncertain: false,
    }
}

const NS: &str = "/commit";

fn keys() -> Keyspace {
    Keyspace::new(NS)
}

async fn etcd() -> (EtcdServer, Client) {
    telemetry_harness::strict_etcd().await.expect("etcd starts")
}

fn committer(client: &Client) -> Committer {
    Committer::new(
        client.clone(),
        keys(),
        Duration::from_secs(60),
        Duration::from_secs(60),
        CancellationToken::new(),
    )
}

/// Enqueues `payload` as message `id` in `partition`; returns the queue key and its revision.
async fn enqueue(client: &Client, partition: u32, id: &str, payload: Vec<u8>) -> (String, i64) {
    let key = keys().queue_entry(partition, id);
    let resp = client
        .clone()
        .put(key.as_str(), payload, None)
        .await
        .expect("put");
    (key, resp.header().map_or(0, |h| h.revision()))
}

/// Queues a valid message and returns it as a record item.
async fn queued_record(client: &Client, partition: u32, n: u128, host: &str) -> Item {
    let (id, payload) = message_payload(n, host, (n % 8) as u32);
    let record = validated(&payload, &id, &keys());
    let (queue_key, revision) = enqueue(client, partition, &id, payload).await;
    Item::Record {
        queue_key,
        revision,
        record: Box::new(record),
    }
}

/// Makes `lease` the owner of `partition`.
async fn own(client: &Client, partition: u32, lease: i64) {
    client
        .clone()
        .put(
            keys().owner(partition),
            "me",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("own partition");
}

async fn stored_stats(client: &Client, partition: u32) -> PartitionStats {
    let (_, raw) = range_all(client, &keys().partition_stats(partition))
        .await
        .expect("range")
        .remove(0);
    serde_json::from_slice(&raw).expect("counter JSON")
}

fn batch(partition: u32, lease: i64, items: Vec<Item>) -> SubBatch {
    SubBatch {
        lease,
        ..sub_batch(partition, items)
    }
}

/// The fence itself, deterministically: a commit carrying a lease that no longer owns the
/// partition is refused and writes nothing, not even part of the batch.
#[tokio::test]
async fn a_commit_fenced_by_a_lost_lease_is_refused_and_writes_nothing() {
    let (_server, client) = etcd().await;
    let item = queued_record(&client, 3, 1, "host-1").await;
    let stale = client.clone().lease_grant(30, None).await.expect("grant").id();
    let owner = client.clone().lease_grant(30, None).await.expect("grant").id();
    own(&client, 3, owner).await;
    let c = committer(&client);
    let mut subs = vec![batch(3, stale, vec![item])];
    assert_eq!(
        c.commit_many(&mut subs).await.expect("answers"),
        vec![Outcome::FenceLost]
    );
    for prefix in [
        keys().data_prefix(),
        format!("{NS}/dedup/processed/"),
        keys().stats_prefix(),
    ] {
        assert_eq!(
            count(&client, &prefix).await.expect("count"),
            0,
            "{prefix} untouched"
        );
    }
    assert_eq!(count(&client, &keys().queue_prefix()).await.expect("count"), 1);
    // The same commit with the owner's lease lands.
    subs[0].lease = owner;
    let outcomes = c.commit_many(&mut subs).await.expect("answers");
    assert!(
        matches!(&outcomes[0], Outcome::Committed { effects, .. } if effects.records == 1),
        "{outcomes:?}"
    );
    assert_eq!(count(&client, &keys().data_prefix()).await.expect("count"), 1);
    assert_eq!(count(&client, &keys().queue_prefix()).await.expect("count"), 0);
}

/// Group commit: batches of different partitions that share index keys (GPUs of one host hash
/// to several partitions) land in one transaction; etcd refuses a transaction that writes a key
/// twice, so the index writes are merged.
#[tokio::test]
async fn batches_sharing_a_host_commit_together_in_one_transaction() {
    let (_server, client) = etcd().await;
    let lease = client.clone().lease_grant(30, None).await.expect("grant").id();
    let mut subs = Vec::new();
    for (partition, n) in [(1, 1), (2, 2)] {
        own(&client, partition, lease).await;
        let mut sub = batch(
            partition,
            lease,
            vec![queued_record(&client, partition, n, "host-1").await],
        );
        sub.index.hosts = vec!["host-1".into()];
        subs.push(sub);
    }
    let outcomes = committer(&client).commit_many(&mut subs).await.expect("lands");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Committed { effects, .. } if effects.records == 1)),
        "{outcomes:?}"
    );
    assert_eq!(count(&client, &keys().data_prefix()).await.expect("count"), 2);
    assert_eq!(
        count(&client, &keys().host_index_prefix()).await.expect("count"),
        1
    );
}

/// The counter is fenced on its revision: a commit computed from a stale base adopts the stored
/// value instead of overwriting it.
#[tokio::test]
async fn a_commit_from_a_stale_stats_base_adopts_the_stored_counter() {
    let (_server, client) = etcd().await;
    let lease = client.clone().lease_grant(30, None).await.expect("grant").id();
    own(&client, 4, lease).await;
    let stored = PartitionStats {
        records: 5,
        duplicates: 1,
        ..Default::default()
    };
    client
        .clone()
        .put(
            keys().partition_stats(4),
            serde_json::to_vec(&stored).expect("json"),
            None,
        )
        .await
        .expect("put stats");
    let mut subs = vec![batch(4, lease, vec![queued_record(&client, 4, 1, "h").await])];
    let outcomes = committer(&client).commit_many(&mut subs).await.expect("answers");
    let Outcome::Committed { stats, .. } = &outcomes[0] else {
        panic!("committed: {outcomes:?}");
    };
    assert_eq!(
        (stats.records, stats.duplicates),
        (6, 1),
        "built on the stored counter"
    );
    assert_eq!(stored_stats(&client, 4).await.records, 6);
}

/// Defect: a commit whose reply was lost was rebuilt from the in-memory queue, and the retry
/// re-put its dead letters and counted them and its duplicates a second time. Every entry is
/// now compared at the revision it was read at, so the retry settles nothing twice.
#[tokio::test]
async fn a_commit_retried_after_a_lost_reply_counts_nothing_twice() {
    let (_server, client) = etcd().await;
    let lease = client.clone().lease_grant(30, None).await.expect("grant").id();
    own(&client, 5, lease).await;
    let record = queued_record(&client, 5, 1, "h").await;
    // The same content queued again under another id: a duplicate within the batch.
    let (_, payload) = message_payload(1, "h", 1);
    let mut twin: Message = serde_json::from_slice(&payload).expect("json");
    twin.id = ulid::Ulid::from_parts(1_800_000_000_000, 9);
    let twin_payload = serde_json::to_vec(&twin).expect("json");
    let twin_record = validated(&twin_payload, &twin.id.to_string(), &keys());
    let (twin_key, twin_rev) = enqueue(&client, 5, &twin.id.to_string(), twin_payload).await;
    let dead_id = ulid::Ulid::from_parts(1_800_000_000_001, 10).to_string();
    let (dead_key_q, dead_rev) = enqueue(&client, 5, &dead_id, b"not json".to_vec()).await;
    let items = vec![
        record,
        Item::Record {
            queue_key: twin_key,
            revision: twin_rev,
            record: Box::new(twin_record),
        },
        Item::Dead {
            dead_key: keys().deadletter(&dead_id),
            letter: Box::new(DeadLetter::new(&dead_key_q, "not JSON".into(), b"not json", "c")),
            queue_key: dead_key_q,
            revision: dead_rev,
        },
    ];
    let original = batch(5, lease, items);
    let c = committer(&client);
    let first = c.commit_many(&mut [original.clone()]).await.expect("lands");
    assert!(matches!(&first[0], Outcome::Committed { .. }), "{first:?}");
    let truth = PartitionStats {
        records: 1,
        duplicates: 1,
        dead_letters: 1,
        ..stored_stats(&client, 5).await
    };
    assert_eq!(stored_stats(&client, 5).await, truth);
    let dead_written_at = range_all(&client, &keys().deadletter_prefix())
        .await
        .expect("range")
        .len();
    // The reply was lost: the partition rebuilds the same batch (same base, same entries).
    let mut retry = original.clone();
    retry.uncertain = true;
    let again = c.commit_many(&mut [retry]).await.expect("answers");
    let Outcome::Committed { stats, effects, .. } = &again[0] else {
        panic!("{again:?}");
    };
    assert_eq!(*stats, truth, "nothing counted twice");
    assert_eq!(stored_stats(&client, 5).await, truth);
    assert_eq!(
        (
            effects.records,
            effects.duplicates,
            effects.dead,
            effects.landed_earlier
        ),
        (1, 1, 1, 3),
        "the earlier attempt's effects are reported once, as landed earlier"
    );
    assert_eq!(
        range_all(&client, &keys().deadletter_prefix())
            .await
            .expect("range")
            .len(),
        dead_written_at
    );
    assert_eq!(count(&client, &keys().data_prefix()).await.expect("count"), 1);
}

/// The commit's failure-branch reads are not part of its request: a refused transaction is
/// answered by a second, read-only one with the reads in order, and an applied one by its own
/// answer alone.
#[tokio::test]
async fn failure_reads_are_sent_only_when_a_compare_fails() {
    use etcd_client::{Compare, CompareOp, TxnOp};
    use telemetry_shared::etcd::{BoundedTxn, TxnAnswer};
    let (_server, client) = etcd().await;
    client.clone().put("/t/a", "1", None).await.expect("put");
    let build = |expected: i64| {
        let mut txn = BoundedTxn::new();
        txn.compare(Compare::version("/t/a", CompareOp::Equal, expected));
        txn.then(TxnOp::put("/t/b", "written", None));
        txn.otherwise(TxnOp::get("/t/missing", None));
        txn.otherwise(TxnOp::get("/t/a", None));
        txn.build_split().expect("fits")
    };
    let answer = build(2).send(&mut client.clone()).await.expect("answer");
    let TxnAnswer::Refused(Ok(reads)) = answer else {
        panic!("refused with reads, got {answer:?}");
    };
    let found = plan::found(reads);
    assert_eq!(found.len(), 2);
    assert!(found[0].is_none());
    assert_eq!(found[1].as_ref().map(|f| f.value.clone()), Some(b"1".to_vec()));
    assert_eq!(count(&client, "/t/b").await.expect("count"), 0, "nothing applied");
    let answer = build(1).send(&mut client.clone()).await.expect("answer");
    let TxnAnswer::Applied(resp) = answer else {
        panic!("applied, got {answer:?}");
    };
    assert!(
        resp.op_responses()
            .iter()
            .all(|op| !matches!(op, etcd_client::TxnOpResponse::Get(_)))
    );
    assert_eq!(count(&client, "/t/b").await.expect("count"), 1);
}
