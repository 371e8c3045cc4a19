//! A recent window of every GPU's records in memory, so the common reads never reach etcd.
//!
//! The window is loaded at one revision `R` (the newest `WINDOW_POINTS` records of each GPU in
//! the index) and then kept current from the live feed's watch, which starts at `R + 1` and also
//! carries deletes (retention expiry). It therefore reflects exactly one etcd revision at a
//! time ([`Window::revision`]). For each GPU it knows a *floor*: every record of the GPU with a
//! key at or above the floor is in memory (no floor: all of them are). A read whose answer lies
//! entirely at or above the floor is answered from memory with exactly what etcd would return
//! at the window's revision; any other read goes to etcd.
//!
//! The window is bounded by points per GPU and by total bytes; the oldest records of a GPU go
//! first, raising its floor. It also keeps each GPU's latest record per metric, for the fleet's
//! latest values and the Prometheus exposition.
//!
//! A compaction that outruns the live feed loses the changes the window missed: it is emptied
//! and loaded again at the revision the feed resumes from, and reads go to etcd meanwhile.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound,
    sync::{Arc, RwLock},
};

use telemetry_shared::{
    etcd::EtcdError,
    model::GpuInfo,
    observe::emit,
    retry::{Backoff, Policy},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    events::WindowLoaded,
    page::{Page, Read, Scan},
    query::{Order, TelemetryQuery},
    record::Record,
    store::Store,
};

/// How much the window holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Most records kept per GPU (`WINDOW_POINTS`; 0 turns the window off).
    pub points_per_gpu: usize,
    /// Most bytes of records kept in all (`WINDOW_BYTES`, counted as their JSON size).
    pub max_bytes: usize,
}

/// A GPU, as its data keys name it.
pub(crate) type GpuKey = (String, String);

/// Each GPU's latest record per metric.
pub(crate) type Latest = HashMap<GpuKey, Vec<Arc<Record>>>;

/// Bytes a record is counted as: its JSON, its key, and bookkeeping.
fn size_of(record: &Record) -> usize {
    record.payload(telemetry_shared::SchemaVersion::V1).len() + 2 * record.key.len() + 256
}

#[derive(Debug, Default)]
struct GpuWindow {
    records: BTreeMap<String, Arc<Record>>,
    /// Every record of the GPU with a key at or above this is in `records` (`None`: all are).
    floor: Option<String>,
    /// The newest record per metric.
    latest: HashMap<String, Arc<Record>>,
}

impl GpuWindow {
    fn insert(&mut self, record: Arc<Record>) {
        if let Some(metric) = &record.metric {
            let newer = self
                .latest
                .get(metric)
                .is_none_or(|l| l.key.rsplit('/').next() <= record.key.rsplit('/').next());
            if newer {
                self.latest.insert(metric.clone(), record.clone());
            }
        }
        self.records.insert(record.key.clone(), record);
    }

    /// Removes `key` (deleted in etcd); returns the bytes freed.
    fn remove(&mut self, key: &str) -> usize {
        let Some(record) = self.records.remove(key) else {
            return 0;
        };
        if let Some(metric) = &record.metric
            && self.latest.get(metric).is_some_and(|l| l.key == record.key)
        {
            self.latest.remove(metric);
            if let Some(previous) = self
                .records
                .values()
                .rev()
                .find(|r| r.metric.as_ref() == Some(metric))
            {
                self.latest.insert(metric.clone(), previous.clone());
            }
        }
        size_of(&record)
    }

    /// Drops the oldest record, raising the floor above it; returns the bytes freed.
    fn evict_oldest(&mut self) -> usize {
        let Some((key, record)) = self.records.pop_first() else {
            return 0;
        };
        let mut floor = key;
        floor.push('\0');
        self.floor = Some(floor);
        size_of(&record)
    }

    /// Is every record at or above `lo` in memory?
    fn covers(&self, lo: &str) -> bool {
        self.floor.as_deref().is_none_or(|floor| lo >= floor)
    }

