//! Criterion benchmark of the streamer's CPU path: parse the DCGM sample, type each row, build
//! its message (idempotency key, ULID, timestamp) and its lean queue entry. No etcd involved; the
//! end-to-end enqueue rate is measured by `scripts/bench`.

#![allow(missing_docs)] // criterion_group! generates an undocumented public fn.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use telemetry_streamer::{
    source::{ColumnTypes, CsvSource, SourceItem},
    transform::MessageBuilder,
};

fn rows_to_entries(c: &mut Criterion) {
    let path = telemetry_harness::sample::path();
    let types = ColumnTypes::scan(&path).expect("sample readable");
    let mut group = c.benchmark_group("streamer");
    group.throughput(Throughput::Elements(types.data_rows()));
    group.bench_function("dcgm_sample_rows_to_lean_entries", |b| {
        b.iter(|| {
            let mut source = CsvSource::open(&path).expect("open");
            let mut builder = MessageBuilder::new(
                source.headers().to_vec(),
                types.clone(),
                &["Hostname".to_string(), "gpu_id".to_string()],
            );
            let mut bytes = 0;
            while let Some(item) = source.next_item().expect("read") {
                if let SourceItem::Row(row) = item {
                    let prepared = builder.build("bench", 0, row.row, &row.values);
                    bytes += prepared.encoded.len();
                }
            }
            bytes
        })
    });
    group.finish();
}

criterion_group!(benches, rows_to_entries);
criterion_main!(benches);
