//! `GET /api/v1/ws/telemetry`: live telemetry over a WebSocket.
//!
//! Protocol (server → client text frames, all JSON):
//! - `{"type":"hello","revision":R,...}` first: the live feed starts after revision `R`.
//! - `{"type":"telemetry","revision":R,"records":[…]}`: every matching record written at etcd
//!   revision `R`, each in the negotiated schema version. One frame per revision, so a client
//!   that remembers the last `revision` it received can resume with `?since_revision=` and get
//!   every later record once: no gap, no repeat.
//! - `{"type":"error","error":code,"detail":text,"last_revision":R}` just before the server
//!   closes the socket (slow subscriber, compacted history, gap, shutdown). The close frame
//!   carries the code and `last_revision` too.
//!
//! Resuming replays history from etcd with a short-lived watch from `since_revision + 1`
//! until it reaches the live feed, which buffers meanwhile; a revision that was compacted
//! closes the socket with code 4002 (`compacted`): fetch the gap over REST, then reconnect
//! without `since_revision`.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{
        Query, State,
        ws::{
            CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade,
            rejection::WebSocketUpgradeRejection,
        },
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use telemetry_shared::{
    SchemaVersion,
    etcd::current_revision,
    observe::emit,
    watch::{Follow, Update},
};
use tokio::sync::OwnedSemaphorePermit;
use utoipa::IntoParams;

use crate::{
    AppState,
    error::ApiError,
    events::{RecordsSent, UpgradeRefused},
    hub::{Batch, Ended, Event, Filter, Subscription, group},
    negotiate::negotiate,
    query::nonblank,
};

/// Close code: the subscriber could not keep up.
pub const CLOSE_SLOW: u16 = 4001;
/// Close code: `since_revision` is older than etcd's compacted history.
pub const CLOSE_COMPACTED: u16 = 4002;
/// Close code: the gateway's own feed lost history; resume over REST.
pub const CLOSE_GAP: u16 = 4003;
/// Close code: no pong within two ping intervals.
pub const CLOSE_PING_TIMEOUT: u16 = 4004;
/// Close code: the gateway is shutting down (standard "going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Query parameters of the WebSocket endpoint.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsParams {
    /// Only records of this host.
    pub hostname: Option<String>,
    /// Only records of this gpu_id (on any host unless `hostname` is given).
    pub gpu_id: Option<String>,
    /// Only records of this GPU UUID.
    pub uuid: Option<String>,
    /// Only records of this metric.
    pub metric: Option<String>,
    /// Payload schema version: `v1` (default), `v1beta2` or `v1beta1`.
    pub schema: Option<String>,
    /// Resume after this revision (the last `revision` received).
    pub since_revision: Option<String>,
}

/// Upgrades to a WebSocket subscription.
#[utoipa::path(
    get,
    path = "/api/v1/ws/telemetry",
    params(WsParams),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol; see the module docs for frames"),
        (status = 400, description = "Bad parameter or not a WebSocket request", body = crate::error::ErrorBody),
        (status = 406, description = "Unknown schema version", body = crate::error::ErrorBody),
        (status = 503, description = "WS_MAX_CONNECTIONS subscribers are already connected", body = crate::error::ErrorBody),
    ),
    tag = "live"
)]
pub async fn ws_telemetry(
    State(app): State<Arc<AppState>>,
    params: Result<Query<WsParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let version = negotiate(params.schema.as_deref(), accept)?;
    let since = match params.since_revision.as_deref().map(str::trim) {
        None => None,
        Some(text) => match text.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => {
                return Err(ApiError::invalid(
                    "since_revision",
                    format!("{text:?} is not a revision (a whole number ≥ 0)"),
                ));
            }
        },
    };
    if let Some(since) = since {
        // A revision etcd has not reached yet (a typo, or one from another cluster) would make
        // the client wait silently for history that is not this store's: refuse it.
        let current = current_revision(app.store.client()).await?;
        if since > current {
            return Err(ApiError::invalid(
                "since_revision",
                format!(
                    "{since} is ahead of etcd's current revision {current}; pass a revision this gateway sent"
                ),
            ));
        }
    }
    let filter = Filter {
        hostname: nonblank("hostname", params.hostname)?,
        gpu_id: nonblank("gpu_id", params.gpu_id)?,
        uuid: nonblank("uuid", params.uuid)?,
        metric: nonblank("metric", params.metric)?,
    };
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            format!("this endpoint speaks WebSocket only: {}", e.body_text()),
        )
    })?;
    let Ok(permit) = app.ws_slots.clone().try_acquire_owned() else {
        emit(UpgradeRefused {
            limit: app.config.ws_max_connections,
        });
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!(
                "this gateway already serves {} WebSocket subscribers (WS_MAX_CONNECTIONS); retry later or use another gateway",
                app.config.ws_max_connections
            ),
        ));
    };
    Ok(upgrade
        .on_upgrade(move |socket| async move {
            Session {
                app,
                socket,
                filter,
                version,
                _permit: permit,
                last_sent: 0,
                last_pong: Instant::now(),
            }
            .run(since)
            .await
        })
        .into_response())
}

