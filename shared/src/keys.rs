//! The one definition of the etcd key layout.
//!
//! Every service builds keys through [`Keyspace`] so the layout lives in a single place. All keys
//! sit below an optional namespace (`ETCD_NAMESPACE`), which lets several pipelines (or several
//! tests) share one etcd without seeing each other.
//!
//! | key | value | written by |
//! |---|---|---|
//! | `{ns}/queue/telemetry/{pp}/{ULID}` | lean record ([`crate::record`]) or message JSON | streamer (enqueue) |
//! | `{ns}/dedup/{base64url(SHA-256(idempotency_key)[..16])}` | empty, leased | streamer, same txn as the queue entry (collector for other producers) |
//! | `{ns}/streams/{stream_id}/checkpoint` | [`crate::message::Checkpoint`] JSON | streamer, same txn as each batch |
//! | `{ns}/telemetry/data/{hostname}/{gpu_id}/{timestamp}_{ULID}` | lean record (v1 JSON before the lean release) | collector |
//! | `{ns}/deadletter/{ULID}` | [`crate::model::DeadLetter`] JSON | collector, same txn as the queue removal |
//! | `{ns}/collectors/members/{collector_id}` | [`crate::model::Member`] JSON, session lease | collector |
//! | `{ns}/collectors/owners/{pp}` | owning collector id, session lease | collector |
//! | `{ns}/index/gpus/{uuid}` | [`crate::model::GpuInfo`] JSON | collector, in commit txns |
//! | `{ns}/index/profiles/{id}` | [`crate::record::Profile`] JSON, id from its content | streamer or collector, with the first record that uses it |
//! | `{ns}/index/hosts/{hostname}` | hostname | collector, in commit txns |
//! | `{ns}/stats/partitions/{pp}` | [`crate::model::PartitionStats`] JSON | partition owner, in commit txns |
//! | `{ns}/exporters/{name}/owner` | [`crate::model::ExporterOwner`] JSON, the owner's lease | exporter, when it becomes the active one (`create_revision == 0`) |
//! | `{ns}/exporters/{name}/checkpoint` | [`crate::model::ExportCheckpoint`] JSON | the active exporter, after the TSDB acknowledged, fenced by the owner key's lease |
//! | `{ns}/exporters/{name}/rejected/{revision:020}-{digest}` | [`crate::model::RejectedRecord`] JSON (the newest `REJECTED_KEEP`) | the active exporter, in the checkpoint transaction that passes the record |
//!
//! `{pp}` is the queue partition, two decimal digits: a hash of the GPU identity picks it so
//! that one GPU's messages stay in one partition (and so in order) and collectors can own whole
//! partitions instead of claiming single messages.

use std::fmt::Write as _;

use sha2::Digest as _;

/// Bytes of the SHA-256 of an idempotency key that name its dedup marker.
const MARKER_BYTES: usize = 16;

/// Number of queue partitions. Producers and consumers must agree on it, so it is a constant of
/// the key layout; changing it requires draining the queue first.
pub const QUEUE_PARTITIONS: u32 = 32;

/// Builds every etcd key of the pipeline under one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    ns: String,
}

impl Keyspace {
    /// A keyspace below `namespace` (may be empty; a trailing `/` is ignored).
    pub fn new(namespace: &str) -> Self {
        Keyspace {
            ns: namespace.trim_end_matches('/').to_string(),
        }
    }

    /// The namespace prefix (empty or without a trailing slash).
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    fn key(&self, rest: std::fmt::Arguments<'_>) -> String {
        let mut out = String::with_capacity(self.ns.len() + 128);
        out.push_str(&self.ns);
        // Writing into a String cannot fail.
        let _ = out.write_fmt(rest);
        out
    }

    /// Prefix of every queued message, across all partitions.
    pub fn queue_prefix(&self) -> String {
        self.key(format_args!("/queue/telemetry/"))
    }

    /// Prefix of one queue partition.
    pub fn queue_partition_prefix(&self, partition: u32) -> String {
        self.key(format_args!("/queue/telemetry/{partition:02}/"))
    }

    /// Key of a queued message.
    pub fn queue_entry(&self, partition: u32, message_id: &str) -> String {
        self.key(format_args!("/queue/telemetry/{partition:02}/{message_id}"))
    }

