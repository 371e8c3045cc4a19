//! `GET /api/v1/ws/telemetry`: live telemetry over a WebSocket.
//!
//! Protocol (server to client JSON text frames, see [`crate::frames`]):
//! - a hello frame first: the live feed starts after its `revision`;
//! - a telemetry frame per etcd revision with matching records, each in the negotiated payload
//!   version. A client that remembers the last `revision` it received can resume with
//!   `?since_revision=` and get every later record once: no gap, no repeat;
//! - an error frame just before the server closes the socket (slow subscriber, compacted
//!   history, gap, missing pong, shutdown); the close frame carries its code and
//!   `last_revision` too.
//!
//! Parameters are validated before the upgrade (400, or 406 for the version), so a refusal is
//! an HTTP answer with a JSON body. Resuming replays history from etcd with a short-lived watch
//! from `since_revision + 1` until it reaches the live feed, which buffers meanwhile; a
//! revision that was compacted closes the socket with code 4002 (`compacted`): fetch the gap
//! over REST, then reconnect without `since_revision`.

use std::{sync::Arc, time::Instant};

use axum::{
    Extension,
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
use utoipa::{
    IntoParams,
    openapi::path::{Parameter, ParameterIn},
};

use crate::{
    AppState, Caller, auth,
    error::{ApiError, ErrorBody},
    events::{RecordsSent, UpgradeRefused},
    frames::{CloseReason, ErrorFrame, ErrorType, HelloFrame, HelloType, telemetry_frame},
    hub::{Batch, Ended, Filter, Subscription, group},
    negotiate::{negotiate, version_schema},
    params,
};

/// Query parameters of the WebSocket endpoint; their parameters in the document (see the
/// `IntoParams` implementation) declare the rules [`Subscribe::parse`] applies.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct WsParams {
    /// Only records of this host.
    pub hostname: Option<String>,
    /// Only records of this gpu_id.
    pub gpu_id: Option<String>,
    /// Only records of this GPU UUID.
    pub uuid: Option<String>,
    /// Only records of this metric.
    pub metric: Option<String>,
    /// Payload schema version.
    pub schema: Option<String>,
    /// Resume after this revision.
    pub since_revision: Option<String>,
}

impl IntoParams for WsParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        use params::{query, text_schema};
        vec![
            query(
                "hostname",
                "Only records of this host. Must not be blank.",
                text_schema("mtv5-dgx1-hgpu-031"),
            ),
            query(
                "gpu_id",
                "Only records of this gpu_id (on any host unless `hostname` is given). Must not \
                 be blank.",
                text_schema("0"),
            ),
            query(
                "uuid",
                "Only records of this GPU UUID. Must not be blank.",
                text_schema("GPU-5fd4f087-86f3-7a43-b711-4771313afc50"),
            ),
            query(
                "metric",
                "Only records of this metric; numbers and booleans compare as text. Must not be \
                 blank.",
                text_schema("DCGM_FI_DEV_GPU_UTIL"),
            ),
            query(
                "schema",
                "Payload schema version; wins over `Accept`. An unknown version is a 406.",
                version_schema(),
            ),
            query(
                "since_revision",
                "Resume after this revision: the last `revision` received (a `telemetry` \
                 frame's, or the `last_revision` of an `error` frame). A revision etcd has not \
                 reached yet is refused with 400; one older than etcd's compacted history \
                 closes the socket with 4002.",
                params::whole_schema(0, None, None, 1),
            ),
        ]
    }
}

/// What a valid request subscribes to.
struct Subscribe {
    filter: Filter,
    version: SchemaVersion,
    since: Option<i64>,
}

impl Subscribe {
    /// Validates the parameters (400, or 406 for the version) before any upgrade.
    async fn parse(app: &AppState, params: WsParams, headers: &HeaderMap) -> Result<Self, ApiError> {
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
        let version = negotiate(params.schema.as_deref(), accept)?;
        let since = params::whole(
            "since_revision",
            params.since_revision.as_deref(),
            0..=i64::MAX as u64,
            None,
        )?
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        if let Some(since) = since {
            // A revision etcd has not reached yet (a typo, or one from another cluster) would
            // make the client wait silently for history that is not this store's: refuse it.
            let current = current_revision(app.store.client(), &app.store.keys().data_prefix()).await?;
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
            hostname: params::text("hostname", params.hostname)?,
            gpu_id: params::text("gpu_id", params.gpu_id)?,
            uuid: params::text("uuid", params.uuid)?,
            metric: params::text("metric", params.metric)?,
        };
        Ok(Subscribe {
            filter,
            version,
            since,
        })
    }
}

