//! The chaos run behind `scripts/chaos`: the real binaries on a 3-member etcd cluster, with
//! faults injected on a seeded schedule while data flows, then an audit of etcd.
//!
//! Faults: SIGKILL of a collector (restarted under a new id after a pause); SIGKILL of the
//! streamer (restarted with the same `STREAM_ID`); SIGKILL of the etcd leader (restarted
//! later); SIGSTOP of a collector for longer than its lease TTL, then SIGCONT; and a collector
//! cut off from etcd for longer than its TTL by a [`TcpProxy`] that holds its requests (they
//! arrive late, after its lease expired, so the fence in etcd must refuse its stale commits).
//!
//! The audit: every source row stored exactly once (or dead-lettered, for the rows made
//! invalid on purpose), the queue empty, no partition claim left after the collectors stop,
//! the gateway's stats equal to the audit, and at least one commit refused by the fence (a run
//! in which the fence never acted has not tested it).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use telemetry_harness::{EtcdCluster, EtcdOptions, ProxyMode, TcpProxy, free_port};
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
    /// Rounds of the five faults.
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

/// The five kinds of fault.
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
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::KillCollector,
        Fault::KillStreamer,
        Fault::KillLeader,
        Fault::StopCollector,
        Fault::CutCollector,
    ];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillCollector => "kill-collector",
            Fault::KillStreamer => "kill-streamer",
            Fault::KillLeader => "kill-etcd-leader",
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
fn generate_input(path: &Path, rows: usize) -> anyhow::Result<usize> {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dcgm_sample.csv");
    let text = std::fs::read_to_string(&sample).with_context(|| format!("reading {}", sample.display()))?;
    let (header, body) = text.split_once('\n').context("sample has a header")?;
    let lines: Vec<&str> = body.lines().collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "{header}")?;
    let mut dead = 0;
    for i in 0..rows {
        let line = lines[i % lines.len()];
        if i % DEAD_EVERY == DEAD_EVERY - 1 {
            // Fields are quoted; the 7th is Hostname. Blank it (only that field).
            let fields: Vec<&str> = line.splitn(8, "\",\"").collect();
            anyhow::ensure!(fields.len() == 8, "unexpected sample line shape");
            let mut blanked = fields.clone();
            blanked[6] = "";
            writeln!(out, "{}", blanked.join("\",\""))?;
            dead += 1;
        } else {
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    Ok(dead)
}

/// One service process slot: how to (re)start it and the running child.
struct Service {
    name: String,
    binary: PathBuf,
    env: Vec<(String, String)>,
    log_dir: PathBuf,
    incarnation: u32,
    child: Option<Child>,
    id_var: Option<&'static str>,
}

impl Service {
    fn start(&mut self) -> anyhow::Result<()> {
        self.incarnation += 1;
        let id = format!("{}-{}", self.name, self.incarnation);
        let log = std::fs::File::create(self.log_dir.join(format!("{id}.log")))?;
        let mut cmd = Command::new(&self.binary);
        cmd.env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if let Some(var) = self.id_var {
            cmd.env(var, &id);
        }
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", self.binary.display()))?,
        );
        Ok(())
    }

    fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, signal);
        }
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        self.kill9();
    }
}