    /// Splits a queue key into (partition, message id), or `None` if it is not one.
    pub fn parse_queue_entry<'k>(&self, key: &'k str) -> Option<(u32, &'k str)> {
        let rest = key.strip_prefix(&self.ns)?.strip_prefix("/queue/telemetry/")?;
        let (partition, id) = rest.split_once('/')?;
        let partition = partition.parse().ok()?;
        (partition < QUEUE_PARTITIONS && !id.is_empty() && !id.contains('/')).then_some((partition, id))
    }

    /// The dedup marker of an idempotency key (64 hex digits): present, with an empty value,
    /// while a message with that key is enqueued or was stored recently. It is written in the
    /// transaction that enqueues the message (or, for a producer that does not write markers, in
    /// the one that stores it). The marker is named by the first 128 bits of the SHA-256 of the
    /// key, in base64url (22 characters instead of 64). Hashing again makes any key spread
    /// evenly, a producer's structured keys included (`00…01`, `00…02` share their first half),
    /// so two different keys share a marker with probability about n² / 2¹²⁹ for n markers
    /// alive at once (below 10⁻¹⁴ for a trillion). Every record keeps its marker for
    /// `DEDUP_TTL`, so the name's length is paid by every record.
    pub fn dedup_marker(&self, idempotency_key: &str) -> String {
        use base64::Engine as _;
        let mut bytes = [0u8; 32];
        let digest = match hex::decode_to_slice(idempotency_key, &mut bytes) {
            Ok(()) => sha2::Sha256::digest(bytes),
            // Not 32 bytes of hex (validation refuses such keys before they get here): its text.
            Err(_) => match hex::decode(idempotency_key) {
                Ok(other) => sha2::Sha256::digest(other),
                Err(_) => sha2::Sha256::digest(idempotency_key.as_bytes()),
            },
        };
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..MARKER_BYTES]);
        self.key(format_args!("/dedup/{encoded}"))
    }

    /// Prefix of all dedup markers.
    pub fn dedup_prefix(&self) -> String {
        self.key(format_args!("/dedup/"))
    }

    /// Prefix of the record profiles (see [`crate::record`]).
    pub fn profiles_prefix(&self) -> String {
        self.key(format_args!("/index/profiles/"))
    }

    /// A record profile, by id.
    pub fn profile(&self, id: crate::record::ProfileId) -> String {
        self.key(format_args!("/index/profiles/{id}"))
    }

    /// A stream's checkpoint (last committed pass and row).
    pub fn stream_checkpoint(&self, stream_id: &str) -> String {
        self.key(format_args!("/streams/{stream_id}/checkpoint"))
    }

    /// A stream's origin: its first checkpoint, written with it and never changed, so that a
    /// checkpoint deleted later is noticed instead of read as a new stream.
    pub fn stream_origin(&self, stream_id: &str) -> String {
        self.key(format_args!("/streams/{stream_id}/origin"))
    }

    /// The owner of a scraped target's stream: the id of the streamer that scrapes it, on that
    /// streamer's lease (created with `create_revision == 0`).
    pub fn scrape_owner(&self, stream_id: &str) -> String {
        self.key(format_args!("/scrapes/{stream_id}/owner"))
    }

    /// Prefix of all scrape owner keys.
    pub fn scrapes_prefix(&self) -> String {
        self.key(format_args!("/scrapes/"))
    }

    /// Prefix of all stream checkpoints.
    pub fn streams_prefix(&self) -> String {
        self.key(format_args!("/streams/"))
    }

    /// Prefix of all telemetry data.
    pub fn data_prefix(&self) -> String {
        self.key(format_args!("/telemetry/data/"))
    }

    /// Prefix of one GPU's telemetry.
    pub fn gpu_data_prefix(&self, hostname: &str, gpu_id: &str) -> String {
        self.key(format_args!("/telemetry/data/{hostname}/{gpu_id}/"))
    }

    /// Key of one telemetry record; `timestamp` must be fixed-width so key order is time order.
    pub fn data_record(&self, hostname: &str, gpu_id: &str, timestamp: &str, message_id: &str) -> String {
        self.key(format_args!(
            "/telemetry/data/{hostname}/{gpu_id}/{timestamp}_{message_id}"
        ))
    }

    /// Splits a telemetry record's key into its parts, or `None` if it is not one.
    pub fn parse_data_record<'k>(&self, key: &'k str) -> Option<DataKey<'k>> {
        let rest = key.strip_prefix(&self.ns)?.strip_prefix("/telemetry/data/")?;
        let (hostname, rest) = rest.split_once('/')?;
        let (gpu_id, leaf) = rest.split_once('/')?;
        let (timestamp, message_id) = leaf.rsplit_once('_')?;
        let valid = is_key_segment(hostname)
            && is_key_segment(gpu_id)
            && timestamp.len() == TIMESTAMP_WIDTH
            && !message_id.is_empty()
            && !message_id.contains('/');
        valid.then_some(DataKey {
            hostname,
            gpu_id,
            timestamp,
            message_id,
        })
    }

    /// Prefix of all dead letters.
    pub fn deadletter_prefix(&self) -> String {
        self.key(format_args!("/deadletter/"))
    }

    /// Key of a dead-lettered message.
    pub fn deadletter(&self, message_id: &str) -> String {
        self.key(format_args!("/deadletter/{message_id}"))
    }

    /// The id of a dead-letter key, or `None` if it is not one.
    pub fn parse_deadletter<'k>(&self, key: &'k str) -> Option<&'k str> {
        let id = key.strip_prefix(&self.ns)?.strip_prefix("/deadletter/")?;
        (!id.is_empty() && !id.contains('/')).then_some(id)
    }

    /// The id a dead letter of `queue_key` is stored under: the queue key's message id when it is
    /// a ULID (the layout's `/deadletter/{ULID}`), otherwise a digest of the whole queue key, so
    /// two malformed keys can never share (and overwrite) one dead letter.
    pub fn dead_letter_id(&self, queue_key: &str) -> String {
        if let Some((_, id)) = self.parse_queue_entry(queue_key)
            && id.parse::<ulid::Ulid>().is_ok()
        {
            return id.to_string();
        }
        let digest = sha2::Sha256::digest(queue_key.as_bytes());
        format!("key-{}", hex::encode(&digest[..8]))
    }
}

