//! `telemetry-bench`: measures the pipeline next to etcd's own ceiling, in one run, on one etcd.
//!
//! Phases (each on the same durable single-member etcd, compacted and defragmented between
//! phases so that later phases do not pay for earlier ones' history):
//! 1. raw etcd: transactions of 128 puts of message-sized values, from 1, 4 and 16 concurrent
//!    clients; single puts one at a time from 1 client, and from 64 concurrent tasks;
//! 2. streamer, `RATE=0`, one-shot over a generated CSV (the DCGM sample repeated), with 1 and
//!    with 4 workers;
//! 3. end to end: streamer (`RATE=0`, 16 workers) while 1, 2 and 4 collectors drain the queue,
//!    timed until every message is committed and the queue is empty; then the ideal exactly-once
//!    design (`telemetry_tests::bench::ideal`, no parsing, no services) on the same etcd, and
//!    etcd bytes per stored record after compaction and defragmentation;
//! 4. export: the end-to-end run again (2 collectors) with an exporter following into a real
//!    Prometheus (the exporter's lag behind the last record stored), then a second exporter
//!    exporting the same records from scratch alone: its samples/s against the pipeline's
//!    records/s (≥ 1: it keeps up at full speed) and etcd's CPU time per 1,000 records, next to
//!    the pipeline's (`/proc/<etcd pid>/stat`); skipped when Prometheus is not installed;
//! 5. enqueue-to-commit latency p50/p99: 4 workers at 200 rows/s each and 2 collectors, a watch
//!    on the data prefix timing each record from its message `timestamp` to its watch event;
//! 6. service memory: streamer, 2 collectors and a gateway with `--subscribers` WebSocket
//!    subscribers run as real processes (`target/release/`), peak RSS (`VmHWM`) of each;
//! 7. gateway: "last 100 points of one GPU" (newest first) with `--points` (1,000,000) points
//!    stored over 250 GPUs, p50/p99 from 1 and from 8 concurrent clients; then WebSocket
//!    write-to-delivery p50/p99 with `--subscribers` (100) subscribers; then a load test:
//!    `--rest-clients` (1,000) concurrent REST clients x 5 requests, and `--ws-load-subscribers`
//!    (1,000) subscribers at once receiving 200 writes. Any failed request or subscription
//!    fails the bench (after the table is printed).
//!
//! 8. scrape: the streamer (a real process) scraping `--scrape-targets` (1,000) simulated
//!    dcgm-exporters of 80 series each on loopback every second: samples scraped and enqueued
//!    per second, and the streamer's CPU per 1,000 samples.
//!
//! `--quick` shrinks every phase (a few minutes in all); `--gateway-only` runs only phase 7,
//! `--export-only` only phase 4, `--ideal-only` only the 2-collector end-to-end run, the ideal
//! design and etcd bytes per record of phase 3, `--scrape-only` only phase 8.
//!
//! An enqueued CSV row costs one key write (its queue entry; the stream's checkpoint is its
//! dedup record, one put per transaction), so the streamer's efficiency is
//! `msgs_per_s / raw_keys_per_s`. A stored row costs three (queue put, telemetry put, queue
//! delete), so the pipeline's is `e2e_msgs_per_s * 3 / raw_128op_keys_per_s`, against the best
//! raw rate measured. (The ideal design writes four per message: it adds a dedup marker.) Figures on these machines move by ±25 %
//! between runs; only ratios within one run are meaningful.
//!
//! This file is the plan and one small function per phase (`raw_txns`, `raw_puts`,
//! `streamer_only`, `end_to_end`, `ideal_design`, `bytes_per_record`, `export`, `enqueue_to_commit`, `service_rss`, `gateway_last_100`,
//! `ws_delivery`, `load_rest`, `load_ws`), each adding its figures to one [`Table`]; the
//! measurements themselves are in `telemetry_tests::bench`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use etcd_client::Client;
use telemetry_harness::{EtcdOptions, EtcdServer, sample};
use telemetry_tests::bench::{
    Table, export, gateway as gw, ideal, limits,
    pipeline::{self, E2E_WORKERS, Target},
    raw::{self, reset},
    rss, scrape as scraping,
};