/// Upgrades to a WebSocket subscription to live telemetry.
///
/// Frames (server to client, JSON text): `HelloFrame` first; then a `TelemetryFrame` per etcd
/// revision with matching records (with `since_revision`, history is replayed first, then the
/// live feed, with no gap and no repeat); an `ErrorFrame` just before the server closes the
/// socket. Close codes: 4001 slow subscriber, 4002 `since_revision` compacted, 4003 the
/// gateway's feed lost history, 4004 no pong within two ping intervals, 1001 shutdown. The
/// server pings every `WS_PING_INTERVAL`; text the client sends is ignored.
#[utoipa::path(
    get,
    path = "/api/v1/ws/telemetry",
    operation_id = "ws_telemetry",
    params(
        WsParams,
        ("Connection" = String, Header, description = "Must contain the token `upgrade`.",
            pattern = "[Uu][Pp][Gg][Rr][Aa][Dd][Ee]", example = "Upgrade"),
        ("Upgrade" = String, Header, description = "`websocket` (any case).",
            pattern = "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$", example = "websocket"),
        ("Sec-WebSocket-Version" = String, Header, description = "`13`.",
            pattern = "^13$", example = "13"),
        ("Sec-WebSocket-Key" = String, Header, description = "The client's handshake nonce (RFC 6455).",
            example = "dGhlIHNhbXBsZSBub25jZQ=="),
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol: frames as described above"),
        (status = 400, description = "Bad parameter, `since_revision` ahead of etcd, or not a WebSocket handshake", body = ErrorBody),
        (status = 406, description = "Unknown schema version", body = ErrorBody),
        (status = 503, description = "WS_MAX_CONNECTIONS subscribers are already connected, or etcd does not answer", body = ErrorBody),
    ),
    tag = "live"
)]
pub async fn ws_telemetry(
    State(app): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    params: Result<Query<WsParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // The token's subscription limit first: a refusal costs no etcd request.
    let token_permit = match (&app.auth, caller) {
        (Some(auth), Some(Extension(Caller(id)))) => auth.subscribe(id)?,
        _ => None,
    };
    let Query(params) = params.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let Subscribe {
        filter,
        version,
        since,
    } = Subscribe::parse(&app, params, &headers).await?;
    let upgrade = upgrade
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "websocket_required",
                format!("this endpoint speaks WebSocket only: {}", e.body_text()),
            )
        })?
        // A browser that sent its token as a subprotocol also offers this one, and must get
        // one of its offers back.
        .protocols([auth::WS_PROTOCOL]);
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
                _token_permit: token_permit,
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
    reason: CloseReason,
    detail: String,
}

struct Session {
    app: Arc<AppState>,
    socket: WebSocket,
    filter: Filter,
    version: SchemaVersion,
    _permit: OwnedSemaphorePermit,
    /// The token's subscription slot, if its subscriptions are limited.
    _token_permit: Option<OwnedSemaphorePermit>,
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
        let hello = HelloFrame {
            r#type: HelloType::Hello,
            revision: live_from,
            since_revision: since,
            schema_version: self.version.as_str(),
            filter: self.filter.clone(),
        };
        if !self.send_json(&hello).await {
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
        let decoder = self.app.hub.decoder().clone();
        let mut follow =
            Follow::new(self.app.store.client(), decoder.keys.data_prefix(), since + 1).without_deletes();
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
                        reason: CloseReason::Compacted,
                        detail: format!(
                            "revision {} is compacted (history starts at {compact_revision}); read the gap over REST, then reconnect without since_revision",
                            since + 1
                        ),
                    }),
                                        Some(Update::Changes { changes, through }) => {
                        if decoder.prepare(self.app.store.client(), &changes, &shutdown).await.is_err() {
                            return self.going_away();
                        }
                        let events = changes
                            .iter()
                            .take_while(|c| c.mod_revision <= live_from)
                            .filter_map(|c| decoder.decode(&c.key, &c.value, c.mod_revision))
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
                            reason: CloseReason::Gap,
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
                        reason: CloseReason::PingTimeout,
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
            if !self.send_text(telemetry_frame(batch.revision, &records)).await {
                return Step::Gone;
            }
            emit(RecordsSent {
                records: records.len(),
            });
        }
        self.last_sent = batch.revision;
        Step::Continue
    }

    async fn send_json(&mut self, frame: &impl serde::Serialize) -> bool {
        match serde_json::to_string(frame) {
            Ok(text) => self.send_text(text).await,
            Err(_) => false,
        }
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
            reason: CloseReason::SlowSubscriber,
            detail: format!(
                "more than {} revisions were waiting for this socket; reconnect with since_revision={} to resume",
                self.app.config.ws_buffer, self.last_sent
            ),
        })
    }

    fn going_away(&self) -> Step {
        Step::Close(Close {
            reason: CloseReason::ShuttingDown,
            detail: format!(
                "the gateway is shutting down; reconnect with since_revision={} to resume",
                self.last_sent
            ),
        })
    }

    async fn close(mut self, close: Close) {
        let notice = ErrorFrame {
            r#type: ErrorType::Error,
            error: close.reason,
            detail: close.detail,
            last_revision: self.last_sent,
        };
        let _ = self.send_json(&notice).await;
        // A close reason is at most 123 bytes.
        let reason = format!("{} last_revision={}", close.reason.as_str(), self.last_sent);
        let frame = CloseFrame {
            code: close.reason.code(),
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(
            self.app.config.ws_send_timeout,
            self.socket.send(WsMessage::Close(Some(frame))),
        )
        .await;
    }
}
