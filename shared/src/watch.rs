//! The one way to follow a key prefix in etcd: every change, in revision order, exactly once.
//!
//! A [`Follow`] watches a prefix from a start revision and yields [`Update`]s:
//! - [`Update::Changes`]: the changes of one or more *complete* revisions. etcd splits a large
//!   revision into fragments (the watch asks for them, or a response over gRPC's limit would
//!   fail to decode); they are reassembled here and delivered together, never half.
//! - [`Update::Compacted`]: the history the follower still needed was compacted away, so some
//!   changes can never be delivered. The caller decides how to catch up (re-read the prefix,
//!   close its subscribers) and where to go on from ([`Follow::resume_from`]).
//!
//! A watch that breaks (etcd restarted, leader change, connection lost) is re-created from the
//! revision after the last complete one delivered, with the shared [`Backoff`](crate::retry),
//! so a consumer sees neither a gap nor a repeat. Responses are decoded up to
//! [`WATCH_MAX_MESSAGE`] bytes.

use etcd_client::{Client, EventType, WatchOptions, WatchResponse, WatchStream};
use tokio_util::sync::CancellationToken;

use crate::retry::{Backoff, Policy};

/// Largest gRPC message a watch stream accepts. etcd can batch many events (a catching-up
/// watcher gets whole revisions of 128-op transactions at once); with the client's default of
/// 4 MiB such a response fails to decode, the watch is re-created from the same revision, and
/// the loop never ends. Fragmenting plus this limit avoid that.
pub const WATCH_MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Whether a change wrote or removed its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The key was written.
    Put,
    /// The key was deleted (or its lease expired).
    Delete,
}

/// One key's change at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Put or delete.
    pub kind: ChangeKind,
    /// The key.
    pub key: Vec<u8>,
    /// The value written (empty for a delete).
    pub value: Vec<u8>,
    /// The revision of the change.
    pub mod_revision: i64,
    /// The revision that created the key (0 for a delete).
    pub create_revision: i64,
    /// The lease the key is attached to (0 for none).
    pub lease: i64,
}

impl Change {
    /// The key as text (lossy for keys that are not UTF-8).
    pub fn key_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.key)
    }
}

/// What a [`Follow`] delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The changes of complete revisions, in revision order; every revision up to and
    /// including `through` has been delivered.
    Changes {
        /// The changes, in revision order (key order within a revision).
        changes: Vec<Change>,
        /// The last revision these changes complete.
        through: i64,
    },
    /// etcd compacted the history from the follower's next revision on. Without a call to
    /// [`Follow::resume_from`], following goes on from `compact_revision` (the oldest revision
    /// etcd still has); the changes in between are lost to this follower.
    Compacted {
        /// The first revision that could not be delivered.
        lost_from: i64,
        /// etcd's compaction revision.
        compact_revision: i64,
    },
}

