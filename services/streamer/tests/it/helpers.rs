//! Test helpers: a real etcd per test, configs pointing at it, queue inspection.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use etcd_client::Client;
use telemetry_harness::EtcdServer;
use telemetry_shared::{Checkpoint, Keyspace, Message};
use telemetry_streamer::{Flags, StreamerConfig};

pub const NS: &str = "/t";

pub fn sample_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/dcgm_sample.csv")
}

pub async fn etcd() -> (EtcdServer, Client) {
    telemetry_harness::strict_etcd().await.expect("etcd starts")
}

pub fn config(server: &EtcdServer, csv: &Path, extra: &[(&str, &str)]) -> StreamerConfig {
    let csv = csv.display().to_string();
    let mut all: Vec<(&str, &str)> = vec![
        ("CSV_PATH", csv.as_str()),
        ("RATE", "0"),
        ("LOOP", "false"),
        ("STREAM_ID", "test"),
    ];
    all.extend_from_slice(extra);
    let vars = telemetry_harness::service_env(server, NS, &all);
    StreamerConfig::from_vars(vars, &Flags::default()).expect("valid config")
}

/// Every queued message, by key.
pub async fn queue(client: &Client) -> BTreeMap<String, Message> {
    telemetry_harness::queued_messages(client, &Keyspace::new(NS))
        .await
        .expect("queue entries decode")
}

pub async fn queue_depth(client: &Client) -> i64 {
    telemetry_harness::count(client, &Keyspace::new(NS).queue_prefix())
        .await
        .expect("count")
}

pub async fn checkpoint(client: &Client, stream: &str) -> Option<Checkpoint> {
    let keys = Keyspace::new(NS);
    let resp = client
        .clone()
        .get(keys.stream_checkpoint(stream), None)
        .await
        .expect("get");
    resp.kvs()
        .first()
        .map(|kv| serde_json::from_slice(kv.value()).expect("checkpoint JSON"))
}

/// Asserts the queue holds rows 1..=n of (stream, pass) exactly once each.
pub fn assert_rows_exactly_once(queue: &BTreeMap<String, Message>, stream: &str, pass: u64, n: u64) {
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for msg in queue.values() {
        let src = msg.source.as_ref().expect("source position");
        if src.stream_id == stream && src.pass == pass {
            *seen.entry(src.row).or_default() += 1;
        }
    }
    let dups: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dups.is_empty(), "rows enqueued more than once: {dups:?}");
    let missing: Vec<u64> = (1..=n).filter(|r| !seen.contains_key(r)).collect();
    assert!(
        missing.is_empty(),
        "rows missing: {} (first {:?})",
        missing.len(),
        missing.first()
    );
    assert_eq!(seen.len() as u64, n);
}

/// Spawns the real binary with the given environment.
pub fn spawn_binary(server: &EtcdServer, csv: &Path, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_telemetry-streamer"));
    cmd.env_clear()
        .env("ETCD_ENDPOINTS", server.endpoint())
        .env("ETCD_NAMESPACE", NS)
        .env("CSV_PATH", csv)
        .env("RATE", "0")
        .env("LOOP", "false")
        .env("STREAM_ID", "test")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("binary starts")
}

/// Waits until the queue holds at least `n` entries (panics after 30 s).
pub async fn wait_for_depth(client: &Client, n: i64) -> i64 {
    for _ in 0..600 {
        let depth = queue_depth(client).await;
        if depth >= n {
            return depth;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("queue never reached {n} entries");
}

/// Writes a temporary CSV file with the given bytes.
pub fn temp_csv(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".csv")
        .tempfile()
        .expect("temp file");
    std::io::Write::write_all(&mut file, bytes).expect("write");
    file
}
