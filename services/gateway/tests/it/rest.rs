//! Every REST endpoint and its errors, over the DCGM sample as the real streamer and collector
//! stored it. One etcd and one load for all the checks (loading takes a few seconds).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_over_the_dcgm_sample() {
    let (server, client) = etcd().await;
    load_sample(&server, &client).await;
    let gw = spawn_gateway(
        &server,
        &client,
        &[("GATEWAY_CORS_ORIGINS", "http://dash.example")],
    )
    .await;
    let http = reqwest::Client::new();
    let base = gw.base.clone();

    health(&http, &base).await;
    let gpus = gpus(&http, &base).await;
    stats(&http, &base).await;
    pages(&http, &base, &gpus).await;
    identities(&http, &base, &gpus).await;
    schema_versions(&http, &base, &gpus).await;
    errors(&http, &base, &gpus).await;
    documents(&http, &base).await;
    gw.shutdown().await;
}

async fn health(http: &reqwest::Client, base: &str) {
    let (status, body) = get(http, &format!("{base}/health")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert!(body["etcd"]["revision"].as_i64().unwrap_or(0) > 0, "{body}");
    assert!(body["etcd"]["member_id"].as_u64().unwrap_or(0) > 0, "{body}");
}

async fn gpus(http: &reqwest::Client, base: &str) -> Vec<Value> {
    let (status, body) = get(http, &format!("{base}/api/v1/gpus")).await;
    assert_eq!(status, 200);
    assert_eq!(body["count"], 247);
    let gpus = body["gpus"].as_array().expect("array").clone();
    let uuids: BTreeSet<&str> = gpus.iter().filter_map(|g| g["uuid"].as_str()).collect();
    let hosts: BTreeSet<&str> = gpus.iter().filter_map(|g| g["hostname"].as_str()).collect();
    assert_eq!((uuids.len(), hosts.len()), (247, 31));
    for g in &gpus {
        for field in ["uuid", "hostname", "gpu_id", "device", "model", "last_seen"] {
            assert!(g[field].is_string(), "{field} missing in {g}");
        }
    }
    // The host filter partitions the list.
    let mut total = 0;
    for host in &hosts {
        let (status, body) = get(http, &format!("{base}/api/v1/gpus?hostname={host}")).await;
        assert_eq!(status, 200);
        assert!(
            body["gpus"]
                .as_array()
                .expect("array")
                .iter()
                .all(|g| g["hostname"] == *host)
        );
        total += body["count"].as_u64().expect("count");
    }
    assert_eq!(total, 247);
    let (_, body) = get(http, &format!("{base}/api/v1/gpus?hostname=no-such-host")).await;
    assert_eq!(body["count"], 0);
    gpus
}

async fn stats(http: &reqwest::Client, base: &str) {
    let (status, body) = get(http, &format!("{base}/api/v1/stats")).await;
    assert_eq!(status, 200);
    assert_eq!(body["total_records"], 2470, "{body}");
    assert_eq!(body["unique_gpus"], 247);
    assert_eq!(body["unique_hosts"], 31);
    assert_eq!(body["queue_depth"], 0);
    assert_eq!(body["dead_letters"], 0);
    assert_eq!(body["duplicates_absorbed"], 0);
    let earliest = body["earliest_timestamp"].as_str().expect("earliest");
    let latest = body["latest_timestamp"].as_str().expect("latest");
    assert!(earliest <= latest);
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_string())
        .collect()
}

fn times(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["timestamp"].as_str().expect("timestamp").to_string())
        .collect()
}

/// Walks every page of a GPU with a cursor; returns the ids in page order.
async fn walk(http: &reqwest::Client, url: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let url = match &cursor {
            Some(c) => format!("{url}&cursor={c}"),
            None => url.to_string(),
        };
        let (status, page) = get(http, &url).await;
        assert_eq!(status, 200, "{page}");
        out.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
    panic!("too many pages");
}