    /// Answers `read` in `order` as etcd would (records and whether the range holds more), or
    /// `None` if part of the answer may lie below the floor.
    fn read(&self, read: Read<'_>, order: Order) -> Option<(Vec<Arc<Record>>, bool)> {
        let lo = std::str::from_utf8(read.lo).ok()?;
        let hi = std::str::from_utf8(read.hi).ok()?;
        if lo >= hi {
            return Some((Vec::new(), false));
        }
        let range = |from: &str| {
            self.records
                .range::<str, _>((Bound::Included(from), Bound::Excluded(hi)))
                .map(|(_, r)| r.clone())
        };
        match order {
            Order::Asc => {
                if !self.covers(lo) {
                    return None;
                }
                let mut found: Vec<Arc<Record>> = range(lo).take(read.n + 1).collect();
                let more = found.len() > read.n;
                found.truncate(read.n);
                Some((found, more))
            }
            Order::Desc => {
                let from = match &self.floor {
                    Some(floor) if floor.as_str() > lo => floor.as_str(),
                    _ => lo,
                };
                let mut found: Vec<Arc<Record>> = range(from).rev().take(read.n + 1).collect();
                if found.len() > read.n {
                    found.truncate(read.n);
                    return Some((found, true));
                }
                // Fewer than asked in memory: the answer is complete only if memory covers lo.
                self.covers(lo).then_some((found, false))
            }
        }
    }
}

/// A change the live feed saw while the window was (re)loading, applied once it is loaded.
#[derive(Debug)]
enum Pending {
    Put(Arc<Record>),
    Delete(String),
}

#[derive(Debug, Default)]
struct State {
    /// The revision the window reflects (the load revision until loaded).
    revision: i64,
    loaded: bool,
    /// Changes after the load revision, seen while loading.
    pending: Vec<(i64, Pending)>,
    gpus: HashMap<GpuKey, GpuWindow>,
    bytes: usize,
}

/// What a GPU's load found: its newest records (newest first) and whether it has older ones.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The GPU.
    pub gpu: GpuKey,
    /// Its newest records, newest first.
    pub records: Vec<Arc<Record>>,
    /// True if older records exist beyond these.
    pub more: bool,
}

/// The window. One per gateway.
#[derive(Debug)]
pub(crate) struct Window {
    limits: Limits,
    state: RwLock<State>,
    /// Woken when the window must be (re)loaded.
    reload: Notify,
}

impl Window {
    /// An empty window that waits to be loaded.
    pub(crate) fn new(limits: Limits) -> Self {
        Window {
            limits,
            state: RwLock::default(),
            reload: Notify::new(),
        }
    }

    /// Is the window in use (`WINDOW_POINTS` > 0)?
    pub(crate) fn enabled(&self) -> bool {
        self.limits.points_per_gpu > 0
    }

    /// How much the window holds.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// The revision the window reflects, once loaded.
    pub(crate) fn revision(&self) -> Option<i64> {
        let state = self.state.read().ok()?;
        state.loaded.then_some(state.revision)
    }

    /// Records and bytes held.
    pub(crate) fn size(&self) -> (usize, usize) {
        self.state
            .read()
            .map(|s| (s.gpus.values().map(|g| g.records.len()).sum(), s.bytes))
            .unwrap_or_default()
    }

    /// Empties the window and asks for a load at `revision` (the live feed goes on from
    /// `revision + 1`; what it sees meanwhile is kept and applied after the load).
    pub(crate) fn reset(&self, revision: i64) {
        if let Ok(mut state) = self.state.write() {
            *state = State {
                revision,
                ..State::default()
            };
        }
        self.reload.notify_one();
    }

    /// Waits until a (re)load is asked for; returns the revision to load at.
    pub(crate) async fn wanted(&self) -> i64 {
        self.reload.notified().await;
        self.state.read().map(|s| s.revision).unwrap_or_default()
    }

    /// Finishes a load made at `revision`: keeps each GPU's newest records within the limits,
    /// then applies what the feed saw since. Ignored if another reset happened meanwhile.
    pub(crate) fn loaded(&self, revision: i64, gpus: Vec<Loaded>) {
        let Ok(mut state) = self.state.write() else { return };
        if state.loaded || state.revision != revision {
            return;
        }
        for load in gpus {
            let window = state.gpus.entry(load.gpu).or_default();
            let keep = load.records.len().min(self.limits.points_per_gpu);
            if keep > 0 && (load.more || keep < load.records.len()) {
                window.floor = Some(load.records[keep - 1].key.clone());
            }
            for record in load.records.into_iter().take(keep) {
                window.insert(record);
            }
        }
        state.bytes = state
            .gpus
            .values()
            .flat_map(|g| g.records.values())
            .map(|r| size_of(r))
            .sum();
        let pending = std::mem::take(&mut state.pending);
        for (through, change) in pending {
            self.apply_one(&mut state, change);
            state.revision = state.revision.max(through);
        }
        state.loaded = true;
    }

