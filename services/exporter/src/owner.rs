//! One active exporter per name: a leased owner key, and standing by until it is free.
//!
//! The owner key `/exporters/{name}/owner` is created only when it does not exist
//! (`create_revision == 0`), attached to this process's lease, so at most one process holds
//! it; every checkpoint advance compares it still carries that lease (`checkpoint.rs`). The
//! lease is renewed on the exporter's own timer (`shared::lease`). A standby polls the key and
//! tries again as soon as it is gone: when the active exporter stops cleanly (it revokes its
//! lease) at once, when it dies after its `LEASE_TTL`.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use telemetry_shared::{
    Keyspace, Timestamp,
    etcd::EtcdError,
    lease::KeptLease,
    model::Member,
    observe::emit,
    retry::{Backoff, Policy},
};
use tokio_util::sync::CancellationToken;

use crate::events;

/// Waits until this process owns `name`, or shutdown (`None`). Retries etcd failures with
/// backoff.
pub(crate) async fn acquire(
    client: &Client,
    keys: &Keyspace,
    name: &str,
    exporter: &str,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> Option<KeptLease> {
    let mut backoff = Backoff::new(Policy::ETCD, "exporter ownership");
    let mut standing_by = false;
    let poll = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        match try_acquire(client, keys, name, exporter, ttl).await {
            Ok(Ok(lease)) => {
                emit(events::BecameActive {
                    name,
                    exporter,
                    lease: lease.id(),
                });
                return Some(lease);
            }
            Ok(Err(active)) => {
                backoff.succeeded();
                if !standing_by {
                    emit(events::StandingBy {
                        name,
                        active: active.as_deref(),
                    });
                    standing_by = true;
                }
                wait_until_free(client, keys, name, poll, shutdown).await?;
            }
            Err(err) => backoff.retry_after(&err, shutdown).await.ok()?,
        }
    }
}

/// One attempt: `Ok(Ok(lease))` when the key was free and is now ours; `Ok(Err(active))` when
/// another process holds it.
async fn try_acquire(
    client: &Client,
    keys: &Keyspace,
    name: &str,
    exporter: &str,
    ttl: Duration,
) -> Result<Result<KeptLease, Option<String>>, EtcdError> {
    let lease = KeptLease::grant(client, ttl).await?;
    let key = keys.exporter_owner(name);
    let member = Member {
        id: exporter.to_string(),
        lease: lease.id(),
        started_at: Timestamp::now(),
    };
    let txn = Txn::new()
        .when(vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then(vec![TxnOp::put(
            key.as_str(),
            serde_json::to_vec(&member).unwrap_or_default(),
            Some(PutOptions::new().with_lease(lease.id())),
        )])
        .or_else(vec![TxnOp::get(key.as_str(), None)]);
    let resp = client.clone().txn(txn).await?;
    if resp.succeeded() {
        return Ok(Ok(lease));
    }
    let active = resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<Member>(kv.value()).ok())
            .map(|m| m.id),
        _ => None,
    });
    // Not ours: give the lease back at once instead of letting it expire.
    let _ = lease.revoke(client).await;
    Ok(Err(active))
}

/// Polls the owner key every `poll` until it is gone (`None` at shutdown).
async fn wait_until_free(
    client: &Client,
    keys: &Keyspace,
    name: &str,
    poll: Duration,
    shutdown: &CancellationToken,
) -> Option<()> {
    let key = keys.exporter_owner(name);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(poll) => {}
        }
        let options = GetOptions::new().with_count_only();
        if let Ok(resp) = client.clone().get(key.as_str(), Some(options)).await
            && resp.count() == 0
        {
            return Some(());
        }
    }
}
