//! etcd members and clusters on loopback, and reads of what they hold.
//!
//! [`EtcdServer`] starts one member on free loopback ports with a temporary data dir, waits
//! until it answers, and kills it and removes the dir when dropped. [`EtcdCluster`] starts a
//! cluster of any size whose members can be killed, paused and restarted, for leader-failure
//! tests. Nothing here mocks etcd: it runs the real binary, which is, in order: `$ETCD_BIN`; the
//! etcd 3.7.2 vendored by the `etcd-bin-vendored` crate; an `etcd` on `PATH`.

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::{CertFiles, Env, HarnessError, TestPki, free_port, io};

/// Finds the etcd binary: `$ETCD_BIN`, then the vendored one, then `etcd` on `PATH`.
pub fn etcd_binary() -> Result<PathBuf, HarnessError> {
    if let Some(path) = std::env::var_os("ETCD_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    if let Ok(path) = etcd_bin_vendored::etcd_bin_path()
        && path.exists()
    {
        return Ok(path.to_path_buf());
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("etcd"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or(HarnessError::NoBinary)
}

/// How to run the members.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Skip fsync (`--unsafe-no-fsync`): much faster on slow disks, loses durability across a
    /// machine crash. Fine for tests that kill services, not for tests that kill etcd itself.
    pub unsafe_no_fsync: bool,
    /// Backend quota in bytes (`--quota-backend-bytes`), if not etcd's default of 2 GiB.
    pub quota_backend_bytes: Option<u64>,
    /// Extra command-line flags.
    pub extra_args: Vec<String>,
    /// How long to wait for the member(s) to become healthy.
    pub start_timeout: Duration,
    /// Serve clients over TLS (`https://`) with certificates of a test PKI.
    pub tls: Option<EtcdTls>,
    /// `--auth-token`, e.g. `simple` (etcd's default) or `jwt,...`.
    pub auth_token: Option<String>,
    /// `--auth-token-ttl` in seconds: how long an unused simple token lives (etcd's default 300).
    pub auth_token_ttl: Option<u64>,
}

/// TLS for the client port of every member.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA that signs the server certificate and is trusted for client certificates
    /// (`--trusted-ca-file`).
    pub pki: TestPki,
    /// `--client-cert-auth`: every client must present a certificate the CA signed.
    pub client_cert_auth: bool,
}

/// The harness' own client identity: etcd takes the CN of a certificate as the user when no
/// password is sent, so with authentication on the harness reads and waits as `root`, with no
/// token to expire.
pub const HARNESS_CLIENT_CN: &str = "root";

/// The CN of the client certificate services get in [`EtcdCluster::env`]: no etcd user has this
/// name, so a service without `ETCD_USERNAME` is refused everything once authentication is on.
pub const SERVICE_CLIENT_CN: &str = "telemetry-service";

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            unsafe_no_fsync: false,
            quota_backend_bytes: None,
            extra_args: Vec::new(),
            start_timeout: Duration::from_secs(30),
            tls: None,
            auth_token: None,
            auth_token_ttl: None,
        }
    }
}

impl EtcdOptions {
    /// Options for fast tests: no fsync.
    pub fn fast() -> Self {
        EtcdOptions {
            unsafe_no_fsync: true,
            ..Self::default()
        }
    }

    /// Options for service tests: no fsync, and `--max-txn-ops 128`. That is etcd's default,
    /// stated so that any transaction over the limit fails the test that makes it.
    pub fn strict() -> Self {
        EtcdOptions {
            extra_args: vec!["--max-txn-ops".into(), "128".into()],
            ..Self::fast()
        }
    }

    /// These options with clients served over TLS by certificates of `pki`, and with
    /// `--client-cert-auth` if `client_cert_auth`.
    pub fn with_tls(mut self, pki: &TestPki, client_cert_auth: bool) -> Self {
        self.tls = Some(EtcdTls {
            pki: pki.clone(),
            client_cert_auth,
        });
        self
    }

