//! The chaos run behind `scripts/chaos`: the real binaries on a 3-member etcd cluster, with
//! faults injected on a seeded schedule while data flows, then an audit of etcd and of the
//! Prometheus two exporters (one active) write into.
//!
//! Faults: SIGKILL of a collector (restarted under a new id after a pause); SIGKILL of the
//! streamer (restarted with the same `STREAM_ID`); SIGKILL of the etcd leader (restarted
//! later); SIGSTOP of a collector for longer than its lease TTL, then SIGCONT; and a collector
//! cut off from etcd for longer than its TTL by a [`TcpProxy`] that holds its requests (they
//! arrive late, after its lease expired, so the fence in etcd must refuse its stale commits);
//! SIGKILL of an exporter (restarted later; the second exporter of its name, which reaches etcd
//! through the same proxies as the cut-off collector, stands by or takes over).
//!
//! The audit: every source row stored exactly once (or dead-lettered, for the rows made
//! invalid on purpose), the queue empty, no partition claim left after the collectors stop,
//! the gateway's stats equal to the audit, and at least one commit refused by the fence (a run
//! in which the fence never acted has not tested it), and in Prometheus every stored record's
//! sample exactly once: none missing, none extra.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::sys::signal::Signal;
use telemetry_harness::{
    Env, EtcdCluster, EtcdOptions, ProcessSpec, ProxyMode, ServiceProcess, TcpProxy, free_port, sample,
};
use telemetry_harness::{Tsdb, TsdbKind};
use telemetry_shared::Keyspace;

const NS: &str = "/chaos";
const LEASE_TTL_S: u64 = 3;
/// Every this many rows, one is made invalid (empty host name) so dead letters are expected.
const DEAD_EVERY: usize = 2000;

/// How to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Rows in the generated input.
    pub rows: usize,
    /// Rounds of the six faults.
    pub rounds: usize,
    /// Seconds between faults.
    pub gap_s: f64,
    /// Seed of the schedule.
    pub seed: u64,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// Where logs and the input go.
    pub work_dir: PathBuf,
}

/// The six kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL a collector, restart it later.
    KillCollector,
    /// SIGKILL the streamer, restart it with the same stream id.
    KillStreamer,
    /// SIGKILL the etcd leader, restart it later.
    KillLeader,
    /// SIGSTOP a collector past its lease TTL, then SIGCONT.
    StopCollector,
    /// Stall a collector's connections past its lease TTL, then let them flow.
    CutCollector,
    /// SIGKILL an exporter, restart it later.
    KillExporter,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::KillCollector,
        Fault::KillStreamer,
        Fault::KillLeader,
        Fault::StopCollector,
        Fault::CutCollector,
        Fault::KillExporter,
    ];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillCollector => "kill-collector",
            Fault::KillStreamer => "kill-streamer",
            Fault::KillLeader => "kill-etcd-leader",
            Fault::KillExporter => "kill-exporter",
            Fault::StopCollector => "sigstop-collector",
            Fault::CutCollector => "cut-collector",
        }
    }
}

/// What the run found.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    /// Seed used.
    pub seed: u64,
    /// Input rows.
    pub rows: usize,
    /// Rows made invalid on purpose.
    pub expected_dead: usize,
    /// Records stored.
    pub stored: usize,
    /// Valid rows not stored.
    pub lost: usize,
    /// Extra copies of stored rows.
    pub duplicated: usize,
    /// Dead letters found.
    pub dead_letters: usize,
    /// Records the exporters' checkpoint says landed in Prometheus.
    pub exported: u64,
    /// Samples of stored records missing from Prometheus.
    pub tsdb_missing: usize,
    /// Samples in Prometheus that no stored record accounts for (doubles included).
    pub tsdb_extra: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Commits the fence refused (from the collectors' logs).
    pub fence_refusals: usize,
    /// Seconds from the streamer's last exit to an empty queue.
    pub drain_s: f64,
    /// Seconds of the whole run.
    pub total_s: f64,
    /// The schedule as executed.
    pub schedule: Vec<String>,
    /// Everything that is wrong (empty for a pass).
    pub problems: Vec<String>,
}

