//! Liveness and readiness: what a service answers on `/livez` and `/readyz`.
//!
//! The two questions are kept apart, as Kubernetes asks them:
//! - **live** (restart me if not): every main loop of the process is still running and none is
//!   stuck inside one step. A loop is registered by wrapping its future in [`Health::watch`]:
//!   the wrapper notes when each poll starts and ends, so a poll that has not returned for
//!   [`STUCK_AFTER`] (a thread blocked in synchronous code, a spinning loop) and a loop that
//!   ended before shutdown (it returned, or panicked) both fail liveness. Waiting for etcd,
//!   for a watch event or for backpressure is not being stuck: the loop is parked, not polled.
//!   An outage of etcd never fails liveness (restarting would not bring etcd back).
//! - **ready** (send me work, or count me as working): etcd answers a status request within
//!   [`ETCD_PROBE_TIMEOUT`], and every [`Check`] the service registered passes (the collector's
//!   session and partitions, the streamer's commits, the gateway's live feed and read window).
//!
//! Each answer is a small JSON object ([`Report`]): `status` (`ok` or `failing`), the service, a
//! `reason` when failing (the failing checks joined), and every check with its detail. The
//! streamer and collector serve them beside `/metrics` ([`crate::observe::serve_metrics`]); the
//! gateway on its own port.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use etcd_client::Client;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// A poll of a watched loop that has not returned after this long means the loop's thread is
/// blocked (async code returns from a poll in microseconds).
pub const STUCK_AFTER: Duration = Duration::from_secs(15);

/// How long `/readyz` waits for etcd's status answer.
pub const ETCD_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The health of one process: its watched loops and readiness checks. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    service: &'static str,
    /// When cancelled, loops may end without failing liveness.
    shutdown: CancellationToken,
    /// The origin of the loops' poll timestamps.
    epoch: Instant,
    loops: Mutex<BTreeMap<String, Arc<LoopState>>>,
    checks: Mutex<BTreeMap<String, CheckState>>,
    /// The client whose etcd `/readyz` asks; `None` until connected.
    etcd: Mutex<Option<Client>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("service", &self.inner.service)
            .finish_non_exhaustive()
    }
}

/// A check's state: `Ok(detail)` or `Err(reason)`, shared by the service and the probe.
type CheckState = Arc<Mutex<Result<String, String>>>;

/// What a watched loop is doing, as its wrapper records it.
struct LoopState {
    /// Milliseconds since the epoch, plus one, when the current poll began; 0 when not polling.
    polling_since: AtomicU64,
    /// [`RUNNING`], [`RETURNED`] or [`DROPPED`].
    state: AtomicU8,
}

const RUNNING: u8 = 0;
const RETURNED: u8 = 1;
const DROPPED: u8 = 2;

/// One readiness condition; the service passes or fails it as its work goes.
#[derive(Clone)]
pub struct Check {
    state: CheckState,
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Check").field(&self.get()).finish()
    }
}

impl Check {
    /// A check that is not registered anywhere (for code run without a health endpoint).
    pub fn detached() -> Self {
        Check {
            state: Arc::new(Mutex::new(Ok(String::new()))),
        }
    }

    /// The condition holds; `detail` says how (may be empty).
    pub fn pass(&self, detail: impl Into<String>) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Ok(detail.into());
    }

    /// The condition does not hold, for `reason`.
    pub fn fail(&self, reason: impl Into<String>) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Err(reason.into());
    }

    /// The current state: `Ok(detail)` or `Err(reason)`.
    pub fn get(&self) -> Result<String, String> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// One line of a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// Whether it holds.
    pub ok: bool,
    /// How it holds, or why not.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// The body of `/livez` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `ok` or `failing`.
    pub status: &'static str,
    /// The service that answers.
    pub service: &'static str,
    /// Every failing check, `name: reason`, joined by `; ` (absent when ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every check by name.
    pub checks: BTreeMap<String, CheckResult>,
}

impl Report {
    fn new(service: &'static str, checks: BTreeMap<String, CheckResult>) -> Self {
        let failing: Vec<String> = checks
            .iter()
            .filter(|(_, c)| !c.ok)
            .map(|(name, c)| format!("{name}: {}", c.detail))
            .collect();
        Report {
            status: if failing.is_empty() { "ok" } else { "failing" },
            service,
            reason: (!failing.is_empty()).then(|| failing.join("; ")),
            checks,
        }
    }