impl Keyspace {
    /// Prefix of collector registrations and partition ownership.
    pub fn collectors_prefix(&self) -> String {
        self.key(format_args!("/collectors/"))
    }

    /// Prefix of collector registrations.
    pub fn members_prefix(&self) -> String {
        self.key(format_args!("/collectors/members/"))
    }

    /// A collector's registration key.
    pub fn member(&self, collector_id: &str) -> String {
        self.key(format_args!("/collectors/members/{collector_id}"))
    }

    /// Prefix of partition ownership keys.
    pub fn owners_prefix(&self) -> String {
        self.key(format_args!("/collectors/owners/"))
    }

    /// The ownership key of a queue partition.
    pub fn owner(&self, partition: u32) -> String {
        self.key(format_args!("/collectors/owners/{partition:02}"))
    }

    /// Prefix of the GPU index.
    pub fn gpu_index_prefix(&self) -> String {
        self.key(format_args!("/index/gpus/"))
    }

    /// A GPU's index entry, by UUID.
    pub fn gpu_index(&self, uuid: &str) -> String {
        self.key(format_args!("/index/gpus/{uuid}"))
    }

    /// Prefix of the host index.
    pub fn host_index_prefix(&self) -> String {
        self.key(format_args!("/index/hosts/"))
    }

    /// A host's index entry.
    pub fn host_index(&self, hostname: &str) -> String {
        self.key(format_args!("/index/hosts/{hostname}"))
    }

    /// Prefix of the per-partition stats counters.
    pub fn stats_prefix(&self) -> String {
        self.key(format_args!("/stats/partitions/"))
    }

    /// The stats counter of a partition.
    pub fn partition_stats(&self, partition: u32) -> String {
        self.key(format_args!("/stats/partitions/{partition:02}"))
    }