impl ChaosReport {
    /// The table printed at the end.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "seed {}  (replay: scripts/chaos --seed {})",
            self.seed, self.seed
        );
        for line in &self.schedule {
            let _ = writeln!(out, "  {line}");
        }
        let _ = writeln!(out, "| measure | value |\n|---|---|");
        let _ = writeln!(out, "| rows | {} |", self.rows);
        for fault in Fault::ALL {
            let _ = writeln!(
                out,
                "| faults: {} | {} |",
                fault.name(),
                self.faults.get(fault.name()).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(out, "| stored | {} |", self.stored);
        let _ = writeln!(out, "| lost | {} |", self.lost);
        let _ = writeln!(out, "| duplicated | {} |", self.duplicated);
        let _ = writeln!(
            out,
            "| dead letters (expected) | {} ({}) |",
            self.dead_letters, self.expected_dead
        );
        let _ = writeln!(
            out,
            "| stale commits refused by the fence | {} |",
            self.fence_refusals
        );
        let _ = writeln!(out, "| exported to Prometheus | {} |", self.exported);
        let _ = writeln!(
            out,
            "| Prometheus samples missing / extra | {} / {} |",
            self.tsdb_missing, self.tsdb_extra
        );
        let _ = writeln!(out, "| drain time | {:.1} s |", self.drain_s);
        let _ = writeln!(out, "| total time | {:.1} s |", self.total_s);
        if self.problems.is_empty() {
            let _ = writeln!(out, "PASS");
        } else {
            for p in &self.problems {
                let _ = writeln!(out, "FAIL: {p}");
            }
        }
        out
    }
}

/// xorshift64*: a small seeded generator, so a schedule can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Writes the input: the DCGM sample repeated to `rows` rows, every [`DEAD_EVERY`]th with an
/// empty host name. Returns how many rows are invalid.
fn plant_input(path: &Path, rows: usize) -> anyhow::Result<usize> {
    let mut dead = 0;
    sample::write_repeated_with(path, rows, |i, line| {
        if i % DEAD_EVERY != DEAD_EVERY - 1 {
            return Ok(None);
        }
        // Fields are quoted; the 7th is Hostname. Blank it (only that field).
        let mut fields: Vec<&str> = line.splitn(8, "\",\"").collect();
        anyhow::ensure!(fields.len() == 8, "unexpected sample line shape");
        fields[6] = "";
        dead += 1;
        Ok(Some(fields.join("\",\"")))
    })?;
    Ok(dead)
}

fn check_binaries(bin_dir: &Path) -> anyhow::Result<()> {
    for bin in [
        "telemetry-streamer",
        "telemetry-collector",
        "telemetry-gateway",
        "telemetry-exporter",
    ] {
        anyhow::ensure!(
            bin_dir.join(bin).is_file(),
            "{} is missing: build the services first (cargo build --release --bins)",
            bin_dir.join(bin).display()
        );
    }
    Ok(())
}

/// One service process slot: how to (re)start it and the running process. Each start is a new
/// incarnation `{name}-{n}` with its own log file (and, for collectors, its own id).
struct Slot {
    name: String,
    spec: ProcessSpec,
    log_dir: PathBuf,
    incarnation: u32,
    id_var: Option<&'static str>,
    process: Option<ServiceProcess>,
}

impl Slot {
    fn new(name: String, binary: PathBuf, env: Env, log_dir: &Path, id_var: Option<&'static str>) -> Self {
        Slot {
            name,
            spec: ProcessSpec::new(binary).env(env),
            log_dir: log_dir.to_path_buf(),
            incarnation: 0,
            id_var,
            process: None,
        }
    }