    /// The same report with check `name` added (a check computed by the caller at probe
    /// time).
    pub fn with_check(self, name: &str, result: Result<String, String>) -> Report {
        let mut checks = self.checks;
        checks.insert(name.to_string(), result_line(result));
        Report::new(self.service, checks)
    }

    /// Whether every check holds (200) or not (503).
    pub fn ok(&self) -> bool {
        self.reason.is_none()
    }
}

impl Health {
    /// The health of `service`; loops may end once `shutdown` is cancelled.
    pub fn new(service: &'static str, shutdown: &CancellationToken) -> Self {
        Health {
            inner: Arc::new(Inner {
                service,
                shutdown: shutdown.clone(),
                epoch: Instant::now(),
                loops: Mutex::new(BTreeMap::new()),
                checks: Mutex::new(BTreeMap::new()),
                etcd: Mutex::new(None),
            }),
        }
    }

    /// The service name.
    pub fn service(&self) -> &'static str {
        self.inner.service
    }

    /// Registers readiness check `name`, failing with `initially` until the service passes it.
    /// Registering a name again returns the same check.
    pub fn check(&self, name: &str, initially: &str) -> Check {
        let mut checks = self.inner.checks.lock().unwrap_or_else(PoisonError::into_inner);
        let state = checks
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(Err(initially.to_string()))))
            .clone();
        Check { state }
    }

    /// From now on, `/readyz` asks this client's etcd for its status.
    pub fn set_etcd(&self, client: &Client) {
        *self.inner.etcd.lock().unwrap_or_else(PoisonError::into_inner) = Some(client.clone());
    }

    /// Wraps main loop `name` so that liveness sees it (see the module docs). A name registered
    /// again (a loop restarted) replaces the earlier one.
    pub fn watch<F: Future>(&self, name: &str, future: F) -> Watched<F> {
        let state = Arc::new(LoopState {
            polling_since: AtomicU64::new(0),
            state: AtomicU8::new(RUNNING),
        });
        self.inner
            .loops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), state.clone());
        Watched {
            future: Box::pin(future),
            state,
            epoch: self.inner.epoch,
        }
    }

    /// `/livez`: every watched loop runs and none is stuck in a poll.
    pub fn live(&self) -> Report {
        self.live_at(self.inner.epoch.elapsed())
    }

    /// Liveness as seen `now` after the epoch.
    fn live_at(&self, now: Duration) -> Report {
        let stopping = self.inner.shutdown.is_cancelled();
        let loops = self.inner.loops.lock().unwrap_or_else(PoisonError::into_inner);
        let mut checks = BTreeMap::new();
        for (name, state) in loops.iter() {
            let since = state.polling_since.load(Ordering::Acquire);
            let busy = (since > 0).then(|| now.saturating_sub(Duration::from_millis(since - 1)));
            let result = match state.state.load(Ordering::Acquire) {
                RETURNED if !stopping => Err("the loop ended before shutdown".to_string()),
                DROPPED if !stopping => Err("the loop panicked or was aborted".to_string()),
                RUNNING => match busy {
                    Some(busy) if busy > STUCK_AFTER => Err(format!(
                        "stuck in one step for {}s (a blocked thread)",
                        busy.as_secs()
                    )),
                    _ => Ok("running".to_string()),
                },
                _ => Ok("stopped for shutdown".to_string()),
            };
            checks.insert(name.clone(), result_line(result));
        }
        Report::new(self.inner.service, checks)
    }

    /// `/readyz`: etcd answers, and every registered check passes.
    pub async fn ready(&self) -> Report {
        let client = self
            .inner
            .etcd
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let etcd = match client {
            None => Err("not connected yet".to_string()),
            Some(client) => probe_etcd(client).await,
        };
        let mut checks = BTreeMap::from([("etcd".to_string(), result_line(etcd))]);
        let registered = self.inner.checks.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, state) in registered.iter() {
            let result = state.lock().unwrap_or_else(PoisonError::into_inner).clone();
            checks.insert(name.clone(), result_line(result));
        }
        Report::new(self.inner.service, checks)
    }
}

