//! The reference the pipeline is measured against (issue 12): an ideal exactly-once design with
//! no parsing and no services, run on the same etcd in the same bench run.
//!
//! - 16 producers each enqueue messages of the sample's JSON size in transactions of 64, each
//!   message a queue put plus a dedup-marker put guarded by `create_revision == 0`;
//! - 16 consumers each own one partition through a leased owner key, range their partition
//!   from a cursor, and commit 63 messages per transaction (data put + queue delete) fenced by
//!   a compare on the owner key's lease.
//!
//! Also here: etcd's CPU time, read from `/proc/<pid>/stat`, so each phase can report etcd
//! CPU-seconds per 1,000 messages.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

/// Producers and consumers (and partitions) of the reference design.
pub const WORKERS: usize = 16;
/// Messages per producer transaction.
const ENQUEUE_BATCH: usize = 64;
/// Messages per consumer transaction.
const COMMIT_BATCH: usize = 63;

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command may contain spaces: fields are counted after its closing parenthesis.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12th and 13th after the ")".
    let ticks: f64 = fields
        .get(11..13)
        .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    Ok(ticks / 100.0)
}

/// What one run of the reference design measured.
#[derive(Debug, Clone, Copy)]
pub struct IdealRun {
    /// Messages moved.
    pub messages: u64,
    /// Messages per second, from the producers' start until every message is committed.
    pub rate: f64,
}

/// Runs the reference design over `messages` messages of `value_len` bytes under `prefix`.
pub async fn run(
    client: &Client,
    prefix: &str,
    messages: usize,
    value_len: usize,
) -> anyhow::Result<IdealRun> {
    let per_producer = messages.div_ceil(WORKERS);
    let total = (per_producer * WORKERS) as u64;
    let value = Arc::new(vec![b'x'; value_len]);
    let committed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..WORKERS {
        let (client, prefix, value, committed) = (
            client.clone(),
            prefix.to_string(),
            value.clone(),
            committed.clone(),
        );
        tasks.spawn(async move { consume(client, &prefix, c, value, committed, total).await });
    }
    for p in 0..WORKERS {
        let (client, prefix, value) = (client.clone(), prefix.to_string(), value.clone());
        tasks.spawn(async move { produce(client, &prefix, p, per_producer, value).await });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(IdealRun {
        messages: total,
        rate: total as f64 / started.elapsed().as_secs_f64(),
    })
}

/// One producer: `n` messages spread over the partitions, 64 per transaction.
async fn produce(
    mut client: Client,
    prefix: &str,
    p: usize,
    n: usize,
    value: Arc<Vec<u8>>,
) -> anyhow::Result<()> {
    for start in (0..n).step_by(ENQUEUE_BATCH) {
        let mut compares = Vec::with_capacity(ENQUEUE_BATCH);
        let mut ops = Vec::with_capacity(2 * ENQUEUE_BATCH);
        for i in start..(start + ENQUEUE_BATCH).min(n) {
            let seq = p * n + i;
            let partition = seq % WORKERS;
            let marker = format!("{prefix}/dedup/{:064x}", seq);
            compares.push(Compare::create_revision(marker.as_str(), CompareOp::Equal, 0));
            ops.push(TxnOp::put(
                format!("{prefix}/queue/{partition:02}/{p:02}-{i:08}"),
                value.as_slice(),
                None::<PutOptions>,
            ));
            ops.push(TxnOp::put(marker, seq.to_string(), None::<PutOptions>));
        }
        let resp = client.txn(Txn::new().when(compares).and_then(ops)).await?;
        anyhow::ensure!(resp.succeeded(), "an ideal producer's dedup compare failed");
    }
    Ok(())
}

/// One consumer: owns partition `c` through a leased key and commits 63 messages per
/// transaction, fenced by the lease, until `total` messages are committed in all.
async fn consume(
    mut client: Client,
    prefix: &str,
    c: usize,
    value: Arc<Vec<u8>>,
    committed: Arc<AtomicU64>,
    total: u64,
) -> anyhow::Result<()> {
    let lease = client.lease_grant(60, None).await?.id();
    let owner = format!("{prefix}/owner/{c:02}");
    client
        .put(owner.as_str(), "me", Some(PutOptions::new().with_lease(lease)))
        .await?;
    let queue = format!("{prefix}/queue/{c:02}/");
    let end = telemetry_shared::keys::prefix_end(&queue);
    let mut cursor = queue.as_bytes().to_vec();
    while committed.load(Ordering::Relaxed) < total {
        let options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(COMMIT_BATCH as i64);
        let page = client.get(cursor.clone(), Some(options)).await?;
        if page.kvs().is_empty() {
            // Nothing after the cursor: start over from the partition's head (a producer may have
            // committed keys that sort before the cursor), after a short pause (a tight loop
            // would spend etcd's CPU on ranges).
            cursor = queue.as_bytes().to_vec();
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            continue;
        }
        let mut ops = Vec::with_capacity(2 * page.kvs().len());
        for kv in page.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let id = key.rsplit('/').next().unwrap_or_default();
            ops.push(TxnOp::put(
                format!("{prefix}/data/{c:02}/{id}"),
                value.as_slice(),
                None::<PutOptions>,
            ));
            ops.push(TxnOp::delete(kv.key(), None));
        }
        let fence = Compare::lease(owner.as_str(), CompareOp::Equal, lease);
        let resp = client.txn(Txn::new().when(vec![fence]).and_then(ops)).await?;
        anyhow::ensure!(resp.succeeded(), "an ideal consumer's fence failed");
        if let Some(last) = page.kvs().last() {
            cursor = last.key().to_vec();
            cursor.push(0);
        }
        committed.fetch_add(page.kvs().len() as u64, Ordering::Relaxed);
    }
    Ok(())
}