/// Why a session ends, and what the client is told.
struct Close {
    code: u16,
    error: &'static str,
    detail: String,
}

struct Session {
    app: Arc<AppState>,
    socket: WebSocket,
    filter: Filter,
    version: SchemaVersion,
    _permit: OwnedSemaphorePermit,
    /// The last revision fully sent (or the resume point).
    last_sent: i64,
    last_pong: Instant,
}

enum Step {
    Continue,
    Close(Close),
    Gone,
}

impl Session {
    async fn run(mut self, since: Option<i64>) {
        let mut sub = self
            .app
            .hub
            .subscribe(self.filter.clone(), self.app.config.ws_buffer);
        let live_from = sub.start_revision;
        self.last_sent = since.unwrap_or(live_from);
        let hello = serde_json::json!({
            "type": "hello",
            "revision": live_from,
            "since_revision": since,
            "schema_version": self.version.as_str(),
            "filter": self.filter,
        });
        if !self.send_text(hello.to_string()).await {
            return;
        }
        let outcome = match since {
            Some(n) if n < live_from && self.app.store.any_written(n + 1, live_from).await => {
                self.replay(n, live_from, &sub).await
            }
            _ => Step::Continue,
        };
        let outcome = match outcome {
            Step::Continue => self.live(&mut sub).await,
            other => other,
        };
        if let Step::Close(close) = outcome {
            self.close(close).await;
        }
    }

    /// Replays revisions `(since, live_from]` from etcd, then returns to the live feed (which
    /// has been buffering everything after `live_from`).
    async fn replay(&mut self, since: i64, live_from: i64, sub: &Subscription) -> Step {
        let (keys, columns) = self.app.hub.decoder();
        let (keys, columns) = (keys.clone(), columns.clone());
        let mut follow =
            Follow::new(self.app.store.client(), keys.data_prefix(), since + 1).without_deletes();
        let mut ping = self.ping_timer();
        let shutdown = self.app.shutdown.clone();
        loop {
            if sub.is_slow() {
                return self.slow();
            }
            tokio::select! {
                update = follow.next(&shutdown) => match update {
                    None => return self.going_away(),
                    Some(Update::Compacted { compact_revision, .. }) => return Step::Close(Close {
                        code: CLOSE_COMPACTED,
                        error: "compacted",
                        detail: format!(
                            "revision {} is compacted (history starts at {compact_revision}); read the gap over REST, then reconnect without since_revision",
                            since + 1
                        ),
                    }),
                    Some(Update::Changes { changes, through }) => {
                        let events = changes
                            .iter()
                            .take_while(|c| c.mod_revision <= live_from)
                            .filter_map(|c| Event::decode(&keys, &columns, &c.key, &c.value, c.mod_revision))
                            .map(Arc::new)
                            .collect();
                        for batch in group(events) {
                            if let Step::Gone = self.send_batch(&batch).await {
                                return Step::Gone;
                            }
                        }
                        if through >= live_from {
                            self.last_sent = self.last_sent.max(live_from);
                            return Step::Continue;
                        }
                    }
                },
                step = self.socket_step(&mut ping) => {
                    if !matches!(step, Step::Continue) {
                        return step;
                    }
                }
                _ = shutdown.cancelled() => return self.going_away(),
            }
        }
    }