/// Follows a key prefix; see the module docs.
pub struct Follow {
    client: Client,
    prefix: String,
    deletes: bool,
    /// The first revision not yet delivered.
    next: i64,
    stream: Option<WatchStream>,
    /// Fragments of a response whose last fragment has not arrived yet.
    partial: Vec<Change>,
    /// Why etcd cancelled the last watch, if it did (other than for compaction): handled
    /// before the watch is created again.
    cancelled: Option<String>,
    backoff: Backoff,
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow")
            .field("prefix", &self.prefix)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Follow {
    /// Follows every key under `prefix` from revision `from` (inclusive; at least 1).
    pub fn new(client: &Client, prefix: impl Into<String>, from: i64) -> Self {
        Follow {
            client: client.clone(),
            prefix: prefix.into(),
            deletes: true,
            next: from.max(1),
            stream: None,
            partial: Vec::new(),
            cancelled: None,
            backoff: Backoff::new(Policy::ETCD, "etcd watch"),
        }
    }

    /// Leaves out deletes (etcd filters them on the server): for followers that learn of
    /// removals another way and would only pay for the events.
    pub fn without_deletes(mut self) -> Self {
        self.deletes = false;
        self
    }

    /// The first revision not yet delivered.
    pub fn next_revision(&self) -> i64 {
        self.next
    }

    /// Goes on from revision `from` (after a compaction, once the caller has caught up some
    /// other way, e.g. by reading the prefix at `from - 1`).
    pub fn resume_from(&mut self, from: i64) {
        self.next = from.max(1);
        self.stream = None;
        self.partial.clear();
    }

    /// The next update, or `None` once `shutdown` is cancelled. Waits (retrying with backoff)
    /// while etcd is unreachable.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> Option<Update> {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                if let Some(reason) = self.cancelled.take() {
                    self.after_cancel(&reason, shutdown).await?;
                }
                self.connect(shutdown).await?;
                continue;
            };
            let message = tokio::select! {
                _ = shutdown.cancelled() => return None,
                m = stream.message() => m,
            };
            match message {
                Ok(Some(resp)) => {
                    if let Some(update) = self.absorb(resp) {
                        return Some(update);
                    }
                }
                Ok(None) => self.broken("the watch stream ended"),
                Err(err) => self.broken(&err.to_string()),
            }
        }
    }

    async fn connect(&mut self, shutdown: &CancellationToken) -> Option<()> {
        loop {
            let mut options = WatchOptions::new()
                .with_prefix()
                .with_fragment()
                .with_start_revision(self.next);
            if !self.deletes {
                options = options.with_filters([etcd_client::WatchFilterType::NoDelete]);
            }
            let mut client = self
                .client
                .watch_client()
                .max_decoding_message_size(WATCH_MAX_MESSAGE);
            let created = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = client.watch(self.prefix.as_str(), Some(options)) => r,
            };
            match created {
                Ok(stream) => {
                    self.stream = Some(stream);
                    self.partial.clear();
                    return Some(());
                }
                Err(err) => {
                    self.backoff.failed(&err);
                    self.backoff.wait(shutdown).await.ok()?;
                }
            }
        }
    }

    /// etcd cancelled the watch for `reason`. etcd checks a watch's permission with the token
    /// the stream was opened with, when the watch is created: after the token expired or etcd
    /// restarted, the new watch is cancelled with "invalid auth token". The client renews its
    /// token for unary calls by itself, not for this, so it is renewed here before the watch is
    /// created again. Any other reason (permission denied) is waited out with the backoff, so a
    /// watch that etcd keeps refusing does not spin.
    async fn after_cancel(&mut self, reason: &str, shutdown: &CancellationToken) -> Option<()> {
        if reason.contains("invalid auth token") {
            match self.client.refresh_token().await {
                Ok(()) => {
                    tracing::debug!(prefix = %self.prefix, "renewed the etcd token for a watch");
                    return Some(());
                }
                Err(err) => self.backoff.failed(&err),
            }
        } else {
            self.backoff
                .failed(&format!("etcd cancelled the watch: {reason}"));
        }
        self.backoff.wait(shutdown).await.ok()
    }

    fn broken(&mut self, why: &str) {
        tracing::debug!(prefix = %self.prefix, next = self.next, why, "watch broke; re-creating it from the last complete revision");
        metrics::counter!("etcd_watch_restarts_total").increment(1);
        self.stream = None;
        self.partial.clear();
    }

    /// Takes one response; returns an update once a response is complete.
    fn absorb(&mut self, resp: WatchResponse) -> Option<Update> {
        if resp.canceled() {
            self.stream = None;
            self.partial.clear();
            if resp.compact_revision() > 0 {
                let lost_from = self.next;
                self.next = resp.compact_revision();
                metrics::counter!("etcd_watch_compacted_total").increment(1);
                return Some(Update::Compacted {
                    lost_from,
                    compact_revision: resp.compact_revision(),
                });
            }
            tracing::debug!(prefix = %self.prefix, reason = resp.cancel_reason(), "watch cancelled by etcd; re-creating it");
            self.cancelled = Some(resp.cancel_reason().to_string());
            return None;
        }
        if resp.created() && resp.events().is_empty() {
            self.backoff.succeeded();
            return None;
        }
        let fragment = resp.0.fragment;
        // Owned fields (the `pub-response-field` feature): values are moved, not copied.
        for event in resp.0.events {
            let Some(kv) = event.kv else { continue };
            self.partial.push(Change {
                kind: if event.r#type == EventType::Delete as i32 {
                    ChangeKind::Delete
                } else {
                    ChangeKind::Put
                },
                key: kv.key,
                value: kv.value,
                mod_revision: kv.mod_revision,
                create_revision: kv.create_revision,
                lease: kv.lease,
            });
        }
        if fragment || self.partial.is_empty() {
            return None;
        }
        let changes = std::mem::take(&mut self.partial);
        let through = changes
            .iter()
            .map(|c| c.mod_revision)
            .max()
            .unwrap_or(self.next - 1);
        self.next = self.next.max(through + 1);
        Some(Update::Changes { changes, through })
    }
}