#[derive(Parser, Debug)]
#[command(
    name = "telemetry-bench",
    version,
    about = "Benchmarks the telemetry pipeline against raw etcd in the same run",
    after_help = format!(
        "{}\n\nETCD_BIN picks the etcd binary (default: the vendored etcd 3.7.2, else etcd on PATH).",
        telemetry_shared::config::env_help::<telemetry_shared::config::RawLogConfig>()
    )
)]
struct Args {
    /// Rows of the generated CSV for the streamer phases (the sample repeated) [default: 49400,
    /// --quick 9880].
    #[arg(long)]
    rows: Option<usize>,
    /// Seconds per raw etcd phase [default: 4, --quick 2].
    #[arg(long)]
    seconds: Option<f64>,
    /// Telemetry points stored for the gateway query phase [default: 1000000, --quick 100000].
    #[arg(long)]
    points: Option<usize>,
    /// Requests per client count in the "last 100 points" phase [default: 2000, --quick 500].
    #[arg(long)]
    requests: Option<usize>,
    /// WebSocket subscribers in the live-latency phase (and in the RSS phase) [default: 100].
    #[arg(long)]
    subscribers: Option<usize>,
    /// Concurrent REST clients in the gateway load phase [default: 1000, --quick 200].
    #[arg(long)]
    rest_clients: Option<usize>,
    /// Requests each REST client sends in the gateway load phase, over its kept-alive
    /// connection [default: 20, --quick 5]. Enough that the rate measures serving, not the
    /// setting-up of 1,000 connections.
    #[arg(long)]
    rest_requests: Option<usize>,
    /// WebSocket subscribers connected at once in the gateway load phase [default: 1000,
    /// --quick 200].
    #[arg(long)]
    ws_load_subscribers: Option<usize>,
    /// Seconds of the enqueue-to-commit latency phase (4 workers x 200 rows/s) [default: 10,
    /// --quick 5].
    #[arg(long)]
    latency_seconds: Option<f64>,
    /// Shrink every phase so that the whole bench takes a few minutes.
    #[arg(long)]
    quick: bool,
    /// Run only the gateway phases (quicker).
    #[arg(long)]
    gateway_only: bool,
    /// Run only the export phase (quicker).
    #[arg(long, conflicts_with = "gateway_only")]
    export_only: bool,
    /// Run only the end-to-end run with 2 collectors, the ideal design beside it, and etcd
    /// bytes per stored record (issue 12's goals; quicker).
    #[arg(long, conflicts_with_all = ["gateway_only", "export_only", "scrape_only"])]
    ideal_only: bool,
    /// Run only the scrape phase (quicker).
    #[arg(long, conflicts_with_all = ["gateway_only", "export_only"])]
    scrape_only: bool,
    /// Simulated dcgm-exporters (80 series each) in the scrape phase [default: 1000, --quick
    /// 200].
    #[arg(long)]
    scrape_targets: Option<usize>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench.json")]
    json: PathBuf,
}

/// The sizes of every phase, once `--quick` and the explicit flags are applied.
#[derive(Debug)]
struct Plan {
    rows: usize,
    seconds: f64,
    points: usize,
    requests: usize,
    subscribers: usize,
    ws_writes: usize,
    rest_clients: usize,
    rest_requests_per_client: usize,
    ws_load_subscribers: usize,
    ws_load_writes: usize,
    latency_seconds: f64,
    scrape_targets: usize,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let q = args.quick;
        let pick = |v: Option<usize>, full: usize, quick: usize| v.unwrap_or(if q { quick } else { full });
        Plan {
            rows: pick(args.rows, 49_400, 9_880),
            seconds: args.seconds.unwrap_or(if q { 2.0 } else { 4.0 }),
            points: pick(args.points, 1_000_000, 100_000),
            requests: pick(args.requests, 2000, 500),
            subscribers: pick(args.subscribers, 100, 100),
            ws_writes: if q { 400 } else { 1000 },
            rest_clients: pick(args.rest_clients, 1000, 200),
            rest_requests_per_client: pick(args.rest_requests, 20, 5),
            ws_load_subscribers: pick(args.ws_load_subscribers, 1000, 200),
            ws_load_writes: 200,
            latency_seconds: args.latency_seconds.unwrap_or(if q { 5.0 } else { 10.0 }),
            scrape_targets: pick(args.scrape_targets, 1000, 200),
        }
    }

    /// Descriptors the gateway load phase needs: both ends of every REST connection and
    /// WebSocket live in this process, plus etcd connections, the listener and some slack.
    fn open_files_needed(&self) -> u64 {
        (2 * (self.rest_clients + self.ws_load_subscribers) + 1024) as u64
    }
}

/// Streamer workers and rows per second per worker in the enqueue-to-commit latency phase: a
/// modest fixed rate, so that the queue stays short and the figure is latency, not backlog.
const LATENCY_WORKERS: usize = 4;
const LATENCY_RATE: f64 = 200.0;
/// Collectors in the enqueue-to-commit latency and RSS phases.
const PHASE_COLLECTORS: usize = 2;
/// Streamer workers in the RSS phase (each streams `rows / 4` rows).
const RSS_WORKERS: usize = 4;
/// Rows of the storage phase: the sample repeated (issue 12 measures at least 24,700).
const FOOTPRINT_ROWS: usize = 24_700;

/// What every phase shares: the plan, the etcd (its client waits up to 5 minutes: resetting a
/// store of hundreds of MB takes longer than a service's request timeout), the generated inputs'
/// directory, the message size, and the table the figures go to.
struct Bench {
    plan: Plan,
    server: EtcdServer,
    client: Client,
    dir: tempfile::TempDir,
    value_len: usize,
    bin_dir: PathBuf,
    table: Table,
}

