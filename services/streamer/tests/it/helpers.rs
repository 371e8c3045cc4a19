//! Helpers: a real etcd per test, streamer configurations pointing at it, and the real binary.
//! Everything general (etcd, the sample, environments, processes, reading the queue) is in
//! `telemetry-harness`; this file only binds it to the streamer.

use std::path::Path;

use etcd_client::Client;
use telemetry_harness::{Env, EtcdServer, ProcessSpec, ServiceProcess};
pub use telemetry_harness::{
    Probe, assert_rows_exactly_once,
    sample::{self, temp_csv},
};
use telemetry_streamer::{Flags, StreamerConfig};

pub const NS: &str = "/t";
/// The `STREAM_ID` of every streamer here; its first worker streams as `test-w0`.
pub const STREAM: &str = "test";

/// A strict etcd (`--max-txn-ops 128`), a client, and a probe of the test namespace.
pub async fn etcd() -> (EtcdServer, Client, Probe) {
    let (server, client) = telemetry_harness::strict_etcd().await.expect("etcd starts");
    let probe = Probe::new(&client, NS);
    (server, client, probe)
}

/// A one-shot streamer over `csv` as fast as it can, then `extra`.
pub fn env(server: &EtcdServer, csv: &Path, extra: &[(&str, &str)]) -> Env {
    server.env(NS).streamer(csv, STREAM).with(extra)
}

pub fn config(server: &EtcdServer, csv: &Path, extra: &[(&str, &str)]) -> StreamerConfig {
    StreamerConfig::from_vars(env(server, csv, extra), &Flags::default()).expect("valid config")
}

/// The real binary with [`env`]; its log (standard error) is in [`ServiceProcess::log`].
pub fn spawn_binary(server: &EtcdServer, csv: &Path, extra: &[(&str, &str)]) -> ServiceProcess {
    binary()
        .env(env(server, csv, extra))
        .start()
        .expect("binary starts")
}

/// The real binary, with nothing set.
pub fn binary() -> ProcessSpec {
    ProcessSpec::new(env!("CARGO_BIN_EXE_telemetry-streamer")).rust_log("warn")
}