/// Splits changes (in revision order) into runs of one revision each.
pub fn by_revision(changes: &[Change]) -> impl Iterator<Item = &[Change]> {
    changes.chunk_by(|a, b| a.mod_revision == b.mod_revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(rev: i64, key: &str) -> Change {
        Change {
            kind: ChangeKind::Put,
            key: key.as_bytes().to_vec(),
            value: Vec::new(),
            mod_revision: rev,
            create_revision: rev,
            lease: 0,
        }
    }

    fn response(fragment: bool, puts: &[(i64, &str)]) -> WatchResponse {
        use etcd_client::proto::{PbEvent, PbKeyValue, PbWatchResponse};
        WatchResponse(PbWatchResponse {
            fragment,
            events: puts
                .iter()
                .map(|(rev, key)| PbEvent {
                    r#type: 0,
                    kv: Some(PbKeyValue {
                        key: key.as_bytes().to_vec(),
                        mod_revision: *rev,
                        create_revision: *rev,
                        ..Default::default()
                    }),
                    prev_kv: None,
                })
                .collect(),
            ..Default::default()
        })
    }

    fn keys_of(update: Option<Update>) -> Vec<String> {
        match update {
            Some(Update::Changes { changes, .. }) => {
                changes.iter().map(|c| c.key_str().into_owned()).collect()
            }
            other => panic!("changes expected, got {other:?}"),
        }
    }

    /// A watch that breaks in the middle of a fragmented revision is re-created from that
    /// revision, and etcd sends the whole revision again: the half already received must not be
    /// delivered twice (the collector's counters drifted when it was), nor the rest lost.
    #[tokio::test]
    async fn a_break_mid_fragment_neither_repeats_nor_loses() {
        let client = match Client::connect(["127.0.0.1:1"], None).await {
            Ok(client) => client,
            // Connecting is lazy; this only fails on a malformed endpoint.
            Err(err) => panic!("client: {err}"),
        };
        let mut follow = Follow::new(&client, "/q/", 5);
        assert_eq!(keys_of(follow.absorb(response(false, &[(5, "a")]))), vec!["a"]);
        assert_eq!(follow.next_revision(), 6);
        // Revision 6 arrives in two fragments; the watch breaks after the first.
        assert!(follow.absorb(response(true, &[(6, "b"), (6, "c")])).is_none());
        follow.broken("test");
        assert_eq!(
            follow.next_revision(),
            6,
            "re-watched from the incomplete revision"
        );
        assert!(follow.absorb(response(true, &[(6, "b"), (6, "c")])).is_none());
        assert_eq!(
            keys_of(follow.absorb(response(false, &[(6, "d"), (7, "e")]))),
            vec!["b", "c", "d", "e"],
            "each change once, in order"
        );
        assert_eq!(follow.next_revision(), 8);
    }

    #[tokio::test]
    async fn compaction_is_its_own_event() {
        use etcd_client::proto::PbWatchResponse;
        let Ok(client) = Client::connect(["127.0.0.1:1"], None).await else {
            panic!("client")
        };
        let mut follow = Follow::new(&client, "/q/", 3);
        let update = follow.absorb(WatchResponse(PbWatchResponse {
            canceled: true,
            compact_revision: 10,
            ..Default::default()
        }));
        assert_eq!(
            update,
            Some(Update::Compacted {
                lost_from: 3,
                compact_revision: 10
            })
        );
        assert_eq!(follow.next_revision(), 10);
        follow.resume_from(20);
        assert_eq!(follow.next_revision(), 20);
    }

    #[test]
    fn changes_split_by_revision() {
        let all = vec![change(3, "a"), change(3, "b"), change(4, "c"), change(6, "d")];
        let runs: Vec<Vec<&str>> = by_revision(&all)
            .map(|run| {
                run.iter()
                    .map(|c| std::str::from_utf8(&c.key).unwrap_or(""))
                    .collect()
            })
            .collect();
        assert_eq!(runs, vec![vec!["a", "b"], vec!["c"], vec!["d"]]);
    }
}