impl Bench {
    async fn start(plan: Plan, bin_dir: PathBuf) -> anyhow::Result<Self> {
        let value_len = raw::message_size()?;
        eprintln!("starting a durable single-member etcd (fsync on) ...");
        let server = EtcdServer::start_with(EtcdOptions {
            quota_backend_bytes: Some(8 * 1024 * 1024 * 1024),
            ..EtcdOptions::default()
        })
        .await?;
        let options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(300));
        let client = Client::connect([server.endpoint()], Some(options)).await?;
        Ok(Bench {
            plan,
            server,
            client,
            dir: tempfile::tempdir()?,
            value_len,
            bin_dir,
            table: Table::default(),
        })
    }

    fn target(&mut self) -> Target {
        Target {
            endpoint: self.server.endpoint(),
            client: self.client.clone(),
            pid: self.server.member().pid().unwrap_or(0),
        }
    }

    /// A CSV of `rows` rows (the sample repeated) named `name` in the bench's directory.
    fn csv(&self, name: &str, rows: usize) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        sample::write_repeated(&path, rows)?;
        Ok(path)
    }

    async fn reset(&mut self) -> anyhow::Result<()> {
        reset(&mut self.client).await
    }
}

/// Raw etcd rates of 128-put transactions from 1, 4 and 16 clients, each phase followed by a
/// reset.
struct RawRates {
    one: f64,
    four: f64,
    sixteen: f64,
}

impl RawRates {
    fn best(&self) -> f64 {
        self.one.max(self.four).max(self.sixteen)
    }
}

async fn raw_txns(b: &mut Bench) -> anyhow::Result<RawRates> {
    let (len, seconds) = (b.value_len, b.plan.seconds);
    let mut rates = Vec::new();
    for clients in [1, 4, 16] {
        if clients == 1 {
            eprintln!("raw etcd, 1 client, 128-put transactions of {len}-byte values ...");
        } else {
            eprintln!("raw etcd, {clients} clients ...");
        }
        rates.push(raw::raw_txn_rate(&b.client, clients, len, seconds).await?);
        b.reset().await?;
    }
    let raw = RawRates {
        one: rates[0],
        four: rates[1],
        sixteen: rates[2],
    };
    for (name, value) in [
        ("raw_128op_txn_1_client", raw.one),
        ("raw_128op_txn_4_clients", raw.four),
        ("raw_128op_txn_16_clients", raw.sixteen),
    ] {
        b.table.push(name, value, "keys/s", format!("{len}-byte values"));
    }
    Ok(raw)
}

/// Single puts one at a time from 1 client, and from 64 concurrent tasks.
async fn raw_puts(b: &mut Bench) -> anyhow::Result<()> {
    let (len, seconds) = (b.value_len, b.plan.seconds);
    eprintln!("raw etcd, serial single puts of {len}-byte values ...");
    let serial = raw::raw_put_rate(&b.client, 1, len, seconds).await?;
    b.reset().await?;
    eprintln!("raw etcd, 64 concurrent single puts ...");
    let concurrent = raw::raw_put_rate(&b.client, 64, len, seconds).await?;
    b.reset().await?;
    let note = format!("1 client, one put at a time, {len}-byte values");
    b.table.push("raw_put_serial", serial, "keys/s", note);
    let note = format!("64 tasks each putting in a loop, {len}-byte values");
    b.table.push("raw_put_64_concurrent", concurrent, "keys/s", note);
    Ok(())
}

/// The streamer alone, `RATE=0`, with 1 and with 4 workers; its efficiency against raw etcd.
async fn streamer_only(b: &mut Bench, raw: &RawRates) -> anyhow::Result<()> {
    let rows = b.plan.rows;
    let csv = b.csv("bench.csv", rows)?;
    eprintln!("streamer, 1 worker, RATE=0, {rows} rows ...");
    let (s1, n1) = pipeline::streamer_rate(&b.target(), &csv, 1).await?;
    b.reset().await?;
    eprintln!("streamer, 4 workers, RATE=0, {rows} rows each ...");
    let (s4, n4) = pipeline::streamer_rate(&b.target(), &csv, 4).await?;
    let t = &mut b.table;
    t.push(
        "streamer_1_worker",
        s1,
        "msgs/s",
        format!("{n1} messages, 1 key each"),
    );
    t.push(
        "streamer_4_workers",
        s4,
        "msgs/s",
        format!("{n4} messages, 1 key each"),
    );
    let note = "streamer msgs/s (1 key each) / raw keys/s";
    t.push(
        "ratio_streamer_1w_keys_vs_raw_1_client",
        s1 / raw.one,
        "ratio",
        note,
    );
    t.push(
        "ratio_streamer_4w_keys_vs_raw_4_clients",
        s4 / raw.four,
        "ratio",
        note,
    );
    Ok(())
}