    async fn live(&mut self, sub: &mut Subscription) -> Step {
        let mut ping = self.ping_timer();
        let shutdown = self.app.shutdown.clone();
        loop {
            if sub.is_slow() {
                return self.slow();
            }
            tokio::select! {
                batch = sub.rx.recv() => match batch {
                    Some(batch) => {
                        if let Step::Gone = self.send_batch(&batch).await {
                            return Step::Gone;
                        }
                    }
                    None => return match sub.ended() {
                        Ended::Slow => self.slow(),
                        Ended::Gap { resumed_at } => Step::Close(Close {
                            code: CLOSE_GAP,
                            error: "gap",
                            detail: format!(
                                "the gateway's feed lost history before revision {resumed_at}; read the gap over REST, then reconnect"
                            ),
                        }),
                        Ended::Shutdown => self.going_away(),
                    },
                },
                step = self.socket_step(&mut ping) => {
                    if !matches!(step, Step::Continue) {
                        return step;
                    }
                }
                _ = shutdown.cancelled() => return self.going_away(),
            }
        }
    }

    fn ping_timer(&self) -> tokio::time::Interval {
        let period = self.app.config.ws_ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping
    }

    /// Handles what the client sends, and the keepalive.
    async fn socket_step(&mut self, ping: &mut tokio::time::Interval) -> Step {
        tokio::select! {
            incoming = self.socket.recv() => match incoming {
                Some(Ok(WsMessage::Pong(_))) => {
                    self.last_pong = Instant::now();
                    Step::Continue
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => Step::Gone,
                // Pings are answered by the library; client text is ignored.
                Some(Ok(_)) => Step::Continue,
            },
            _ = ping.tick() => {
                if self.last_pong.elapsed() > self.app.config.ws_ping_interval * 2 {
                    return Step::Close(Close {
                        code: CLOSE_PING_TIMEOUT,
                        error: "ping_timeout",
                        detail: "no pong within two ping intervals".into(),
                    });
                }
                match tokio::time::timeout(
                    self.app.config.ws_send_timeout,
                    self.socket.send(WsMessage::Ping(Vec::new().into())),
                )
                .await
                {
                    Ok(Ok(())) => Step::Continue,
                    _ => Step::Gone,
                }
            }
        }
    }

    async fn send_batch(&mut self, batch: &Batch) -> Step {
        if batch.revision <= self.last_sent {
            return Step::Continue;
        }
        let records: Vec<&str> = batch
            .events
            .iter()
            .filter(|e| self.filter.matches(e))
            .map(|e| e.payload(self.version))
            .collect();
        if !records.is_empty() {
            let frame = format!(
                "{{\"type\":\"telemetry\",\"revision\":{},\"records\":[{}]}}",
                batch.revision,
                records.join(",")
            );
            if !self.send_text(frame).await {
                return Step::Gone;
            }
            emit(RecordsSent {
                records: records.len(),
            });
        }
        self.last_sent = batch.revision;
        Step::Continue
    }

    async fn send_text(&mut self, text: String) -> bool {
        matches!(
            tokio::time::timeout(
                self.app.config.ws_send_timeout,
                self.socket.send(WsMessage::Text(text.into()))
            )
            .await,
            Ok(Ok(()))
        )
    }

    fn slow(&self) -> Step {
        Step::Close(Close {
            code: CLOSE_SLOW,
            error: "slow_subscriber",
            detail: format!(
                "more than {} revisions were waiting for this socket; reconnect with since_revision={} to resume",
                self.app.config.ws_buffer, self.last_sent
            ),
        })
    }

    fn going_away(&self) -> Step {
        Step::Close(Close {
            code: CLOSE_GOING_AWAY,
            error: "shutting_down",
            detail: format!(
                "the gateway is shutting down; reconnect with since_revision={} to resume",
                self.last_sent
            ),
        })
    }

    async fn close(mut self, close: Close) {
        let notice = serde_json::json!({
            "type": "error",
            "error": close.error,
            "detail": close.detail,
            "last_revision": self.last_sent,
        });
        let _ = self.send_text(notice.to_string()).await;
        // A close reason is at most 123 bytes.
        let reason = format!("{} last_revision={}", close.error, self.last_sent);
        let frame = CloseFrame {
            code: close.code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(
            self.app.config.ws_send_timeout,
            self.socket.send(WsMessage::Close(Some(frame))),
        )
        .await;
    }
}