fn result_line(result: Result<String, String>) -> CheckResult {
    match result {
        Ok(detail) => CheckResult { ok: true, detail },
        Err(detail) => CheckResult { ok: false, detail },
    }
}

/// Asks etcd for the status of the member the client talks to.
async fn probe_etcd(mut client: Client) -> Result<String, String> {
    match tokio::time::timeout(ETCD_PROBE_TIMEOUT, client.status()).await {
        Err(_) => Err(format!("no answer within {}s", ETCD_PROBE_TIMEOUT.as_secs())),
        Ok(Err(err)) => Err(err.to_string()),
        Ok(Ok(status)) => Ok(format!(
            "revision {}",
            status.header().map_or(0, |h| h.revision())
        )),
    }
}

/// A main loop's future, wrapped by [`Health::watch`].
pub struct Watched<F> {
    future: Pin<Box<F>>,
    state: Arc<LoopState>,
    epoch: Instant,
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let started = u64::try_from(this.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        this.state.polling_since.store(started, Ordering::Release);
        let poll = this.future.as_mut().poll(cx);
        this.state.polling_since.store(0, Ordering::Release);
        if poll.is_ready() {
            this.state.state.store(RETURNED, Ordering::Release);
        }
        poll
    }
}

impl<F> Drop for Watched<F> {
    fn drop(&mut self) {
        // A loop dropped before it returned: its task panicked (the poll never cleared its
        // mark) or was aborted.
        let _ = self
            .state
            .state
            .compare_exchange(RUNNING, DROPPED, Ordering::AcqRel, Ordering::Acquire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_fail_until_passed_and_name_the_reason() {
        let shutdown = CancellationToken::new();
        let health = Health::new("test", &shutdown);
        let session = health.check("session", "starting");
        let report = health.ready().await;
        assert!(!report.ok());
        assert_eq!(
            report.reason.as_deref(),
            Some("etcd: not connected yet; session: starting")
        );
        session.pass("lease 7");
        let again = health.check("session", "ignored");
        assert_eq!(again.get(), Ok("lease 7".to_string()));
        let body = serde_json::to_value(health.ready().await).expect("json");
        assert_eq!(
            body["checks"]["session"],
            serde_json::json!({"ok": true, "detail": "lease 7"})
        );
        assert_eq!(body["status"], "failing");
        assert_eq!(body["service"], "test");
    }

    #[tokio::test]
    async fn a_loop_that_ends_before_shutdown_fails_liveness() {
        let shutdown = CancellationToken::new();
        let health = Health::new("test", &shutdown);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(health.watch("main", async move {
            let _ = rx.await;
        }));
        tokio::task::yield_now().await;
        assert!(health.live().ok(), "{:?}", health.live());
        let _ = tx.send(());
        task.await.expect("joins");
        let report = health.live();
        assert!(!report.ok());
        assert_eq!(
            report.reason.as_deref(),
            Some("main: the loop ended before shutdown")
        );
        shutdown.cancel();
        assert!(health.live().ok());
    }

    #[tokio::test]
    async fn a_panicked_loop_fails_liveness() {
        let shutdown = CancellationToken::new();
        let health = Health::new("test", &shutdown);
        let task = tokio::spawn(health.watch("main", async {
            tokio::task::yield_now().await;
            panic!("boom");
        }));
        assert!(task.await.is_err());
        let report = health.live();
        assert_eq!(
            report.reason.as_deref(),
            Some("main: the loop panicked or was aborted")
        );
    }

    #[test]
    fn a_poll_that_does_not_return_is_stuck() {
        let shutdown = CancellationToken::new();
        let health = Health::new("test", &shutdown);
        let watched = health.watch("main", std::future::pending::<()>());
        // What a poll that began at the epoch and has not returned looks like.
        watched.state.polling_since.store(1, Ordering::Release);
        assert!(health.live_at(STUCK_AFTER).ok(), "not stuck yet");
        let report = health.live_at(STUCK_AFTER + Duration::from_secs(1));
        assert_eq!(
            report.reason.as_deref(),
            Some("main: stuck in one step for 16s (a blocked thread)")
        );
        watched.state.polling_since.store(0, Ordering::Release);
        assert!(health.live_at(STUCK_AFTER * 2).ok(), "parked, not stuck");
    }
}