    /// Applies the live feed's changes through revision `through`.
    pub(crate) fn apply(&self, puts: &[Arc<Record>], deletes: &[String], through: i64) {
        if !self.enabled() {
            return;
        }
        let Ok(mut state) = self.state.write() else { return };
        if through <= state.revision && state.loaded {
            return;
        }
        if !state.loaded {
            // Changes up to the load revision are in the load itself.
            if through > state.revision {
                state
                    .pending
                    .extend(puts.iter().map(|r| (through, Pending::Put(r.clone()))));
                state
                    .pending
                    .extend(deletes.iter().map(|k| (through, Pending::Delete(k.clone()))));
            }
            return;
        }
        for record in puts {
            self.apply_one(&mut state, Pending::Put(record.clone()));
        }
        for key in deletes {
            self.apply_one(&mut state, Pending::Delete(key.clone()));
        }
        state.revision = through;
    }

    fn apply_one(&self, state: &mut State, change: Pending) {
        match change {
            Pending::Put(record) => {
                let gpu = (record.hostname.clone(), record.gpu_id.clone());
                let window = state.gpus.entry(gpu.clone()).or_default();
                if window.records.contains_key(&record.key) {
                    return;
                }
                let size = size_of(&record);
                window.insert(record);
                state.bytes += size;
                let window = state.gpus.entry(gpu.clone()).or_default();
                let mut freed = 0;
                while window.records.len() > self.limits.points_per_gpu {
                    freed += window.evict_oldest();
                }
                state.bytes -= freed.min(state.bytes);
                // Over the byte budget: this GPU, the one that grew, gives up its oldest.
                while state.bytes > self.limits.max_bytes {
                    let Some(window) = state.gpus.get_mut(&gpu) else {
                        break;
                    };
                    let freed = window.evict_oldest();
                    if freed == 0 {
                        break;
                    }
                    state.bytes -= freed.min(state.bytes);
                }
            }
            Pending::Delete(key) => {
                let freed: usize = state.gpus.values_mut().map(|g| g.remove(&key)).sum();
                state.bytes -= freed.min(state.bytes);
            }
        }
    }

    /// A telemetry page of `gpu` for `query`, answered from memory with the revision it
    /// reflects, or `None` when memory cannot answer it exactly.
    pub(crate) fn page(&self, gpu: &GpuInfo, prefix: &str, query: &TelemetryQuery) -> Option<(Page, i64)> {
        let state = self.state.read().ok()?;
        if !state.loaded || !self.enabled() {
            return None;
        }
        let empty = GpuWindow::default();
        let window = state
            .gpus
            .get(&(gpu.hostname.clone(), gpu.gpu_id.clone()))
            .unwrap_or(&empty);
        let mut scan = Scan::new(query, prefix);
        while let Some(read) = scan.next_read() {
            let (records, more) = window.read(read, query.order)?;
            scan.absorb(records.into_iter().map(|r| (r.key.clone(), Some(r))), more);
        }
        Some((scan.finish(), state.revision))
    }

    /// Every GPU's latest record per metric, with the revision it reflects; `None` until
    /// loaded.
    pub(crate) fn latest(&self) -> Option<(Latest, i64)> {
        let state = self.state.read().ok()?;
        if !state.loaded {
            return None;
        }
        let latest = state
            .gpus
            .iter()
            .filter(|(_, g)| !g.latest.is_empty())
            .map(|(gpu, g)| {
                let mut records: Vec<Arc<Record>> = g.latest.values().cloned().collect();
                records.sort_by(|a, b| a.metric.cmp(&b.metric));
                (gpu.clone(), records)
            })
            .collect();
        Some((latest, state.revision))
    }
}