    /// The collector id of a registration key, or `None` if it is not one.
    pub fn parse_member<'k>(&self, key: &'k str) -> Option<&'k str> {
        let id = key.strip_prefix(&self.ns)?.strip_prefix("/collectors/members/")?;
        is_key_segment(id).then_some(id)
    }

    /// The partition of an ownership key, or `None` if it is not one.
    pub fn parse_owner(&self, key: &str) -> Option<u32> {
        parse_partition(key.strip_prefix(&self.ns)?.strip_prefix("/collectors/owners/")?)
    }

    /// The partition of a stats counter key, or `None` if it is not one.
    pub fn parse_partition_stats(&self, key: &str) -> Option<u32> {
        parse_partition(key.strip_prefix(&self.ns)?.strip_prefix("/stats/partitions/")?)
    }

    /// The UUID of a GPU index key, or `None` if it is not one.
    pub fn parse_gpu_index<'k>(&self, key: &'k str) -> Option<&'k str> {
        let uuid = key.strip_prefix(&self.ns)?.strip_prefix("/index/gpus/")?;
        is_key_segment(uuid).then_some(uuid)
    }
}

impl Keyspace {
    /// Prefix of every exporter's keys.
    pub fn exporters_prefix(&self) -> String {
        self.key(format_args!("/exporters/"))
    }

    /// The leased key naming the active exporter of `name`.
    pub fn exporter_owner(&self, name: &str) -> String {
        self.key(format_args!("/exporters/{name}/owner"))
    }

    /// The checkpoint of exporter `name`: the position up to which every record is exported.
    pub fn exporter_checkpoint(&self, name: &str) -> String {
        self.key(format_args!("/exporters/{name}/checkpoint"))
    }

    /// Prefix of the records exporter `name` rejected.
    pub fn exporter_rejected_prefix(&self, name: &str) -> String {
        self.key(format_args!("/exporters/{name}/rejected/"))
    }

    /// The entry of a record exporter `name` rejected: its revision (zero-padded, so key order
    /// is revision order) and a digest of its data key (two records of one revision).
    pub fn exporter_rejected(&self, name: &str, revision: i64, data_key: &str) -> String {
        let digest = sha2::Sha256::digest(data_key.as_bytes());
        let revision = revision.max(0);
        self.key(format_args!(
            "/exporters/{name}/rejected/{revision:020}-{}",
            hex::encode(&digest[..6])
        ))
    }

    /// The exporter name of a checkpoint key, or `None` if it is not one.
    pub fn parse_exporter_checkpoint<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(&self.ns)?.strip_prefix("/exporters/")?;
        let name = rest.strip_suffix("/checkpoint")?;
        is_key_segment(name).then_some(name)
    }
}

/// Width of the timestamp in a data key (`2026-11-23T08:11:31.123456Z`).
pub const TIMESTAMP_WIDTH: usize = 27;

/// The parts of a telemetry record's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataKey<'k> {
    /// The host.
    pub hostname: &'k str,
    /// The GPU id within the host.
    pub gpu_id: &'k str,
    /// The record's processing time, fixed-width RFC 3339 (key order is time order).
    pub timestamp: &'k str,
    /// The message id.
    pub message_id: &'k str,
}

fn parse_partition(text: &str) -> Option<u32> {
    (text.len() == 2)
        .then(|| text.parse().ok())
        .flatten()
        .filter(|p| *p < QUEUE_PARTITIONS)
}

/// Is `segment` safe to use as one path segment of a key (no `/`, no control characters,
/// non-empty)? Stream ids, hostnames and GPU ids are checked with this before use.
pub fn is_key_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= 256
        && !segment.contains('/')
        && !segment.chars().any(char::is_control)
}

