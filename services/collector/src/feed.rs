//! The source of one owned partition: a range over the partition once, then its watch.
//!
//! The partition is ranged once (paged, at one revision) when it is acquired; after that the
//! task learns of new entries only from the partition's own watch, started just after the range.
//! It never polls the queue with ranges, which would re-scan deleted keys (tombstones) until
//! etcd compacts. The watch leaves out deletes: the only deletes of queue entries are this
//! owner's own commits (it knows them), and an entry removed by anyone else fails its commit's
//! compare and is dropped then.

use std::collections::BTreeMap;

use etcd_client::Client;
use telemetry_shared::{
    etcd::{EtcdError, current_revision, range_entries},
    watch::{Follow, Update},
};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::batch::Pending;

/// A change to the partition, from its watch.
#[derive(Debug)]
pub(crate) enum QueueEvent {
    /// A queue entry was written at `revision`.
    Put {
        /// Its key.
        key: String,
        /// Its payload and revision.
        entry: Pending,
    },
    /// The watch lost history to a compaction: range the partition again.
    Resync,
}

/// The partition's entries as of one revision.
pub(crate) struct Snapshot {
    /// Entries by key.
    pub entries: BTreeMap<String, Pending>,
    /// The revision they were read at.
    pub revision: i64,
}

/// Ranges over the partition `prefix` at one revision.
pub(crate) async fn range(client: &Client, prefix: &str) -> Result<Snapshot, EtcdError> {
    let (entries, revision) = range_entries(client, prefix, 500).await?;
    Ok(Snapshot {
        entries: entries
            .into_iter()
            .map(|e| {
                (
                    e.key,
                    Pending {
                        value: e.value,
                        revision: e.mod_revision,
                    },
                )
            })
            .collect(),
        revision,
    })
}

/// Follows the partition `prefix` from revision `from` and forwards its writes. After a
/// compaction it asks for a resync and follows from the then current revision (the task ranges
/// again and keeps only events newer than that range).
pub(crate) async fn feed(
    client: Client,
    prefix: String,
    from: i64,
    tx: UnboundedSender<QueueEvent>,
    stop: CancellationToken,
) {
    let mut follow = Follow::new(&client, prefix.clone(), from).without_deletes();
    while let Some(update) = follow.next(&stop).await {
        match update {
            Update::Changes { changes, .. } => {
                for change in changes {
                    let event = QueueEvent::Put {
                        key: change.key_str().into_owned(),
                        entry: Pending {
                            revision: change.mod_revision,
                            value: change.value,
                        },
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
            Update::Compacted { compact_revision, .. } => {
                let now = current_revision(&client, &prefix)
                    .await
                    .unwrap_or(compact_revision);
                follow.resume_from(now.max(compact_revision) + 1);
                if tx.send(QueueEvent::Resync).is_err() {
                    return;
                }
            }
        }
    }
}
