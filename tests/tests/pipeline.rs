//! The in-process pipeline (`telemetry_tests::Pipeline`) end to end: the sample streamed
//! through two collectors lands once, and the gateway serves what landed.

use std::time::Duration;

use telemetry_harness::{assert_rows_exactly_once, sample};
use telemetry_tests::Pipeline;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_through_two_collectors_is_served_by_the_gateway() {
    let pipeline = Pipeline::builder()
        .namespace("/e2e")
        .collectors(2)
        .gateway(true)
        .start()
        .await
        .expect("the pipeline starts");
    pipeline
        .wait_owned(Duration::from_secs(20))
        .await
        .expect("the collectors settle");
    pipeline.stream_sample().await;
    pipeline
        .wait_drained(sample::ROWS as i64, Duration::from_secs(60))
        .await;
    let records = pipeline.probe().records().await;
    assert_rows_exactly_once(records.values(), "dcgm-w0", 0, sample::ROWS);
    assert_eq!(records.len() as u64, sample::ROWS);

    let http = reqwest::Client::new();
    let get = |path: &str| {
        let request = http.get(format!("{}{path}", pipeline.gateway_url()));
        async move {
            let response = request.send().await.expect("the gateway answers");
            assert!(response.status().is_success(), "{response:?}");
            response.json::<serde_json::Value>().await.expect("JSON")
        }
    };
    let stats = get("/api/v1/stats").await;
    assert_eq!(stats["total_records"], sample::ROWS, "{stats}");
    assert_eq!(stats["queue_depth"], 0, "{stats}");
    let gpus = get("/api/v1/gpus").await;
    assert_eq!(gpus["count"], sample::GPUS, "{gpus}");

    let stopped = pipeline.shutdown().await.expect("every service stops cleanly");
    assert_eq!(stopped.processed(), sample::ROWS);
    assert!(
        stopped.collectors.iter().all(|(_, t)| t.processed > 0),
        "both collectors worked: {:?}",
        stopped.collectors
    );
}