/// One end-to-end run with `collectors` collectors, added to the table.
async fn end_to_end_with(b: &mut Bench, collectors: usize) -> anyhow::Result<pipeline::E2eRun> {
    let e2e_rows = (b.plan.rows / E2E_WORKERS).max(1);
    let csv = b.csv("e2e.csv", e2e_rows)?;
    eprintln!("end to end, {E2E_WORKERS} streamer workers x {e2e_rows} rows, {collectors} collector(s) ...");
    let run = pipeline::e2e_rate(&b.target(), &csv, collectors).await?;
    let note = format!("{} messages, streamer {E2E_WORKERS} workers", run.messages);
    b.table
        .push(format!("e2e_{collectors}_collectors"), run.rate, "msgs/s", note);
    Ok(run)
}

/// End to end with 1, 2 and 4 collectors; the pipeline's efficiency against the best raw rate.
/// Returns the 2-collector run (the one compared with the ideal design).
async fn end_to_end(b: &mut Bench, raw_best: f64) -> anyhow::Result<pipeline::E2eRun> {
    let e2e_rows = (b.plan.rows / E2E_WORKERS).max(1);
    let csv = b.csv("e2e.csv", e2e_rows)?;
    let mut runs = Vec::new();
    for collectors in [1, 2, 4] {
        b.reset().await?;
        eprintln!(
            "end to end, {E2E_WORKERS} streamer workers x {e2e_rows} rows, {collectors} collector(s) ..."
        );
        let target = b.target();
        runs.push((collectors, pipeline::e2e_rate(&target, &csv, collectors).await?));
    }
    for (collectors, run) in &runs {
        let plural = if *collectors == 1 { "" } else { "s" };
        let note = format!("{} messages, streamer {E2E_WORKERS} workers", run.messages);
        b.table.push(
            format!("e2e_{collectors}_collector{plural}"),
            run.rate,
            "msgs/s",
            note,
        );
    }
    for (collectors, run) in &runs {
        let note = format!("e2e msgs/s * 3 / {raw_best:.0} raw 128-op keys/s (best of 1/4/16 clients)");
        let name = format!("ratio_e2e_{collectors}c_x3_vs_raw_best");
        b.table.push(name, run.rate * 3.0 / raw_best, "ratio", note);
    }
    runs.into_iter()
        .find(|(c, _)| *c == 2)
        .map(|(_, run)| run)
        .ok_or_else(|| anyhow::anyhow!("no 2-collector run"))
}

/// Paired rounds of the 2-collector end-to-end run and the ideal design: the ratio is the
/// median of the rounds' ratios. On two shared cores either rate moves by 15 % between runs
/// minutes apart; a pair run back to back, three times, gives a ratio that does not.
const IDEAL_ROUNDS: usize = 3;

/// One round of [`ideal_design`]: a 2-collector run, the ideal design right after it, and the
/// ideal design's etcd and client CPU seconds.
struct Round {
    e2e: pipeline::E2eRun,
    ideal: ideal::IdealRun,
    etcd_cpu: f64,
    clients_cpu: f64,
}

