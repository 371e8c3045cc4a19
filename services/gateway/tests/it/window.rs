//! The in-memory window answers exactly what etcd would: many random queries over the sample,
//! asked while records are still being written, are compared with the same query read from etcd
//! at the revision the window answered for. And the fleet's latest values, as JSON and as
//! Prometheus text.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::helpers::*;

/// A small deterministic generator (xorshift), seeded per run and printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const METRICS: [&str; 4] = [
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_FB_USED",
];

/// A random query string for a telemetry page.
fn random_query(rng: &mut Rng, now: chrono::DateTime<chrono::Utc>) -> String {
    let mut q = vec![format!("limit={}", 1 + rng.below(40))];
    if rng.below(2) == 0 {
        q.push("order=asc".into());
    }
    if rng.below(3) == 0 {
        q.push(format!(
            "metric={}",
            METRICS[rng.below(METRICS.len() as u64) as usize]
        ));
    }
    if rng.below(4) == 0 {
        q.push(format!("offset={}", rng.below(10)));
    }
    if rng.below(3) == 0 {
        let back = chrono::TimeDelta::milliseconds(rng.below(20_000) as i64);
        q.push(format!(
            "start_time={}",
            (now - back).format("%Y-%m-%dT%H:%M:%S%.3fZ")
        ));
    }
    q.join("&")
}

/// The parts of a page that must be equal whatever the source (the `gpu` object carries the
/// index's `last_seen`, refreshed every few seconds, not at the page's revision).
fn comparable(page: &Value) -> Value {
    let mut page = page.clone();
    if let Some(obj) = page.as_object_mut() {
        obj.remove("gpu");
    }
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_answers_equal_etcd_answers_at_the_same_revision_while_records_are_written() {
    let (server, client) = etcd().await;
    let collector = spawn_collector(&server, &client);
    let gw = spawn_gateway(&server, &client, &[("WINDOW_POINTS", "24")]).await;
    // The sample streams at a bounded rate, so queries run while records keep landing.
    let writer = {
        let (server_endpoint, client) = (server.endpoint(), client.clone());
        let _ = server_endpoint;
        let csv = sample_csv();
        let server = &server;
        let config = streamer_config(server, &csv, "window", &[("RATE", "400")]);
        tokio::spawn(telemetry_streamer::run(
            config,
            client,
            tokio_util::sync::CancellationToken::new(),
        ))
    };
    let http = reqwest::Client::new();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut rng = Rng(seed);
    let (mut from_memory, mut compared) = (0, 0);
    for _ in 0..400 {
        let (_, gpus) = get(&http, &format!("{}/api/v1/gpus", gw.base)).await;
        let gpus = gpus["gpus"].as_array().cloned().unwrap_or_default();
        if gpus.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        let gpu = &gpus[rng.below(gpus.len() as u64) as usize];
        let uuid = gpu["uuid"].as_str().expect("uuid");
        let query = random_query(&mut rng, chrono::Utc::now());
        let url = format!("{}/api/v1/gpus/{uuid}/telemetry?{query}", gw.base);
        let response = http.get(&url).send().await.expect("request");
        let source = response
            .headers()
            .get("x-telemetry-source")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert_eq!(response.status().as_u16(), 200, "{url} (seed {seed})");
        let memory: Value = response.json().await.expect("json");
        if source != "memory" {
            continue;
        }
        from_memory += 1;
        let revision = memory["revision"].as_i64().expect("revision");
        let again = format!("{url}&revision={revision}");
        let response = http
            .get(&again)
            .header("cache-control", "no-cache")
            .send()
            .await
            .expect("request");
        assert_eq!(
            response
                .headers()
                .get("x-telemetry-source")
                .and_then(|v| v.to_str().ok()),
            Some("etcd")
        );
        let etcd: Value = response.json().await.expect("json");
        assert_eq!(
            comparable(&memory),
            comparable(&etcd),
            "{url} at revision {revision} differs between memory and etcd (seed {seed})"
        );
        compared += 1;
    }
    eprintln!("window comparison: {compared} of 400 queries answered from memory and compared (seed {seed})");
    assert!(
        from_memory >= 100,
        "only {from_memory} of 400 queries were answered from memory (seed {seed})"
    );
    writer.await.expect("joins").expect("streamer ran");
    collector.cancel();
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_latest_values_are_the_newest_records_as_json_and_as_prometheus_text() {
    let (server, client) = etcd().await;
    load_sample(&server, &client).await;
    let gw = spawn_gateway(&server, &client, &[]).await;
    let http = reqwest::Client::new();
    let latest = loop {
        let (status, body) = get(&http, &format!("{}/api/v1/gpus/latest", gw.base)).await;
        if status == 200 {
            break body;
        }
        assert_eq!(status, 503, "{body}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(latest["count"], 247);
    // Each GPU's latest values equal its newest record of each metric, read from etcd.
    let gpus = latest["gpus"].as_array().expect("gpus");
    for gpu in gpus.iter().step_by(25) {
        let uuid = gpu["uuid"].as_str().expect("uuid");
        let (_, page) = get(
            &http,
            &format!("{}/api/v1/gpus/{uuid}/telemetry?limit=1000", gw.base),
        )
        .await;
        let mut newest: BTreeMap<String, &Value> = BTreeMap::new();
        for item in page["items"].as_array().expect("items").iter().rev() {
            let metric = item["fields"]["metric_name"]
                .as_str()
                .expect("metric")
                .to_string();
            newest.insert(metric, item);
        }
        let metrics = gpu["metrics"].as_object().expect("metrics");
        assert_eq!(metrics.len(), newest.len(), "{uuid}");
        for (metric, item) in newest {
            assert_eq!(
                metrics[&metric]["value"], item["fields"]["value"],
                "{uuid} {metric}"
            );
            assert_eq!(metrics[&metric]["id"], item["id"], "{uuid} {metric}");
        }
    }
    let (_, one_host) = get(
        &http,
        &format!(
            "{}/api/v1/gpus/latest?hostname=mtv5-dgx1-hgpu-031&metric=DCGM_FI_DEV_GPU_UTIL",
            gw.base
        ),
    )
    .await;
    assert_eq!(one_host["count"], 8);
    assert!(
        one_host["gpus"]
            .as_array()
            .expect("gpus")
            .iter()
            .all(|g| g["metrics"].as_object().is_some_and(|m| m.len() == 1)),
        "{one_host}"
    );

    // The same values as Prometheus text, named and labelled like dcgm-exporter.
    let text = reqwest::get(format!("{}/metrics/gpus", gw.base))
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    // promtool's style lint asks for snake_case label names; dcgm-exporter's `modelName` is
    // kept as it is (dashboards select by it). Anything else promtool says is a failure.
    if let Err(complaints) = telemetry_harness::promtool_check_metrics(&text) {
        let other: Vec<&str> = complaints
            .lines()
            .filter(|l| !l.ends_with("label names should be written in 'snake_case' not 'camelCase'"))
            .collect();
        assert!(
            other.is_empty(),
            "promtool check metrics on /metrics/gpus:\n{complaints}"
        );
    }
    let util: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("DCGM_FI_DEV_GPU_UTIL{"))
        .collect();
    assert_eq!(util.len(), 247, "one series per GPU");
    assert!(util.iter().all(|l| l.contains("Hostname=\"")
        && l.contains("UUID=\"")
        && l.contains("gpu=\"")
        && l.contains("modelName=\"")
        && l.contains("device=\"")
        && l.contains("DCGM_FI_DRIVER_VERSION=\"")));
    assert_eq!(text.matches("# TYPE ").count(), 10, "ten DCGM fields");
    gw.shutdown().await;
}
