//! Faults: a collector killed, a collector whose lease is taken away while it still works, and
//! a collector paused past its lease TTL. In each case every row lands exactly once.

use std::time::{Duration, Instant};

use nix::{sys::signal::Signal, unistd::Pid};
use telemetry_harness::range_all;
use telemetry_shared::model::Member;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

fn signal(child: &std::process::Child, sig: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    nix::sys::signal::kill(pid, sig).expect("signal delivered");
}

async fn owners_held_by(client: &etcd_client::Client, id: &str) -> usize {
    range_all(client, &keys().owners_prefix())
        .await
        .expect("range")
        .iter()
        .filter(|(_, v)| v.as_slice() == id.as_bytes())
        .count()
}

#[tokio::test]
async fn sigkilled_collector_is_taken_over_within_about_one_ttl_and_nothing_doubles() {
    let (server, client) = etcd().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = spawn_collector_process(&server, "a", &dir.path().join("a.log"), &[]);
    assert!(
        telemetry_harness::eventually(Duration::from_secs(20), || async {
            owners_held_by(&client, "a").await == 32
        })
        .await
    );
    // Stream at a bounded rate so the kill lands mid-stream.
    let streamer = tokio::spawn(telemetry_streamer::run(
        streamer_config(&server, &[("RATE", "600")]),
        client.clone(),
        CancellationToken::new(),
    ));
    assert!(
        telemetry_harness::eventually(Duration::from_secs(30), || async {
            data_count(&client).await >= 400
        })
        .await
    );
    a.kill().expect("SIGKILL");
    let _ = a.wait();
    let killed_at = Instant::now();
    let at_kill = data_count(&client).await;
    let b = spawn_collector(&server, &client, "b", &[]);
    assert!(
        telemetry_harness::eventually(Duration::from_secs(30), || async {
            data_count(&client).await > at_kill
        })
        .await,
        "b took over"
    );
    let takeover = killed_at.elapsed();
    streamer.await.expect("joins").expect("streamer ran");
    wait_drained(&client, 2470, Duration::from_secs(60)).await;
    b.shutdown().await;
    assert_sample_exactly_once(&client).await;
    assert_eq!(stats(&client).await.records, 2470);
    // LEASE_TTL is 3 s: the partitions move when a's lease expires, about one TTL after the kill.
    assert!(takeover < Duration::from_secs(10), "takeover took {takeover:?}");
    eprintln!("takeover after SIGKILL: {takeover:?} (LEASE_TTL 3s)");
}

#[tokio::test]
async fn a_collector_whose_lease_is_revoked_while_working_doubles_nothing() {
    let (server, client) = etcd().await;
    // a's own timer would notice a lost lease only after 10 s: until then only the fence stops it.
    let a = spawn_collector(&server, &client, "a", &[("LEASE_TTL", "30s")]);
    assert!(
        telemetry_harness::eventually(Duration::from_secs(20), || async {
            owners_held_by(&client, "a").await == 32
        })
        .await
    );
    let streamer = tokio::spawn(telemetry_streamer::run(
        streamer_config(&server, &[("RATE", "500")]),
        client.clone(),
        CancellationToken::new(),
    ));
    assert!(
        telemetry_harness::eventually(Duration::from_secs(30), || async {
            data_count(&client).await >= 300
        })
        .await
    );
    // Take a's lease away (as an expiry would) while a keeps receiving work.
    let (_, member) = range_all(&client, &keys().member("a"))
        .await
        .expect("range")
        .remove(0);
    let member: Member = serde_json::from_slice(&member).expect("member JSON");
    client.clone().lease_revoke(member.lease).await.expect("revoke");
    let b = spawn_collector(&server, &client, "b", &[]);
    streamer.await.expect("joins").expect("streamer ran");
    wait_drained(&client, 2470, Duration::from_secs(60)).await;
    let ta = a.shutdown().await;
    let tb = b.shutdown().await;
    // a either had a commit refused by the fence or stopped first because its group watch told
    // it its keys were gone; either way nothing it did after the revocation landed.
    eprintln!(
        "collector with revoked lease: {} commit(s) refused by the fence",
        ta.fence_refusals
    );
    assert_eq!(ta.processed + tb.processed, 2470, "a {ta:?} b {tb:?}");
    assert_sample_exactly_once(&client).await;
    assert_eq!(stats(&client).await.records, 2470);
}

#[tokio::test]
async fn a_collector_paused_past_its_ttl_and_resumed_doubles_nothing() {
    let (server, client) = etcd().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("a.log");
    let a = spawn_collector_process(&server, "a", &log, &[("LEASE_TTL", "2s")]);
    assert!(
        telemetry_harness::eventually(Duration::from_secs(20), || async {
            owners_held_by(&client, "a").await == 32
        })
        .await
    );
    let streamer = tokio::spawn(telemetry_streamer::run(
        streamer_config(&server, &[("RATE", "300")]),
        client.clone(),
        CancellationToken::new(),
    ));
    assert!(
        telemetry_harness::eventually(Duration::from_secs(30), || async {
            data_count(&client).await >= 200
        })
        .await
    );
    signal(&a, Signal::SIGSTOP);
    let b = spawn_collector(&server, &client, "b", &[("LEASE_TTL", "2s")]);
    // Past a's TTL: b owns everything.
    assert!(
        telemetry_harness::eventually(Duration::from_secs(20), || async {
            owners_held_by(&client, "b").await == 32
        })
        .await
    );
    signal(&a, Signal::SIGCONT);
    streamer.await.expect("joins").expect("streamer ran");
    wait_drained(&client, 2470, Duration::from_secs(60)).await;
    signal(&a, Signal::SIGTERM);
    let status = a.wait_with_output().expect("a exits").status;
    assert!(status.success(), "a exits 0 after SIGTERM");
    b.shutdown().await;
    assert_sample_exactly_once(&client).await;
    assert_eq!(stats(&client).await.records, 2470);
    let text = std::fs::read_to_string(&log).expect("log");
    let refused = text.matches("refused by the fence").count();
    let noticed = text.contains("session lease lost");
    assert!(
        refused > 0 || noticed,
        "a noticed it had lost its lease, or its commits were refused:\n{text}"
    );
    eprintln!("paused collector: {refused} commit(s) refused by the fence; lease loss noticed: {noticed}");
}

/// etcd itself killed mid-stream and restarted: streamer and collector retry with backoff,
/// re-create their watches and sessions, and every row still lands exactly once.
#[tokio::test]
async fn etcd_killed_and_restarted_mid_stream_loses_and_doubles_nothing() {
    let (mut server, client) = etcd().await;
    let collector = spawn_collector(&server, &client, "c", &[]);
    let streamer = tokio::spawn(telemetry_streamer::run(
        streamer_config(&server, &[("RATE", "400")]),
        client.clone(),
        CancellationToken::new(),
    ));
    assert!(
        telemetry_harness::eventually(Duration::from_secs(30), || async {
            data_count(&client).await >= 300
        })
        .await
    );
    server.member().kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await.expect("etcd restarts with its data");
    streamer
        .await
        .expect("joins")
        .expect("streamer rides out the outage");
    wait_drained(&client, 2470, Duration::from_secs(90)).await;
    let totals = collector.shutdown().await;
    assert!(totals.processed <= 2470, "{totals:?}");
    assert_sample_exactly_once(&client).await;
    assert_eq!(stats(&client).await.records, 2470);
}