async fn pages(http: &reqwest::Client, base: &str, gpus: &[Value]) {
    let uuid = gpus[0]["uuid"].as_str().expect("uuid");
    let url = format!("{base}/api/v1/gpus/{uuid}/telemetry");
    let (status, all) = get(http, &url).await;
    assert_eq!(status, 200);
    assert_eq!(all["count"], 10);
    assert_eq!(all["order"], "desc");
    assert!(all["next_cursor"].is_null());
    assert_eq!(all["gpu"]["uuid"], uuid);
    let desc = times(&all);
    let mut sorted = desc.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(desc, sorted, "newest first");

    let (_, asc) = get(http, &format!("{url}?order=asc")).await;
    let mut reversed = ids(&asc);
    reversed.reverse();
    assert_eq!(reversed, ids(&all), "asc is desc reversed");

    // Cursor paging in both orders returns every record once, in order.
    assert_eq!(walk(http, &format!("{url}?limit=3")).await, ids(&all));
    assert_eq!(walk(http, &format!("{url}?limit=4&order=asc")).await, ids(&asc));
    // Offset.
    let (_, page) = get(http, &format!("{url}?limit=2&offset=3")).await;
    assert_eq!(ids(&page), ids(&all)[3..5].to_vec());
    assert!(page["next_cursor"].is_string());
    let (_, page) = get(http, &format!("{url}?offset=20")).await;
    assert_eq!(page["count"], 0);

    // Inclusive time bounds: a window of exactly one record's timestamp holds that record.
    let first = asc["items"][0]["timestamp"].as_str().expect("ts");
    let (_, page) = get(http, &format!("{url}?start_time={first}&end_time={first}")).await;
    assert!(page["count"].as_u64().expect("count") >= 1);
    assert!(times(&page).iter().all(|t| t == first));
    let last = all["items"][0]["timestamp"].as_str().expect("ts");
    let (_, page) = get(http, &format!("{url}?start_time={first}&end_time={last}")).await;
    assert_eq!(page["count"], 10);
    let (_, page) = get(http, &format!("{url}?end_time=2000-01-01T00:00:00Z")).await;
    assert_eq!(page["count"], 0);
    // The same bound with an offset is the same instant.
    let (_, page) = get(http, &format!("{url}?start_time=2000-01-01T01:00:00%2B01:00")).await;
    assert_eq!(page["count"], 10);

    // Metric filter.
    let (_, page) = get(http, &format!("{url}?metric=DCGM_FI_DEV_GPU_TEMP")).await;
    assert_eq!(page["count"], 1);
    assert_eq!(page["items"][0]["fields"]["metric_name"], "DCGM_FI_DEV_GPU_TEMP");
    let (_, page) = get(http, &format!("{url}?metric=NOPE")).await;
    assert_eq!(page["count"], 0);

    // Every GPU has its ten records.
    for gpu in gpus.iter().step_by(13) {
        let uuid = gpu["uuid"].as_str().expect("uuid");
        let (_, page) = get(http, &format!("{base}/api/v1/gpus/{uuid}/telemetry")).await;
        assert_eq!(page["count"], 10, "{uuid}");
        assert!(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .all(|i| i["fields"]["uuid"] == *uuid)
        );
    }
}

async fn identities(http: &reqwest::Client, base: &str, gpus: &[Value]) {
    let gpu = &gpus[5];
    let (host, id, uuid) = (
        gpu["hostname"].as_str().expect("host"),
        gpu["gpu_id"].as_str().expect("gpu_id"),
        gpu["uuid"].as_str().expect("uuid"),
    );
    let (status, page) = get(
        http,
        &format!("{base}/api/v1/gpus/{id}/telemetry?hostname={host}"),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["gpu"]["uuid"], uuid);
    // gpu_id alone is ambiguous in the sample (every id is on many hosts).
    let (status, body) = get(http, &format!("{base}/api/v1/gpus/{id}/telemetry")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "ambiguous_gpu_id");
    assert!(body["detail"].as_str().expect("detail").contains("hostname"));
    // Unknown GPUs.
    let (status, body) = get(http, &format!("{base}/api/v1/gpus/GPU-nope/telemetry")).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, _) = get(
        http,
        &format!("{base}/api/v1/gpus/{id}/telemetry?hostname=no-such-host"),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = get(http, &format!("{base}/api/v1/gpus/99/telemetry?hostname={host}")).await;
    assert_eq!(status, 404);
}

