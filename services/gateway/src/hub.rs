//! The live feed: one etcd watch on the telemetry prefix per gateway process, fanned out to
//! every WebSocket subscriber.
//!
//! The watch delivers whole revisions (fragments are reassembled), and each revision becomes
//! one [`Batch`], sent to every subscriber whose filter matches one of its records. Each
//! subscriber has a bounded channel; one that is full is dropped at once (never waited for), so
//! a slow client cannot stall the others, and its socket task closes it with the last revision
//! it was sent. Registration happens under the same lock as broadcasting, so a new subscriber
//! learns the exact revision its live feed starts after ([`Subscription::start_revision`]).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
};

use etcd_client::Client;
use telemetry_shared::{
    etcd::current_revision,
    health::Health,
    observe::emit,
    watch::{ChangeKind, Follow, Update},
};
use tokio_util::sync::CancellationToken;

use crate::{
    events::{LiveBroadcast, LiveGap, SlowSubscriberDropped, Subscribed, Unsubscribed},
    record::{Decoder, Record},
    window::Window,
};

/// All the records of one etcd revision.
#[derive(Debug)]
pub struct Batch {
    /// The revision.
    pub revision: i64,
    /// Its records, in key order.
    pub events: Vec<Arc<Record>>,
}

/// What a subscriber wants to see; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Filter {
    /// Only this host.
    pub hostname: Option<String>,
    /// Only this gpu_id (on any host unless `hostname` is set too).
    pub gpu_id: Option<String>,
    /// Only this GPU UUID.
    pub uuid: Option<String>,
    /// Only this metric.
    pub metric: Option<String>,
}

impl Filter {
    /// Does `event` pass?
    pub fn matches(&self, event: &Record) -> bool {
        fn ok(want: &Option<String>, have: Option<&str>) -> bool {
            want.as_deref().is_none_or(|w| have == Some(w))
        }
        ok(&self.hostname, Some(&event.hostname))
            && ok(&self.gpu_id, Some(&event.gpu_id))
            && ok(&self.uuid, event.uuid.as_deref())
            && ok(&self.metric, event.metric.as_deref())
    }

    /// Does any record of `batch` pass?
    pub fn matches_any(&self, batch: &Batch) -> bool {
        batch.events.iter().any(|e| self.matches(e))
    }
}

/// Why the hub stopped feeding a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Its buffer was full: it reads slower than telemetry arrives.
    Slow,
    /// The hub's watch lost history (compaction while it was disconnected): the feed has a gap
    /// before revision `resumed_at`.
    Gap {
        /// The revision the hub resumed watching from.
        resumed_at: i64,
    },
    /// The gateway is shutting down.
    Shutdown,
}

struct Subscriber {
    filter: Filter,
    tx: tokio::sync::mpsc::Sender<Arc<Batch>>,
    ended: Arc<Mutex<Option<Ended>>>,
}

struct Inner {
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    next_id: AtomicU64,
    /// The last revision broadcast (every record up to it has been offered to subscribers).
    delivered: AtomicI64,
    decoder: Decoder,
    /// Kept current from the same watch.
    window: Arc<Window>,
    /// True while the watch task runs (readiness).
    following: std::sync::atomic::AtomicBool,
}

/// The fan-out hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("delivered", &self.delivered())
            .field("subscribers", &self.subscribers())
            .finish()
    }
}

/// A subscriber's end of the feed. Dropping it unsubscribes.
pub struct Subscription {
    /// Batches after [`Subscription::start_revision`] that match the filter.
    pub rx: tokio::sync::mpsc::Receiver<Arc<Batch>>,
    /// Every record up to this revision was broadcast before the subscription existed; every
    /// later one will be offered to it.
    pub start_revision: i64,
    ended: Arc<Mutex<Option<Ended>>>,
    id: u64,
    hub: Arc<Inner>,
}

impl Subscription {
    /// Why the feed ended, once `rx` has returned `None`.
    pub fn ended(&self) -> Ended {
        self.ended
            .lock()
            .map(|e| e.clone())
            .unwrap_or(None)
            .unwrap_or(Ended::Shutdown)
    }

    /// Has the hub already given up on this subscriber (even if batches are still buffered)?
    pub fn is_slow(&self) -> bool {
        matches!(self.ended.lock().map(|e| e.clone()), Ok(Some(Ended::Slow)))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut subs) = self.hub.subscribers.lock() {
            subs.remove(&self.id);
        }
        emit(Unsubscribed);
    }
}

