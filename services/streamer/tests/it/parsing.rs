//! CSV parsing and typing, end to end through etcd, plus a property test of the source.

use proptest::prelude::*;
use serde_json::json;
use telemetry_streamer::{
    source::{ColumnTypes, CsvSource, SourceItem},
    transform::MessageBuilder,
};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

#[tokio::test]
async fn malformed_rows_are_skipped_and_counted_and_quoting_crlf_bom_work() {
    let (server, client, probe) = etcd().await;
    let mut bytes = b"\xEF\xBB\xBFname,count,note\r\n".to_vec();
    bytes.extend_from_slice(b"a,1,plain\r\n"); // row 1 ok
    bytes.extend_from_slice(b"b,2\r\n"); // row 2 too few fields
    bytes.extend_from_slice(b"c,3,x,extra\r\n"); // row 3 too many
    bytes.extend_from_slice(b"d,4,\xFF\xFE\r\n"); // row 4 bad UTF-8
    bytes.extend_from_slice(b"\"e, with comma\",5,\"say \"\"hi\"\"\nnext line\"\r\n"); // row 5 ok
    bytes.extend_from_slice(b"f,6,last"); // row 6 ok, no final newline
    let csv = temp_csv(&bytes);
    let totals = telemetry_streamer::run(
        config(&server, csv.path(), &[]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("run");
    assert_eq!((totals.enqueued, totals.skipped), (3, 3));
    let queue = probe.queue().await;
    let mut rows: Vec<_> = queue.values().collect();
    rows.sort_by_key(|m| m.source.as_ref().map(|s| s.row));
    let rows_seen: Vec<u64> = rows
        .iter()
        .filter_map(|m| m.source.as_ref().map(|s| s.row))
        .collect();
    assert_eq!(rows_seen, vec![1, 5, 6]);
    assert_eq!(
        rows[0].fields["name"],
        json!("a"),
        "BOM stripped from the first header"
    );
    assert_eq!(rows[1].fields["name"], json!("e, with comma"));
    assert_eq!(rows[1].fields["note"], json!("say \"hi\"\nnext line"));
    assert_eq!(rows[2].fields["note"], json!("last"));
    let cp = probe.checkpoint("test-w0").await.expect("checkpoint");
    assert_eq!(
        (cp.row, cp.pass_complete),
        (6, true),
        "skipped rows are settled too"
    );
}

#[tokio::test]
async fn values_are_typed_by_the_documented_rules() {
    let (server, client, probe) = etcd().await;
    let csv = temp_csv(
        b"num,flag,mixed,text,blank\n\
          1,true,true,GPU-1,\n\
          0,0,5,x y,\n\
          2.5,1,hello,-,\n\
          -3e2,FALSE,0,NaN,\n",
    );
    telemetry_streamer::run(
        config(&server, csv.path(), &[]),
        client.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("run");
    let mut rows: Vec<_> = probe.queue().await.into_values().collect();
    rows.sort_by_key(|m| m.source.as_ref().map(|s| s.row));
    let col = |name: &str| rows.iter().map(|m| m.fields[name].clone()).collect::<Vec<_>>();
    // A column of numbers stays numeric even where a value is 1 or 0.
    assert_eq!(
        col("num"),
        vec![json!(1.0), json!(0.0), json!(2.5), json!(-300.0)]
    );
    // true/false/1/0 only, with a literal: a boolean column.
    assert_eq!(
        col("flag"),
        vec![json!(true), json!(false), json!(true), json!(false)]
    );
    // Otherwise typed per cell.
    assert_eq!(
        col("mixed"),
        vec![json!(true), json!(5.0), json!("hello"), json!(0.0)]
    );
    assert_eq!(
        col("text"),
        vec![json!("GPU-1"), json!("x y"), json!("-"), json!("NaN")]
    );
    assert_eq!(col("blank"), vec![json!(""); 4]);
}

#[test]
fn sample_types_and_line_numbers() {
    let path = sample::path();
    let types = ColumnTypes::scan(&path).expect("scan");
    assert_eq!(types.data_rows(), sample::ROWS);
    let mut source = CsvSource::open(&path).expect("open");
    assert_eq!(source.headers().len(), sample::COLUMNS);
    let Some(SourceItem::Row(first)) = source.next_item().expect("read") else {
        panic!("first row is valid");
    };
    assert_eq!((first.row, first.line), (1, 2));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Arbitrary bytes never panic, and every data row is either a message or a counted skip.
    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut bytes = b"a,b,c\n".to_vec();
        bytes.extend_from_slice(&body);
        let file = temp_csv(&bytes);
        let types = ColumnTypes::scan(file.path()).expect("scan");
        let mut source = CsvSource::open(file.path()).expect("open");
        let mut builder = MessageBuilder::new(source.headers().to_vec(), types.clone(), &[]);
        let (mut ok, mut bad, mut last) = (0u64, 0u64, 0u64);
        while let Some(item) = source.next_item().expect("no I/O error") {
            prop_assert_eq!(item.row(), last + 1, "rows numbered without gaps");
            last = item.row();
            match item {
                SourceItem::Row(row) => {
                    let msg = builder.build("s", 0, row.row, &row.values);
                    let json = serde_json::to_vec(&msg.message).expect("encodes");
                    prop_assert!(telemetry_shared::schema::decode(&json).is_ok());
                    ok += 1;
                }
                SourceItem::Malformed(_) => bad += 1,
            }
        }
        prop_assert_eq!(ok + bad, types.data_rows());
    }
}
