//! A lease kept alive on the holder's own timer, that says when it is lost.
//!
//! `etcd-client`'s `keep_alive()` sends one renewal per call and its stream does not reconnect,
//! so a task renews every TTL/3 and checks each answer. A renewal etcd answers with TTL 0 (it no
//! longer knows the lease), or no successful renewal for a whole TTL (the process was paused,
//! partitioned or starved), marks the lease lost. A holder stops acting on the lease's behalf
//! then; etcd's compares on the lease stay the authority, this only stops wasted work early.
//! (The collector's session, `services/collector/src/session.rs`, keeps its lease the same way.)

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use etcd_client::Client;
use tokio_util::sync::CancellationToken;

use crate::etcd::{EtcdError, MIN_LEASE_TTL};

/// A granted lease and the task renewing it; see the module docs. The renewal stops when this
/// is dropped (the lease then expires after its TTL) or revoked.
#[derive(Debug)]
pub struct KeptLease {
    id: i64,
    ttl: Duration,
    state: Arc<Mutex<State>>,
    lost: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    /// When etcd last confirmed the lease.
    confirmed: Instant,
    /// Why the lease was lost, once it is.
    lost: Option<String>,
}

impl KeptLease {
    /// Grants a lease of `ttl` (at least [`MIN_LEASE_TTL`]) and starts renewing it.
    pub async fn grant(client: &Client, ttl: Duration) -> Result<Self, EtcdError> {
        let ttl = ttl.max(MIN_LEASE_TTL);
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let granted_at = Instant::now();
        let id = client.clone().lease_grant(ttl_secs, None).await?.id();
        let state = Arc::new(Mutex::new(State {
            confirmed: granted_at,
            lost: None,
        }));
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(client.clone(), id, ttl, state.clone(), lost.clone()));
        Ok(KeptLease {
            id,
            ttl,
            state,
            lost,
            keeper,
        })
    }

    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A token cancelled when the lease is lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Is the lease believed alive, with at least `margin` of its TTL left since etcd last
    /// confirmed it? Checked right before acting on the lease's behalf outside etcd (where no
    /// compare can fence the action).
    pub fn is_alive_for(&self, margin: Duration) -> bool {
        let Ok(state) = self.state.lock() else {
            return false;
        };
        state.lost.is_none() && state.confirmed.elapsed() + margin < self.ttl
    }

    /// Why the lease was lost, once it is.
    pub fn lost_reason(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.lost.clone())
    }

    /// Stops renewing and revokes the lease, so the keys attached to it go at once.
    pub async fn revoke(self, client: &Client) -> Result<(), EtcdError> {
        self.keeper.abort();
        self.lost.cancel();
        client.clone().lease_revoke(self.id).await?;
        Ok(())
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        self.keeper.abort();
        self.lost.cancel();
    }
}

fn mark_lost(state: &Mutex<State>, token: &CancellationToken, why: &str) {
    if let Ok(mut state) = state.lock() {
        state.lost.get_or_insert_with(|| why.to_string());
    }
    token.cancel();
}

async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    state: Arc<Mutex<State>>,
    token: CancellationToken,
) {
    let every = ttl / 3;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let confirmed = state
            .lock()
            .map(|s| s.confirmed)
            .unwrap_or_else(|_| Instant::now());
        // Checked before renewing: after a pause longer than the TTL the lease is gone even if
        // a renewal would now be answered.
        if confirmed.elapsed() >= ttl {
            mark_lost(&state, &token, "no successful renewal within one TTL");
            return;
        }
        let asked = Instant::now();
        let renewed = async {
            let (mut keeper, mut stream) = client.clone().lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            let resp = stream.message().await?;
            Ok::<_, etcd_client::Error>(resp.map(|r| r.ttl()))
        };
        match tokio::time::timeout(every, renewed).await {
            Ok(Ok(Some(left))) if left > 0 => {
                if let Ok(mut state) = state.lock() {
                    // The TTL restarts when etcd receives the renewal, not when we hear back.
                    state.confirmed = asked;
                }
            }
            Ok(Ok(_)) => {
                mark_lost(&state, &token, "etcd no longer knows the lease");
                return;
            }
            Ok(Err(err)) => tracing::debug!(lease, error = %err, "lease renewal failed; retrying"),
            Err(_) => tracing::debug!(lease, "lease renewal timed out; retrying"),
        }
    }
}
