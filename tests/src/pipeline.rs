//! The whole pipeline started in process, the way zero2prod's `spawn_app()` starts its app:
//! a fresh etcd (or one given), collectors and a gateway run through the same public `run`
//! functions their binaries call, the gateway on a port-0 listener, all in one namespace. A test
//! then streams into it and asserts on what landed.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use telemetry_tests::Pipeline;
//! let pipeline = Pipeline::builder().collectors(2).gateway(true).start().await?;
//! pipeline.stream_sample().await;
//! pipeline.wait_drained(2470, Duration::from_secs(60)).await;
//! let stats = reqwest::get(format!("{}/api/v1/stats", pipeline.gateway_url())).await?;
//! pipeline.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Everything here is in process; tests about processes (signals, exit codes, memory) start
//! the binaries with [`telemetry_harness::ProcessSpec`].

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::Context as _;
use etcd_client::Client;
use telemetry_collector::{CollectorConfig, CollectorError};
use telemetry_gateway::{GatewayConfig, GatewayError};
use telemetry_harness::{Env, EtcdOptions, EtcdServer, Probe, sample};
use telemetry_shared::Keyspace;
use telemetry_streamer::{Flags, StreamerConfig, StreamerError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where the pipeline's etcd comes from.
enum Etcd {
    /// A fresh single member started with these options.
    Fresh(EtcdOptions),
    /// A server the caller started (and prepared); the pipeline owns it from now on.
    Owned(Box<EtcdServer>),
    /// An etcd the caller keeps, reached at `endpoints` through `client`.
    Shared { endpoints: String, client: Box<Client> },
}

/// Builds a [`Pipeline`]; see the module documentation.
pub struct PipelineBuilder {
    etcd: Etcd,
    namespace: String,
    collectors: usize,
    collector_prefix: String,
    collector_env: Vec<(String, String)>,
    gateway: Option<Vec<(String, String)>>,
}

impl PipelineBuilder {
    /// A fresh strict etcd ([`EtcdOptions::strict`]) per pipeline (the default).
    pub fn etcd_options(mut self, options: EtcdOptions) -> Self {
        self.etcd = Etcd::Fresh(options);
        self
    }

    /// Runs on `server`, which the pipeline owns (and drops last).
    pub fn etcd(mut self, server: EtcdServer) -> Self {
        self.etcd = Etcd::Owned(Box::new(server));
        self
    }

    /// Runs on an etcd the caller keeps: services connect to `endpoints` (comma-separated),
    /// in-process services share `client`.
    pub fn shared_etcd(mut self, endpoints: impl Into<String>, client: &Client) -> Self {
        self.etcd = Etcd::Shared {
            endpoints: endpoints.into(),
            client: Box::new(client.clone()),
        };
        self
    }

    /// The `ETCD_NAMESPACE` of every service (default `/p`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Collectors started with the pipeline (default 0), with ids `c0`, `c1`, ….
    pub fn collectors(mut self, n: usize) -> Self {
        self.collectors = n;
        self
    }

    /// Collector ids `{prefix}0`, `{prefix}1`, … instead of `c0`, `c1`, ….
    pub fn collector_ids(mut self, prefix: &str) -> Self {
        self.collector_prefix = prefix.into();
        self
    }

    /// Variables every collector gets on top of the defaults (`LEASE_TTL=3s`).
    pub fn collector_env(mut self, extra: &[(&str, &str)]) -> Self {
        self.collector_env
            .extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Serves the gateway (default off).
    pub fn gateway(mut self, on: bool) -> Self {
        self.gateway = on.then(|| self.gateway.take().unwrap_or_default());
        self
    }

    /// Serves the gateway with these variables on top of the defaults.
    pub fn gateway_env(mut self, extra: &[(&str, &str)]) -> Self {
        let mut vars = self.gateway.take().unwrap_or_default();
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.gateway = Some(vars);
        self
    }

    /// Starts etcd (unless given), the collectors and the gateway. Returns once the gateway's
    /// listener is bound; collectors claim partitions in the background (see
    /// [`Pipeline::wait_owned`]).
    pub async fn start(self) -> anyhow::Result<Pipeline> {
        let (server, endpoints, client) = match self.etcd {
            Etcd::Fresh(options) => {
                let server = EtcdServer::start_with(options).await?;
                let client = server.client().await?;
                let endpoint = server.endpoint();
                (Some(server), endpoint, client)
            }
            Etcd::Owned(server) => {
                let client = server.client().await?;
                let endpoint = server.endpoint();
                (Some(*server), endpoint, client)
            }
            Etcd::Shared { endpoints, client } => (None, endpoints, *client),
        };
        let collector_env = Env::new().with(&pairs(&self.collector_env));
        let mut pipeline = Pipeline {
            probe: Probe::new(&client, &self.namespace),
            keys: Keyspace::new(&self.namespace),
            namespace: self.namespace,
            endpoints,
            client,
            collector_env,
            collectors: Vec::new(),
            gateway: None,
            _etcd: server,
        };
        for i in 0..self.collectors {
            pipeline.add_collector(&format!("{}{i}", self.collector_prefix), &[])?;
        }
        if let Some(extra) = self.gateway {
            pipeline.gateway = Some(pipeline.start_gateway(&pairs(&extra)).await?);
        }
        Ok(pipeline)
    }
}

fn pairs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A collector running in process.
struct RunningCollector {
    id: String,
    stop: CancellationToken,
    task: JoinHandle<Result<telemetry_collector::Totals, CollectorError>>,
}

/// The gateway served in process.
struct RunningGateway {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), GatewayError>>,
}

/// A running pipeline; see the module documentation. Dropping it cancels its services;
/// [`Pipeline::shutdown`] also waits for them and reports how they ended.
pub struct Pipeline {
    namespace: String,
    keys: Keyspace,
    endpoints: String,
    client: Client,
    probe: Probe,
    collector_env: Env,
    collectors: Vec<RunningCollector>,
    gateway: Option<RunningGateway>,
    // Last: the services' tasks are cancelled before an owned etcd goes away.
    _etcd: Option<EtcdServer>,
}

/// How the collectors ended, in the order they were started.
#[derive(Debug, Default)]
pub struct Stopped {
    /// Each collector's id and totals.
    pub collectors: Vec<(String, telemetry_collector::Totals)>,
}

impl Stopped {
    /// Records processed by all collectors together.
    pub fn processed(&self) -> u64 {
        self.collectors.iter().map(|(_, t)| t.processed).sum()
    }

    /// Commits made by all collectors together.
    pub fn commits(&self) -> u64 {
        self.collectors.iter().map(|(_, t)| t.commits).sum()
    }
}

impl Pipeline {
    /// A builder: fresh strict etcd, namespace `/p`, no collectors, no gateway.
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder {
            etcd: Etcd::Fresh(EtcdOptions::strict()),
            namespace: "/p".into(),
            collectors: 0,
            collector_prefix: "c".into(),
            collector_env: Vec::new(),
            gateway: None,
        }
    }

    /// The client every in-process service shares.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The namespace's key layout.
    pub fn keys(&self) -> &Keyspace {
        &self.keys
    }

    /// `ETCD_NAMESPACE`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Reads what the pipeline stored.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// The etcd part of every service's environment: `ETCD_ENDPOINTS`, `ETCD_NAMESPACE`.
    pub fn env(&self) -> Env {
        Env::etcd(self.endpoints.clone(), &self.namespace)
    }

    /// The etcd the pipeline owns, if it owns one (to kill or restart it).
    pub fn etcd_server(&mut self) -> Option<&mut EtcdServer> {
        self._etcd.as_mut()
    }

    /// The gateway's address, `127.0.0.1:{port}`. Panics without a gateway.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway
            .as_ref()
            .expect("the pipeline serves no gateway")
            .addr
    }

    /// `http://127.0.0.1:{port}`. Panics without a gateway.
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.gateway_addr())
    }

    /// `ws://127.0.0.1:{port}`. Panics without a gateway.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.gateway_addr())
    }

    /// A one-shot streamer over the sample, as fast as it can and without backpressure
    /// (`MAX_QUEUE_DEPTH=0`), stream id `dcgm`. Change it with [`Env::set`].
    pub fn streamer_env(&self) -> Env {
        self.streamer_env_for(&sample::path(), sample::STREAM_ID)
    }

    /// Like [`streamer_env`](Self::streamer_env) over `csv` under `stream_id`.
    pub fn streamer_env_for(&self, csv: &Path, stream_id: &str) -> Env {
        self.env().streamer(csv, stream_id).set("MAX_QUEUE_DEPTH", 0)
    }

    /// Runs a streamer with `env` in process until it ends.
    pub async fn stream(&self, env: Env) -> anyhow::Result<telemetry_streamer::Totals> {
        let config = StreamerConfig::from_vars(env, &Flags::default())?;
        Ok(telemetry_streamer::run(config, self.client.clone(), CancellationToken::new()).await?)
    }

    /// Starts a streamer with `env` in process and returns its task.
    pub fn spawn_stream(
        &self,
        env: Env,
    ) -> anyhow::Result<JoinHandle<Result<telemetry_streamer::Totals, StreamerError>>> {
        let config = StreamerConfig::from_vars(env, &Flags::default())?;
        Ok(tokio::spawn(telemetry_streamer::run(
            config,
            self.client.clone(),
            CancellationToken::new(),
        )))
    }

    /// Streams the whole sample once ([`streamer_env`](Self::streamer_env)); panics unless
    /// every row is enqueued.
    pub async fn stream_sample(&self) -> telemetry_streamer::Totals {
        let totals = self.stream(self.streamer_env()).await.expect("the streamer runs");
        assert_eq!(totals.enqueued, sample::ROWS, "{totals:?}");
        totals
    }

    /// Starts one more collector, `id`, with the pipeline's collector variables and `extra`.
    pub fn add_collector(&mut self, id: &str, extra: &[(&str, &str)]) -> anyhow::Result<()> {
        let env = self
            .env()
            .collector(id)
            .with(&pairs(self.collector_env.vars()))
            .with(extra);
        let config = CollectorConfig::from_vars(env)?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(telemetry_collector::run(
            config,
            self.client.clone(),
            stop.clone(),
        ));
        self.collectors.push(RunningCollector {
            id: id.into(),
            stop,
            task,
        });
        Ok(())
    }

    async fn start_gateway(&self, extra: &[(&str, &str)]) -> anyhow::Result<RunningGateway> {
        let config = GatewayConfig::from_vars(self.env().with(extra))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(telemetry_gateway::run(
            config,
            listener,
            self.client.clone(),
            stop.clone(),
        ));
        Ok(RunningGateway { addr, stop, task })
    }

    /// Collectors whose task is still running (a collector that gave up has ended).
    pub fn running_collectors(&self) -> usize {
        self.collectors.iter().filter(|c| !c.task.is_finished()).count()
    }

    /// Waits until every queue partition has an owner (the collectors have settled).
    pub async fn wait_owned(&self, timeout: Duration) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.probe.all_partitions_owned(timeout).await,
            "the collectors did not own all partitions within {timeout:?}"
        );
        Ok(())
    }

    /// Waits until the queue is empty and at least `n` records are stored; panics with the
    /// counts after `timeout`.
    pub async fn wait_drained(&self, n: i64, timeout: Duration) {
        self.probe.wait_drained(n, timeout).await;
    }

    /// Stops the gateway (it must end cleanly within 10 s), then every collector, and reports
    /// how the collectors ended. A service that failed is an error.
    pub async fn shutdown(mut self) -> anyhow::Result<Stopped> {
        if let Some(gateway) = self.gateway.take() {
            gateway.stop.cancel();
            tokio::time::timeout(Duration::from_secs(10), gateway.task)
                .await
                .context("the gateway did not stop within 10 s")??
                .context("the gateway failed")?;
        }
        let mut stopped = Stopped::default();
        for collector in std::mem::take(&mut self.collectors) {
            collector.stop.cancel();
            let totals = collector
                .task
                .await?
                .with_context(|| format!("collector {} failed", collector.id))?;
            stopped.collectors.push((collector.id, totals));
        }
        Ok(stopped)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for collector in &self.collectors {
            collector.stop.cancel();
        }
        if let Some(gateway) = &self.gateway {
            gateway.stop.cancel();
        }
    }
}
