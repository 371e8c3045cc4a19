//! Faults: a collector killed, a collector whose lease is taken away while it still works, and
//! a collector paused past its lease TTL. In each case every row lands exactly once.

use std::time::{Duration, Instant};

use telemetry_shared::model::Member;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const OWNED: Duration = Duration::from_secs(20);
const PROGRESS: Duration = Duration::from_secs(30);

#[tokio::test]
async fn sigkilled_collector_is_taken_over_within_about_one_ttl_and_nothing_doubles() {
    let (server, client, probe) = etcd().await;
    let mut a = spawn_collector_process(&server, "a", &[]);
    probe.wait_owned_by("a", 32, OWNED).await;
    // Stream at a bounded rate so the kill lands mid-stream.
    let streamer = tokio::spawn(telemetry_streamer::run(
        streamer_config(&server, &[("RATE", "600")]),
        client.clone(),
        CancellationToken::new(),
    ));
    probe.wait_for_records(400, PROGRESS).await;
    a.kill();
    let killed_at = Instant::now();
    let at_kill = probe.data_count().await;
    let b = spawn_collector(&server, &client, "b", &[]);
    probe.wait_for_records(at_kill + 1, PROGRESS).await; // b took over
    let takeover = killed_at.elapsed();
    streamer.await.expect("joins").expect("streamer ran");
    probe.wait_drained(sample::ROWS as i64, DRAIN).await;
    b.shutdown().await;
    assert_sample_exactly_once(&probe).await;
    assert_eq!(probe.stats().await.records, sample::ROWS);
    // LEASE_TTL is 3 s: the partitions move when a's lease expires, about one TTL after the kill.
    assert!(takeover < Duration::from_secs(10), "takeover took {takeover:?}");
    eprintln!("takeover after SIGKILL: {takeover:?} (LEASE_TTL 3s)");
}

#[tokio::test]
async fn a_collector_whose_lease_is_revoked_while_working_doubles_nothing() {
    let (server, client, probe) = etcd().await;
    // a's own timer would notice a lost lease only after 10 s: until then only the fence stops it.
    let a = spawn_collector(&server, &client, "a", &[("LEASE_TTL", "30s")]);
    probe.wait_owned_by("a", 32, OWNED).await;
    let streamer = tokio::spawn(telemetry_streamer::run(
        streamer_config(&server, &[("RATE", "500")]),
        client.clone(),
        CancellationToken::new(),
    ));
    probe.wait_for_records(300, PROGRESS).await;
    // Take a's lease away (as an expiry would) while a keeps receiving work.
    let (_, member) = probe.range(&probe.keys().member("a")).await.remove(0);
    let member: Member = serde_json::from_slice(&member).expect("member JSON");
    client.clone().lease_revoke(member.lease).await.expect("revoke");
    let b = spawn_collector(&server, &client, "b", &[]);
    streamer.await.expect("joins").expect("streamer ran");
    probe.wait_drained(sample::ROWS as i64, DRAIN).await;
    let ta = a.shutdown().await;
    let tb = b.shutdown().await;
    // a either had a commit refused by the fence or stopped first because its group watch told
    // it its keys were gone; either way nothing it did after the revocation landed.
    eprintln!(
        "collector with revoked lease: {} commit(s) refused by the fence",
        ta.fence_refusals
    );
    assert_eq!(ta.processed + tb.processed, sample::ROWS, "a {ta:?} b {tb:?}");
    assert_sample_exactly_once(&probe).await;
    assert_eq!(probe.stats().await.records, sample::ROWS);
}

#[tokio::test]
async fn a_collector_paused_past_its_ttl_and_resumed_doubles_nothing() {
    let (server, client, probe) = etcd().await;
    let mut a = spawn_collector_process(&server, "a", &[("LEASE_TTL", "2s")]);
    probe.wait_owned_by("a", 32, OWNED).await;
    let streamer = tokio::spawn(telemetry_streamer::run(
        streamer_config(&server, &[("RATE", "300")]),
        client.clone(),
        CancellationToken::new(),
    ));
    probe.wait_for_records(200, PROGRESS).await;
    a.pause().expect("SIGSTOP");
    let b = spawn_collector(&server, &client, "b", &[("LEASE_TTL", "2s")]);
    // Past a's TTL: b owns everything.
    probe.wait_owned_by("b", 32, OWNED).await;
    a.resume().expect("SIGCONT");
    streamer.await.expect("joins").expect("streamer ran");
    probe.wait_drained(sample::ROWS as i64, DRAIN).await;
    a.terminate().expect("SIGTERM");
    let status = a.wait().await;
    assert!(status.success(), "a exits 0 after SIGTERM");
    b.shutdown().await;
    assert_sample_exactly_once(&probe).await;
    assert_eq!(probe.stats().await.records, sample::ROWS);
    let text = a.log();
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
    let (mut server, client, probe) = etcd().await;
    let collector = spawn_collector(&server, &client, "c", &[]);
    let streamer = tokio::spawn(telemetry_streamer::run(
        streamer_config(&server, &[("RATE", "400")]),
        client.clone(),
        CancellationToken::new(),
    ));
    probe.wait_for_records(300, PROGRESS).await;
    server.member().kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await.expect("etcd restarts with its data");
    streamer
        .await
        .expect("joins")
        .expect("streamer rides out the outage");
    probe
        .wait_drained(sample::ROWS as i64, Duration::from_secs(90))
        .await;
    let totals = collector.shutdown().await;
    assert!(totals.processed <= sample::ROWS, "{totals:?}");
    assert_sample_exactly_once(&probe).await;
    assert_eq!(probe.stats().await.records, sample::ROWS);
}
