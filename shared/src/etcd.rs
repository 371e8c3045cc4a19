//! etcd helpers shared by the services: connecting, classifying errors, bounded transactions,
//! time-bucketed leases and cheap queue-depth reads.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use etcd_client::{Client, ConnectOptions, GetOptions, Txn};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{CommonConfig, ConfigError},
    credentials::Credentials,
    retry::{Backoff, Policy},
};

/// etcd's default `--max-txn-ops`: the most compares, or success ops, or failure ops, one
/// transaction may carry. Every transaction the pipeline builds stays within it.
pub const MAX_TXN_OPS: usize = 128;

/// The smallest lease TTL etcd honours reliably (it extends shorter ones to its minimum).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// Most value bytes one transaction carries, well under etcd's 1.5 MiB request limit.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// Largest response a KV read accepts. tonic's default of 4 MiB is less than one page of large
/// values (a message may be up to 512 KiB), so a read over such a page would fail for ever.
pub const KV_MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// A KV client that accepts responses up to [`KV_MAX_MESSAGE`]. Every range read that can
/// return many values goes through one of these, not through `Client::get`.
pub fn kv(client: &Client) -> etcd_client::KvClient {
    client.kv_client().max_decoding_message_size(KV_MAX_MESSAGE)
}

/// Time allowed for one request before it counts as failed. A write that times out may still
/// have been applied: callers re-read before retrying.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from the etcd helpers.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// The client or the server reported an error.
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    /// A file the configuration names (CA, client certificate, key, password) cannot be used.
    /// The message names the variable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// etcd and this client do not accept each other: a certificate or a password was refused.
    /// Waiting does not help, so nothing retries this; the message says which and why.
    #[error("{0}")]
    Refused(String),
    /// A transaction was built with more operations than etcd accepts.
    #[error("transaction has {ops} operations in one branch; the limit is {MAX_TXN_OPS}")]
    TxnTooLarge {
        /// The largest branch's size.
        ops: usize,
    },
    /// The operation was interrupted by shutdown.
    #[error("shutting down")]
    Cancelled,
}

impl EtcdError {
    /// Is this worth trying again later (not a refusal, a bad file or shutdown)?
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            EtcdError::Config(_) | EtcdError::Refused(_) | EtcdError::Cancelled
        )
    }
}

/// Connects to the configured endpoints, over TLS and as the configured user when the
/// configuration says so ([`Credentials`]). The connection itself is lazy in tonic; this issues
/// a status call so that an unreachable etcd is reported here, not at the first write.
///
/// A certificate or password that etcd refuses (or an etcd certificate the CA does not vouch
/// for) is an [`EtcdError::Refused`] that says which; a credentials file that cannot be used is
/// an [`EtcdError::Config`] naming its variable.
///
/// With a user, the client holds a token that etcd forgets when it expires
/// (`--auth-token-ttl`) or etcd restarts (simple tokens). The client then authenticates again
/// and sends the refused request once more (`with_auto_token_refresh`). That re-send cannot
/// double an effect: it happens only when etcd answered `Unauthenticated` ("invalid auth
/// token"), which etcd decides before it proposes a write to raft, so the refused request was
/// never applied. A request whose outcome is unknown (timeout, lost connection) fails as before
/// and its caller re-reads ([`is_indeterminate`]); and every write the pipeline sends is guarded
/// by compares anyway.
pub async fn connect(config: &CommonConfig) -> Result<Client, EtcdError> {
    let credentials = Credentials::load(config)?;
    let probe = credentials.client_tls_probe();
    let options = credentials.apply(
        ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true),
    );
    let attempt = async {
        let mut client = Client::connect(&config.etcd_endpoints, Some(options)).await?;
        client.status().await?;
        Ok::<_, etcd_client::Error>(client)
    };
    let err = match attempt.await {
        Ok(client) => return Ok(client),
        Err(err) => err,
    };
    if let Some(reason) = refusal(&err, config) {
        return Err(EtcdError::Refused(reason));
    }
    // etcd checks a client certificate after the TLS handshake and answers a refused one with
    // an alert, which the gRPC connection may miss when it sees the closed connection first:
    // a handshake of our own waits for etcd's answer.
    if let Some(probe) = probe
        && lost_connection(&err)
        && let Some(detail) = probe.handshake_error(&config.etcd_endpoints).await
        && let Some(reason) = refusal_in(&detail, None, config)
    {
        return Err(EtcdError::Refused(reason));
    }
    Err(EtcdError::Client(err))
}

