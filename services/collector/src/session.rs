//! The collector's session: a lease kept alive on our own timer, and the registration key
//! attached to it.
//!
//! `etcd-client`'s `keep_alive()` sends one renewal per call and its stream does not
//! reconnect, so a task renews every TTL/3 and checks each answer. A renewal that fails, a lease
//! etcd no longer knows, or no successful renewal for a whole TTL (the process was paused,
//! partitioned or starved) marks the session lost: partition tasks stop committing and the
//! coordinator starts a new session. Losing the session never risks a double effect, because
//! every commit is also fenced by the lease in etcd; this only stops wasted work early.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use telemetry_shared::{Keyspace, Timestamp, etcd::EtcdError, model::Member, observe::emit};

use crate::events;
use tokio_util::sync::CancellationToken;

/// A live (or lost) session.
pub(crate) struct Session {
    /// The lease id: owner keys and the registration are attached to it.
    pub lease: i64,
    lost: Arc<AtomicBool>,
    lost_token: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Grants a lease of `ttl`, registers `collector_id` under it and starts renewing it.
    pub async fn start(
        client: &Client,
        keys: &Keyspace,
        collector_id: &str,
        ttl: Duration,
    ) -> Result<Self, EtcdError> {
        let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let lease = client.clone().lease_grant(ttl_secs, None).await?.id();
        let member = Member {
            id: collector_id.to_string(),
            lease,
            started_at: Timestamp::now(),
        };
        let value = serde_json::to_vec(&member).unwrap_or_default();
        let key = keys.member(collector_id);
        // Replace a registration left by an earlier session of the same id (its lease may still
        // be alive for up to a TTL); partitions it owned stay fenced by that old lease.
        let txn = Txn::new()
            .when(vec![Compare::version(key.as_str(), CompareOp::Greater, -1)])
            .and_then(vec![TxnOp::put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        client.clone().txn(txn).await?;
        let lost = Arc::new(AtomicBool::new(false));
        let lost_token = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(
            client.clone(),
            lease,
            ttl,
            lost.clone(),
            lost_token.clone(),
        ));
        emit(events::SessionStarted {
            collector: collector_id,
            lease,
            ttl,
        });
        Ok(Session {
            lease,
            lost,
            lost_token,
            keeper,
        })
    }

    /// Is the session believed alive? (etcd's fence is the authority; this is the early stop.)
    pub fn is_alive(&self) -> bool {
        !self.lost.load(Ordering::Acquire)
    }

    /// A token cancelled when the session is lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost_token.clone()
    }

    /// A cheap handle for partition tasks to check liveness.
    pub fn liveness(&self) -> Liveness {
        Liveness(self.lost.clone())
    }

    /// Stops renewing and revokes the lease, so this collector's partitions and registration
    /// disappear at once instead of after a TTL.
    pub async fn revoke(self, client: &Client) {
        self.keeper.abort();
        self.lost.store(true, Ordering::Release);
        self.lost_token.cancel();
        match client.clone().lease_revoke(self.lease).await {
            Ok(_) => tracing::info!(lease = self.lease, "lease revoked; partitions released"),
            Err(err) => {
                tracing::warn!(lease = self.lease, error = %err, "could not revoke lease; it expires after its TTL")
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Whatever still holds a liveness handle must stop committing under this session.
        self.lost.store(true, Ordering::Release);
        self.lost_token.cancel();
        self.keeper.abort();
    }
}

/// Whether a session is still believed alive.
#[derive(Clone)]
pub(crate) struct Liveness(Arc<AtomicBool>);

impl Liveness {
    /// True until the session is lost.
    pub fn is_alive(&self) -> bool {
        !self.0.load(Ordering::Acquire)
    }
}

async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    lost: Arc<AtomicBool>,
    token: CancellationToken,
) {
    let mark_lost = |why: &str| {
        emit(events::SessionLost { lease, reason: why });
        lost.store(true, Ordering::Release);
        token.cancel();
    };
    let every = ttl / 3;
    let mut last_ok = Instant::now();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Checked before renewing: after a pause longer than the TTL the lease is gone even if
        // a renewal would now be answered (etcd would say "not found" anyway).
        if last_ok.elapsed() >= ttl {
            mark_lost("no successful renewal within one TTL");
            return;
        }
        let renewed = async {
            let (mut keeper, mut stream) = client.clone().lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            let resp = stream.message().await?;
            Ok::<_, etcd_client::Error>(resp.map(|r| r.ttl()))
        };
        match tokio::time::timeout(every, renewed).await {
            Ok(Ok(Some(ttl_left))) if ttl_left > 0 => last_ok = Instant::now(),
            Ok(Ok(_)) => {
                mark_lost("etcd no longer knows the lease");
                return;
            }
            Ok(Err(err)) => tracing::debug!(lease, error = %err, "lease renewal failed; retrying"),
            Err(_) => tracing::debug!(lease, "lease renewal timed out; retrying"),
        }
    }
}
