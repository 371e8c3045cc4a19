//! The one retry policy of the workspace: capped exponential backoff with jitter.
//!
//! Every loop that waits for etcd (or any other peer) to come back uses a [`Backoff`]: it hands
//! out the delays (from [`backon`], jittered so that many clients that failed together do not
//! retry together), sleeps them unless shutdown comes first, and logs an outage once when it
//! begins and once when it ends instead of at every attempt. Bounded retries of idempotent
//! reads use [`retry`] with [`Policy::READ`].

use std::{fmt::Display, future::Future, time::Duration};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder, Retryable};
use tokio_util::sync::CancellationToken;

/// How long to wait between attempts, and how many attempts to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The first delay.
    pub min: Duration,
    /// The delay never grows past this (before jitter, which adds up to 100 %).
    pub max: Duration,
    /// Retries after the first attempt; `None` retries until shutdown.
    pub max_retries: Option<usize>,
}

impl Policy {
    /// Waiting for etcd to come back: 100 ms doubling to 5 s, until it answers or shutdown.
    pub const ETCD: Policy = Policy {
        min: Duration::from_millis(100),
        max: Duration::from_secs(5),
        max_retries: None,
    };

    /// Tight loops that must not spin (a contended compare, a retried commit): 50 ms to 5 s.
    pub const FAST: Policy = Policy {
        min: Duration::from_millis(50),
        max: Duration::from_secs(5),
        max_retries: None,
    };

    /// An idempotent read a caller is waiting for: three retries, 100 ms doubling.
    pub const READ: Policy = Policy {
        min: Duration::from_millis(100),
        max: Duration::from_millis(400),
        max_retries: Some(3),
    };

    fn builder(self) -> ExponentialBuilder {
        let builder = ExponentialBuilder::new()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter();
        match self.max_retries {
            Some(n) => builder.with_max_times(n),
            None => builder.without_max_times(),
        }
    }
}

/// Why [`Backoff::wait`] did not sleep the whole delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    /// Shutdown was requested.
    #[error("shutting down")]
    Cancelled,
    /// The policy's retries are used up.
    #[error("gave up after the configured retries")]
    Exhausted,
}

/// The state of one retry loop: the next delay, and whether an outage is being reported.
#[derive(Debug)]
pub struct Backoff {
    policy: Policy,
    delays: ExponentialBackoff,
    failing: bool,
    what: &'static str,
}

impl Backoff {
    /// A loop doing `what` (used in its log lines, e.g. `"partition commit"`).
    pub fn new(policy: Policy, what: &'static str) -> Self {
        Backoff {
            policy,
            delays: policy.builder().build(),
            failing: false,
            what,
        }
    }

    /// Is an outage being reported (a failure since the last success)?
    pub fn is_failing(&self) -> bool {
        self.failing
    }

    /// Records a failure: the first one of an outage is logged as a warning, later ones at
    /// debug level.
    pub fn failed(&mut self, error: &dyn Display) {
        if self.failing {
            tracing::debug!(what = self.what, %error, "still failing; retrying");
        } else {
            tracing::warn!(what = self.what, %error, "failed; retrying with backoff");
            self.failing = true;
        }
    }

    /// Records a success: the delay starts small again, and an outage's end is logged.
    pub fn succeeded(&mut self) {
        if self.failing {
            tracing::info!(what = self.what, "works again");
            self.failing = false;
        }
        self.delays = self.policy.builder().build();
    }

    /// The next delay, or `None` when the policy's retries are used up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.delays.next()
    }

    /// Sleeps the next delay, unless `shutdown` comes first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> Result<(), Stopped> {
        let delay = self.next_delay().ok_or(Stopped::Exhausted)?;
        tokio::select! {
            _ = shutdown.cancelled() => Err(Stopped::Cancelled),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }

    /// [`Backoff::failed`] then [`Backoff::wait`]: the usual body of a retry loop's error arm.
    pub fn retry_after<'a>(
        &'a mut self,
        error: &dyn Display,
        shutdown: &'a CancellationToken,
    ) -> impl Future<Output = Result<(), Stopped>> + Send + 'a {
        // Logged now, so the returned future does not hold the error.
        self.failed(error);
        self.wait(shutdown)
    }
}

/// Runs `attempt` until it succeeds, fails with an error `retryable` rejects, or the policy's
/// retries are used up (then the last error is returned). For idempotent operations only.
pub async fn retry<T, E, F, Fut>(policy: Policy, retryable: impl Fn(&E) -> bool, attempt: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    attempt
        .retry(policy.builder())
        .sleep(tokio::time::sleep)
        .when(retryable)
        .notify(|_, delay| {
            metrics::counter!("etcd_request_retries_total").increment(1);
            tracing::debug!(?delay, "retrying a failed request");
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Policy::ETCD, "test");
        let delays: Vec<Duration> = (0..12).filter_map(|_| b.next_delay()).collect();
        assert_eq!(delays.len(), 12, "the etcd policy never gives up");
        // Jitter adds at most 100 %: each delay is between its base and twice its base.
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200));
        assert!(delays.iter().all(|d| *d <= 2 * Policy::ETCD.max));
        assert!(delays[11] >= Policy::ETCD.max, "capped, not reset");
        b.succeeded();
        assert!(b.next_delay().is_some_and(|d| d <= Duration::from_millis(200)));
    }

    #[test]
    fn bounded_policies_run_out() {
        let mut b = Backoff::new(Policy::READ, "test");
        assert_eq!((0..10).filter_map(|_| b.next_delay()).count(), 3);
    }

    #[tokio::test]
    async fn retry_stops_on_a_permanent_error_and_after_the_budget() {
        let mut calls = 0;
        let result: Result<(), &str> = retry(
            Policy::READ,
            |e: &&str| *e == "transient",
            || {
                calls += 1;
                async { Err("permanent") }
            },
        )
        .await;
        assert_eq!((result, calls), (Err("permanent"), 1));
        let mut calls = 0;
        let fast = Policy {
            min: Duration::from_millis(1),
            max: Duration::from_millis(2),
            max_retries: Some(3),
        };
        let result: Result<(), &str> = retry(
            fast,
            |_: &&str| true,
            || {
                calls += 1;
                async { Err("transient") }
            },
        )
        .await;
        assert_eq!((result, calls), (Err("transient"), 4));
    }

    #[tokio::test]
    async fn wait_returns_at_shutdown() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut b = Backoff::new(Policy::ETCD, "test");
        assert_eq!(b.wait(&shutdown).await, Err(Stopped::Cancelled));
    }
}
