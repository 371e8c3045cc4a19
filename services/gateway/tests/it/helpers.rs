//! Helpers: a real etcd per test, the sample streamed and collected into it, and the gateway
//! served in process on a free port.

use std::{path::PathBuf, time::Duration};

use etcd_client::Client;
use futures::StreamExt as _;
use serde_json::Value;
use telemetry_collector::CollectorConfig;
use telemetry_gateway::GatewayConfig;
use telemetry_harness::{EtcdServer, count};
use telemetry_shared::Keyspace;
use telemetry_streamer::{Flags, StreamerConfig};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{Message, protocol::CloseFrame},
};
use tokio_util::sync::CancellationToken;

pub const NS: &str = "/g";

pub fn keys() -> Keyspace {
    Keyspace::new(NS)
}

pub fn sample_csv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/dcgm_sample.csv")
}

pub async fn etcd() -> (EtcdServer, Client) {
    telemetry_harness::strict_etcd().await.expect("etcd starts")
}

fn vars(server: &EtcdServer, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    telemetry_harness::service_env(server, NS, extra)
}

/// The streamer, one-shot over the sample as fast as it can.
pub async fn stream_sample(server: &EtcdServer, client: &Client, stream_id: &str) {
    assert_eq!(stream_csv(server, client, &sample_csv(), stream_id).await, 2470);
}

/// A one-shot streamer config over `csv` as `stream_id`, with `extra` variables.
pub fn streamer_config(
    server: &EtcdServer,
    csv: &std::path::Path,
    stream_id: &str,
    extra: &[(&str, &str)],
) -> StreamerConfig {
    let csv = csv.display().to_string();
    let mut pairs = vec![
        ("CSV_PATH", csv.as_str()),
        ("RATE", "0"),
        ("LOOP", "false"),
        ("STREAM_ID", stream_id),
        ("MAX_QUEUE_DEPTH", "0"),
    ];
    for (k, v) in extra {
        pairs.retain(|(key, _)| key != k);
        pairs.push((k, v));
    }
    StreamerConfig::from_vars(vars(server, &pairs), &Flags::default()).expect("streamer config")
}

/// The streamer, one-shot over `csv`; returns how many messages it enqueued.
pub async fn stream_csv(server: &EtcdServer, client: &Client, csv: &std::path::Path, stream_id: &str) -> u64 {
    let csv = csv.display().to_string();
    let pairs = [
        ("CSV_PATH", csv.as_str()),
        ("RATE", "0"),
        ("LOOP", "false"),
        ("STREAM_ID", stream_id),
        ("MAX_QUEUE_DEPTH", "0"),
    ];
    let config = StreamerConfig::from_vars(vars(server, &pairs), &Flags::default()).expect("streamer config");
    let totals = telemetry_streamer::run(config, client.clone(), CancellationToken::new())
        .await
        .expect("streamer runs");
    totals.enqueued
}

/// A collector running in process until the token is cancelled.
pub fn spawn_collector(server: &EtcdServer, client: &Client) -> CancellationToken {
    spawn_collector_task(server, client).0
}

/// A collector running in process until the token is cancelled, and its task.
fn spawn_collector_task(
    server: &EtcdServer,
    client: &Client,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let config = CollectorConfig::from_vars(vars(server, &[("COLLECTOR_ID", "c1"), ("LEASE_TTL", "3s")]))
        .expect("collector config");
    let task = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            let _ = telemetry_collector::run(config, client, stop).await;
        }
    });
    (stop, task)
}

/// Waits until `n` records are stored and the queue is empty.
pub async fn wait_stored(client: &Client, n: i64) {
    let ok = telemetry_harness::eventually(Duration::from_secs(60), || async {
        count(client, &keys().data_prefix()).await.unwrap_or(0) >= n
            && count(client, &keys().queue_prefix()).await.unwrap_or(1) == 0
    })
    .await;
    assert!(ok, "the sample was not collected in time");
}

/// Streams and collects the whole sample, then stops the collector (and waits for it, so
/// nothing of the pipeline runs in the process any more).
pub async fn load_sample(server: &EtcdServer, client: &Client) {
    let (stop, task) = spawn_collector_task(server, client);
    stream_sample(server, client, "dcgm").await;
    wait_stored(client, 2470).await;
    stop.cancel();
    task.await.expect("collector stops");
}

