//! The WebSocket feed: every live record once, filters and schema versions, resume with
//! `since_revision` (no gap, no repeat), compacted history, the connection limit, shutdown.

use std::{collections::BTreeMap, time::Duration};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio_tungstenite::{connect_async, tungstenite::Message};

use crate::helpers::*;

/// Records received on one connection: id → revision, asserting no id twice and revisions
/// increasing.
#[derive(Default)]
struct Received {
    ids: BTreeMap<String, i64>,
    last_revision: i64,
    records: Vec<Value>,
}

impl Received {
    fn take(&mut self, frame: &Value) {
        assert_eq!(frame["type"], "telemetry", "{frame}");
        let revision = frame["revision"].as_i64().expect("revision");
        assert!(revision > self.last_revision, "revisions go up");
        self.last_revision = revision;
        for record in frame["records"].as_array().expect("records") {
            let id = record["id"]
                .as_str()
                .or_else(|| record["message_id"].as_str())
                .expect("id")
                .to_string();
            assert!(
                self.ids.insert(id.clone(), revision).is_none(),
                "{id} delivered twice"
            );
            self.records.push(record.clone());
        }
    }

    /// Reads telemetry frames until `n` records in total have arrived.
    async fn until(&mut self, socket: &mut Socket, n: usize) {
        while self.ids.len() < n {
            match next(socket).await {
                Frame::Json(frame) => self.take(&frame),
                Frame::Closed(close) => panic!("closed after {} records: {close:?}", self.ids.len()),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_records_arrive_once_and_a_resume_loses_and_repeats_nothing() {
    let (server, client) = etcd().await;
    let gw = spawn_gateway(&server, &client, &[]).await;
    let host = "mtv5-dgx1-hgpu-031";
    let url = format!("{}/api/v1/ws/telemetry", gw.ws);
    let (mut all, hello) = connect(&url).await;
    assert_eq!(hello["schema_version"], "v1");
    let (mut interrupted, _) = connect(&url).await;
    let (mut filtered, _) = connect(&format!("{url}?hostname={host}&schema=v1beta1")).await;
    let (mut metric, _) = connect(&format!("{url}?metric=DCGM_FI_DEV_POWER_USAGE&schema=v1beta2")).await;

    let stop = spawn_collector(&server, &client);
    let stream = tokio::spawn({
        let client = client.clone();
        async move {
            stream_sample(&server, &client, "dcgm").await;
            server
        }
    });

    // One subscriber leaves part-way and comes back with the last revision it saw.
    let mut first = Received::default();
    first.until(&mut interrupted, 500).await;
    let resume_at = first.last_revision;
    drop(interrupted);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut resumed, hello) = connect(&format!("{url}?since_revision={resume_at}")).await;
    assert_eq!(hello["since_revision"], resume_at);
    let mut second = Received::default();
    second.until(&mut resumed, 2470 - first.ids.len()).await;
    for id in second.ids.keys() {
        assert!(!first.ids.contains_key(id), "{id} repeated after the resume");
    }
    assert!(second.ids.values().all(|rev| *rev > resume_at));

    let mut everything = Received::default();
    everything.until(&mut all, 2470).await;
    let mut union: Vec<&String> = first.ids.keys().chain(second.ids.keys()).collect();
    union.sort();
    let all_ids: Vec<&String> = everything.ids.keys().collect();
    assert_eq!(
        union, all_ids,
        "the interrupted subscriber saw exactly what the others saw"
    );

    let server = stream.await.expect("streamer task");
    // Filters and versions: the host's records only, as v1beta1, valid against the schema.
    let http = reqwest::Client::new();
    let (_, gpus) = get(&http, &format!("{}/api/v1/gpus?hostname={host}", gw.base)).await;
    let expected = gpus["count"].as_u64().expect("count") as usize * 10;
    let mut host_records = Received::default();
    host_records.until(&mut filtered, expected).await;
    let v1beta1 = validator(&http, &gw.base, "v1beta1").await;
    for record in &host_records.records {
        assert_eq!(record["payload"]["Hostname"], host);
        assert_valid(&v1beta1, record);
    }
    let mut power = Received::default();
    power.until(&mut metric, 247).await;
    let v1beta2 = validator(&http, &gw.base, "v1beta2").await;
    for record in &power.records {
        assert_eq!(record["fields"]["metric_name"], "DCGM_FI_DEV_POWER_USAGE");
        assert_valid(&v1beta2, record);
    }
    // Nothing more arrives for the filtered subscriber (its count was exact).
    let extra = tokio::time::timeout(Duration::from_millis(500), filtered.next()).await;
    assert!(
        !matches!(extra, Ok(Some(Ok(Message::Text(_))))),
        "unexpected extra frame"
    );

    // Shutdown closes subscribers with "going away" and where to resume.
    stop.cancel();
    gw.stop.cancel();
    match next(&mut all).await {
        Frame::Json(notice) => {
            assert_eq!(notice["error"], "shutting_down");
            assert_eq!(notice["last_revision"], everything.last_revision);
        }
        Frame::Closed(close) => panic!("no notice before close: {close:?}"),
    }
    match next(&mut all).await {
        Frame::Closed(Some(close)) => assert_eq!(u16::from(close.code), 1001),
        Frame::Closed(None) => panic!("closed without a close frame"),
        Frame::Json(frame) => panic!("unexpected {frame}"),
    }
    drop((server, client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_history_and_compacted_revisions() {
    let (server, client) = etcd().await;
    load_sample(&server, &client).await;
    let gw = spawn_gateway(&server, &client, &[]).await;
    let url = format!("{}/api/v1/ws/telemetry", gw.ws);

    // Everything, replayed from etcd's history, then live.
    let (mut socket, hello) = connect(&format!("{url}?since_revision=0")).await;
    let live_from = hello["revision"].as_i64().expect("revision");
    let mut replayed = Received::default();
    replayed.until(&mut socket, 2470).await;
    assert!(replayed.last_revision <= live_from);

    // A record written now arrives after the replay, once.
    let stop = spawn_collector(&server, &client);
    stream_sample(&server, &client, "again").await;
    replayed.until(&mut socket, 4940).await;
    stop.cancel();

    // History before the compaction point cannot be replayed: a clear close.
    let mut kv = client.clone();
    let revision = kv
        .get("x", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    kv.compact(revision, None).await.expect("compact");
    let (mut socket, _) = connect(&format!("{url}?since_revision=1")).await;
    match next(&mut socket).await {
        Frame::Json(notice) => {
            assert_eq!(notice["type"], "error");
            assert_eq!(notice["error"], "compacted", "{notice}");
            assert!(notice["detail"].as_str().expect("detail").contains("REST"));
        }
        Frame::Closed(close) => panic!("closed without a notice: {close:?}"),
    }
    match next(&mut socket).await {
        Frame::Closed(Some(close)) => {
            assert_eq!(u16::from(close.code), 4002);
            assert!(close.reason.contains("compacted"));
        }
        _ => panic!("expected a close frame"),
    }
    // Bad parameters are refused before the upgrade.
    for (query, status) in [
        ("since_revision=-1", 400),
        ("since_revision=abc", 400),
        ("schema=v3", 406),
        ("hostname=", 400),
    ] {
        let err = connect_async(format!("{url}?{query}")).await.expect_err(query);
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                assert_eq!(resp.status().as_u16(), status, "{query}");
                let body: Value =
                    serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).expect("JSON refusal");
                assert!(body["error"].is_string());
            }
            other => panic!("{query}: {other}"),
        }
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_clearly_and_frees_slots() {
    let (server, client) = etcd().await;
    let gw = spawn_gateway(
        &server,
        &client,
        &[("WS_MAX_CONNECTIONS", "2"), ("WS_PING_INTERVAL", "200ms")],
    )
    .await;
    let url = format!("{}/api/v1/ws/telemetry", gw.ws);
    let (mut a, _) = connect(&url).await;
    let (b, _) = connect(&url).await;
    match connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503);
            let body: Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).expect("JSON refusal");
            assert_eq!(body["error"], "too_many_connections");
            assert!(
                body["detail"]
                    .as_str()
                    .expect("detail")
                    .contains("WS_MAX_CONNECTIONS")
            );
        }
        other => panic!("third connection was not refused: {:?}", other.map(|_| ())),
    }
    drop(b);
    let ok = telemetry_harness::eventually(Duration::from_secs(5), || async {
        connect_async(&url).await.is_ok()
    })
    .await;
    assert!(ok, "a freed slot is reusable");
    // Keepalive: the server pings; an answering client stays connected past several intervals.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    a.send(Message::Text("hello?".into())).await.expect("still open");
    gw.shutdown().await;
}