async fn count(client: &etcd_client::Client, prefix: &str) -> i64 {
    telemetry_harness::count(client, prefix).await.unwrap_or(-1)
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
    report.expected_dead = generate_input(&input, opts.rows)?;
    for bin in ["telemetry-streamer", "telemetry-collector", "telemetry-gateway"] {
        anyhow::ensure!(
            opts.bin_dir.join(bin).is_file(),
            "{} is missing: build the services first (cargo build --release --bins)",
            opts.bin_dir.join(bin).display()
        );
    }

    let mut cluster = EtcdCluster::start(
        3,
        EtcdOptions {
            extra_args: vec!["--max-txn-ops".into(), "128".into()],
            ..EtcdOptions::fast()
        },
    )
    .await?;
    let client = cluster.client().await?;
    let keys = Keyspace::new(NS);
    let mut proxies = Vec::new();
    for endpoint in cluster.endpoints() {
        proxies.push(TcpProxy::start(endpoint.parse().context("member address")?).await?);
    }
    let direct = cluster.endpoints_env();
    let proxied: String = proxies
        .iter()
        .map(TcpProxy::endpoint)
        .collect::<Vec<_>>()
        .join(",");
    let common = |endpoints: &str| {
        vec![
            ("ETCD_ENDPOINTS".to_string(), endpoints.to_string()),
            ("ETCD_NAMESPACE".to_string(), NS.to_string()),
        ]
    };
    let rate = opts.rows as f64 / (opts.rounds as f64 * Fault::ALL.len() as f64 * opts.gap_s + 8.0);
    let mut streamer = Service {
        name: "streamer".into(),
        binary: opts.bin_dir.join("telemetry-streamer"),
        env: [
            common(&direct),
            vec![
                ("CSV_PATH".into(), input.display().to_string()),
                ("RATE".into(), format!("{rate:.1}")),
                ("LOOP".into(), "false".into()),
                ("STREAM_ID".into(), "chaos".into()),
                ("MAX_QUEUE_DEPTH".into(), "20000".into()),
            ],
        ]
        .concat(),
        log_dir: opts.work_dir.clone(),
        incarnation: 0,
        child: None,
        id_var: None,
    };
    let mut collectors: Vec<Service> = (1..=3)
        .map(|i| Service {
            name: format!("collector{i}"),
            binary: opts.bin_dir.join("telemetry-collector"),
            // The third reaches etcd only through the proxies, so it can be cut off.
            env: [
                common(if i == 3 { &proxied } else { &direct }),
                vec![("LEASE_TTL".into(), format!("{LEASE_TTL_S}s"))],
            ]
            .concat(),
            log_dir: opts.work_dir.clone(),
            incarnation: 0,
            child: None,
            id_var: Some("COLLECTOR_ID"),
        })
        .collect();
    let gateway_port = free_port()?;
    let mut gateway = Service {
        name: "gateway".into(),
        binary: opts.bin_dir.join("telemetry-gateway"),
        env: [
            common(&direct),
            vec![
                ("GATEWAY_HOST".into(), "127.0.0.1".into()),
                ("GATEWAY_PORT".into(), gateway_port.to_string()),
            ],
        ]
        .concat(),
        log_dir: opts.work_dir.clone(),
        incarnation: 0,
        child: None,
        id_var: None,
    };
    for c in &mut collectors {
        c.start()?;
    }
    gateway.start()?;
    streamer.start()?;
    report.schedule.push(format!(
        "{} rows at {rate:.0} rows/s; {} round(s) of faults, one every {:.0} s; lease TTL {LEASE_TTL_S} s",
        opts.rows, opts.rounds, opts.gap_s
    ));

    // The schedule: each round is the five faults in a seeded order.
    let ttl = Duration::from_secs(LEASE_TTL_S);
    let mut plan = Vec::new();
    for _ in 0..opts.rounds {
        let mut kinds = Fault::ALL.to_vec();
        for i in (1..kinds.len()).rev() {
            kinds.swap(i, rng.below(i + 1));
        }
        plan.extend(kinds);
    }
    let gap = Duration::from_secs_f64(opts.gap_s);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for fault in plan {
        let at = started.elapsed().as_secs_f64();
        let line = match fault {
            Fault::KillCollector => {
                let i = rng.below(3);
                collectors[i].kill9();
                tokio::time::sleep(Duration::from_secs(2)).await;
                collectors[i].start()?;
                format!("SIGKILL {}, restarted 2 s later", collectors[i].name)
            }
            Fault::KillStreamer => {
                if streamer.running() {
                    streamer.kill9();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    streamer.start()?;
                    "SIGKILL streamer, restarted 1 s later with the same STREAM_ID".to_string()
                } else {
                    "streamer already finished (no kill)".to_string()
                }
            }
            Fault::KillLeader => {
                let leader = cluster.leader().await?;
                cluster.kill(leader);
                tokio::time::sleep(Duration::from_secs(4)).await;
                cluster.restart(leader).await?;
                format!("SIGKILL etcd leader (member {leader}), restarted 4 s later")
            }
            Fault::StopCollector => {
                let i = rng.below(2);
                collectors[i].signal(Signal::SIGSTOP);
                tokio::time::sleep(ttl + Duration::from_secs(3)).await;
                collectors[i].signal(Signal::SIGCONT);
                format!(
                    "SIGSTOP {} for {} s (TTL {LEASE_TTL_S} s), then SIGCONT",
                    collectors[i].name,
                    LEASE_TTL_S + 3
                )
            }
            Fault::CutCollector => {
                for p in &proxies {
                    p.set(ProxyMode::StallRequests);
                }
                tokio::time::sleep(ttl + Duration::from_secs(3)).await;
                for p in &proxies {
                    p.set(ProxyMode::Pass);
                }
                format!(
                    "cut collector3's requests off from etcd for {} s (held, then delivered late)",
                    LEASE_TTL_S + 3
                )
            }
        };
        *report.faults.entry(fault.name()).or_default() += 1;
        report.schedule.push(format!("t+{at:.1}s {line}"));
        eprintln!("chaos: t+{at:.1}s {line}");
        tokio::time::sleep(gap).await;
    }

    // Let the streamer finish, however long a loaded machine makes that take, as long as
    // records keep landing; then drain.
    let mut last_progress = (count(&client, &keys.data_prefix()).await, Instant::now());
    loop {
        match streamer.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) if status.success() => break,
            Some(Ok(Some(status))) => {
                report.problems.push(format!("the streamer exited with {status}"));
                break;
            }
            _ => {}
        }
        let stored = count(&client, &keys.data_prefix()).await;
        if stored > last_progress.0 {
            last_progress = (stored, Instant::now());
        }
        anyhow::ensure!(
            last_progress.1.elapsed() < Duration::from_secs(180),
            "no record stored for 3 minutes while the streamer runs ({stored} stored)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stream_done = Instant::now();
    let expected_stored = (opts.rows - report.expected_dead) as i64;
    let drained = telemetry_harness::eventually(Duration::from_secs(300), || async {
        count(&client, &keys.queue_prefix()).await == 0
            && count(&client, &keys.data_prefix()).await + count(&client, &keys.deadletter_prefix()).await
                >= opts.rows as i64
    })
    .await;
    report.drain_s = stream_done.elapsed().as_secs_f64();
    if !drained {
        report.problems.push(format!(
            "not drained in 300 s: queue {}, data {}, expected {expected_stored}",
            count(&client, &keys.queue_prefix()).await,
            count(&client, &keys.data_prefix()).await
        ));
    }

    // The gateway's view, then a graceful stop of everything.
    let stats_url = format!("http://127.0.0.1:{gateway_port}/api/v1/stats");
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
    for (i, member) in cluster.members().iter_mut().enumerate() {
        if !member.is_running() {
            report
                .problems
                .push(format!("etcd member {i} was not running at the audit"));
        }
    }
    for c in &mut collectors {
        c.stop().await;
    }
    gateway.stop().await;

    // Audit.
    let records = telemetry_harness::stored_records(&client, &keys).await?;
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
    report.dead_letters = count(&client, &keys.deadletter_prefix()).await.max(0) as usize;
    let claims_gone = telemetry_harness::eventually(ttl * 3, || async {
        count(&client, &keys.owners_prefix()).await == 0
    })
    .await;
    if !claims_gone {
        report.problems.push(format!(
            "{} partition claims left after every collector stopped",
            count(&client, &keys.owners_prefix()).await
        ));
    }
    if count(&client, &keys.queue_prefix()).await != 0 {
        report.problems.push("the queue is not empty".into());
    }
    for dir_entry in std::fs::read_dir(&opts.work_dir)? {
        let path = dir_entry?.path();
        let is_collector_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("collector") && n.ends_with(".log"));
        if is_collector_log {
            let log = std::fs::read_to_string(&path)?;
            report.fence_refusals += log.matches("commit refused by the fence").count();
        }
    }
    if report.lost > 0 {
        report.problems.push(format!("{} rows lost", report.lost));
    }
    if report.duplicated > 0 {
        report.problems.push(format!("{} duplicates", report.duplicated));
    }
    if report.dead_letters != report.expected_dead {
        report.problems.push(format!(
            "{} dead letters, expected {}",
            report.dead_letters, report.expected_dead
        ));
    }
    if report.fence_refusals == 0 {
        report
            .problems
            .push("the fence never refused a commit: this run did not test it".into());
    }
    let stat = |name: &str| stats[name].as_u64().unwrap_or(u64::MAX);
    if stat("total_records") != report.stored as u64 || stat("queue_depth") != 0 {
        report.problems.push(format!(
            "gateway stats disagree with the audit: total_records {} vs {} stored, queue_depth {}",
            stat("total_records"),
            report.stored,
            stat("queue_depth")
        ));
    }
    if stat("dead_letters") != report.expected_dead as u64 {
        report.problems.push(format!(
            "gateway stats count {} dead letters, expected {}",
            stat("dead_letters"),
            report.expected_dead
        ));
    }
    report.total_s = started.elapsed().as_secs_f64();
    Ok(report)
}
