//! Criterion benchmark of the collector's CPU path per queue entry: the DCGM sample's rows as
//! the streamer enqueues them (lean entries against their GPUs' profiles) are validated into
//! records (identity, idempotency key checked against its derivation, data key, stored
//! bytes). No etcd involved; the end-to-end rate is measured by `scripts/bench`.

#![allow(missing_docs)] // criterion_group! generates an undocumented public fn.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use telemetry_collector::{
    config::Columns,
    validate::{Context, validate},
};
use telemetry_shared::{Keyspace, profiles::ProfileCache, record::ProfileBook};
use telemetry_streamer::{
    source::{ColumnTypes, CsvSource, SourceItem},
    transform::MessageBuilder,
};

fn entries_to_records(c: &mut Criterion) {
    let path = telemetry_harness::sample::path();
    let types = ColumnTypes::scan(&path).expect("sample readable");
    let mut source = CsvSource::open(&path).expect("open");
    let mut builder = MessageBuilder::new(
        source.headers().to_vec(),
        types,
        &["Hostname".to_string(), "gpu_id".to_string()],
    );
    let profiles = ProfileCache::new();
    let mut entries = Vec::new();
    while let Some(item) = source.next_item().expect("read") {
        if let SourceItem::Row(row) = item {
            let prepared = builder.build("bench", 0, row.row, &row.values);
            profiles.insert(prepared.profile.0, prepared.profile.1.clone());
            entries.push((prepared.message.id.to_string(), prepared.encoded));
        }
    }
    let keys = Keyspace::new("");
    let columns = Columns::default();
    let mut group = c.benchmark_group("collector");
    group.throughput(Throughput::Elements(entries.len() as u64));
    group.bench_function("dcgm_sample_lean_entries_to_records", |b| {
        b.iter(|| {
            let mut book = ProfileBook::new();
            let mut ctx = Context {
                keys: &keys,
                columns: &columns,
                profiles: &profiles,
                book: &mut book,
            };
            let mut bytes = 0;
            for (id, payload) in &entries {
                let record = validate(payload, id, &mut ctx).expect("valid");
                bytes += record.encoded.len();
            }
            bytes
        })
    });
    group.finish();
}

criterion_group!(benches, entries_to_records);
criterion_main!(benches);
