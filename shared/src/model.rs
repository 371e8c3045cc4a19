//! Records the collector keeps beside the telemetry so the gateway can answer without scanning:
//! the GPU index, per-partition stats counters, dead letters and collector registrations; and
//! the exporter's checkpoint and rejected records.

use serde::{Deserialize, Serialize};

use crate::message::Timestamp;

/// One GPU as the index knows it (`/index/gpus/{uuid}`). `gpu_id` is unique only within a host;
/// the UUID is the global identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// GPU UUID.
    pub uuid: String,
    /// Host the GPU is in.
    pub hostname: String,
    /// GPU index within its host.
    pub gpu_id: String,
    /// Device name (e.g. `nvidia0`), if the source has one.
    #[serde(default)]
    pub device: Option<String>,
    /// Model name, if the source has one.
    #[serde(default)]
    pub model: Option<String>,
    /// Processing time of the newest record seen for this GPU (updated at most about once a
    /// second per GPU, so it may lag by that much).
    pub last_seen: Timestamp,
}

/// Counters of one queue partition (`/stats/partitions/{pp}`). Only the partition's owner writes
/// them, in the same transactions as the effects they count, so they are exact and contention
/// free; the gateway sums the 32 of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PartitionStats {
    /// Telemetry records written (retention expiry does not subtract).
    pub records: u64,
    /// Messages absorbed because their idempotency key was already processed.
    pub duplicates: u64,
    /// Messages dead-lettered.
    pub dead_letters: u64,
    /// Oldest record timestamp written.
    #[serde(default)]
    pub earliest: Option<Timestamp>,
    /// Newest record timestamp written.
    #[serde(default)]
    pub latest: Option<Timestamp>,
}

/// A message the collector could not accept (`/deadletter/{id}`), with why. The payload is
/// kept whole (as text when it is UTF-8, base64 otherwise), so a dead letter that becomes
/// acceptable (after a configuration change, say) can be replayed as it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The queue key it was removed from.
    pub queue_key: String,
    /// Why it was rejected.
    pub reason: String,
    /// The payload, when it is UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload in base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// Size of the original payload in bytes.
    #[serde(default)]
    pub payload_size: usize,
    /// True when only the first part of the payload could be kept: a queue entry too large to
    /// copy into a dead letter within one etcd request (only producers other than the streamer
    /// write entries that large). Such a dead letter cannot be replayed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payload_truncated: bool,
    /// When it was dead-lettered.
    pub failed_at: Timestamp,
    /// Which collector rejected it.
    pub collector: String,
    /// The queue entry's `mod_revision` when it was dead-lettered (0: unknown). A dedup marker
    /// written with the entry has this revision, which is how a replay knows the marker is the
    /// message's own.
    #[serde(default)]
    pub entry_revision: i64,
    /// The message's idempotency key, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Largest payload a dead letter keeps whole; etcd accepts at most 1.5 MiB per request, and the
/// dead letter is written in the same transaction that removes the queue entry.
pub const MAX_DEAD_PAYLOAD: usize = 1024 * 1024;

/// Why a dead letter's payload cannot be given back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Only part of it was kept.
    #[error("only the first {kept} of {size} bytes were kept (the entry was too large to copy)")]
    Truncated {
        /// Bytes kept.
        kept: usize,
        /// Bytes the original had.
        size: usize,
    },
    /// The stored base64 does not decode.
    #[error("the stored payload is not valid base64: {0}")]
    Corrupt(String),
}

impl DeadLetter {
    /// A dead letter for `payload` found at `queue_key`, rejected for `reason` by `collector`.
    pub fn new(queue_key: &str, reason: String, payload: &[u8], collector: &str) -> Self {
        use base64::Engine as _;
        let truncated = payload.len() > MAX_DEAD_PAYLOAD;
        let kept = &payload[..payload.len().min(MAX_DEAD_PAYLOAD)];
        // Text when it is UTF-8 and JSON escaping does not make it larger than base64 would.
        let as_text = std::str::from_utf8(kept).ok().filter(|text| {
            serde_json::to_string(text).is_ok_and(|escaped| escaped.len() <= kept.len() * 4 / 3 + 4)
        });
        let (text, base64) = match as_text {
            Some(text) => (Some(text.to_string()), None),
            None => (None, Some(base64::engine::general_purpose::STANDARD.encode(kept))),
        };
        DeadLetter {
            queue_key: queue_key.to_string(),
            reason,
            payload: text,
            payload_base64: base64,
            payload_size: payload.len(),
            payload_truncated: truncated,
            failed_at: Timestamp::now(),
            collector: collector.to_string(),
            entry_revision: 0,
            idempotency_key: None,
        }
    }