impl Hub {
    /// Starts the watch task from just after `revision`, keeping `window` current; the task is
    /// a main loop of `health`.
    pub fn start(
        client: Client,
        decoder: Decoder,
        window: Arc<Window>,
        revision: i64,
        health: &Health,
        shutdown: CancellationToken,
    ) -> Hub {
        let hub = Hub {
            inner: Arc::new(Inner {
                subscribers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                delivered: AtomicI64::new(revision),
                decoder,
                window,
                following: std::sync::atomic::AtomicBool::new(true),
            }),
        };
        tokio::spawn(health.watch("live_feed", hub.clone().watch(client, shutdown)));
        hub
    }

    /// Whether the watch task still runs.
    pub fn following(&self) -> bool {
        self.inner.following.load(Ordering::Acquire)
    }

    /// The last revision broadcast.
    pub fn delivered(&self) -> i64 {
        self.inner.delivered.load(Ordering::Acquire)
    }

    /// How many subscribers are attached.
    pub fn subscribers(&self) -> usize {
        self.inner.subscribers.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// What the hub decodes records with (replays use the same).
    pub fn decoder(&self) -> &Decoder {
        &self.inner.decoder
    }

    /// Attaches a subscriber with a buffer of `buffer` batches.
    pub fn subscribe(&self, filter: Filter, buffer: usize) -> Subscription {
        let (tx, rx) = tokio::sync::mpsc::channel(buffer.max(1));
        let ended = Arc::new(Mutex::new(None));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let start_revision = {
            let mut subs = self
                .inner
                .subscribers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            subs.insert(
                id,
                Subscriber {
                    filter,
                    tx,
                    ended: ended.clone(),
                },
            );
            self.delivered()
        };
        emit(Subscribed);
        Subscription {
            rx,
            start_revision,
            ended,
            id,
            hub: self.inner.clone(),
        }
    }

    fn broadcast(&self, batches: Vec<Batch>, through: i64) {
        let mut subs = self
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for batch in batches {
            let batch = Arc::new(batch);
            subs.retain(|_, sub| {
                if !sub.filter.matches_any(&batch) {
                    return true;
                }
                match sub.tx.try_send(batch.clone()) {
                    Ok(()) => true,
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                        emit(SlowSubscriberDropped {
                            revision: batch.revision,
                        });
                        end(sub, Ended::Slow);
                        false
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
            emit(LiveBroadcast {
                revision: batch.revision,
                records: batch.events.len(),
            });
            self.inner.delivered.store(batch.revision, Ordering::Release);
        }
        if through > self.delivered() {
            self.inner.delivered.store(through, Ordering::Release);
        }
    }

    /// Ends every subscriber. With `resume_at`, the feed's revision moves there under the same
    /// lock, so a subscriber that registers afterwards starts after it (and one that registered
    /// before was ended): nobody can register in between and miss records silently.
    fn end_all(&self, why: Ended, resume_at: Option<i64>) {
        let mut subs = self
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, sub) in subs.drain() {
            end(&sub, why.clone());
        }
        if let Some(revision) = resume_at {
            self.inner.delivered.store(revision, Ordering::Release);
        }
    }

    async fn watch(self, client: Client, shutdown: CancellationToken) {
        // Deletes (retention expiry) keep the window exact; subscribers get writes only.
        let mut follow = Follow::new(
            &client,
            self.inner.decoder.keys.data_prefix(),
            self.delivered() + 1,
        );
        while let Some(update) = follow.next(&shutdown).await {
            match update {
                Update::Changes { changes, through } => {
                    if self
                        .decoder()
                        .prepare(&client, &changes, &shutdown)
                        .await
                        .is_err()
                    {
                        break;
                    }
                    let mut records = Vec::new();
                    let mut deletes = Vec::new();
                    for change in &changes {
                        match change.kind {
                            ChangeKind::Put => records.extend(self.decoder().decode(
                                &change.key,
                                &change.value,
                                change.mod_revision,
                            )),
                            ChangeKind::Delete => deletes.push(change.key_str().into_owned()),
                        }
                    }
                    self.inner.window.apply(&records, &deletes, through);
                    self.broadcast(group(records), through);
                }
                Update::Compacted { compact_revision, .. } => {
                    let resumed_at = self.recover_from_compaction(&client, compact_revision).await;
                    self.inner.window.reset(resumed_at);
                    follow.resume_from(resumed_at + 1);
                }
            }
        }
        self.inner.following.store(false, Ordering::Release);
        self.end_all(Ended::Shutdown, None);
    }

    /// The history after our last revision is gone: subscribers get a gap notice (they can
    /// fall back to REST), and the feed resumes from the current revision, which is returned.
    async fn recover_from_compaction(&self, client: &Client, compacted: i64) -> i64 {
        let resumed_at = current_revision(client, &self.inner.decoder.keys.data_prefix())
            .await
            .unwrap_or(compacted)
            .max(compacted);
        emit(LiveGap {
            lost_after: self.delivered(),
            compacted,
            resumed_at,
        });
        self.end_all(Ended::Gap { resumed_at }, Some(resumed_at));
        resumed_at
    }
}

fn end(sub: &Subscriber, why: Ended) {
    if let Ok(mut ended) = sub.ended.lock() {
        ended.get_or_insert(why);
    }
}

/// Splits events (in revision order) into one batch per revision.
pub fn group(events: Vec<Arc<Record>>) -> Vec<Batch> {
    let mut batches: Vec<Batch> = Vec::new();
    for event in events {
        match batches.last_mut() {
            Some(batch) if batch.revision == event.revision => batch.events.push(event),
            _ => batches.push(Batch {
                revision: event.revision,
                events: vec![event],
            }),
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry_shared::{
        Fields, Keyspace, Message, SchemaVersion, Timestamp, config::Columns, profiles::ProfileCache,
    };

    fn detached() -> Hub {
        Hub {
            inner: Arc::new(Inner {
                subscribers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                delivered: AtomicI64::new(10),
                following: std::sync::atomic::AtomicBool::new(true),
                decoder: Decoder {
                    keys: Keyspace::new("/t"),
                    columns: Columns::default(),
                    profiles: ProfileCache::new(),
                },
                window: Arc::new(Window::new(crate::window::Limits {
                    points_per_gpu: 0,
                    max_bytes: 0,
                })),
            }),
        }
    }

    fn event(revision: i64, host: &str) -> Arc<Record> {
        let mut fields = Fields::new();
        fields.insert("metric_name".into(), "M".into());
        fields.insert("uuid".into(), "GPU-1".into());
        let message = Message {
            schema_version: SchemaVersion::V1,
            id: ulid::Ulid::from_parts(1, revision as u128),
            timestamp: Timestamp::now(),
            idempotency_key: "ab".repeat(32),
            source: None,
            fields,
        };
        let key = format!("/t/telemetry/data/{host}/0/x_{revision}");
        Arc::new(Record::new(
            key,
            revision,
            host,
            "0",
            message,
            &Columns::default(),
        ))
    }

    #[test]
    fn a_full_subscriber_is_dropped_without_stalling_others() {
        let hub = detached();
        let mut fast = hub.subscribe(Filter::default(), 8);
        let slow = hub.subscribe(Filter::default(), 2);
        let other_host = hub.subscribe(
            Filter {
                hostname: Some("b".into()),
                ..Filter::default()
            },
            1,
        );
        assert_eq!(fast.start_revision, 10);
        for rev in 11..=14 {
            hub.broadcast(group(vec![event(rev, "a")]), rev);
        }
        // The slow one overflowed at the third batch and was dropped; the filtered one never
        // matched and is still attached; the fast one got all four.
        assert!(slow.is_slow());
        assert!(!other_host.is_slow());
        assert_eq!(hub.subscribers(), 2);
        let mut revisions = Vec::new();
        while let Ok(batch) = fast.rx.try_recv() {
            revisions.push(batch.revision);
        }
        assert_eq!(revisions, vec![11, 12, 13, 14]);
        // A late subscriber starts after what was already broadcast.
        assert_eq!(hub.subscribe(Filter::default(), 1).start_revision, 14);
        // Gap and shutdown reach everyone attached.
        hub.end_all(Ended::Gap { resumed_at: 99 }, Some(99));
        // A subscriber that registers after the gap starts after the resumed revision.
        assert_eq!(hub.subscribe(Filter::default(), 1).start_revision, 99);
        assert_eq!(other_host.ended(), Ended::Gap { resumed_at: 99 });
        assert_eq!(hub.subscribers(), 0);
    }

    #[test]
    fn payloads_are_encoded_once_per_version() {
        let e = event(5, "a");
        let v1 = e.payload(SchemaVersion::V1).as_ptr();
        assert_eq!(e.payload(SchemaVersion::V1).as_ptr(), v1);
        assert!(e.payload(SchemaVersion::V1beta1).contains("\"timestamp_ms\""));
        assert!(
            Filter {
                metric: Some("M".into()),
                ..Filter::default()
            }
            .matches(&e)
        );
        assert!(
            !Filter {
                uuid: Some("GPU-2".into()),
                ..Filter::default()
            }
            .matches(&e)
        );
    }
}