async fn schema_versions(http: &reqwest::Client, base: &str, gpus: &[Value]) {
    let uuid = gpus[1]["uuid"].as_str().expect("uuid");
    let url = format!("{base}/api/v1/gpus/{uuid}/telemetry");
    for version in ["v1", "v1beta2", "v1beta1"] {
        let validator = validator(http, base, version).await;
        let by_query = get(http, &format!("{url}?schema={version}")).await.1;
        let accept = format!("application/vnd.telemetry.{version}+json");
        let by_header = get_with(http, &url, Some(&accept)).await.1;
        for page in [&by_query, &by_header] {
            assert_eq!(page["schema_version"], version);
            assert_eq!(page["count"], 10);
            for item in page["items"].as_array().expect("items") {
                assert_eq!(item["schema_version"], version);
                assert_valid(&validator, item);
            }
        }
    }
    let resp = http.get(&url).send().await.expect("request");
    assert_eq!(
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/vnd.telemetry.v1+json")
    );
    for (query, accept) in [
        ("?schema=v2", None),
        ("", Some("application/vnd.telemetry.v0+json")),
    ] {
        let (status, body) = get_with(http, &format!("{url}{query}"), accept).await;
        assert_eq!(status, 406, "{body}");
        assert_eq!(body["error"], "unsupported_schema_version");
        let detail = body["detail"].as_str().expect("detail");
        assert!(detail.contains("v1, v1beta2, v1beta1"), "{detail}");
    }
}

async fn errors(http: &reqwest::Client, base: &str, gpus: &[Value]) {
    let uuid = gpus[2]["uuid"].as_str().expect("uuid");
    let url = format!("{base}/api/v1/gpus/{uuid}/telemetry");
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=many", "limit"),
        ("offset=-2", "offset"),
        ("start_time=yesterday", "start_time"),
        ("end_time=2026-02-30T00:00:00Z", "end_time"),
        (
            "start_time=2026-01-02T00:00:00Z&end_time=2026-01-01T00:00:00Z",
            "start_time",
        ),
        ("order=sideways", "order"),
        ("cursor=garbage", "cursor"),
        ("metric=", "metric"),
        ("hostname=", "hostname"),
    ] {
        let (status, body) = get(http, &format!("{url}?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "invalid_parameter", "{query}");
        assert!(
            body["detail"].as_str().expect("detail").starts_with(param),
            "{query}: {body}"
        );
    }
    let (status, body) = get(http, &format!("{base}/api/v1/nothing")).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let resp = http
        .post(format!("{base}/api/v1/stats"))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 405);
    let body: Value = resp.json().await.expect("JSON 405");
    assert_eq!(body["error"], "method_not_allowed");
    let (status, body) = get(http, &format!("{base}/schemas/v7.json")).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    // A plain GET on the WebSocket endpoint is a JSON 400, not a hang.
    let (status, body) = get(http, &format!("{base}/api/v1/ws/telemetry")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("websocket_required"))
    );
}

async fn documents(http: &reqwest::Client, base: &str) {
    let (status, doc) = get(http, &format!("{base}/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    for path in [
        "/health",
        "/api/v1/gpus",
        "/api/v1/gpus/{id}/telemetry",
        "/api/v1/stats",
        "/api/v1/ws/telemetry",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing from OpenAPI");
    }
    let docs = http.get(format!("{base}/docs/")).send().await.expect("docs");
    assert_eq!(docs.status().as_u16(), 200, "{:?}", docs.headers());
    assert!(docs.text().await.expect("html").contains("swagger"));
    let metrics = http.get(format!("{base}/metrics")).send().await.expect("metrics");
    let text = metrics.text().await.expect("text");
    assert!(text.contains("gateway_http_requests_total"), "{text}");
    // CORS for the configured origin only.
    let resp = http
        .get(format!("{base}/api/v1/stats"))
        .header("origin", "http://dash.example")
        .send()
        .await
        .expect("cors");
    assert_eq!(
        resp.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("http://dash.example")
    );
    let resp = http
        .get(format!("{base}/api/v1/stats"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("cors");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}