    fn start(&mut self) -> anyhow::Result<()> {
        self.incarnation += 1;
        let id = format!("{}-{}", self.name, self.incarnation);
        let mut spec = self.spec.clone().log_file(self.log_dir.join(format!("{id}.log")));
        if let Some(var) = self.id_var {
            spec = spec.var(var, &id);
        }
        self.process = Some(spec.start()?);
        Ok(())
    }

    fn signal(&self, signal: Signal) {
        if let Some(process) = &self.process {
            let _ = process.signal(signal);
        }
    }

    fn running(&mut self) -> bool {
        self.process.as_mut().is_some_and(ServiceProcess::is_running)
    }

    fn kill9(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s.
    async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.stop(Duration::from_secs(10)).await;
        }
    }
}

async fn count(client: &etcd_client::Client, prefix: &str) -> i64 {
    telemetry_harness::count(client, prefix).await.unwrap_or(-1)
}

/// The etcd side: a 3-member cluster and a proxy in front of each member.
struct Cluster {
    etcd: EtcdCluster,
    client: etcd_client::Client,
    keys: Keyspace,
    proxies: Vec<TcpProxy>,
}

async fn start_cluster() -> anyhow::Result<Cluster> {
    let etcd = EtcdCluster::start(3, EtcdOptions::strict()).await?;
    let client = etcd.client().await?;
    let mut proxies = Vec::new();
    for endpoint in etcd.endpoints() {
        proxies.push(TcpProxy::start(endpoint.parse().context("member address")?).await?);
    }
    Ok(Cluster {
        etcd,
        client,
        keys: Keyspace::new(NS),
        proxies,
    })
}

/// The services: one streamer, three collectors (the third through the proxies), a gateway,
/// and two exporters of one name (the second through the proxies).
struct Services {
    streamer: Slot,
    collectors: Vec<Slot>,
    gateway: Slot,
    gateway_port: u16,
    exporters: Vec<Slot>,
}

/// The exporters' name.
const EXPORTER: &str = "chaos";

impl Services {
    fn start(
        cluster: &Cluster,
        opts: &ChaosOptions,
        input: &Path,
        rate: f64,
        write_url: &str,
    ) -> anyhow::Result<Self> {
        let direct = cluster.etcd.env(NS);
        let proxied = Env::etcd(
            cluster
                .proxies
                .iter()
                .map(TcpProxy::endpoint)
                .collect::<Vec<_>>()
                .join(","),
            NS,
        );
        let bin = |name: &str| opts.bin_dir.join(name);
        let streamer_env = direct
            .clone()
            .streamer(input, "chaos")
            .set("RATE", format!("{rate:.1}"))
            .set("MAX_QUEUE_DEPTH", 20_000);
        let collectors = (1..=3)
            .map(|i| {
                // The third reaches etcd only through the proxies, so it can be cut off.
                let env = if i == 3 { &proxied } else { &direct };
                let env = env.clone().set("LEASE_TTL", format!("{LEASE_TTL_S}s"));
                let name = format!("collector{i}");
                Slot::new(
                    name,
                    bin("telemetry-collector"),
                    env,
                    &opts.work_dir,
                    Some("COLLECTOR_ID"),
                )
            })
            .collect();
        let gateway_port = free_port()?;
        let gateway_env = direct.clone().gateway(gateway_port);
        let exporters = [&direct, &proxied]
            .into_iter()
            .enumerate()
            .map(|(i, env)| {
                let env = env
                    .clone()
                    .exporter(write_url, EXPORTER)
                    .set("LEASE_TTL", format!("{LEASE_TTL_S}s"));
                let name = format!("exporter{}", i + 1);
                Slot::new(
                    name,
                    bin("telemetry-exporter"),
                    env,
                    &opts.work_dir,
                    Some("EXPORTER_ID"),
                )
            })
            .collect();
        let mut services = Services {
            streamer: Slot::new(
                "streamer".into(),
                bin("telemetry-streamer"),
                streamer_env,
                &opts.work_dir,
                None,
            ),
            collectors,
            gateway: Slot::new(
                "gateway".into(),
                bin("telemetry-gateway"),
                gateway_env,
                &opts.work_dir,
                None,
            ),
            gateway_port,
            exporters,
        };
        for c in &mut services.collectors {
            c.start()?;
        }
        for e in &mut services.exporters {
            e.start()?;
        }
        services.gateway.start()?;
        services.streamer.start()?;
        Ok(services)
    }