    /// These options with simple auth tokens that expire after `ttl_secs` unused.
    pub fn with_token_ttl(mut self, ttl_secs: u64) -> Self {
        self.auth_token = Some("simple".into());
        self.auth_token_ttl = Some(ttl_secs);
        self
    }
}

/// The files of a TLS cluster: the server's certificate and the two client identities.
#[derive(Debug, Clone)]
struct ClusterTls {
    ca_file: PathBuf,
    server: CertFiles,
    client_cert_auth: bool,
    /// CN [`HARNESS_CLIENT_CN`]: the harness' own clients.
    harness: CertFiles,
    /// CN [`SERVICE_CLIENT_CN`]: what [`EtcdCluster::env`] hands services.
    service: CertFiles,
}

impl ClusterTls {
    fn new(tls: &EtcdTls) -> Result<Self, HarnessError> {
        Ok(ClusterTls {
            ca_file: tls.pki.ca_file(),
            server: tls.pki.server()?,
            client_cert_auth: tls.client_cert_auth,
            harness: tls.pki.client(HARNESS_CLIENT_CN)?,
            service: tls.pki.client(SERVICE_CLIENT_CN)?,
        })
    }

    /// The harness' TLS options (its own identity, root).
    fn options(&self) -> Result<TlsOptions, HarnessError> {
        let read = |path: &Path| std::fs::read(path).map_err(io(format!("reading {}", path.display())));
        Ok(TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca_file)?))
            .identity(Identity::from_pem(
                read(&self.harness.cert)?,
                read(&self.harness.key)?,
            )))
    }
}

/// One member's fixed identity: name, ports, data dir. Kept across restarts.
#[derive(Debug, Clone)]
struct MemberSpec {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    tls: bool,
}

impl MemberSpec {
    fn client_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A running (or stopped) etcd member process.
#[derive(Debug)]
pub struct Member {
    spec: MemberSpec,
    child: Option<Child>,
}

impl Member {
    /// The member's client endpoint, `127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.spec.client_port)
    }

