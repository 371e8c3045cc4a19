//! Scraped dcgm-exporter text through the whole pipeline with the collectors' default columns:
//! every sample lands under its own GPU (`Hostname`, `gpu_id` from `gpu`, `uuid` from `UUID`),
//! once per scrape, and the gateway lists the sample's 247 GPUs.

use std::{collections::BTreeSet, time::Duration};

use telemetry_harness::{ExpositionServer, sample};
use telemetry_tests::Pipeline;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_samples_land_under_their_gpu_with_the_default_collector_columns() {
    let pipeline = Pipeline::builder()
        .namespace("/scrape")
        .collectors(1)
        .gateway(true)
        .start()
        .await
        .expect("the pipeline starts");
    pipeline
        .wait_owned(Duration::from_secs(20))
        .await
        .expect("the collector settles");
    let target = ExpositionServer::start().await.expect("exposition server");
    let url = target.url();
    let env = pipeline
        .env()
        .scraper(std::slice::from_ref(&url), "1s")
        .set("MAX_QUEUE_DEPTH", 0);
    let config = telemetry_streamer::StreamerConfig::from_vars(env, &telemetry_streamer::Flags::default())
        .expect("valid config");
    let stop = CancellationToken::new();
    let streamer = tokio::spawn(telemetry_streamer::run(
        config,
        pipeline.client().clone(),
        stop.clone(),
    ));
    let stream = telemetry_streamer::target_stream_id(&url);
    let two_scrapes = telemetry_harness::eventually(Duration::from_secs(90), || async {
        pipeline
            .probe()
            .checkpoint(&stream)
            .await
            .is_some_and(|cp| cp.pass >= 1 && cp.pass_complete)
    })
    .await;
    stop.cancel();
    streamer
        .await
        .expect("joins")
        .expect("the streamer stops cleanly");
    assert!(two_scrapes);
    let cp = pipeline.probe().checkpoint(&stream).await.expect("checkpoint");
    let expected = (cp.pass + 1) as i64 * sample::ROWS as i64
        - if cp.pass_complete {
            0
        } else {
            (sample::ROWS - cp.row) as i64
        };
    pipeline.wait_drained(expected, Duration::from_secs(90)).await;
    assert_eq!(
        pipeline.probe().dead_letter_count().await,
        0,
        "nothing dead-lettered"
    );
    let records = pipeline.probe().records().await;
    assert_eq!(records.len() as i64, expected);
    // Each data key names the GPU its fields name; each (scrape, series) once.
    let mut seen = BTreeSet::new();
    for (key, m) in &records {
        let host = m.fields["Hostname"].as_str().expect("host");
        let gpu = m.fields["gpu_id"].as_str().expect("gpu");
        assert!(key.contains(&format!("/telemetry/data/{host}/{gpu}/")), "{key}");
        let series = (
            m.fields["scrape_time"].to_string(),
            m.fields["metric_name"].to_string(),
            host.to_string(),
            gpu.to_string(),
        );
        assert!(seen.insert(series), "{key}: twice");
    }
    let gpus: serde_json::Value = reqwest::get(format!("{}/api/v1/gpus", pipeline.gateway_url()))
        .await
        .expect("the gateway answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(gpus["count"], sample::GPUS, "{gpus}");
    pipeline.shutdown().await.expect("every service stops cleanly");
}
