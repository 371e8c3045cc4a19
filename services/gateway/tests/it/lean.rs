//! Lean records serve exactly the JSON the previous release served: every record of the sample,
//! as the gateway returns it, equals the message the streamer built from its CSV row (fields in
//! column order, typed values, idempotency key, source position), with the id and processing
//! time of its key; and a record stored in the previous release's JSON form next to lean ones
//! is served unchanged.

use std::collections::BTreeMap;

use serde_json::Value;
use telemetry_shared::{Message, SchemaVersion};
use telemetry_streamer::{
    source::{ColumnTypes, CsvSource, SourceItem},
    transform::MessageBuilder,
};

use crate::helpers::*;

/// The message the streamer builds for each row of the sample (id and time aside), by row.
fn expected_messages() -> BTreeMap<u64, Message> {
    let csv = sample_csv();
    let types = ColumnTypes::scan(&csv).expect("sample");
    let mut source = CsvSource::open(&csv).expect("open");
    let mut builder = MessageBuilder::new(
        source.headers().to_vec(),
        types,
        &["Hostname".to_string(), "gpu_id".to_string()],
    );
    let mut out = BTreeMap::new();
    while let Some(item) = source.next_item().expect("read") {
        if let SourceItem::Row(row) = item {
            out.insert(row.row, builder.build("dcgm-w0", 0, row.row, &row.values).message);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_records_serve_the_json_of_the_previous_release() {
    let (server, client) = etcd().await;
    load_sample(&server, &client).await;
    let gw = spawn_gateway(&server, &client, &[]).await;
    let http = reqwest::Client::new();
    let expected = expected_messages();
    let (_, body) = get(&http, &format!("{}/api/v1/gpus", gw.base)).await;
    let mut seen = 0;
    for gpu in body["gpus"].as_array().expect("gpus") {
        let uuid = gpu["uuid"].as_str().expect("uuid");
        let url = format!("{}/api/v1/gpus/{uuid}/telemetry?limit=1000", gw.base);
        let (status, page) = get(&http, &url).await;
        assert_eq!(status, 200, "{page}");
        for item in page["items"].as_array().expect("items") {
            let served: Message = serde_json::from_value(item.clone()).expect("a v1 message");
            let row = served.source.as_ref().expect("source").row;
            let mut want = expected[&row].clone();
            // The id and processing time are this run's; everything else is the row's.
            want.id = served.id;
            want.timestamp = served.timestamp;
            assert_eq!(served, want, "row {row}");
            assert_eq!(item.to_string(), want.to_version(SchemaVersion::V1).to_string());
            seen += 1;
        }
    }
    assert_eq!(seen, 2470);

    // A record in the previous release's JSON form, beside the lean ones, is served as stored.
    let mut legacy = expected[&1].clone();
    legacy.id = ulid::Ulid::from_parts(1_900_000_000_000, 1);
    let host = legacy.fields["Hostname"].as_str().expect("host").to_string();
    let gpu_id = telemetry_shared::message::field_text(&legacy.fields["gpu_id"]).expect("gpu_id");
    let key = keys().data_record(
        &host,
        &gpu_id,
        &legacy.timestamp.to_string(),
        &legacy.id.to_string(),
    );
    let json = serde_json::to_vec(&legacy).expect("json");
    client.clone().put(key, json.clone(), None).await.expect("put");
    let uuid = legacy.fields["uuid"].as_str().expect("uuid");
    let (_, page) = get(
        &http,
        &format!("{}/api/v1/gpus/{uuid}/telemetry?limit=1000&order=asc", gw.base),
    )
    .await;
    let stored: Value = serde_json::from_slice(&json).expect("json");
    assert!(
        page["items"].as_array().expect("items").contains(&stored),
        "the legacy record is served as it was stored"
    );
    gw.shutdown().await;
}