    /// Collectors, gateway and exporters, gracefully (the streamer has ended by now).
    async fn stop(&mut self) {
        for c in &mut self.collectors {
            c.stop().await;
        }
        self.gateway.stop().await;
        for e in &mut self.exporters {
            e.stop().await;
        }
    }
}

/// Each round is the six faults in a seeded order.
fn schedule(rng: &mut Rng, rounds: usize) -> Vec<Fault> {
    let mut plan = Vec::new();
    for _ in 0..rounds {
        let mut kinds = Fault::ALL.to_vec();
        for i in (1..kinds.len()).rev() {
            kinds.swap(i, rng.below(i + 1));
        }
        plan.extend(kinds);
    }
    plan
}

/// Injects `plan`, one fault every `gap_s` seconds, each recorded in the report's schedule.
async fn run_faults(
    plan: Vec<Fault>,
    cluster: &mut Cluster,
    services: &mut Services,
    rng: &mut Rng,
    opts: &ChaosOptions,
    started: Instant,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    for fault in plan {
        let at = started.elapsed().as_secs_f64();
        let line = inject(fault, cluster, services, rng).await?;
        *report.faults.entry(fault.name()).or_default() += 1;
        report.schedule.push(format!("t+{at:.1}s {line}"));
        eprintln!("chaos: t+{at:.1}s {line}");
        tokio::time::sleep(Duration::from_secs_f64(opts.gap_s)).await;
    }
    Ok(())
}

/// Injects one fault and says what was done.
async fn inject(
    fault: Fault,
    cluster: &mut Cluster,
    services: &mut Services,
    rng: &mut Rng,
) -> anyhow::Result<String> {
    let ttl = Duration::from_secs(LEASE_TTL_S);
    match fault {
        Fault::KillCollector => {
            let c = &mut services.collectors[rng.below(3)];
            c.kill9();
            tokio::time::sleep(Duration::from_secs(2)).await;
            c.start()?;
            Ok(format!("SIGKILL {}, restarted 2 s later", c.name))
        }
        Fault::KillStreamer => {
            let streamer = &mut services.streamer;
            if !streamer.running() {
                return Ok("streamer already finished (no kill)".to_string());
            }
            streamer.kill9();
            tokio::time::sleep(Duration::from_secs(1)).await;
            streamer.start()?;
            Ok("SIGKILL streamer, restarted 1 s later with the same STREAM_ID".to_string())
        }
        Fault::KillLeader => {
            let leader = cluster.etcd.leader().await?;
            cluster.etcd.kill(leader);
            tokio::time::sleep(Duration::from_secs(4)).await;
            cluster.etcd.restart(leader).await?;
            Ok(format!(
                "SIGKILL etcd leader (member {leader}), restarted 4 s later"
            ))
        }
        Fault::StopCollector => {
            let c = &services.collectors[rng.below(2)];
            c.signal(Signal::SIGSTOP);
            tokio::time::sleep(ttl + Duration::from_secs(3)).await;
            c.signal(Signal::SIGCONT);
            let held = LEASE_TTL_S + 3;
            Ok(format!(
                "SIGSTOP {} for {held} s (TTL {LEASE_TTL_S} s), then SIGCONT",
                c.name
            ))
        }
        Fault::KillExporter => {
            let e = &mut services.exporters[rng.below(2)];
            e.kill9();
            tokio::time::sleep(Duration::from_secs(1)).await;
            e.start()?;
            Ok(format!("SIGKILL {}, restarted 1 s later", e.name))
        }
        Fault::CutCollector => {
            cluster
                .proxies
                .iter()
                .for_each(|p| p.set(ProxyMode::StallRequests));
            tokio::time::sleep(ttl + Duration::from_secs(3)).await;
            cluster.proxies.iter().for_each(|p| p.set(ProxyMode::Pass));
            let held = LEASE_TTL_S + 3;
            Ok(format!(
                "cut collector3's requests off from etcd for {held} s (held, then delivered late)"
            ))
        }
    }
}