/// Did the connection itself fail (closed, reset, not made), as opposed to an answer from etcd?
fn lost_connection(err: &etcd_client::Error) -> bool {
    let chain = error_chain(err).to_ascii_lowercase();
    matches!(err, etcd_client::Error::TransportError(_))
        || ["connection", "broken pipe", "transport"]
            .iter()
            .any(|w| chain.contains(w))
}

/// Connects, retrying with the shared backoff until etcd answers or `shutdown` fires. Logs
/// once when etcd is first found unreachable, not at every attempt. A permanent failure (a
/// refused certificate or password, an unusable credentials file) is returned at once.
pub async fn connect_with_retry(
    config: &CommonConfig,
    shutdown: &CancellationToken,
) -> Result<Client, EtcdError> {
    let mut backoff = Backoff::new(Policy::ETCD, "connecting to etcd");
    loop {
        match connect(config).await {
            Ok(client) => {
                backoff.succeeded();
                return Ok(client);
            }
            Err(err) if err.is_permanent() => return Err(err),
            Err(err) => backoff
                .retry_after(&err, shutdown)
                .await
                .map_err(|_| EtcdError::Cancelled)?,
        }
    }
}

/// The error and its causes as one line (etcd-client's error does not expose its source).
pub fn error_chain(err: &etcd_client::Error) -> String {
    let source: Option<&(dyn std::error::Error + 'static)> = match err {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        etcd_client::Error::TransportError(err) => std::error::Error::source(err),
        etcd_client::Error::IoError(err) => std::error::Error::source(err),
        _ => None,
    };
    crate::observe::append_causes(err.to_string(), source)
}

/// The word(s) after `prefix` in `text`, up to a quote, comma or closing parenthesis.
fn phrase<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    let mut depth = 0usize;
    let mut end = rest.len();
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            ')' | '"' | '}' => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    Some(rest[..end].trim())
}

/// If `err` means that etcd and this client refuse each other's credentials, why, in words that
/// name the variable to fix.
pub fn refusal(err: &etcd_client::Error, config: &CommonConfig) -> Option<String> {
    refusal_in(&error_chain(err), grpc_status(err), config)
}

/// [`refusal`] of an error's text `detail` and its gRPC status, if it has one.
fn refusal_in(detail: &str, status: Option<&tonic::Status>, config: &CommonConfig) -> Option<String> {
    let user = config.etcd_user.as_ref();
    let tls = config.etcd_tls.as_ref();
    let client_cert = tls.and_then(|t| t.client.as_ref());
    if let Some(status) = status {
        let message = status.message();
        if message.contains("authentication failed") {
            let (name, file) = user.map_or((String::new(), String::new()), |u| {
                (u.name.clone(), u.password_file.display().to_string())
            });
            return Some(format!(
                "etcd refused the password of user {name:?} (ETCD_USERNAME) from \
                 ETCD_PASSWORD_FILE={file:?}: wrong password or no such user ({message})"
            ));
        }
        if message.contains("authentication is not enabled") {
            return Some(format!(
                "ETCD_USERNAME is set but etcd has authentication disabled: enable it \
                 (telemetry-admin auth setup --enable) or unset ETCD_USERNAME and \
                 ETCD_PASSWORD_FILE ({message})"
            ));
        }
    }
    let tls = tls?;
    if let Some(reason) = phrase(detail, "invalid peer certificate: ") {
        let ca = tls.ca_file.display().to_string();
        // rustls writes a bare variant name (`UnknownIssuer`) or, when it has the context, words
        // (`certificate expired: verification time ...`).
        let words = reason.to_ascii_lowercase().replace(' ', "");
        let why = if words.contains("unknownissuer") || words.contains("badsignature") {
            format!("it is not signed by the CA in ETCD_CA_FILE={ca:?}")
        } else if words.contains("expired") || words.contains("notvalidyet") {
            "it is outside its validity period".to_string()
        } else if words.contains("notvalidforname") {
            format!(
                "it does not name the endpoint ({}) among its subject alternative names",
                config.etcd_endpoints.join(",")
            )
        } else {
            format!("ETCD_CA_FILE={ca:?} does not vouch for it")
        };
        return Some(format!(
            "etcd's TLS certificate is not trusted: {why} (invalid peer certificate: {reason})"
        ));
    }
    if let Some(alert) = phrase(detail, "received fatal alert: ") {
        return Some(match client_cert {
            Some(client) => format!(
                "etcd refused the client certificate in ETCD_CERT_FILE={:?}: {} (received fatal \
                 alert: {alert})",
                client.cert_file.display().to_string(),
                client_alert_meaning(alert)
            ),
            None => format!(
                "etcd refused the TLS connection: it requires a client certificate \
                 (--client-cert-auth); set ETCD_CERT_FILE and ETCD_KEY_FILE (received fatal \
                 alert: {alert})"
            ),
        });
    }
    if detail.contains("InvalidContentType") || detail.contains("corrupt message") {
        return Some(format!(
            "etcd at {} does not answer TLS although ETCD_CA_FILE is set: it serves plain http",
            config.etcd_endpoints.join(",")
        ));
    }
    None
}