    /// The member's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The OS process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Is the process running (started and not exited)?
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILLs the member and waits for it to exit. Its data dir is kept for a restart.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOPs the member (it stops answering but keeps its sockets).
    pub fn pause(&self) -> Result<(), HarnessError> {
        self.signal(nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGCONTs a paused member.
    pub fn resume(&self) -> Result<(), HarnessError> {
        self.signal(nix::sys::signal::Signal::SIGCONT)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> Result<(), HarnessError> {
        let pid = self.pid().ok_or_else(|| HarnessError::Io {
            context: format!("signalling {}", self.spec.name),
            source: std::io::Error::other("member is not running"),
        })?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        nix::sys::signal::kill(pid, signal).map_err(|e| HarnessError::Io {
            context: format!("signalling {}", self.spec.name),
            source: std::io::Error::from(e),
        })
    }

    fn log_tail(&self) -> String {
        log_tail(&self.spec.log_path)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The arguments of one member start.
struct Spawn<'a> {
    binary: &'a Path,
    initial_cluster: &'a str,
    cluster_token: &'a str,
    options: &'a EtcdOptions,
    tls: Option<&'a ClusterTls>,
}

fn spawn_member(spawn: &Spawn<'_>, spec: &MemberSpec, state: &str) -> Result<Child, HarnessError> {
    let Spawn {
        binary,
        initial_cluster,
        cluster_token,
        options,
        tls,
    } = *spawn;
    std::fs::create_dir_all(&spec.data_dir).map_err(io("creating the etcd data dir"))?;
    let log = File::options()
        .create(true)
        .append(true)
        .open(&spec.log_path)
        .map_err(io("opening the etcd log"))?;
    let log_err = log.try_clone().map_err(io("opening the etcd log"))?;
    let mut cmd = Command::new(binary);
    cmd.arg("--name")
        .arg(&spec.name)
        .arg("--data-dir")
        .arg(&spec.data_dir)
        .arg("--listen-client-urls")
        .arg(spec.client_url())
        .arg("--advertise-client-urls")
        .arg(spec.client_url())
        .arg("--listen-peer-urls")
        .arg(spec.peer_url())
        .arg("--initial-advertise-peer-urls")
        .arg(spec.peer_url())
        .arg("--initial-cluster")
        .arg(initial_cluster)
        .arg("--initial-cluster-token")
        .arg(cluster_token)
        .arg("--initial-cluster-state")
        .arg(state)
        .arg("--log-level")
        .arg("warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    if options.unsafe_no_fsync {
        cmd.arg("--unsafe-no-fsync");
    }
    if let Some(bytes) = options.quota_backend_bytes {
        cmd.arg("--quota-backend-bytes").arg(bytes.to_string());
    }
    if let Some(tls) = tls {
        cmd.arg("--cert-file")
            .arg(&tls.server.cert)
            .arg("--key-file")
            .arg(&tls.server.key)
            .arg("--trusted-ca-file")
            .arg(&tls.ca_file);
        if tls.client_cert_auth {
            cmd.arg("--client-cert-auth");
        }
    }
    if let Some(token) = &options.auth_token {
        cmd.arg("--auth-token").arg(token);
    }
    if let Some(ttl) = options.auth_token_ttl {
        cmd.arg("--auth-token-ttl").arg(ttl.to_string());
    }
    cmd.args(&options.extra_args);
    cmd.spawn().map_err(io(format!(
        "starting {} (ETCD_BIN overrides it)",
        binary.display()
    )))
}

async fn connect_to(endpoints: &[String], tls: Option<&ClusterTls>) -> Result<Client, HarnessError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        options = options.with_tls(tls.options()?);
    }
    Ok(Client::connect(endpoints, Some(options)).await?)
}

/// A cluster of etcd members on loopback, each with its own ports and data dir below one
/// temporary directory (removed on drop, after the members are killed).
#[derive(Debug)]
pub struct EtcdCluster {
    binary: PathBuf,
    options: EtcdOptions,
    initial_cluster: String,
    token: String,
    tls: Option<ClusterTls>,
    members: Vec<Member>,
    // Declared last: dropped after the members, so processes die before their dir is removed.
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster has a leader and every member answers.
    /// Retries with new ports if a port was taken in between (tests run in parallel).
    pub async fn start(size: usize, options: EtcdOptions) -> Result<Self, HarnessError> {
        let mut last_err = None;
        for _ in 0..3 {
            match Self::try_start(size, options.clone()).await {
                Ok(cluster) => return Ok(cluster),
                Err(err) => last_err = Some(err),
            }
        }
        Err(last_err.unwrap_or(HarnessError::NoBinary))
    }

    async fn try_start(size: usize, options: EtcdOptions) -> Result<Self, HarnessError> {
        let binary = etcd_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("telemetry-etcd-")
            .tempdir()
            .map_err(io("creating a temporary dir"))?;
        let mut specs = Vec::with_capacity(size);
        for i in 0..size {
            let name = format!("m{i}");
            specs.push(MemberSpec {
                data_dir: dir.path().join(format!("{name}.etcd")),
                log_path: dir.path().join(format!("{name}.log")),
                name,
                client_port: free_port()?,
                peer_port: free_port()?,
                tls: options.tls.is_some(),
            });
        }
        let initial_cluster = specs
            .iter()
            .map(|s| format!("{}={}", s.name, s.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "telemetry-{}-{}",
            std::process::id(),
            dir.path().file_name().and_then(|n| n.to_str()).unwrap_or("x")
        );
        let tls = options.tls.as_ref().map(ClusterTls::new).transpose()?;
        let mut members = Vec::with_capacity(size);
        let spawn = Spawn {
            binary: &binary,
            initial_cluster: &initial_cluster,
            cluster_token: &token,
            options: &options,
            tls: tls.as_ref(),
        };
        for spec in specs {
            let child = spawn_member(&spawn, &spec, "new")?;
            members.push(Member {
                spec,
                child: Some(child),
            });
        }
        let mut cluster = EtcdCluster {
            binary,
            options,
            initial_cluster,
            token,
            tls,
            members,
            _dir: dir,
        };
        let indices: Vec<usize> = (0..size).collect();
        cluster.wait_healthy(&indices).await?;
        Ok(cluster)
    }

    async fn wait_healthy(&mut self, indices: &[usize]) -> Result<(), HarnessError> {
        let deadline = Instant::now() + self.options.start_timeout;
        for &i in indices {
            loop {
                let member = &mut self.members[i];
                if !member.is_running() {
                    return Err(HarnessError::NotHealthy {
                        name: member.spec.name.clone(),
                        reason: "the process exited".into(),
                        log_tail: member.log_tail(),
                    });
                }
                let endpoint = vec![member.endpoint()];
                let healthy = match connect_to(&endpoint, self.tls.as_ref()).await {
                    // A member answers status once it has joined; a KV read also needs a leader.
                    Ok(mut client) => {
                        client.status().await.is_ok() && client.get("health", None).await.is_ok()
                    }
                    Err(_) => false,
                };
                if healthy {
                    break;
                }
                if Instant::now() > deadline {
                    let member = &self.members[i];
                    return Err(HarnessError::NotHealthy {
                        name: member.spec.name.clone(),
                        reason: format!("not healthy after {:?}", self.options.start_timeout),
                        log_tail: member.log_tail(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Client endpoints of all members (running or not), `127.0.0.1:port`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Client endpoints joined with commas, as `ETCD_ENDPOINTS` takes them.
    pub fn endpoints_env(&self) -> String {
        self.endpoints().join(",")
    }

    /// A client connected to every member (over TLS as `root` by its certificate's CN, on a
    /// TLS cluster).
    pub async fn client(&self) -> Result<Client, HarnessError> {
        connect_to(&self.endpoints(), self.tls.as_ref()).await
    }

    /// The environment of a service using this cluster under `namespace`:
    /// `ETCD_ENDPOINTS` (every member) and `ETCD_NAMESPACE`; on a TLS cluster also
    /// `ETCD_CA_FILE`, and with `--client-cert-auth` a client certificate (CN
    /// [`SERVICE_CLIENT_CN`]) in `ETCD_CERT_FILE` and `ETCD_KEY_FILE`.
    pub fn env(&self, namespace: &str) -> Env {
        let env = Env::etcd(self.endpoints_env(), namespace);
        match &self.tls {
            None => env,
            Some(tls) => env.etcd_tls(&tls.ca_file, tls.client_cert_auth.then_some(&tls.service)),
        }
    }

    /// The members, for killing, pausing and inspecting.
    pub fn members(&mut self) -> &mut [Member] {
        &mut self.members
    }

    /// Index of the current leader, asking each running member.
    pub async fn leader(&mut self) -> Result<usize, HarnessError> {
        for i in 0..self.members.len() {
            if !self.members[i].is_running() {
                continue;
            }
            let Ok(mut client) = connect_to(&[self.members[i].endpoint()], self.tls.as_ref()).await else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            if status.leader() != 0 && status.leader() == status.header().map_or(0, |h| h.member_id()) {
                return Ok(i);
            }
        }
        Err(HarnessError::NoLeader)
    }

    /// SIGKILLs member `i` (its data is kept).
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Restarts a killed member with its data and ports, and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) -> Result<(), HarnessError> {
        self.members[i].kill();
        let spec = self.members[i].spec.clone();
        let spawn = Spawn {
            binary: &self.binary,
            initial_cluster: &self.initial_cluster,
            cluster_token: &self.token,
            options: &self.options,
            tls: self.tls.as_ref(),
        };
        let child = spawn_member(&spawn, &spec, "existing")?;
        self.members[i].child = Some(child);
        self.wait_healthy(&[i]).await
    }
}

/// A single-member etcd: the common case for tests.
#[derive(Debug)]
pub struct EtcdServer {
    cluster: EtcdCluster,
}

impl EtcdServer {
    /// Starts one member with default (durable) options.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(EtcdOptions::default()).await
    }

    /// Starts one member with the given options.
    pub async fn start_with(options: EtcdOptions) -> Result<Self, HarnessError> {
        Ok(EtcdServer {
            cluster: EtcdCluster::start(1, options).await?,
        })
    }

    /// The client endpoint, `127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        self.cluster.members[0].endpoint()
    }

    /// A client connected to it.
    pub async fn client(&self) -> Result<Client, HarnessError> {
        self.cluster.client().await
    }

    /// The environment of a service using this server under `namespace`: `ETCD_ENDPOINTS`,
    /// `ETCD_NAMESPACE` and on TLS the files of [`EtcdCluster::env`].
    pub fn env(&self, namespace: &str) -> Env {
        self.cluster.env(namespace)
    }

    /// The member, for killing and pausing.
    pub fn member(&mut self) -> &mut Member {
        &mut self.cluster.members[0]
    }

    /// Restarts a killed server with its data.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.cluster.restart(0).await
    }
}

/// Every key/value under `prefix`, read in pages at one revision (a single range over a large
/// prefix can exceed gRPC's 4 MiB message limit).
pub async fn range_all(client: &Client, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, HarnessError> {
    match telemetry_shared::etcd::range_prefix(client, prefix, 1000).await {
        Ok((entries, _)) => Ok(entries),
        Err(telemetry_shared::etcd::EtcdError::Client(err)) => Err(HarnessError::Client(err)),
        Err(other) => Err(HarnessError::Io {
            context: format!("ranging over {prefix}"),
            source: std::io::Error::other(other.to_string()),
        }),
    }
}

/// Number of keys under `prefix` (count-only range).
pub async fn count(client: &Client, prefix: &str) -> Result<i64, HarnessError> {
    let options = etcd_client::GetOptions::new().with_prefix().with_count_only();
    Ok(client.clone().get(prefix, Some(options)).await?.count())
}

/// An etcd for service tests: one member with [`EtcdOptions::strict`] (no fsync,
/// `--max-txn-ops 128`). Returns the server and a connected client.
pub async fn strict_etcd() -> Result<(EtcdServer, Client), HarnessError> {
    let server = EtcdServer::start_with(EtcdOptions::strict()).await?;
    let client = server.client().await?;
    Ok((server, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn single_member_starts_serves_and_cleans_up() {
        let server = EtcdServer::start_with(EtcdOptions::fast())
            .await
            .expect("etcd starts");
        let mut client = server.client().await.expect("connects");
        client.put("k", "v", None).await.expect("put");
        let got = client.get("k", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"v");
        let dir = server.cluster._dir.path().to_path_buf();
        drop(client);
        drop(server);
        assert!(!dir.exists(), "data dir removed on drop");
    }

    #[tokio::test]
    async fn cluster_survives_leader_kill_and_restart() {
        let mut cluster = EtcdCluster::start(3, EtcdOptions::fast())
            .await
            .expect("cluster starts");
        let mut client = cluster.client().await.expect("connects");
        client.put("a", "1", None).await.expect("put");
        let leader = cluster.leader().await.expect("has a leader");
        cluster.kill(leader);
        // The remaining two elect a new leader and keep serving writes.
        let mut ok = false;
        for _ in 0..100 {
            if client.put("b", "2", None).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "writes continue after the leader is killed");
        cluster.restart(leader).await.expect("restarts");
        let mut member_client = connect_to(&[cluster.members()[leader].endpoint()], None)
            .await
            .expect("connects");
        let mut seen = false;
        for _ in 0..100 {
            if let Ok(resp) = member_client.get("b", None).await
                && !resp.kvs().is_empty()
            {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(seen, "restarted member catches up");
    }
}
