//! VictoriaMetrics: the sample once (it deduplicates re-sent samples with
//! `-dedup.minScrapeInterval`), and an exporter that refuses a VictoriaMetrics without it.

use std::time::Duration;

use telemetry_harness::{Tsdb, TsdbKind, tsdb::installed};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

#[tokio::test]
async fn the_sample_lands_once_in_victoria_metrics_through_sigkills() {
    if !installed(&TsdbKind::victoria_metrics()) {
        eprintln!("skipped: victoria-metrics is not installed (apt-get install victoria-metrics)");
        return;
    }
    let (server, client, probe) = etcd().await;
    let tsdb = Tsdb::start(TsdbKind::victoria_metrics())
        .await
        .expect("victoria-metrics starts");
    let collector = spawn_collector(&server, &client);
    let streamer = stream(&server, &client, "vm", 1, 1500.0);
    for i in 0..2 {
        let id = format!("v-{i}");
        let mut exporter =
            start_exporter_process(&server, &tsdb, &[("BATCH_SAMPLES", "100"), ("EXPORTER_ID", &id)]);
        wait_active(&probe, &id).await;
        tokio::time::sleep(Duration::from_millis(random_below(600))).await;
        exporter.kill();
    }
    assert_eq!(streamer.await.expect("streamer"), 2470);
    probe.wait_drained(2470, SLOW).await;
    let mut exporter = start_exporter_process(&server, &tsdb, &[("BATCH_SAMPLES", "100")]);
    let cp = wait_exported(&probe, 2470).await;
    exporter.kill();
    assert_eq!((cp.records, cp.rejected), (2470, 0), "{cp:?}");
    let expected = expected_samples(&probe).await;
    // VictoriaMetrics makes new samples searchable within about a second.
    let ok = telemetry_harness::eventually(Duration::from_secs(10), || async {
        tsdb.count_over_time("DCGM_.+", "3h", query_time())
            .await
            .unwrap_or(0) as usize
            == expected.len()
    })
    .await;
    assert!(ok, "log:\n{}", exporter.log());
    assert_exactly_once(&tsdb, &expected).await;
    collector.shutdown().await.expect("collector ran");
}

#[tokio::test]
async fn victoria_metrics_without_deduplication_is_refused() {
    if !installed(&TsdbKind::victoria_metrics()) {
        eprintln!("skipped: victoria-metrics is not installed");
        return;
    }
    let (server, client, _probe) = etcd().await;
    let tsdb = Tsdb::start(TsdbKind::VictoriaMetrics { dedup: None })
        .await
        .expect("victoria-metrics starts");
    let config = exporter_config(&server, &tsdb, &[]);
    let err = telemetry_exporter::run(config, client.clone(), CancellationToken::new())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("-dedup.minScrapeInterval"), "{err}");
    // With SERVER_CHECK=warn it runs (and says why it is unsafe).
    let config = exporter_config(&server, &tsdb, &[("SERVER_CHECK", "warn")]);
    let stop = CancellationToken::new();
    let task = tokio::spawn(telemetry_exporter::run(config, client.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    task.await.expect("joins").expect("runs with a warning");
}