/// What a TLS alert etcd sent about our client certificate means (Go's TLS stack names the
/// cause in the alert it picks).
fn client_alert_meaning(alert: &str) -> &'static str {
    match alert {
        "UnknownCA" => "it is not signed by a CA etcd trusts (its --trusted-ca-file)",
        "CertificateExpired" => "it is expired or not yet valid",
        "UnsupportedCertificate" => "it is not usable for client authentication (extended key usage)",
        _ => "it is expired, not yet valid or not signed by a CA etcd trusts",
    }
}

fn grpc_status(err: &etcd_client::Error) -> Option<&tonic::Status> {
    match err {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        _ => None,
    }
}

/// Did the request fail because a lease it named no longer exists (expired or revoked)?
pub fn is_lease_not_found(err: &etcd_client::Error) -> bool {
    grpc_status(err).is_some_and(|s| s.message().contains("requested lease not found"))
}

/// Is the outcome of a failed write unknown (it may have been applied)? True for timeouts,
/// lost connections and leader changes; false for errors the server returned before applying.
pub fn is_indeterminate(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::Aborted
                | tonic::Code::Internal
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// Is the error one worth retrying (etcd unreachable, overloaded, or between leaders)?
pub fn is_retryable(err: &etcd_client::Error) -> bool {
    is_indeterminate(err)
        || grpc_status(err).is_some_and(|s| {
            matches!(s.code(), tonic::Code::ResourceExhausted)
                || s.message().contains("too many requests")
                || s.message().contains("leader")
        })
}

/// A transaction under construction that refuses to grow past [`MAX_TXN_OPS`] in any branch.
#[derive(Default)]
pub struct BoundedTxn {
    compares: Vec<etcd_client::Compare>,
    success: Vec<etcd_client::TxnOp>,
    failure: Vec<etcd_client::TxnOp>,
}

impl BoundedTxn {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Room left in the fullest branch.
    pub fn remaining(&self) -> usize {
        MAX_TXN_OPS
            - self
                .compares
                .len()
                .max(self.success.len())
                .max(self.failure.len())
    }

    /// Adds a compare.
    pub fn compare(&mut self, cmp: etcd_client::Compare) -> &mut Self {
        self.compares.push(cmp);
        self
    }

    /// Adds an operation to the success branch.
    pub fn then(&mut self, op: etcd_client::TxnOp) -> &mut Self {
        self.success.push(op);
        self
    }

    /// Adds an operation to the failure branch.
    pub fn otherwise(&mut self, op: etcd_client::TxnOp) -> &mut Self {
        self.failure.push(op);
        self
    }

    /// The largest branch's size, as etcd's `--max-txn-ops` counts it.
    pub fn ops(&self) -> usize {
        self.compares
            .len()
            .max(self.success.len())
            .max(self.failure.len())
    }

    /// Builds the transaction, or refuses if a branch is over the limit.
    pub fn build(self) -> Result<Txn, EtcdError> {
        let ops = self.ops();
        if ops > MAX_TXN_OPS {
            return Err(EtcdError::TxnTooLarge { ops });
        }
        Ok(Txn::new()
            .when(self.compares)
            .and_then(self.success)
            .or_else(self.failure))
    }

    /// Builds the transaction without its failure branch, whose reads become a read-only
    /// transaction of their own, sent only when a compare fails ([`SplitTxn::send`]). etcd
    /// decodes, logs and replicates a write request whole, failure branch included, so a commit
    /// that carries one read per compare pays for them on every success.
    pub fn build_split(self) -> Result<SplitTxn, EtcdError> {
        let ops = self.ops();
        if ops > MAX_TXN_OPS {
            return Err(EtcdError::TxnTooLarge { ops });
        }
        let reads = (!self.failure.is_empty()).then(|| Txn::new().and_then(self.failure));
        Ok(SplitTxn {
            main: Txn::new().when(self.compares).and_then(self.success),
            reads,
        })
    }
}

/// A transaction whose failure-branch reads are sent only when a compare fails (see
/// [`BoundedTxn::build_split`]).
pub struct SplitTxn {
    main: Txn,
    reads: Option<Txn>,
}

/// What a [`SplitTxn`] did.
#[derive(Debug)]
pub enum TxnAnswer {
    /// Every compare held: the success branch was applied.
    Applied(etcd_client::TxnResponse),
    /// A compare failed and nothing was applied. The failure branch's reads, in order, made in
    /// a second, read-only transaction: one snapshot taken after the refusal, so a caller that
    /// acts on them compares again in its next attempt. `Err` when that read failed (the
    /// refusal itself is certain).
    Refused(Result<etcd_client::TxnResponse, etcd_client::Error>),
}

impl SplitTxn {
    /// Sends the transaction, and its reads if a compare fails. An error is the transaction's
    /// own (its outcome may be unknown: see [`is_indeterminate`]).
    pub async fn send(self, client: &mut Client) -> Result<TxnAnswer, etcd_client::Error> {
        let resp = client.txn(self.main).await?;
        if resp.succeeded() {
            return Ok(TxnAnswer::Applied(resp));
        }
        Ok(TxnAnswer::Refused(match self.reads {
            Some(reads) => client.txn(reads).await,
            // No reads: the (empty) failure branch's answer.
            None => Ok(resp),
        }))
    }
}

/// Number of keys under `prefix`, counted by etcd without transferring them. `serializable`
/// reads the local member without a quorum round trip (fine for depth estimates).
pub async fn count_prefix(client: &mut Client, prefix: &str, serializable: bool) -> Result<i64, EtcdError> {
    let mut options = GetOptions::new().with_prefix().with_count_only();
    if serializable {
        options = options.with_serializable();
    }
    Ok(client.get(prefix, Some(options)).await?.count())
}

/// Hands out one lease per time bucket instead of one per key.
///
/// Keys that should expire after about `ttl` (dedup markers, retained data) are attached to the
/// lease of the bucket they are written in. The lease is granted with `ttl + bucket` seconds at
/// the bucket's first use, so each key lives between `ttl` and `ttl + bucket`. With the default
/// bucket of `ttl / 24` a 24 h TTL costs one lease grant per hour per process.
pub struct BucketedLease {
    client: Client,
    ttl: Duration,
    bucket: Duration,
    current: Mutex<Option<(u64, i64)>>,
}

impl BucketedLease {
    /// A lease source for keys that should live about `ttl`.
    pub fn new(client: Client, ttl: Duration) -> Self {
        let bucket = (ttl / 24).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        BucketedLease {
            client,
            ttl: ttl.max(MIN_LEASE_TTL),
            bucket,
            current: Mutex::new(None),
        }
    }

    fn bucket_index(&self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        now.as_secs() / self.bucket.as_secs().max(1)
    }

    /// The lease id for keys written now, granting a new lease when a new bucket begins.
    pub async fn current(&self) -> Result<i64, EtcdError> {
        let index = self.bucket_index();
        if let Ok(guard) = self.current.lock()
            && let Some((bucket, id)) = *guard
            && bucket == index
        {
            return Ok(id);
        }
        let ttl_secs = (self.ttl + self.bucket).as_secs().max(MIN_LEASE_TTL.as_secs());
        let ttl_secs = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
        let granted = self.client.clone().lease_grant(ttl_secs, None).await?;
        tracing::debug!(lease = granted.id(), ttl_secs, "granted bucket lease");
        if let Ok(mut guard) = self.current.lock() {
            *guard = Some((index, granted.id()));
        }
        Ok(granted.id())
    }

    /// Forgets `lease` (after etcd said it no longer exists) so the next call grants anew.
    pub fn invalidate(&self, lease: i64) {
        if let Ok(mut guard) = self.current.lock()
            && guard.is_some_and(|(_, id)| id == lease)
        {
            *guard = None;
        }
    }
}

/// The store's current revision (from the header of a count-only read of `key`). `key` must be
/// one the caller may read when etcd has authentication on (any key under a prefix its role
/// reads, e.g. the prefix it follows); whether it exists does not matter.
pub async fn current_revision(client: &Client, key: &str) -> Result<i64, EtcdError> {
    let resp = client
        .clone()
        .get(key, Some(GetOptions::new().with_count_only()))
        .await?;
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// A key as a range read found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key (lossy UTF-8).
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision of the key's last write.
    pub mod_revision: i64,
    /// The lease the key is attached to (0 for none).
    pub lease: i64,
}

/// Every key/value under `prefix`, read in pages of up to `page` keys at one revision (a
/// single range over a large prefix can exceed any message limit). A page too large to decode
/// is read again in smaller pages, down to one key. Returns the entries in key order and the
/// revision they were read at.
pub async fn range_entries(client: &Client, prefix: &str, page: i64) -> Result<(Vec<Entry>, i64), EtcdError> {
    let end = crate::keys::prefix_end(prefix);
    let mut kv = kv(client);
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut page = page.max(1);
    let mut out = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut resp = match kv.get(from.clone(), Some(options)).await {
            Ok(resp) => resp,
            Err(err) if page > 1 && is_too_large(&err) => {
                page = (page / 4).max(1);
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        if let Some(last) = kvs.last() {
            from = last.key().to_vec();
            from.push(0);
        }
        let done = !more || kvs.is_empty();
        for kv in kvs {
            let (mod_revision, lease) = (kv.mod_revision(), kv.lease());
            let (key, value) = kv.into_key_value();
            out.push(Entry {
                key: String::from_utf8_lossy(&key).into_owned(),
                value,
                mod_revision,
                lease,
            });
        }
        if done {
            return Ok((out, revision));
        }
    }
}

/// [`range_entries`] as (key, value) pairs.
pub async fn range_prefix(
    client: &Client,
    prefix: &str,
    page: i64,
) -> Result<(Vec<(String, Vec<u8>)>, i64), EtcdError> {
    let (entries, revision) = range_entries(client, prefix, page).await?;
    Ok((entries.into_iter().map(|e| (e.key, e.value)).collect(), revision))
}

/// Calls `visit` with every key under `prefix` (keys only, in pages of `page`, at one revision,
/// so a million keys never sit in memory at once). Returns the revision they were read at.
pub async fn for_each_key(
    client: &Client,
    prefix: &str,
    page: i64,
    mut visit: impl FnMut(&str),
) -> Result<i64, EtcdError> {
    let end = crate::keys::prefix_end(prefix);
    let mut kv = kv(client);
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_keys_only()
            .with_limit(page.max(1));
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let resp = kv.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for item in resp.kvs() {
            visit(&String::from_utf8_lossy(item.key()));
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(revision),
        }
    }
}

/// Did a response fail to decode because it is over the client's message limit?
pub fn is_too_large(err: &etcd_client::Error) -> bool {
    grpc_status(err).is_some_and(|s| {
        s.code() == tonic::Code::OutOfRange || s.message().contains("message length too large")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_end_where_their_parenthesis_closes() {
        let expired = "transport error: invalid peer certificate: certificate expired: verification time 9 \
                       (UNIX), but certificate is not valid after 8 (1 seconds ago))";
        assert_eq!(
            phrase(expired, "invalid peer certificate: "),
            Some(
                "certificate expired: verification time 9 (UNIX), but certificate is not valid after 8 (1 seconds ago)"
            )
        );
        let issuer = r#"Custom { error: "invalid peer certificate: UnknownIssuer" })"#;
        assert_eq!(
            phrase(issuer, "invalid peer certificate: "),
            Some("UnknownIssuer")
        );
        assert_eq!(
            phrase("received fatal alert: UnknownCA", "received fatal alert: "),
            Some("UnknownCA")
        );
        assert_eq!(phrase("nothing", "received fatal alert: "), None);
    }

    #[test]
    fn refusals_say_which_credential() {
        let raw: crate::config::RawCommonConfig = crate::config::from_iter([
            ("ETCD_ENDPOINTS".to_string(), "https://127.0.0.1:1".to_string()),
            ("ETCD_CA_FILE".to_string(), "/s/ca.pem".to_string()),
            ("ETCD_CERT_FILE".to_string(), "/s/c.pem".to_string()),
            ("ETCD_KEY_FILE".to_string(), "/s/c.key".to_string()),
        ])
        .expect("raw");
        let config = CommonConfig::try_from(raw).expect("valid");
        let says = |detail: &str| refusal_in(detail, None, &config).unwrap_or_default();
        assert!(says("io: received fatal alert: CertificateExpired").contains(
            "etcd refused the client certificate in ETCD_CERT_FILE=\"/s/c.pem\": it is expired or not yet valid"
        ));
        assert!(
            says("invalid peer certificate: UnknownIssuer)")
                .contains("not signed by the CA in ETCD_CA_FILE=\"/s/ca.pem\"")
        );
        assert!(
            says("invalid peer certificate: certificate expired: at 1")
                .contains("outside its validity period")
        );
        assert_eq!(says("connection refused"), "");
    }
}