/// The ideal exactly-once design (issue 12's reference: no parsing, no services) on the same
/// etcd, with as many messages as the 2-collector end-to-end run, in [`IDEAL_ROUNDS`] rounds
/// each paired with a 2-collector run (`first` is the first round's); the pipeline against it,
/// and etcd's and the bench process's CPU per 1,000 messages of each.
async fn ideal_design(b: &mut Bench, first: pipeline::E2eRun) -> anyhow::Result<()> {
    let e2e_rows = (b.plan.rows / E2E_WORKERS).max(1);
    let csv = b.csv("e2e.csv", e2e_rows)?;
    let len = b.value_len;
    let pid = b.target().pid;
    let mut pairs: Vec<Round> = Vec::new();
    for round in 0..IDEAL_ROUNDS {
        let e2e = if round == 0 {
            first
        } else {
            b.reset().await?;
            eprintln!(
                "end to end, 2 collectors (round {} of {IDEAL_ROUNDS}) ...",
                round + 1
            );
            pipeline::e2e_rate(&b.target(), &csv, 2).await?
        };
        b.reset().await?;
        let messages = e2e.messages as usize;
        eprintln!(
            "ideal design (round {} of {IDEAL_ROUNDS}): {} producers x {} consumers, {messages} messages of {len} bytes ...",
            round + 1,
            ideal::WORKERS,
            ideal::WORKERS
        );
        let cpu_before = ideal::cpu_seconds(pid)?;
        let own_before = ideal::cpu_seconds(std::process::id())?;
        let run = ideal::run(&b.client, "/ideal", messages, len).await?;
        let etcd_cpu = ideal::cpu_seconds(pid)? - cpu_before;
        let clients_cpu = ideal::cpu_seconds(std::process::id())? - own_before;
        eprintln!(
            "  round {}: end to end {:.0} msgs/s, ideal {:.0} msgs/s, ratio {:.2}",
            round + 1,
            e2e.rate,
            run.rate,
            e2e.rate / run.rate
        );
        pairs.push(Round {
            e2e,
            ideal: run,
            etcd_cpu,
            clients_cpu,
        });
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = pairs.iter().map(|p| p.e2e.rate / p.ideal.rate).collect();
    let listed = ratios
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    let e2e_median = median(pairs.iter().map(|p| p.e2e.rate).collect());
    let ideal_median = median(pairs.iter().map(|p| p.ideal.rate).collect());
    let t = &mut b.table;
    let note = format!(
        "median of {IDEAL_ROUNDS} rounds of {} messages of {len} bytes: {} producers x 64-message txns (queue put + dedup marker, create_revision == 0), {} consumers x 63-message txns (data put + queue delete) fenced by their owner key's lease",
        first.messages,
        ideal::WORKERS,
        ideal::WORKERS
    );
    t.push("ideal_design", ideal_median, "msgs/s", note);
    t.push(
        "e2e_2c_paired",
        e2e_median,
        "msgs/s",
        format!("median of the {IDEAL_ROUNDS} 2-collector runs paired with the ideal design"),
    );
    let note = format!(
        "median of {IDEAL_ROUNDS} rounds, each e2e with 2 collectors and {E2E_WORKERS} streamer workers / the ideal design run right after it on the same etcd (rounds: {listed})"
    );
    t.push("ratio_e2e_2c_vs_ideal", median(ratios), "ratio", note);
    // CPU milliseconds per 1,000 messages, over all rounds.
    let messages: u64 = pairs.iter().map(|p| p.e2e.messages).sum();
    let ideal_messages: u64 = pairs.iter().map(|p| p.ideal.messages).sum();
    let per_1000 = |cpu: f64, n: u64| cpu * 1_000_000.0 / n.max(1) as f64;
    let sum = |f: fn(&Round) -> f64| -> f64 { pairs.iter().map(f).sum() };
    t.push(
        "etcd_cpu_per_1000_e2e_2c",
        per_1000(sum(|p| p.e2e.etcd_cpu), messages),
        "ms",
        "etcd user+system CPU per 1,000 messages, pipeline with 2 collectors (/proc), all rounds",
    );
    t.push(
        "etcd_cpu_per_1000_ideal",
        per_1000(sum(|p| p.etcd_cpu), ideal_messages),
        "ms",
        "etcd user+system CPU per 1,000 messages, ideal design (/proc), all rounds",
    );
    t.push(
        "client_cpu_per_1000_e2e_2c",
        per_1000(sum(|p| p.e2e.services_cpu), messages),
        "ms",
        "bench process CPU per 1,000 messages: the in-process streamer (16 workers) and 2 collectors, all rounds",
    );
    t.push(
        "client_cpu_per_1000_ideal",
        per_1000(sum(|p| p.clients_cpu), ideal_messages),
        "ms",
        "bench process CPU per 1,000 messages: the ideal design's 16 producers and 16 consumers, all rounds",
    );
    Ok(())
}

/// etcd backend bytes per stored record: the sample repeated to `FOOTPRINT_ROWS` rows through
/// one streamer and 2 collectors, measured after compaction and defragmentation.
async fn bytes_per_record(b: &mut Bench) -> anyhow::Result<()> {
    b.reset().await?;
    let rows = FOOTPRINT_ROWS;
    let csv = b.csv("footprint.csv", rows)?;
    eprintln!(
        "storage: {rows} rows through 1 streamer and {PHASE_COLLECTORS} collectors, then compact and defragment ..."
    );
    let target = b.target();
    let f = pipeline::footprint(&target, &csv, PHASE_COLLECTORS).await?;
    let note = format!(
        "{} records: backend {} bytes after (queue empty, compacted, defragmented) - {} before, / records (markers, profiles, indexes, counters included)",
        f.records, f.after, f.before
    );
    b.table
        .push("etcd_bytes_per_record", f.per_record(), "bytes", note);
    Ok(())
}

/// The exporter next to the pipeline (see `telemetry_tests::bench::export`).
async fn export(b: &mut Bench) -> anyhow::Result<()> {
    if !telemetry_harness::tsdb::installed(&telemetry_harness::TsdbKind::prometheus()) {
        eprintln!("export: skipped (no prometheus binary; apt-get install prometheus)");
        return Ok(());
    }
    let e2e_rows = (b.plan.rows / E2E_WORKERS).max(1);
    let csv = b.csv("export.csv", e2e_rows)?;
    let pid = b.server.member().pid().context("the bench etcd is not running")?;
    eprintln!(
        "export: {E2E_WORKERS} streamer workers x {e2e_rows} rows, {PHASE_COLLECTORS} collectors, \
         an exporter following into Prometheus; then another exporting them alone ..."
    );
    let f = export::export_phase(&b.target(), &csv, PHASE_COLLECTORS, pid).await?;
    let n = f.records;
    let t = &mut b.table;
    t.push(
        "e2e_with_exporter",
        f.pipeline_per_s,
        "msgs/s",
        format!("{n} records stored, {PHASE_COLLECTORS} collectors, an exporter following"),
    );
    t.push(
        "export_live_lag_after_last_store",
        f.live_lag_s * 1000.0,
        "ms",
        "last record stored to its sample acknowledged by Prometheus",
    );
    t.push(
        "export_backlog",
        f.export_samples_per_s,
        "samples/s",
        format!("{n} records exported from scratch by one exporter, alone (one sample each)"),
    );
    t.push(
        "ratio_export_vs_e2e",
        f.export_samples_per_s / f.pipeline_per_s,
        "ratio",
        "export samples/s / e2e records/s of the same run (>= 1: the exporter keeps up)",
    );
    t.push(
        "etcd_cpu_per_1000_records_pipeline",
        f.etcd_cpu_ms_per_1000_pipeline,
        "ms",
        "etcd CPU (utime+stime) per 1,000 records stored, streamer + collectors + live exporter",
    );
    t.push(
        "etcd_cpu_per_1000_records_export",
        f.etcd_cpu_ms_per_1000_export,
        "ms",
        "etcd CPU per 1,000 records exported by the exporter alone (its extra cost)",
    );
    Ok(())
}

/// Enqueue-to-commit latency p50/p99 at a modest fixed rate.
async fn enqueue_to_commit(b: &mut Bench) -> anyhow::Result<()> {
    let rows = ((LATENCY_RATE * b.plan.latency_seconds) as usize).max(1);
    let csv = b.csv("latency.csv", rows)?;
    eprintln!(
        "enqueue to commit: {LATENCY_WORKERS} streamer workers x {rows} rows at \
         {LATENCY_RATE}/s, {PHASE_COLLECTORS} collectors ..."
    );
    let latency =
        pipeline::enqueue_to_commit(&b.target(), &csv, LATENCY_WORKERS, LATENCY_RATE, PHASE_COLLECTORS)
            .await?;
    let note = format!(
        "{} records, {LATENCY_WORKERS} workers x {LATENCY_RATE}/s, {PHASE_COLLECTORS} \
         collectors; message timestamp to arrival of its data watch event (includes \
         the watch delivery)",
        latency.n
    );
    b.table.push_percentiles("e2e_enqueue_to_commit", &latency, &note);
    Ok(())
}

/// Peak RSS of each service run as a real process.
async fn service_rss(b: &mut Bench) -> anyhow::Result<()> {
    let rows = (b.plan.rows / RSS_WORKERS).max(1);
    let csv = b.csv("rss.csv", rows)?;
    let subscribers = b.plan.subscribers;
    eprintln!(
        "service RSS: processes from {}: streamer {RSS_WORKERS} workers x {rows} rows, \
         {PHASE_COLLECTORS} collectors, gateway with {subscribers} subscribers ...",
        b.bin_dir.display(),
    );
    let target = b.target();
    let rss = rss::service_rss(
        &target,
        &b.bin_dir,
        &csv,
        RSS_WORKERS,
        PHASE_COLLECTORS,
        subscribers,
    )
    .await?;
    let note = format!(
        "peak RSS (VmHWM): {} msgs, streamer {RSS_WORKERS} workers RATE=0, {PHASE_COLLECTORS} \
         collectors, gateway with {subscribers} subscribers ({} received every record), stored in {:.1} s",
        rss.messages, rss.subscribers_complete, rss.seconds
    );
    let collector_max = rss.collectors.iter().copied().fold(0.0, f64::max);
    for (name, value) in [
        ("rss_streamer_max", rss.streamer),
        ("rss_collector_max", collector_max),
        ("rss_gateway_max", rss.gateway),
    ] {
        b.table.push(name, value, "MiB", note.clone());
    }
    Ok(())
}

/// The streamer scraping simulated dcgm-exporters (see `telemetry_tests::bench::scrape`).
async fn scrape(b: &mut Bench) -> anyhow::Result<()> {
    let targets = b.plan.scrape_targets;
    let (interval, window) = (
        Duration::from_secs(1),
        Duration::from_secs(if b.plan.seconds < 4.0 { 5 } else { 15 }),
    );
    eprintln!(
        "scrape: {targets} simulated dcgm-exporters x 80 series every {interval:?}, measured over {window:?} ..."
    );
    let run = scraping::scrape_phase(&b.target(), &b.bin_dir, targets, interval, window).await?;
    let t = &mut b.table;
    t.push(
        "scrape_samples_enqueued",
        run.samples_per_s,
        "samples/s",
        format!(
            "{targets} targets x 80 series every 1 s on loopback (offered {:.0}/s), {} samples in {:.1} s, {} failed scrapes",
            run.offered_per_s, run.samples, run.seconds, run.failures
        ),
    );
    t.push(
        "scrape_streamer_cpu_per_1000_samples",
        run.cpu_ms_per_1000,
        "ms",
        "streamer CPU (utime+stime) per 1,000 samples scraped, parsed and enqueued",
    );
    Ok(())
}

/// The pipeline phases (everything but the gateway's), each on a reset store.
async fn pipeline_phases(b: &mut Bench) -> anyhow::Result<()> {
    let raw = raw_txns(b).await?;
    raw_puts(b).await?;
    streamer_only(b, &raw).await?;
    let e2e = end_to_end(b, raw.best()).await?;
    ideal_design(b, e2e).await?;
    bytes_per_record(b).await?;
    b.reset().await?;
    export(b).await?;
    b.reset().await?;
    enqueue_to_commit(b).await?;
    b.reset().await?;
    service_rss(b).await?;
    b.reset().await?;
    scrape(b).await
}

/// Gateway phases on `--points` stored points: query latency, WebSocket delivery latency, then
/// the load tests. Returns the load tests' failures (the rows are in the table either way).
async fn gateway_phases(b: &mut Bench) -> anyhow::Result<Vec<String>> {
    let ns = "/bench/gw";
    eprintln!(
        "gateway: storing {} points over {} GPUs ...",
        b.plan.points,
        gw::GPUS
    );
    let keys = telemetry_shared::Keyspace::new(ns);
    let secs = gw::load_points(&b.client, &keys, b.plan.points).await?;
    eprintln!("  stored in {secs:.1} s");
    let gateway = telemetry_tests::Pipeline::builder()
        .shared_etcd(b.server.endpoint(), &b.client)
        .namespace(ns)
        .gateway_env(&[("WS_MAX_CONNECTIONS", "2000")])
        .start()
        .await?;
    let addr = gateway.gateway_addr().to_string();
    gateway_last_100(b, &addr, &keys).await?;
    ws_delivery(b, &addr, &keys).await?;
    let mut failures = load_rest(b, &addr).await?;
    failures.extend(load_ws(b, &addr, &keys).await?);
    gateway.shutdown().await?;
    gateway_window_rss(b, ns).await?;
    Ok(failures)
}

/// "Last 100 points of one GPU" (newest first), p50/p99 from 1 and from 8 clients, from the
/// gateway's window; and a direct etcd range read of the same 100 keys from 8 clients.
async fn gateway_last_100(
    b: &mut Bench,
    addr: &str,
    keys: &telemetry_shared::Keyspace,
) -> anyhow::Result<()> {
    // Warm up connections and caches (and wait until the window is loaded: until then reads
    // come from etcd).
    wait_for_window(addr).await?;
    gw::last_100_latency(addr, 100, 1, gw::Source::Memory).await?;
    let mut memory_8 = None;
    for clients in [1usize, 8] {
        eprintln!("gateway: last 100 points of one GPU, {clients} client(s) ...");
        let p = gw::last_100_latency(addr, b.plan.requests, clients, gw::Source::Memory).await?;
        let note = format!(
            "{} requests, {} points stored, from the gateway's window",
            p.n, b.plan.points
        );
        b.table
            .push_percentiles(&format!("gateway_last100_{clients}c"), &p, &note);
        memory_8 = Some(p.p99);
    }
    eprintln!("etcd: a range read of the same 100 keys, 8 clients ...");
    let starts = gw::newest_100_starts(addr, keys).await?;
    let etcd = gw::etcd_range_latency(&b.client, &starts, b.plan.requests, 8).await?;
    let note = format!(
        "{} direct etcd range reads of a GPU's newest 100 keys (values included)",
        etcd.n
    );
    b.table.push_percentiles("etcd_range100_8c", &etcd, &note);
    let note = "gateway last-100 p99 / direct etcd range p99, 8 clients each (goal: at most 1)";
    b.table.push(
        "ratio_last100_8c_p99_vs_etcd_range",
        memory_8.unwrap_or(0.0) / etcd.p99,
        "ratio",
        note,
    );
    Ok(())
}

/// Waits (up to 5 minutes) until the gateway's window is loaded.
async fn wait_for_window(addr: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let body: serde_json::Value = http
            .get(format!("http://{addr}/health"))
            .send()
            .await?
            .json()
            .await?;
        if body["window"]["revision"].is_i64() {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the gateway's window did not load"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Peak RSS of the gateway (as a real process) with its window full over the stored points.
async fn gateway_window_rss(b: &mut Bench, ns: &str) -> anyhow::Result<()> {
    eprintln!("gateway RSS with its window full ...");
    let target = b.target();
    let (mib, records, bytes) = rss::gateway_window_rss(&target, &b.bin_dir, ns).await?;
    let note = format!(
        "peak RSS (VmHWM) of the gateway process once its window was loaded: {records} records, {:.1} MiB of records' JSON, {} points stored",
        bytes as f64 / (1024.0 * 1024.0),
        b.plan.points
    );
    b.table.push("rss_gateway_window_full", mib, "MiB", note);
    Ok(())
}

/// WebSocket write-to-delivery p50/p99 with `--subscribers` subscribers.
async fn ws_delivery(b: &mut Bench, addr: &str, keys: &telemetry_shared::Keyspace) -> anyhow::Result<()> {
    let (subscribers, writes) = (b.plan.subscribers, b.plan.ws_writes);
    eprintln!("gateway: WebSocket write-to-delivery, {subscribers} subscribers ...");
    let p = gw::ws_latency(addr, &b.client, keys, subscribers, writes, 200.0).await?;
    let note = format!("{subscribers} subscribers x {writes} writes at 200/s");
    b.table.push_percentiles("gateway_ws_delivery", &p, &note);
    Ok(())
}

/// `--rest-clients` concurrent REST clients x `--rest-requests` requests, from the window and then from etcd
/// (`Cache-Control: no-cache`), and the ratio of their rates. Returns failures, if any.
async fn load_rest(b: &mut Bench, addr: &str) -> anyhow::Result<Vec<String>> {
    let (clients, per) = (b.plan.rest_clients, b.plan.rest_requests_per_client);
    let mut rates = Vec::new();
    let mut failures = Vec::new();
    for (source, label) in [(gw::Source::Memory, ""), (gw::Source::Etcd, "_etcd")] {
        eprintln!(
            "gateway load: {clients} concurrent REST clients x {per} requests (last 100 points, {source:?}) ..."
        );
        let rest = gw::rest_load(addr, clients, per, source).await?;
        let prefix = format!("gateway_load_rest_{clients}c{label}");
        let note = format!(
            "{} requests from {clients} concurrent clients, {} points stored, read from {source:?}",
            rest.latency.n, b.plan.points
        );
        let t = &mut b.table;
        t.push_percentiles(&prefix, &rest.latency, &note);
        let rate = (clients * per) as f64 / rest.seconds;
        t.push(
            format!("{prefix}_rate"),
            rate,
            "req/s",
            format!("{} requests in {:.1} s", clients * per, rest.seconds),
        );
        t.push(
            format!("{prefix}_errors"),
            rest.errors.len() as f64,
            "count",
            "failed requests (must be 0)",
        );
        rates.push(rate);
        if let Some(first) = rest.errors.first() {
            failures.push(format!(
                "{} of {} REST requests ({source:?}) failed under load; the first: {first}",
                rest.errors.len(),
                clients * per
            ));
        }
    }
    let note = "REST load req/s from the window / from etcd, same run (goal: at least 10)";
    b.table.push(
        "ratio_load_rest_memory_vs_etcd",
        rates[0] / rates[1],
        "ratio",
        note,
    );
    Ok(failures)
}

/// `--ws-load-subscribers` subscribers at once receiving 200 writes. Returns its failure, if
/// any.
async fn load_ws(
    b: &mut Bench,
    addr: &str,
    keys: &telemetry_shared::Keyspace,
) -> anyhow::Result<Vec<String>> {
    let (subs, writes) = (b.plan.ws_load_subscribers, b.plan.ws_load_writes);
    eprintln!("gateway load: {subs} WebSocket subscribers at once, {writes} writes at 200/s ...");
    let ws = gw::ws_deliveries(addr, &b.client, keys, subs, writes, 200.0).await?;
    let note = format!(
        "{} deliveries: {subs} subscribers x {writes} writes at 200/s",
        ws.latency.n
    );
    let t = &mut b.table;
    t.push_percentiles(&format!("gateway_load_ws_{subs}s_delivery"), &ws.latency, &note);
    let note = "failed subscriptions, broken sockets, missing deliveries (must be 0)";
    t.push(
        format!("gateway_load_ws_{subs}s_errors"),
        ws.errors.len() as f64,
        "count",
        note,
    );
    Ok(ws.errors.first().map_or_else(Vec::new, |first| {
        vec![format!(
            "{} WebSocket failure(s) with {subs} subscribers; the first: {first}",
            ws.errors.len()
        )]
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log = telemetry_shared::config::LogConfig::load().unwrap_or_else(|err| err.exit());
    let plan = Plan::new(&args);
    // Fail before any phase runs, not after minutes of them.
    limits::ensure_open_files(plan.open_files_needed())?;
    let bin_dir = limits::service_bin_dir()?;
    // Warnings from the services (e.g. a watch that keeps breaking) must be visible here.
    telemetry_shared::observe::init_tracing(&log);
    let mut bench = Bench::start(plan, bin_dir).await?;
    if args.scrape_only {
        scrape(&mut bench).await?;
        print!("{}", bench.table.render());
        return write_json(&bench.table, &args.json);
    }
    if args.export_only {
        export(&mut bench).await?;
        print!("{}", bench.table.render());
        return write_json(&bench.table, &args.json);
    }
    if args.ideal_only {
        bench.reset().await?;
        let e2e = end_to_end_with(&mut bench, 2).await?;
        ideal_design(&mut bench, e2e).await?;
        bytes_per_record(&mut bench).await?;
        print!("{}", bench.table.render());
        return write_json(&bench.table, &args.json);
    }
    if !args.gateway_only {
        pipeline_phases(&mut bench).await?;
    }
    bench.reset().await?;
    let failures = gateway_phases(&mut bench).await?;
    print!("{}", bench.table.render());
    write_json(&bench.table, &args.json)?;
    if !failures.is_empty() {
        anyhow::bail!("the gateway load test failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

fn write_json(table: &Table, path: &Path) -> anyhow::Result<()> {
    table.write_json(path)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