    /// The original payload, byte for byte.
    pub fn payload_bytes(&self) -> Result<Vec<u8>, PayloadError> {
        use base64::Engine as _;
        let bytes = match (&self.payload, &self.payload_base64) {
            (Some(text), _) => text.as_bytes().to_vec(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| PayloadError::Corrupt(e.to_string()))?,
            (None, None) => Vec::new(),
        };
        if self.payload_truncated {
            return Err(PayloadError::Truncated {
                kept: bytes.len(),
                size: self.payload_size,
            });
        }
        Ok(bytes)
    }

    /// The payload for display: the text, or a note for binary payloads.
    pub fn payload_text(&self) -> std::borrow::Cow<'_, str> {
        match (&self.payload, &self.payload_base64) {
            (Some(text), _) => std::borrow::Cow::Borrowed(text.as_str()),
            (None, Some(b64)) => std::borrow::Cow::Owned(format!("(binary, base64) {b64}")),
            (None, None) => std::borrow::Cow::Borrowed(""),
        }
    }
}

/// A collector's registration (`/collectors/members/{id}`), attached to its session lease; also
/// an exporter's owner key (`/exporters/{name}/owner`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The collector id.
    pub id: String,
    /// Its session lease.
    pub lease: i64,
    /// When it registered.
    pub started_at: Timestamp,
}

/// Where an exporter is (`/exporters/{name}/checkpoint`): every stored record at or before the
/// position (`revision`, then `key` within it) has landed in the TSDB, been rejected, or is
/// known to have expired before it could be exported. Records are taken in revision order, and
/// in key order within a revision. Written only after the TSDB acknowledged, in a transaction
/// fenced by the owner key's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExportCheckpoint {
    /// The revision of the position.
    pub revision: i64,
    /// The last data key passed at `revision`; `None` when the whole revision was passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Records whose samples landed.
    pub records: u64,
    /// Samples that landed.
    pub samples: u64,
    /// Records rejected (they cannot become samples, or the TSDB refused them).
    pub rejected: u64,
    /// Records that expired (their retention lease ended) before they could be exported.
    pub expired: u64,
    /// The newest gaps (history compacted, records expired), newest last, at most
    /// [`MAX_EXPORT_GAPS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<ExportGap>,
    /// The processing time of the last record passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_record_time: Option<Timestamp>,
    /// When this was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Timestamp>,
    /// Which exporter process wrote it.
    #[serde(default)]
    pub exporter: String,
}

/// How many gaps a checkpoint keeps.
pub const MAX_EXPORT_GAPS: usize = 16;

/// A stretch of history an exporter could not follow (etcd had compacted it), caught up from
/// the data keys; the records written in it that no longer existed were lost to the export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportGap {
    /// The checkpoint's revision when the gap was found.
    pub from_revision: i64,
    /// The revision the data keys were read at.
    pub to_revision: i64,
    /// Records written in between that had expired (`None`: unknown, the stats counters could
    /// not be read or were reset).
    pub expired: Option<u64>,
    /// The expired records are newer than this (the last record exported before the gap).
    #[serde(default)]
    pub after: Option<Timestamp>,
    /// And older than this (the first record found after the gap, or when it was found).
    #[serde(default)]
    pub before: Option<Timestamp>,
    /// When the gap was found.
    pub found_at: Timestamp,
}

/// A record an exporter rejected (`/exporters/{name}/rejected/...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedRecord {
    /// The record's data key.
    pub key: String,
    /// The revision it was written at.
    pub revision: i64,
    /// Why it was rejected.
    pub reason: String,
    /// When it was rejected.
    pub rejected_at: Timestamp,
    /// Which exporter process rejected it.
    pub exporter: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_keep_the_whole_payload() {
        let big = "x".repeat(200 * 1024);
        let letter = DeadLetter::new("/q/1", "bad".into(), big.as_bytes(), "c");
        assert_eq!(letter.payload_bytes().as_deref(), Ok(big.as_bytes()));
        let binary = vec![0xff, 0x00, 0xfe];
        let letter = DeadLetter::new("/q/1", "bad".into(), &binary, "c");
        let json = serde_json::to_string(&letter).expect("json");
        let back: DeadLetter = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.payload_bytes(), Ok(binary));
        let huge = vec![b'y'; MAX_DEAD_PAYLOAD + 1];
        let letter = DeadLetter::new("/q/1", "bad".into(), &huge, "c");
        assert!(matches!(
            letter.payload_bytes(),
            Err(PayloadError::Truncated { .. })
        ));
    }

    #[test]
    fn dead_letters_of_the_previous_release_still_read() {
        let old = r#"{"queue_key":"/q/1","reason":"r","payload":"{}","failed_at":"2026-11-23T08:00:00Z","collector":"c"}"#;
        let letter: DeadLetter = serde_json::from_str(old).expect("old format");
        assert_eq!(letter.payload_bytes(), Ok(b"{}".to_vec()));
    }
}