/// Loads the window whenever it asks (at start, and after a compaction outran the live feed):
/// the newest records of every GPU in the index, at the revision asked for. Runs until
/// `shutdown`.
pub(crate) async fn maintain(window: Arc<Window>, store: Arc<Store>, shutdown: CancellationToken) {
    if !window.enabled() {
        return;
    }
    loop {
        let revision = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = window.wanted() => r,
        };
        let mut backoff = Backoff::new(Policy::ETCD, "loading the read window");
        loop {
            match load(&window, &store, revision).await {
                Ok(loaded) => {
                    let gpus = loaded.len();
                    window.loaded(revision, loaded);
                    let (records, bytes) = window.size();
                    emit(WindowLoaded {
                        revision,
                        gpus,
                        records,
                        bytes,
                    });
                    break;
                }
                Err(err) => {
                    if backoff.retry_after(&err, &shutdown).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

async fn load(window: &Window, store: &Store, revision: i64) -> Result<Vec<Loaded>, EtcdError> {
    let points = window.limits().points_per_gpu;
    let gpus = store.gpus().await?;
    let mut loaded = Vec::with_capacity(gpus.len());
    for gpu in gpus.iter() {
        let (records, more) = store.newest_records(gpu, points, revision).await?;
        loaded.push(Loaded {
            gpu: (gpu.hostname.clone(), gpu.gpu_id.clone()),
            records,
            more,
        });
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use telemetry_shared::{Fields, Message, SchemaVersion, Timestamp, config::Columns};

    use super::*;

    const PREFIX: &str = "/d/h/0/";

    fn record(i: usize) -> Arc<Record> {
        let mut fields = Fields::new();
        fields.insert("metric_name".into(), format!("M{}", i % 3).into());
        let message = Message {
            schema_version: SchemaVersion::V1,
            id: ulid::Ulid::from_parts(1, i as u128),
            timestamp: Timestamp::now(),
            idempotency_key: "ab".repeat(32),
            source: None,
            fields,
        };
        let key = format!("{PREFIX}{i:06}");
        Arc::new(Record::new(key, i as i64, "h", "0", message, &Columns::default()))
    }

    fn window(points: usize) -> Window {
        let w = Window::new(Limits {
            points_per_gpu: points,
            max_bytes: usize::MAX,
        });
        w.reset(0);
        w.loaded(0, Vec::new());
        w
    }

    fn read<'a>(lo: &'a [u8], hi: &'a [u8], n: usize) -> Read<'a> {
        Read { lo, hi, n }
    }

    #[test]
    fn reads_above_the_floor_are_answered_and_below_it_are_not() {
        let w = window(5);
        let all: Vec<Arc<Record>> = (0..10).map(record).collect();
        w.apply(&all, &[], 10);
        let state = w.state.read().expect("lock");
        let g = state.gpus.get(&("h".into(), "0".into())).expect("gpu");
        assert_eq!(g.records.len(), 5, "the oldest five were evicted");
        let (lo, hi) = (PREFIX.as_bytes(), b"/d/h/0/~".as_slice());
        // Newest three: in memory, with more below.
        let (found, more) = g.read(read(lo, hi, 3), Order::Desc).expect("covered");
        assert_eq!(
            (found.len(), more, found[0].key.ends_with("000009")),
            (3, true, true)
        );
        // Newest eight: five in memory, the rest may be below the floor.
        assert!(g.read(read(lo, hi, 8), Order::Desc).is_none());
        // Oldest first from the start of the range: not in memory.
        assert!(g.read(read(lo, hi, 2), Order::Asc).is_none());
        // Oldest first from inside the window: in memory.
        let from = format!("{PREFIX}000007");
        let (found, more) = g.read(read(from.as_bytes(), hi, 2), Order::Asc).expect("covered");
        assert_eq!((found.len(), more), (2, true));
        assert_eq!(g.latest.len(), 3, "latest per metric");
    }

    #[test]
    fn changes_seen_while_loading_are_applied_after_the_load() {
        let w = Window::new(Limits {
            points_per_gpu: 10,
            max_bytes: usize::MAX,
        });
        w.reset(5);
        w.apply(&[record(7)], &[format!("{PREFIX}000003")], 7);
        assert_eq!(w.revision(), None, "not loaded yet");
        let loaded = Loaded {
            gpu: ("h".into(), "0".into()),
            records: vec![record(4), record(3)],
            more: false,
        };
        w.loaded(5, vec![loaded]);
        assert_eq!(w.revision(), Some(7));
        assert_eq!(w.size().0, 2, "3 deleted, 4 and 7 kept");
    }

    #[test]
    fn deletes_move_the_latest_back() {
        let w = window(10);
        w.apply(&[record(0), record(3)], &[], 3);
        w.apply(&[], &[format!("{PREFIX}000003")], 4);
        let (latest, rev) = w.latest().expect("loaded");
        assert_eq!(rev, 4);
        let keys: Vec<&str> = latest.values().flatten().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, vec![format!("{PREFIX}000000").as_str()]);
    }

    #[test]
    fn the_byte_budget_evicts_the_oldest_records() {
        let w = Window::new(Limits {
            points_per_gpu: 100,
            max_bytes: 3 * size_of(&record(0)),
        });
        w.reset(0);
        w.loaded(0, Vec::new());
        let all: Vec<Arc<Record>> = (0..10).map(record).collect();
        w.apply(&all, &[], 10);
        let (records, bytes) = w.size();
        assert!(
            records <= 3 && bytes <= 3 * size_of(&record(0)),
            "{records} {bytes}"
        );
    }
}
