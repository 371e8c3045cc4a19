//! What the pipeline stored in one namespace, read for assertions: the queue, the records, the
//! partition counters, checkpoints and partition owners, the exporters' checkpoints and
//! owners, and waits on them.
//!
//! A [`Probe`] is a client and a [`Keyspace`]. Its reads panic on an etcd error, with the
//! prefix in the message: they are for tests, where an unreadable store is a failed test.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use etcd_client::Client;
use telemetry_shared::{
    Checkpoint, Keyspace, Message,
    keys::QUEUE_PARTITIONS,
    model::{ExportCheckpoint, Member, PartitionStats},
};

use crate::{count, eventually_every, range_all};

/// Reads one namespace of the pipeline's keys.
#[derive(Clone)]
pub struct Probe {
    client: Client,
    keys: Keyspace,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Probe {
    /// Reads `namespace` through `client`.
    pub fn new(client: &Client, namespace: &str) -> Self {
        Probe {
            client: client.clone(),
            keys: Keyspace::new(namespace),
        }
    }

    /// The key layout of the namespace.
    pub fn keys(&self) -> &Keyspace {
        &self.keys
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Keys under `prefix` (count only).
    pub async fn count(&self, prefix: &str) -> i64 {
        count(&self.client, prefix)
            .await
            .unwrap_or_else(|e| panic!("counting {prefix}: {e}"))
    }

    /// Every key/value under `prefix`, read in pages at one revision.
    pub async fn range(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        range_all(&self.client, prefix)
            .await
            .unwrap_or_else(|e| panic!("reading {prefix}: {e}"))
    }

    /// Entries in the queue.
    pub async fn queue_depth(&self) -> i64 {
        self.count(&self.keys.queue_prefix()).await
    }

    /// Stored records.
    pub async fn data_count(&self) -> i64 {
        self.count(&self.keys.data_prefix()).await
    }

    /// Dead letters.
    pub async fn dead_letter_count(&self) -> i64 {
        self.count(&self.keys.deadletter_prefix()).await
    }

    /// Every queued message, decoded (lean or earlier JSON), by queue key.
    pub async fn queue(&self) -> BTreeMap<String, Message> {
        crate::queued_messages(&self.client, &self.keys)
            .await
            .unwrap_or_else(|e| panic!("reading the queue: {e}"))
    }

    /// Every stored record, decoded (lean with its profile, or earlier JSON), by data key.
    pub async fn records(&self) -> BTreeMap<String, Message> {
        crate::stored_records(&self.client, &self.keys)
            .await
            .unwrap_or_else(|e| panic!("reading the records: {e}"))
    }

    /// The partition counters, summed over every partition.
    pub async fn stats(&self) -> PartitionStats {
        let mut total = PartitionStats::default();
        for (key, value) in self.range(&self.keys.stats_prefix()).await {
            let s: PartitionStats =
                serde_json::from_slice(&value).unwrap_or_else(|e| panic!("{key} is not a counter: {e}"));
            total.records += s.records;
            total.duplicates += s.duplicates;
            total.dead_letters += s.dead_letters;
        }
        total
    }

    /// The checkpoint of `stream` (a worker's stream id, such as `dcgm-w0`), if any.
    pub async fn checkpoint(&self, stream: &str) -> Option<Checkpoint> {
        let key = self.keys.stream_checkpoint(stream);
        let resp = self
            .client
            .clone()
            .get(key.as_str(), None)
            .await
            .unwrap_or_else(|e| panic!("reading {key}: {e}"));
        resp.kvs().first().map(|kv| {
            serde_json::from_slice(kv.value()).unwrap_or_else(|e| panic!("{key} is not a checkpoint: {e}"))
        })
    }

    /// The checkpoint of exporter `name` (a default one when it has none yet).
    pub async fn export_checkpoint(&self, name: &str) -> ExportCheckpoint {
        let key = self.keys.exporter_checkpoint(name);
        let resp = self
            .client
            .clone()
            .get(key.as_str(), None)
            .await
            .unwrap_or_else(|e| panic!("reading {key}: {e}"));
        resp.kvs()
            .first()
            .map(|kv| {
                serde_json::from_slice(kv.value())
                    .unwrap_or_else(|e| panic!("{key} is not a checkpoint: {e}"))
            })
            .unwrap_or_default()
    }

    /// The id of the active exporter of `name`, if any.
    pub async fn exporter_owner(&self, name: &str) -> Option<String> {
        let key = self.keys.exporter_owner(name);
        let resp = self.client.clone().get(key.as_str(), None).await.ok()?;
        let kv = resp.kvs().first()?;
        serde_json::from_slice::<Member>(kv.value()).ok().map(|m| m.id)
    }

    /// Waits until the checkpoint of exporter `name` accounts for `n` records (exported,
    /// rejected or expired); returns it. Panics after `timeout`.
    pub async fn wait_exported(&self, name: &str, n: u64, timeout: Duration) -> ExportCheckpoint {
        let ok = eventually_every(Duration::from_millis(50), timeout, || async {
            let cp = self.export_checkpoint(name).await;
            cp.records + cp.rejected + cp.expired >= n
        })
        .await;
        let cp = self.export_checkpoint(name).await;
        assert!(
            ok,
            "exporter {name} did not account for {n} records in {timeout:?}: {cp:?}"
        );
        cp
    }

    /// Partitions held, by collector id.
    pub async fn owners(&self) -> BTreeMap<String, usize> {
        let mut held = BTreeMap::new();
        for (_, v) in self.range(&self.keys.owners_prefix()).await {
            *held.entry(String::from_utf8_lossy(&v).into_owned()).or_default() += 1;
        }
        held
    }

    /// Partitions held by collector `id`.
    pub async fn owned_by(&self, id: &str) -> usize {
        self.owners().await.get(id).copied().unwrap_or(0)
    }

    /// Is the queue empty with at least `n` records stored? (The small queue is counted first,
    /// the data prefix only once the queue is empty.)
    pub async fn drained(&self, n: i64) -> bool {
        self.queue_depth().await == 0 && self.data_count().await >= n
    }

    /// Waits (polling every 100 ms) until the queue is empty and at least `n` records are
    /// stored; panics with both counts after `timeout`.
    pub async fn wait_drained(&self, n: i64, timeout: Duration) {
        let ok = eventually_every(Duration::from_millis(100), timeout, || self.drained(n)).await;
        assert!(
            ok,
            "not drained within {timeout:?}: {} records stored (expected {n}), {} queued",
            self.data_count().await,
            self.queue_depth().await
        );
    }

    /// Waits until the queue holds at least `n` entries; returns the depth seen. Panics after
    /// `timeout`.
    pub async fn wait_for_depth(&self, n: i64, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let depth = self.queue_depth().await;
            if depth >= n {
                return depth;
            }
            assert!(
                Instant::now() < deadline,
                "the queue never reached {n} entries in {timeout:?} (last {depth})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until at least `n` records are stored; panics after `timeout`.
    pub async fn wait_for_records(&self, n: i64, timeout: Duration) {
        let ok = eventually_every(Duration::from_millis(50), timeout, || async {
            self.data_count().await >= n
        })
        .await;
        assert!(
            ok,
            "fewer than {n} records stored after {timeout:?} ({})",
            self.data_count().await
        );
    }

    /// Waits until collector `id` owns `partitions` partitions; panics after `timeout`.
    pub async fn wait_owned_by(&self, id: &str, partitions: usize, timeout: Duration) {
        let ok = eventually_every(Duration::from_millis(50), timeout, || async {
            self.owned_by(id).await == partitions
        })
        .await;
        assert!(
            ok,
            "{id} does not own {partitions} partitions after {timeout:?}: {:?}",
            self.owners().await
        );
    }

    /// Waits until every queue partition has an owner; `false` after `timeout`.
    pub async fn all_partitions_owned(&self, timeout: Duration) -> bool {
        eventually_every(Duration::from_millis(50), timeout, || async {
            self.count(&self.keys.owners_prefix()).await >= QUEUE_PARTITIONS as i64
        })
        .await
    }
}

/// Asserts that `messages` hold rows `1..=n` of `(stream, pass)` exactly once each (messages of
/// other streams and passes are ignored).
pub fn assert_rows_exactly_once<'a>(
    messages: impl IntoIterator<Item = &'a Message>,
    stream: &str,
    pass: u64,
    n: u64,
) {
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for msg in messages {
        let src = msg.source.as_ref().expect("every message has a source position");
        if src.stream_id == stream && src.pass == pass {
            *seen.entry(src.row).or_default() += 1;
        }
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(doubled.is_empty(), "rows present more than once: {doubled:?}");
    let missing: Vec<u64> = (1..=n).filter(|r| !seen.contains_key(r)).collect();
    assert!(
        missing.is_empty(),
        "rows missing: {} (first {:?})",
        missing.len(),
        missing.first()
    );
    assert_eq!(seen.len() as u64, n, "rows beyond {n}");
}