/// The queue partition of a partition key (e.g. `hostname/gpu_id`): FNV-1a, stable across
/// processes, versions and platforms (unlike `std`'s hasher).
pub fn partition_of(partition_key: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in partition_key {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % QUEUE_PARTITIONS
}

/// The smallest key greater than every key starting with `prefix` (etcd's range end for a
/// prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_with_and_without_namespace() {
        let ks = Keyspace::new("");
        assert_eq!(ks.queue_entry(3, "01ABC"), "/queue/telemetry/03/01ABC");
        assert_eq!(
            ks.data_record("host-1", "7", "2026-01-01T00:00:00.000000Z", "01ABC"),
            "/telemetry/data/host-1/7/2026-01-01T00:00:00.000000Z_01ABC"
        );
        let ks = Keyspace::new("/test-1/");
        assert_eq!(ks.queue_prefix(), "/test-1/queue/telemetry/");
        assert_eq!(ks.stream_checkpoint("s"), "/test-1/streams/s/checkpoint");
        assert_eq!(ks.stream_origin("s"), "/test-1/streams/s/origin");
        assert_eq!(
            ks.dedup_marker(&"00".repeat(32)),
            // base64url of the first 16 bytes of SHA-256 of 32 zero bytes.
            "/test-1/dedup/Zmh6rfhivXdsj8GLjp-OIA"
        );
    }

    #[test]
    fn queue_keys_round_trip() {
        let ks = Keyspace::new("/ns");
        let key = ks.queue_entry(31, "01J0000000000000000000000");
        assert_eq!(
            ks.parse_queue_entry(&key),
            Some((31, "01J0000000000000000000000"))
        );
        assert_eq!(ks.parse_queue_entry("/ns/queue/telemetry/99/x"), None);
        assert_eq!(ks.parse_queue_entry("/other/queue/telemetry/01/x"), None);
    }

    #[test]
    fn every_key_parses_back() {
        let ks = Keyspace::new("/ns");
        let key = ks.data_record("host-1", "7", "2026-01-01T00:00:00.000000Z", "01ABC");
        assert_eq!(
            ks.parse_data_record(&key),
            Some(DataKey {
                hostname: "host-1",
                gpu_id: "7",
                timestamp: "2026-01-01T00:00:00.000000Z",
                message_id: "01ABC"
            })
        );
        assert_eq!(ks.parse_data_record("/ns/telemetry/data/h/0/short_01ABC"), None);
        assert_eq!(
            ks.parse_data_record(&Keyspace::new("").data_record("h", "0", "x", "y")),
            None
        );
        assert_eq!(ks.parse_member(&ks.member("c-1")), Some("c-1"));
        assert_eq!(ks.parse_owner(&ks.owner(5)), Some(5));
        assert_eq!(ks.parse_owner("/ns/collectors/owners/5"), None);
        assert_eq!(ks.parse_partition_stats(&ks.partition_stats(31)), Some(31));
        assert_eq!(ks.parse_partition_stats(&ks.partition_stats(32)), None);
        assert_eq!(ks.parse_gpu_index(&ks.gpu_index("GPU-1")), Some("GPU-1"));
        assert_eq!(ks.parse_deadletter(&ks.deadletter("01X")), Some("01X"));
        assert_eq!(ks.parse_member(&ks.owner(1)), None);
        assert_eq!(
            ks.parse_exporter_checkpoint(&ks.exporter_checkpoint("tsdb-1")),
            Some("tsdb-1")
        );
        assert_eq!(ks.parse_exporter_checkpoint(&ks.exporter_owner("x")), None);
    }

    #[test]
    fn rejected_entries_sort_by_revision() {
        let ks = Keyspace::new("/ns");
        let a = ks.exporter_rejected("e", 9, "/ns/telemetry/data/h/0/t_1");
        let b = ks.exporter_rejected("e", 10, "/ns/telemetry/data/h/0/t_0");
        assert!(a < b, "{a} < {b}");
        assert!(a.starts_with(&ks.exporter_rejected_prefix("e")));
        assert_ne!(a, ks.exporter_rejected("e", 9, "/ns/telemetry/data/h/0/t_2"));
    }

    #[test]
    fn dead_letter_ids_are_the_message_id_or_a_digest() {
        let ks = Keyspace::new("");
        let id = ulid::Ulid::from_parts(1, 2).to_string();
        assert_eq!(ks.dead_letter_id(&ks.queue_entry(1, &id)), id);
        let a = ks.dead_letter_id("/queue/telemetry/01/not-a-ulid");
        let b = ks.dead_letter_id("/queue/telemetry/01/not-a-ulid2");
        assert!(a.starts_with("key-") && a.len() == 20, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(
            partition_of(b"mtv5-dgx1-hgpu-031/0"),
            partition_of(b"mtv5-dgx1-hgpu-031/0")
        );
        for i in 0..1000u32 {
            assert!(partition_of(&i.to_le_bytes()) < QUEUE_PARTITIONS);
        }
        // Pinned so that a change of hash (which would reorder in-flight queues) is noticed.
        assert_eq!(partition_of(b""), 0x811c_9dc5 % QUEUE_PARTITIONS);
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }
}
