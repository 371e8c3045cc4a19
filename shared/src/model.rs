//! Records the collector keeps beside the telemetry so the gateway can answer without scanning:
//! the GPU index, per-partition stats counters, dead letters and collector registrations.

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

/// A message the collector could not accept (`/deadletter/{id}`), with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The queue key it was removed from.
    pub queue_key: String,
    /// Why it was rejected.
    pub reason: String,
    /// The payload as found (lossy UTF-8 if it was not text).
    pub payload: String,
    /// When it was dead-lettered.
    pub failed_at: Timestamp,
    /// Which collector rejected it.
    pub collector: String,
}

/// A collector's registration (`/collectors/members/{id}`), attached to its session lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The collector id.
    pub id: String,
    /// Its session lease.
    pub lease: i64,
    /// When it registered.
    pub started_at: Timestamp,
}
