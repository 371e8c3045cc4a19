//! `telemetry-bench`: measures the pipeline next to etcd's own ceiling, in one run, on one etcd.
//!
//! Phases (each on the same durable single-member etcd, compacted and defragmented between
//! phases so that later phases do not pay for earlier ones' history):
//! 1. raw etcd: transactions of 128 puts of message-sized values, from 1, 4 and 16 concurrent
//!    clients; single puts one at a time from 1 client, and from 64 concurrent tasks;
//! 2. streamer, `RATE=0`, one-shot over a generated CSV (the DCGM sample repeated), with 1 and
//!    with 4 workers;
//! 3. end to end: streamer (`RATE=0`, 16 workers) while 1, 2 and 4 collectors drain the queue,
//!    timed until every message is committed and the queue is empty;
//! 4. enqueue-to-commit latency p50/p99: 4 workers at 200 rows/s each and 2 collectors, a watch
//!    on the data prefix timing each record from its message `timestamp` to its watch event;
//! 5. service memory: streamer, 2 collectors and a gateway with `--subscribers` WebSocket
//!    subscribers run as real processes (`target/release/`), peak RSS (`VmHWM`) of each;
//! 6. gateway: "last 100 points of one GPU" (newest first) with `--points` (1,000,000) points
//!    stored over 250 GPUs, p50/p99 from 1 and from 8 concurrent clients; then WebSocket
//!    write-to-delivery p50/p99 with `--subscribers` (100) subscribers; then a load test:
//!    `--rest-clients` (1,000) concurrent REST clients x 5 requests, and `--ws-load-subscribers`
//!    (1,000) subscribers at once receiving 200 writes. Any failed request or subscription
//!    fails the bench (after the table is printed).
//!
//! `--quick` shrinks every phase (a few minutes in all); `--gateway-only` runs only phase 6.
//!
//! An enqueued message costs two key writes (queue entry + dedup marker), so the streamer's
//! efficiency is `msgs_per_s * 2 / raw_keys_per_s`. An exactly-once message costs at least four
//! (queue put, dedup marker, telemetry put, queue delete; the collector also writes a processed
//! marker), so the pipeline's is `e2e_msgs_per_s * 4 / raw_128op_keys_per_s`, against the best
//! raw rate measured. Figures on these machines move by ±25 %
//! between runs; only ratios within one run are meaningful.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use serde::Serialize;
use telemetry_harness::{EtcdOptions, EtcdServer, count};
use telemetry_shared::Keyspace;
use telemetry_streamer::{Flags, StreamerConfig};
use telemetry_tests::pipeline_bench;
use tokio_util::sync::CancellationToken;

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
            rest_requests_per_client: 5,
            ws_load_subscribers: pick(args.ws_load_subscribers, 1000, 200),
            ws_load_writes: 200,
            latency_seconds: args.latency_seconds.unwrap_or(if q { 5.0 } else { 10.0 }),
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

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    note: String,
}