/// Lets the streamer finish, however long a loaded machine makes that take, as long as records
/// keep landing.
async fn await_streamer(
    streamer: &mut Slot,
    cluster: &Cluster,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    let data = cluster.keys.data_prefix();
    let mut last_progress = (count(&cluster.client, &data).await, Instant::now());
    loop {
        match streamer.process.as_mut().and_then(ServiceProcess::try_status) {
            Some(status) if status.success() => return Ok(()),
            Some(status) => {
                report.problems.push(format!("the streamer exited with {status}"));
                return Ok(());
            }
            None => {}
        }
        let stored = count(&cluster.client, &data).await;
        if stored > last_progress.0 {
            last_progress = (stored, Instant::now());
        }
        anyhow::ensure!(
            last_progress.1.elapsed() < Duration::from_secs(180),
            "no record stored for 3 minutes while the streamer runs ({stored} stored)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (up to 300 s) for an empty queue and every row stored or dead-lettered.
async fn drain(cluster: &Cluster, opts: &ChaosOptions, report: &mut ChaosReport) {
    let (client, keys) = (&cluster.client, &cluster.keys);
    let stream_done = Instant::now();
    let expected_stored = (opts.rows - report.expected_dead) as i64;
    let drained = telemetry_harness::eventually(Duration::from_secs(300), || async {
        count(client, &keys.queue_prefix()).await == 0
            && count(client, &keys.data_prefix()).await + count(client, &keys.deadletter_prefix()).await
                >= opts.rows as i64
    })
    .await;
    report.drain_s = stream_done.elapsed().as_secs_f64();
    if !drained {
        report.problems.push(format!(
            "not drained in 300 s: queue {}, data {}, expected {expected_stored}",
            count(client, &keys.queue_prefix()).await,
            count(client, &keys.data_prefix()).await
        ));
    }
}

/// The gateway's `/api/v1/stats` (retried while it is not available yet).
async fn gateway_stats(port: u16) -> anyhow::Result<serde_json::Value> {
    let stats_url = format!("http://127.0.0.1:{port}/api/v1/stats");
    let mut stats = serde_json::Value::Null;
    for _ in 0..20 {
        let resp = reqwest::get(&stats_url).await.context("gateway stats")?;
        let ok = resp.status().is_success();
        stats = resp.json().await.context("gateway stats JSON")?;
        if ok {
            break;
        }
        eprintln!("chaos: gateway stats not available yet: {stats}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(stats)
}

/// Every member must be running at the audit (each killed leader was restarted).
fn check_members(cluster: &mut Cluster, report: &mut ChaosReport) {
    for (i, member) in cluster.etcd.members().iter_mut().enumerate() {
        if !member.is_running() {
            report
                .problems
                .push(format!("etcd member {i} was not running at the audit"));
        }
    }
}

/// Runs the whole scenario and audits it.
pub async fn run(opts: &ChaosOptions) -> anyhow::Result<ChaosReport> {
    let started = Instant::now();
    let mut report = ChaosReport {
        seed: opts.seed,
        rows: opts.rows,
        ..ChaosReport::default()
    };
    let mut rng = Rng(opts.seed.max(1));
    std::fs::create_dir_all(&opts.work_dir)?;
    let input = opts.work_dir.join("input.csv");
    report.expected_dead = plant_input(&input, opts.rows)?;
    check_binaries(&opts.bin_dir)?;
    let mut cluster = start_cluster().await?;
    let tsdb = Tsdb::start(TsdbKind::prometheus()).await?;
    let rate = opts.rows as f64 / (opts.rounds as f64 * Fault::ALL.len() as f64 * opts.gap_s + 8.0);
    let mut services = Services::start(&cluster, opts, &input, rate, &tsdb.write_url())?;
    report.schedule.push(format!(
        "{} rows at {rate:.0} rows/s; {} round(s) of faults, one every {:.0} s; lease TTL {LEASE_TTL_S} s",
        opts.rows, opts.rounds, opts.gap_s
    ));
    let plan = schedule(&mut rng, opts.rounds);
    run_faults(
        plan,
        &mut cluster,
        &mut services,
        &mut rng,
        opts,
        started,
        &mut report,
    )
    .await?;
    await_streamer(&mut services.streamer, &cluster, &mut report).await?;
    drain(&cluster, opts, &mut report).await;
    // The gateway's view, then a graceful stop of everything.
    let stats = gateway_stats(services.gateway_port).await?;
    check_members(&mut cluster, &mut report);
    let probe = telemetry_harness::Probe::new(&cluster.client, NS);
    let stored = telemetry_harness::count(&cluster.client, &cluster.keys.data_prefix()).await?;
    let exported = telemetry_harness::eventually(Duration::from_secs(120), || async {
        let cp = probe.export_checkpoint(EXPORTER).await;
        (cp.records + cp.rejected) as i64 >= stored
    })
    .await;
    if !exported {
        report.problems.push(format!(
            "the exporters did not export {stored} records in 120 s: {:?}",
            probe.export_checkpoint(EXPORTER).await
        ));
    }
    services.stop().await;
    audit(&cluster, opts, &stats, &mut report).await?;
    audit_export(&cluster, &tsdb, &probe, &mut report).await?;
    report.total_s = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The audit: every valid row stored once, the expected dead letters, no claims left, an empty
/// queue, the fence seen at work, and the gateway agreeing.
async fn audit(
    cluster: &Cluster,
    opts: &ChaosOptions,
    stats: &serde_json::Value,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    audit_records(cluster, opts, report).await?;
    audit_keys(cluster, report).await;
    report.fence_refusals = fence_refusals(&opts.work_dir)?;
    judge(stats, report);
    Ok(())
}

/// Counts stored, duplicated and lost rows, and dead letters.
async fn audit_records(
    cluster: &Cluster,
    opts: &ChaosOptions,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    let records = telemetry_harness::stored_records(&cluster.client, &cluster.keys).await?;
    let mut rows: HashMap<u64, usize> = HashMap::new();
    for (key, message) in &records {
        let source = message.source.clone().context("stored record without source")?;
        if source.stream_id != "chaos-w0" || source.pass != 0 {
            anyhow::bail!("stored record {key} has an unexpected source {source:?}");
        }
        *rows.entry(source.row).or_default() += 1;
    }
    report.stored = records.len();
    report.duplicated = rows.values().map(|n| n - 1).sum();
    report.lost = (1..=opts.rows as u64)
        .filter(|row| !(*row as usize).is_multiple_of(DEAD_EVERY) && !rows.contains_key(row))
        .count();
    report.dead_letters = count(&cluster.client, &cluster.keys.deadletter_prefix())
        .await
        .max(0) as usize;
    Ok(())
}

/// Prometheus must hold every stored record's sample once: the samples of the stored records
/// (two of one series and millisecond with one value are one sample) against every sample
/// read back.
/// A sample as compared: name, labels, timestamp (ms), value bits.
type SampleId = (String, Vec<(String, String)>, i64, u64);

async fn audit_export(
    cluster: &Cluster,
    tsdb: &Tsdb,
    probe: &telemetry_harness::Probe,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    let checkpoint = probe.export_checkpoint(EXPORTER).await;
    report.exported = checkpoint.records;
    if checkpoint.rejected > 0 {
        report
            .problems
            .push(format!("the exporters rejected {} records", checkpoint.rejected));
    }
    let records = telemetry_harness::stored_records(&cluster.client, &cluster.keys).await?;
    let mut expected: Vec<SampleId> = telemetry_harness::expected_samples(records.values())
        .into_iter()
        .map(|s| (s.name, s.labels, s.timestamp_ms, s.value.to_bits()))
        .collect();
    expected.sort();
    let time = chrono::Utc::now().timestamp_millis() as f64 / 1000.0 + 60.0;
    let mut got: Vec<SampleId> = tsdb
        .samples(".+", "6h", time)
        .await?
        .into_iter()
        .map(|s| (s.name, s.labels, s.timestamp_ms, s.value.to_bits()))
        .collect();
    got.sort();
    let expected_set: std::collections::HashSet<_> = expected.iter().collect();
    let got_set: std::collections::HashSet<_> = got.iter().collect();
    report.tsdb_missing = expected.iter().filter(|e| !got_set.contains(e)).count();
    report.tsdb_extra =
        got.len() - got.iter().filter(|g| expected_set.contains(g)).count() + (got.len() - got_set.len());
    if report.tsdb_missing > 0 || report.tsdb_extra > 0 {
        report.problems.push(format!(
            "Prometheus: {} samples of stored records missing, {} extra ({} expected, {} read)",
            report.tsdb_missing,
            report.tsdb_extra,
            expected.len(),
            got.len()
        ));
    }
    Ok(())
}

/// No partition claim may outlive the collectors, and the queue must be empty.
async fn audit_keys(cluster: &Cluster, report: &mut ChaosReport) {
    let (client, keys) = (&cluster.client, &cluster.keys);
    let ttl = Duration::from_secs(LEASE_TTL_S);
    let claims_gone = telemetry_harness::eventually(ttl * 3, || async {
        count(client, &keys.owners_prefix()).await == 0
    })
    .await;
    if !claims_gone {
        report.problems.push(format!(
            "{} partition claims left after every collector stopped",
            count(client, &keys.owners_prefix()).await
        ));
    }
    if count(client, &keys.queue_prefix()).await != 0 {
        report.problems.push("the queue is not empty".into());
    }
}

/// Commits refused by the fence, from every collector incarnation's log.
fn fence_refusals(work_dir: &Path) -> anyhow::Result<usize> {
    let mut refusals = 0;
    for dir_entry in std::fs::read_dir(work_dir)? {
        let path = dir_entry?.path();
        let is_collector_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("collector") && n.ends_with(".log"));
        if is_collector_log {
            let log = std::fs::read_to_string(&path)?;
            refusals += log.matches("commit refused by the fence").count();
        }
    }
    Ok(refusals)
}

/// Turns the counts into problems.
fn judge(stats: &serde_json::Value, report: &mut ChaosReport) {
    let mut problems = Vec::new();
    if report.lost > 0 {
        problems.push(format!("{} rows lost", report.lost));
    }
    if report.duplicated > 0 {
        problems.push(format!("{} duplicates", report.duplicated));
    }
    if report.dead_letters != report.expected_dead {
        problems.push(format!(
            "{} dead letters, expected {}",
            report.dead_letters, report.expected_dead
        ));
    }
    if report.fence_refusals == 0 {
        problems.push("the fence never refused a commit: this run did not test it".into());
    }
    let stat = |name: &str| stats[name].as_u64().unwrap_or(u64::MAX);
    if stat("total_records") != report.stored as u64 || stat("queue_depth") != 0 {
        problems.push(format!(
            "gateway stats disagree with the audit: total_records {} vs {} stored, queue_depth {}",
            stat("total_records"),
            report.stored,
            stat("queue_depth")
        ));
    }
    if stat("dead_letters") != report.expected_dead as u64 {
        problems.push(format!(
            "gateway stats count {} dead letters, expected {}",
            stat("dead_letters"),
            report.expected_dead
        ));
    }
    report.problems.extend(problems);
}
