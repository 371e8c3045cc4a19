//! etcd's own ceiling, measured on the same etcd as the pipeline: transactions of 128 puts and
//! single puts of message-sized values; and the reset that gives every phase a clean store.

use std::time::{Duration, Instant};

use etcd_client::{Client, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use telemetry_harness::sample;
use telemetry_streamer::{
    source::{ColumnTypes, CsvSource, SourceItem},
    transform::MessageBuilder,
};

/// Keys per second written by transactions of 128 puts of `value_len`-byte values, from
/// `clients` concurrent clients, for `seconds`.
pub async fn raw_txn_rate(
    client: &Client,
    clients: usize,
    value_len: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let value = vec![b'x'; value_len];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let mut client = client.clone();
        let value = value.clone();
        tasks.spawn(async move {
            let mut keys = 0u64;
            let mut round = 0u64;
            while Instant::now() < deadline {
                let ops: Vec<TxnOp> = (0..128)
                    .map(|i| {
                        TxnOp::put(
                            format!("/bench/raw/{c}/{round}/{i}"),
                            value.clone(),
                            None::<PutOptions>,
                        )
                    })
                    .collect();
                client.txn(Txn::new().and_then(ops)).await?;
                keys += 128;
                round += 1;
            }
            anyhow::Ok(keys)
        });
    }
    rate(tasks).await
}

/// Keys per second written by single puts (no transaction) of `value_len`-byte values: `tasks`
/// tasks, each sending one put at a time in a loop, for `seconds`. One task measures the
/// round trip of a durable write; many show how far etcd batches concurrent proposals.
pub async fn raw_put_rate(
    client: &Client,
    tasks: usize,
    value_len: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let value = vec![b'x'; value_len];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let mut client = client.clone();
        let value = value.clone();
        set.spawn(async move {
            let mut keys = 0u64;
            while Instant::now() < deadline {
                client
                    .put(format!("/bench/put/{t}/{keys}"), value.clone(), None)
                    .await?;
                keys += 1;
            }
            anyhow::Ok(keys)
        });
    }
    rate(set).await
}

/// Sums the keys the tasks wrote and divides by the time until the last one finished.
async fn rate(mut tasks: tokio::task::JoinSet<anyhow::Result<u64>>) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut total = 0;
    while let Some(result) = tasks.join_next().await {
        total += result??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Deletes every key (in chunks: one delete of hundreds of MB exceeds etcd's own request
/// timeout), compacts and defragments, so a phase does not pay for an earlier one's history.
pub async fn reset(client: &mut Client) -> anyhow::Result<()> {
    loop {
        let options = GetOptions::new()
            .with_from_key()
            .with_keys_only()
            .with_limit(5000);
        let keys = client.get("/", Some(options)).await?;
        let (Some(first), Some(last)) = (keys.kvs().first(), keys.kvs().last()) else {
            break;
        };
        let mut end = last.key().to_vec();
        end.push(0);
        client
            .delete(first.key(), Some(DeleteOptions::new().with_range(end)))
            .await?;
    }
    compact_and_defragment(client).await
}

/// Compacts etcd at its current revision and defragments it. A put and a delete first move the
/// revision past any earlier compaction, so two calls in a row never compact at an already
/// compacted revision (which etcd refuses); compaction removes both again.
pub async fn compact_and_defragment(client: &mut Client) -> anyhow::Result<()> {
    client.put("/bench/compact", "", None).await?;
    let deleted = client.delete("/bench/compact", None).await?;
    let rev = deleted.header().map_or(0, |h| h.revision());
    client.compact(rev, None).await?;
    client.defragment().await?;
    Ok(())
}

/// Mean encoded size of a sample message, so raw puts write values of the same size.
pub fn message_size() -> anyhow::Result<usize> {
    let path = sample::path();
    let types = ColumnTypes::scan(&path)?;
    let mut source = CsvSource::open(&path)?;
    let mut builder = MessageBuilder::new(source.headers().to_vec(), types, &[]);
    let (mut bytes, mut n) = (0, 0);
    while let Some(item) = source.next_item()? {
        if let SourceItem::Row(row) = item {
            bytes += serde_json::to_vec(&builder.build("bench-0-w0", 0, row.row, &row.values).message)?.len();
            n += 1;
        }
    }
    Ok(bytes / n.max(1))
}
