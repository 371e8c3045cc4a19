//! Pages of large records: ten records of about 480 KiB (near the streamer's 512 KiB message
//! limit) make a page of almost 5 MB, more than tonic's default 4 MiB response limit. REST
//! reads them through the KV client with the larger limit, in both orders and across cursors.

use crate::helpers::*;

const RECORDS: usize = 10;
const LABEL_BYTES: usize = 480 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_large_records_are_served() {
    let (server, client) = etcd().await;
    let labels: Vec<String> = (0..RECORDS)
        .map(|i| format!("{i}{}", "x".repeat(LABEL_BYTES)))
        .collect();
    let rows: Vec<(&str, &str, &str, &str, &str)> = labels
        .iter()
        .map(|l| ("DCGM_FI_DEV_GPU_UTIL", "0", "GPU-large", "large-host", l.as_str()))
        .collect();
    let csv = csv_file(&rows);
    load_csv(&server, &client, csv.path(), RECORDS as i64).await;
    let gw = spawn_gateway(&server, &client, &[]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/gpus/GPU-large/telemetry", gw.base);

    for order in ["desc", "asc"] {
        let (status, page) = get(&http, &format!("{url}?order={order}")).await;
        assert_eq!(status, 200, "order={order}: {}", page["detail"]);
        assert_eq!(page["count"], RECORDS, "order={order}");
        let sizes = page["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["fields"]["labels_raw"].as_str().map_or(0, str::len));
        assert!(sizes.into_iter().all(|n| n > LABEL_BYTES));
    }
    // A cursor walk in pages of four.
    let (mut seen, mut cursor) = (0, String::new());
    loop {
        let (status, page) = get(&http, &format!("{url}?limit=4{cursor}")).await;
        assert_eq!(status, 200, "{}", page["detail"]);
        seen += page["count"].as_u64().expect("count");
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, RECORDS as u64);
    gw.shutdown().await;
}