async fn raw_txn_rate(
    client: &Client,
    clients: usize,
    value_len: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let value = vec![b'x'; value_len];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let mut client = client.clone();
        let value = value.clone();
        tasks.spawn(async move {
            let mut keys = 0u64;
            let mut round = 0u64;
            while Instant::now() < deadline {
                let ops: Vec<TxnOp> = (0..128)
                    .map(|i| {
                        TxnOp::put(
                            format!("/bench/raw/{c}/{round}/{i}"),
                            value.clone(),
                            None::<PutOptions>,
                        )
                    })
                    .collect();
                client.txn(Txn::new().and_then(ops)).await?;
                keys += 128;
                round += 1;
            }
            anyhow::Ok(keys)
        });
    }
    let started = Instant::now();
    let mut total = 0;
    while let Some(result) = tasks.join_next().await {
        total += result??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn reset(client: &mut Client) -> anyhow::Result<()> {
    // In chunks: one delete of hundreds of MB exceeds etcd's own request timeout.
    loop {
        let keys = client
            .get(
                "/",
                Some(
                    etcd_client::GetOptions::new()
                        .with_from_key()
                        .with_keys_only()
                        .with_limit(5000),
                ),
            )
            .await?;
        let (Some(first), Some(last)) = (keys.kvs().first(), keys.kvs().last()) else {
            break;
        };
        let mut end = last.key().to_vec();
        end.push(0);
        client
            .delete(
                first.key(),
                Some(etcd_client::DeleteOptions::new().with_range(end)),
            )
            .await?;
    }
    let rev = client.get("/", None).await?.header().map_or(0, |h| h.revision());
    client.compact(rev, None).await?;
    client.defragment().await?;
    Ok(())
}

fn generated_csv(dir: &Path, rows: usize) -> anyhow::Result<(PathBuf, usize)> {
    generated_csv_named(dir, "bench.csv", rows)
}

fn generated_csv_named(dir: &Path, name: &str, rows: usize) -> anyhow::Result<(PathBuf, usize)> {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dcgm_sample.csv");
    let text = std::fs::read_to_string(&sample).with_context(|| format!("reading {}", sample.display()))?;
    let (header, body) = text.split_once('\n').context("sample has a header")?;
    let lines: Vec<&str> = body.lines().collect();
    let path = dir.join(name);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    writeln!(out, "{header}")?;
    for i in 0..rows {
        writeln!(out, "{}", lines[i % lines.len()])?;
    }
    out.flush()?;
    Ok((path, rows))
}

async fn streamer_rate(
    server: &EtcdServer,
    client: &Client,
    csv: &Path,
    workers: u32,
) -> anyhow::Result<(f64, u64)> {
    let vars = vec![
        ("ETCD_ENDPOINTS".to_string(), server.endpoint()),
        ("CSV_PATH".to_string(), csv.display().to_string()),
        ("RATE".to_string(), "0".to_string()),
        ("LOOP".to_string(), "false".to_string()),
        ("MAX_QUEUE_DEPTH".to_string(), "0".to_string()),
        ("WORKERS".to_string(), workers.to_string()),
        ("STREAM_ID".to_string(), format!("bench-{workers}")),
        ("PROGRESS_INTERVAL".to_string(), "1h".to_string()),
    ];
    let config = StreamerConfig::from_vars(vars, &Flags::default())?;
    let started = Instant::now();
    let totals = telemetry_streamer::run(config, client.clone(), CancellationToken::new()).await?;
    let secs = started.elapsed().as_secs_f64();
    Ok((totals.enqueued as f64 / secs, totals.enqueued))
}

/// Streamer workers in the end-to-end phase: etcd's throughput comes from many transactions in
/// flight, so the producer side runs as many as a real deployment would (e.g. 2 streamers x 8).
const E2E_WORKERS: usize = 16;

/// End to end: `collectors` collectors drain while a streamer of `E2E_WORKERS` workers enqueues; returns
/// messages per second from the streamer's start until the queue is empty and all are stored.
async fn e2e_rate(
    server: &EtcdServer,
    client: &Client,
    csv: &Path,
    collectors: usize,
) -> anyhow::Result<(f64, u64)> {
    let ns = format!("/e2e{collectors}");
    let keys = Keyspace::new(&ns);
    let mut running = Vec::new();
    for i in 0..collectors {
        let vars = vec![
            ("ETCD_ENDPOINTS".to_string(), server.endpoint()),
            ("ETCD_NAMESPACE".to_string(), ns.clone()),
            ("COLLECTOR_ID".to_string(), format!("bench-{i}")),
            ("LEASE_TTL".to_string(), "10s".to_string()),
        ];
        let config = telemetry_collector::CollectorConfig::from_vars(vars)?;
        let stop = CancellationToken::new();
        running.push((
            stop.clone(),
            tokio::spawn(telemetry_collector::run(config, client.clone(), stop)),
        ));
    }
    // Wait until the group owns all 32 partitions before timing.
    for _ in 0..400 {
        if count(client, &keys.owners_prefix()).await? == 32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let vars = vec![
        ("ETCD_ENDPOINTS".to_string(), server.endpoint()),
        ("ETCD_NAMESPACE".to_string(), ns.clone()),
        ("CSV_PATH".to_string(), csv.display().to_string()),
        ("RATE".to_string(), "0".to_string()),
        ("LOOP".to_string(), "false".to_string()),
        ("MAX_QUEUE_DEPTH".to_string(), "0".to_string()),
        ("WORKERS".to_string(), E2E_WORKERS.to_string()),
        ("STREAM_ID".to_string(), "e2e".to_string()),
        ("PROGRESS_INTERVAL".to_string(), "1h".to_string()),
    ];
    let config = StreamerConfig::from_vars(vars, &Flags::default())?;
    let started = Instant::now();
    let totals = telemetry_streamer::run(config, client.clone(), CancellationToken::new()).await?;
    let expected = i64::try_from(totals.enqueued)?;
    // Poll only the (small) queue while draining; a count over the growing data prefix would
    // itself load etcd and skew the figure. Once the queue is empty, check the data count.
    loop {
        if count(client, &keys.queue_prefix()).await? == 0
            && count(client, &keys.data_prefix()).await? >= expected
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let (mut processed, mut commits) = (0, 0);
    for (stop, task) in running {
        stop.cancel();
        let totals = task.await??;
        processed += totals.processed;
        commits += totals.commits;
    }
    eprintln!(
        "  {collectors} collector(s): {processed} records in {commits} commits ({:.1} per commit)",
        processed as f64 / commits.max(1) as f64
    );
    Ok((totals.enqueued as f64 / secs, totals.enqueued))
}

/// Mean encoded size of a sample message, so raw puts write values of the same size.
fn message_size() -> anyhow::Result<usize> {
    use telemetry_streamer::{
        source::{ColumnTypes, CsvSource, SourceItem},
        transform::MessageBuilder,
    };
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dcgm_sample.csv");
    let types = ColumnTypes::scan(&sample)?;
    let mut source = CsvSource::open(&sample)?;
    let mut builder = MessageBuilder::new(source.headers().to_vec(), types, &[]);
    let (mut bytes, mut n) = (0, 0);
    while let Some(item) = source.next_item()? {
        if let SourceItem::Row(row) = item {
            bytes += serde_json::to_vec(&builder.build("bench-0-w0", 0, row.row, &row.values).message)?.len();
            n += 1;
        }
    }
    Ok(bytes / n.max(1))
}

/// Gateway phases: query latency, WebSocket delivery latency, then the load test. Returns the
/// load test's failures (the rows are in the table either way).
async fn gateway_phases(
    server: &EtcdServer,
    client: &Client,
    plan: &Plan,
    table: &mut Vec<Row>,
) -> anyhow::Result<Vec<String>> {
    use telemetry_tests::gateway_bench as gw;
    let keys = Keyspace::new("/bench/gw");
    eprintln!(
        "gateway: storing {} points over {} GPUs ...",
        plan.points,
        gw::GPUS
    );
    let secs = gw::load_points(client, &keys, plan.points).await?;
    eprintln!("  stored in {secs:.1} s");
    let gateway = gw::Gateway::start(server, client, "/bench/gw", &[("WS_MAX_CONNECTIONS", "2000")]).await?;
    // Warm up connections and caches.
    gw::last_100_latency(&gateway.addr, 100, 1).await?;
    for clients in [1usize, 8] {
        eprintln!("gateway: last 100 points of one GPU, {clients} client(s) ...");
        let p = gw::last_100_latency(&gateway.addr, plan.requests, clients).await?;
        for (q, v) in [("p50", p.p50), ("p99", p.p99)] {
            table.push(Row {
                name: format!("gateway_last100_{clients}c_{q}"),
                value: v,
                unit: "ms",
                note: format!("{} requests, {} points stored", p.n, plan.points),
            });
        }
    }
    eprintln!(
        "gateway: WebSocket write-to-delivery, {} subscribers ...",
        plan.subscribers
    );
    let p = gw::ws_latency(
        &gateway.addr,
        client,
        &keys,
        plan.subscribers,
        plan.ws_writes,
        200.0,
    )
    .await?;
    for (q, v) in [("p50", p.p50), ("p99", p.p99)] {
        table.push(Row {
            name: format!("gateway_ws_delivery_{q}"),
            value: v,
            unit: "ms",
            note: format!(
                "{} subscribers x {} writes at 200/s",
                plan.subscribers, plan.ws_writes
            ),
        });
    }

    let mut failures = Vec::new();
    let (clients, per) = (plan.rest_clients, plan.rest_requests_per_client);
    eprintln!("gateway load: {clients} concurrent REST clients x {per} requests (last 100 points) ...");
    let rest = gw::rest_load(&gateway.addr, clients, per).await?;
    for (q, v) in [("p50", rest.latency.p50), ("p99", rest.latency.p99)] {
        table.push(Row {
            name: format!("gateway_load_rest_{clients}c_{q}"),
            value: v,
            unit: "ms",
            note: format!(
                "{} requests from {clients} concurrent clients, {} points stored",
                rest.latency.n, plan.points
            ),
        });
    }
    table.push(Row {
        name: format!("gateway_load_rest_{clients}c_rate"),
        value: (clients * per) as f64 / rest.seconds,
        unit: "req/s",
        note: format!("{} requests in {:.1} s", clients * per, rest.seconds),
    });
    table.push(Row {
        name: format!("gateway_load_rest_{clients}c_errors"),
        value: rest.errors.len() as f64,
        unit: "count",
        note: "failed requests (must be 0)".into(),
    });
    if !rest.errors.is_empty() {
        failures.push(format!(
            "{} of {} REST requests failed under load; the first: {}",
            rest.errors.len(),
            clients * per,
            rest.errors[0]
        ));
    }

    let (subs, writes) = (plan.ws_load_subscribers, plan.ws_load_writes);
    eprintln!("gateway load: {subs} WebSocket subscribers at once, {writes} writes at 200/s ...");
    let ws = gw::ws_deliveries(&gateway.addr, client, &keys, subs, writes, 200.0).await?;
    for (q, v) in [("p50", ws.latency.p50), ("p99", ws.latency.p99)] {
        table.push(Row {
            name: format!("gateway_load_ws_{subs}s_delivery_{q}"),
            value: v,
            unit: "ms",
            note: format!(
                "{} deliveries: {subs} subscribers x {writes} writes at 200/s",
                ws.latency.n
            ),
        });
    }
    table.push(Row {
        name: format!("gateway_load_ws_{subs}s_errors"),
        value: ws.errors.len() as f64,
        unit: "count",
        note: "failed subscriptions, broken sockets, missing deliveries (must be 0)".into(),
    });
    if !ws.errors.is_empty() {
        failures.push(format!(
            "{} WebSocket failure(s) with {subs} subscribers; the first: {}",
            ws.errors.len(),
            ws.errors[0]
        ));
    }
    gateway.stop().await?;
    Ok(failures)
}

fn print_table(table: &[Row]) {
    println!("{:<42} {:>12}  {:<7} note", "measure", "value", "unit");
    for row in table {
        let value = match row.unit {
            "ratio" | "ms" => format!("{:.2}", row.value),
            "MiB" => format!("{:.1}", row.value),
            _ => format!("{:.0}", row.value),
        };
        println!("{:<42} {:>12}  {:<7} {}", row.name, value, row.unit, row.note);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log = telemetry_shared::config::LogConfig::load().unwrap_or_else(|err| err.exit());
    let plan = Plan::new(&args);
    // Fail before any phase runs, not after minutes of them.
    pipeline_bench::ensure_open_files(plan.open_files_needed())?;
    let bin_dir = pipeline_bench::service_bin_dir()?;
    // Warnings from the services (e.g. a watch that keeps breaking) must be visible here.
    telemetry_shared::observe::init_tracing(&log);
    let value_len = message_size()?;
    eprintln!("starting a durable single-member etcd (fsync on) ...");
    let server = EtcdServer::start_with(EtcdOptions {
        quota_backend_bytes: Some(8 * 1024 * 1024 * 1024),
        ..EtcdOptions::default()
    })
    .await?;
    // Resetting between phases (delete all, compact, defragment a store of hundreds of MB) takes
    // longer than a service's request timeout: the bench's own client waits up to 5 minutes.
    let options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(300));
    let mut client = Client::connect([server.endpoint()], Some(options)).await?;
    let dir = tempfile::tempdir()?;
    let (csv, rows) = generated_csv(dir.path(), plan.rows)?;

    let mut table = Vec::new();
    if !args.gateway_only {
        let seconds = plan.seconds;
        eprintln!("raw etcd, 1 client, 128-put transactions of {value_len}-byte values ...");
        let raw1 = raw_txn_rate(&client, 1, value_len, seconds).await?;
        reset(&mut client).await?;
        eprintln!("raw etcd, 4 clients ...");
        let raw4 = raw_txn_rate(&client, 4, value_len, seconds).await?;
        reset(&mut client).await?;
        eprintln!("raw etcd, 16 clients ...");
        let raw16 = raw_txn_rate(&client, 16, value_len, seconds).await?;
        reset(&mut client).await?;
        eprintln!("raw etcd, serial single puts of {value_len}-byte values ...");
        let put1 = pipeline_bench::raw_put_rate(&client, 1, value_len, seconds).await?;
        reset(&mut client).await?;
        eprintln!("raw etcd, 64 concurrent single puts ...");
        let put64 = pipeline_bench::raw_put_rate(&client, 64, value_len, seconds).await?;
        reset(&mut client).await?;
        eprintln!("streamer, 1 worker, RATE=0, {rows} rows ...");
        let (s1, n1) = streamer_rate(&server, &client, &csv, 1).await?;
        reset(&mut client).await?;
        eprintln!("streamer, 4 workers, RATE=0, {rows} rows each ...");
        let (s4, n4) = streamer_rate(&server, &client, &csv, 4).await?;
        let e2e_rows = (rows / E2E_WORKERS).max(1);
        let (e2e_csv, _) = generated_csv_named(dir.path(), "e2e.csv", e2e_rows)?;
        let mut e2e = Vec::new();
        for collectors in [1, 2, 4] {
            reset(&mut client).await?;
            eprintln!(
                "end to end, {E2E_WORKERS} streamer workers x {e2e_rows} rows, {collectors} collector(s) ..."
            );
            e2e.push((
                collectors,
                e2e_rate(&server, &client, &e2e_csv, collectors).await?,
            ));
        }
        reset(&mut client).await?;
        let latency_rows = ((LATENCY_RATE * plan.latency_seconds) as usize).max(1);
        let (latency_csv, _) = generated_csv_named(dir.path(), "latency.csv", latency_rows)?;
        eprintln!(
            "enqueue to commit: {LATENCY_WORKERS} streamer workers x {latency_rows} rows at \
             {LATENCY_RATE}/s, {PHASE_COLLECTORS} collectors ..."
        );
        let latency = pipeline_bench::enqueue_to_commit(
            &server.endpoint(),
            &client,
            &latency_csv,
            LATENCY_WORKERS,
            LATENCY_RATE,
            PHASE_COLLECTORS,
        )
        .await?;
        reset(&mut client).await?;
        let rss_rows = (rows / RSS_WORKERS).max(1);
        let (rss_csv, _) = generated_csv_named(dir.path(), "rss.csv", rss_rows)?;
        eprintln!(
            "service RSS: processes from {}: streamer {RSS_WORKERS} workers x {rss_rows} rows, \
             {PHASE_COLLECTORS} collectors, gateway with {} subscribers ...",
            bin_dir.display(),
            plan.subscribers
        );
        let rss = pipeline_bench::service_rss(
            &server.endpoint(),
            &client,
            &bin_dir,
            &rss_csv,
            RSS_WORKERS,
            PHASE_COLLECTORS,
            plan.subscribers,
        )
        .await?;
        let raw_best = raw1.max(raw4).max(raw16);

        for (name, value) in [
            ("raw_128op_txn_1_client", raw1),
            ("raw_128op_txn_4_clients", raw4),
            ("raw_128op_txn_16_clients", raw16),
        ] {
            table.push(Row {
                name: name.into(),
                value,
                unit: "keys/s",
                note: format!("{value_len}-byte values"),
            });
        }
        table.push(Row {
            name: "raw_put_serial".into(),
            value: put1,
            unit: "keys/s",
            note: format!("1 client, one put at a time, {value_len}-byte values"),
        });
        table.push(Row {
            name: "raw_put_64_concurrent".into(),
            value: put64,
            unit: "keys/s",
            note: format!("64 tasks each putting in a loop, {value_len}-byte values"),
        });
        table.push(Row {
            name: "streamer_1_worker".into(),
            value: s1,
            unit: "msgs/s",
            note: format!("{n1} messages, 2 keys each"),
        });
        table.push(Row {
            name: "streamer_4_workers".into(),
            value: s4,
            unit: "msgs/s",
            note: format!("{n4} messages, 2 keys each"),
        });
        table.push(Row {
            name: "ratio_streamer_1w_keys_vs_raw_1_client".into(),
            value: s1 * 2.0 / raw1,
            unit: "ratio",
            note: "streamer msgs/s * 2 / raw keys/s".into(),
        });
        table.push(Row {
            name: "ratio_streamer_4w_keys_vs_raw_4_clients".into(),
            value: s4 * 2.0 / raw4,
            unit: "ratio",
            note: "streamer msgs/s * 2 / raw keys/s".into(),
        });

        for (collectors, (rate, n)) in &e2e {
            table.push(Row {
                name: format!(
                    "e2e_{collectors}_collector{}",
                    if *collectors == 1 { "" } else { "s" }
                ),
                value: *rate,
                unit: "msgs/s",
                note: format!("{n} messages, streamer {E2E_WORKERS} workers"),
            });
        }
        for (collectors, (rate, _)) in &e2e {
            table.push(Row {
                name: format!("ratio_e2e_{collectors}c_x4_vs_raw_best"),
                value: rate * 4.0 / raw_best,
                unit: "ratio",
                note: format!("e2e msgs/s * 4 / {raw_best:.0} raw 128-op keys/s (best of 1/4/16 clients)"),
            });
        }
        for (q, v) in [("p50", latency.p50), ("p99", latency.p99)] {
            table.push(Row {
                name: format!("e2e_enqueue_to_commit_{q}"),
                value: v,
                unit: "ms",
                note: format!(
                    "{} records, {LATENCY_WORKERS} workers x {LATENCY_RATE}/s, {PHASE_COLLECTORS} \
                     collectors; message timestamp to arrival of its data watch event (includes \
                     the watch delivery)",
                    latency.n
                ),
            });
        }
        let rss_note = format!(
            "peak RSS (VmHWM): {} msgs, streamer {RSS_WORKERS} workers RATE=0, {PHASE_COLLECTORS} \
             collectors, gateway with {} subscribers ({} received every record), stored in {:.1} s",
            rss.messages, plan.subscribers, rss.subscribers_complete, rss.seconds
        );
        for (name, value) in [
            ("rss_streamer_max", rss.streamer),
            (
                "rss_collector_max",
                rss.collectors.iter().copied().fold(0.0, f64::max),
            ),
            ("rss_gateway_max", rss.gateway),
        ] {
            table.push(Row {
                name: name.into(),
                value,
                unit: "MiB",
                note: rss_note.clone(),
            });
        }
    }
    reset(&mut client).await?;
    let failures = gateway_phases(&server, &client, &plan, &mut table).await?;
    print_table(&table);
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(&table)?)?;
    eprintln!("wrote {}", args.json.display());
    if !failures.is_empty() {
        anyhow::bail!("the gateway load test failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}
