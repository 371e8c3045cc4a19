//! The real binary's `/metrics`, scraped while it streams: what `promtool check metrics` says,
//! and that every metric it exports is one the streamer's table describes.

use std::{collections::BTreeSet, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use telemetry_shared::observe::SHARED_METRICS;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::*;

#[tokio::test]
async fn the_metrics_endpoint_passes_promtool_and_matches_the_table() {
    let (server, client) = etcd().await;
    let port = telemetry_harness::free_port().expect("a free port").to_string();
    // A malformed row (row 2) so that the skip counter moves too.
    let csv = temp_csv(b"a,b\n1,x\n2\n3,z\n");
    let child = spawn_binary(
        &server,
        csv.path(),
        &[
            ("LOOP", "true"),
            ("METRICS_PORT", port.as_str()),
            ("BATCH_SIZE", "1"),
        ],
    );
    wait_for_depth(&client, 4).await;
    let text = scrape(&port).await;
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let out = child.wait_with_output().expect("waits");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    if let Err(complaints) = telemetry_harness::promtool_check_metrics(&text) {
        panic!("promtool check metrics:\n{complaints}\n{text}");
    }
    let known: BTreeSet<&str> = telemetry_streamer::events::METRICS
        .iter()
        .chain(SHARED_METRICS)
        .map(|m| m.name)
        .chain(["streamer_build_info"])
        .collect();
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let unknown: Vec<&&str> = exported.difference(&known).collect();
    assert!(unknown.is_empty(), "exported but not in the table: {unknown:?}");
    for name in [
        "streamer_build_info",
        "streamer_rows_enqueued_total",
        "streamer_rows_skipped_total",
        "streamer_passes_total",
        "streamer_txn_seconds",
    ] {
        assert!(exported.contains(name), "{name} missing:\n{text}");
    }
    assert!(text.contains("# TYPE streamer_txn_seconds histogram"), "{text}");
}

/// `GET /metrics` on the local `port`, retried until the endpoint answers.
async fn scrape(port: &str) -> String {
    for _ in 0..100 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await {
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .await
                .expect("request");
            let mut response = String::new();
            stream.read_to_string(&mut response).await.expect("response");
            let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
            assert!(
                head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
                "{head}"
            );
            return body.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the metrics endpoint on port {port} never answered");
}