/// A gateway served in process.
pub struct Gateway {
    /// `http://127.0.0.1:{port}`.
    pub base: String,
    /// `ws://127.0.0.1:{port}`.
    pub ws: String,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), telemetry_gateway::GatewayError>>,
}

pub async fn spawn_gateway(server: &EtcdServer, client: &Client, extra: &[(&str, &str)]) -> Gateway {
    let config = GatewayConfig::from_vars(vars(server, extra)).expect("gateway config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let stop = CancellationToken::new();
    let task = tokio::spawn(telemetry_gateway::run(
        config,
        listener,
        client.clone(),
        stop.clone(),
    ));
    Gateway {
        base: format!("http://127.0.0.1:{port}"),
        ws: format!("ws://127.0.0.1:{port}"),
        stop,
        task,
    }
}

impl Gateway {
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("gateway stops within 10 s")
            .expect("joins")
            .expect("gateway ran cleanly");
    }
}

/// GET → (status, JSON body).
pub async fn get(http: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    get_with(http, url, None).await
}

pub async fn get_with(http: &reqwest::Client, url: &str, accept: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = http.get(url);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let body =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: body is not JSON ({e}): {text}"));
    (status, body)
}

/// Compiles the JSON Schema the gateway serves for `version`.
pub async fn validator(http: &reqwest::Client, base: &str, version: &str) -> jsonschema::Validator {
    let (status, schema) = get(http, &format!("{base}/schemas/{version}.json")).await;
    assert_eq!(status, 200);
    jsonschema::validator_for(&schema).expect("schema compiles")
}

pub fn assert_valid(validator: &jsonschema::Validator, item: &serde_json::Value) {
    let errors: Vec<String> = validator.iter_errors(item).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{item} does not validate: {errors:?}");
}

/// A WebSocket client connection.
pub type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

pub enum Frame {
    Json(Value),
    Closed(Option<CloseFrame>),
}

pub async fn connect(url: &str) -> (Socket, Value) {
    let (mut socket, _) = connect_async(url).await.expect("websocket connects");
    match next(&mut socket).await {
        Frame::Json(hello) => {
            assert_eq!(hello["type"], "hello", "{hello}");
            (socket, hello)
        }
        Frame::Closed(close) => panic!("closed before hello: {close:?}"),
    }
}

pub async fn next(socket: &mut Socket) -> Frame {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("a frame within 30 s");
        match msg {
            Some(Ok(Message::Text(text))) => {
                return Frame::Json(serde_json::from_str(&text).expect("frames are JSON"));
            }
            Some(Ok(Message::Close(close))) => return Frame::Closed(close),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Frame::Closed(None),
        }
    }
}

/// The sample's header: `metric_name`, `gpu_id`, `uuid` and `Hostname` are the columns the
/// pipeline keys and filters by.
pub const CSV_HEADER: &str =
    "timestamp,metric_name,gpu_id,device,uuid,modelName,Hostname,container,pod,namespace,value,labels_raw";

/// A CSV file with the sample's header and one row per `(metric, gpu_id, uuid, host, labels)`.
pub fn csv_file(rows: &[(&str, &str, &str, &str, &str)]) -> tempfile::NamedTempFile {
    use std::io::Write as _;
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    writeln!(file, "{CSV_HEADER}").expect("write");
    for (i, (metric, gpu_id, uuid, host, labels)) in rows.iter().enumerate() {
        writeln!(
            file,
            "\"2025-07-18T20:42:34Z\",\"{metric}\",\"{gpu_id}\",\"nvidia{gpu_id}\",\"{uuid}\",\"NVIDIA H100 80GB HBM3\",\"{host}\",\"\",\"\",\"\",\"{i}\",\"{labels}\""
        )
        .expect("write");
    }
    file.flush().expect("flush");
    file
}

/// Streams `csv` through the real streamer and collector and waits until its rows are stored.
pub async fn load_csv(server: &EtcdServer, client: &Client, csv: &std::path::Path, rows: i64) {
    let (stop, task) = spawn_collector_task(server, client);
    assert_eq!(stream_csv(server, client, csv, "csv").await, rows as u64);
    wait_stored(client, rows).await;
    stop.cancel();
    task.await.expect("collector stops");
}
