//! The environment a service reads, built up one variable at a time.
//!
//! Every service is configured by environment variables (read by `envy` into its config
//! struct), so a test describes a service by an [`Env`]: the etcd it uses
//! (`ETCD_ENDPOINTS`, `ETCD_NAMESPACE`), a preset for its role, and the variables the test is
//! about. A later [`Env::set`] of a name replaces the earlier value, so presets are defaults and
//! a test's own variables win. The same `Env` configures a service in process (every config's
//! `from_vars` takes its pairs) or as a process ([`crate::ProcessSpec::env`]).
//!
//! ```
//! # use telemetry_harness::Env;
//! let env = Env::etcd("127.0.0.1:2379", "/t")
//!     .streamer("data/dcgm_sample.csv", "test")
//!     .with(&[("RATE", "400")]);
//! assert_eq!(env.get("RATE"), Some("400"));
//! assert_eq!(env.get("LOOP"), Some("false"));
//! ```

use std::path::Path;

/// Environment variables for one service, in order, each name once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    /// An empty environment.
    pub fn new() -> Self {
        Env::default()
    }

    /// `ETCD_ENDPOINTS` (comma-separated `host:port`) and `ETCD_NAMESPACE`.
    pub fn etcd(endpoints: impl Into<String>, namespace: &str) -> Self {
        Env::new()
            .set("ETCD_ENDPOINTS", endpoints.into())
            .set("ETCD_NAMESPACE", namespace)
    }

    /// TLS towards etcd: `ETCD_CA_FILE`, and `ETCD_CERT_FILE` and `ETCD_KEY_FILE` when a client
    /// certificate is given.
    pub fn etcd_tls(self, ca_file: &Path, client: Option<&crate::CertFiles>) -> Self {
        let env = self.set("ETCD_CA_FILE", ca_file.display());
        match client {
            Some(files) => env
                .set("ETCD_CERT_FILE", files.cert.display())
                .set("ETCD_KEY_FILE", files.key.display()),
            None => env.unset("ETCD_CERT_FILE").unset("ETCD_KEY_FILE"),
        }
    }

    /// An etcd user: `ETCD_USERNAME` and `ETCD_PASSWORD_FILE`.
    pub fn etcd_user(self, name: &str, password_file: &Path) -> Self {
        self.set("ETCD_USERNAME", name)
            .set("ETCD_PASSWORD_FILE", password_file.display())
    }

    /// Sets `name`, replacing an earlier value.
    pub fn set(mut self, name: &str, value: impl ToString) -> Self {
        self.vars.retain(|(k, _)| k != name);
        self.vars.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets every pair of `extra` in order, replacing earlier values.
    pub fn with(self, extra: &[(&str, &str)]) -> Self {
        extra.iter().fold(self, |env, (k, v)| env.set(k, v))
    }

    /// Removes `name`.
    pub fn unset(mut self, name: &str) -> Self {
        self.vars.retain(|(k, _)| k != name);
        self
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The pairs, in the order they were (last) set.
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// The pairs, as every config's `from_vars` takes them.
    pub fn into_vars(self) -> Vec<(String, String)> {
        self.vars
    }

    /// A one-shot streamer over `csv` as fast as it can: `CSV_PATH`, `RATE=0`, `LOOP=false`,
    /// `STREAM_ID`. (Its workers stream as `{stream_id}-w{n}`.)
    pub fn streamer(self, csv: impl AsRef<Path>, stream_id: &str) -> Self {
        self.set("CSV_PATH", csv.as_ref().display())
            .set("RATE", "0")
            .set("LOOP", "false")
            .set("STREAM_ID", stream_id)
    }

    /// A streamer that only scrapes `targets` (`SCRAPE_TARGETS`, comma-separated) every
    /// `interval`, with a 2 s ownership lease (`SCRAPE_LEASE_TTL`) so a standby takes over
    /// quickly.
    pub fn scraper(self, targets: &[String], interval: &str) -> Self {
        self.set("SCRAPE_TARGETS", targets.join(","))
            .set("SCRAPE_INTERVAL", interval)
            .set("SCRAPE_TIMEOUT", interval)
            .set("SCRAPE_LEASE_TTL", "2s")
    }

    /// A collector: `COLLECTOR_ID` and a short `LEASE_TTL` of 3 s, so that a test notices a
    /// lost collector quickly.
    pub fn collector(self, id: &str) -> Self {
        self.set("COLLECTOR_ID", id).set("LEASE_TTL", "3s")
    }

    /// An exporter named `name` writing to `write_url` (`REMOTE_WRITE_URL`), with a short
    /// `LEASE_TTL` of 2 s (a standby takes over quickly), `BATCH_WAIT` of 20 ms and
    /// `RETENTION` of 1 h (the out-of-order window of [`crate::TsdbKind::prometheus`]).
    pub fn exporter(self, write_url: &str, name: &str) -> Self {
        self.set("REMOTE_WRITE_URL", write_url)
            .set("EXPORTER_NAME", name)
            .set("LEASE_TTL", "2s")
            .set("BATCH_WAIT", "20ms")
            .set("RETENTION", "1h")
    }

    /// A gateway listening on `127.0.0.1:{port}` (`GATEWAY_HOST`, `GATEWAY_PORT`).
    pub fn gateway(self, port: u16) -> Self {
        self.set("GATEWAY_HOST", "127.0.0.1").set("GATEWAY_PORT", port)
    }
}

impl IntoIterator for Env {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.vars.into_iter()
    }
}

impl<'a> IntoIterator for &'a Env {
    type Item = (String, String);
    type IntoIter = std::iter::Cloned<std::slice::Iter<'a, (String, String)>>;

    fn into_iter(self) -> Self::IntoIter {
        self.vars.iter().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_values_replace_earlier_ones() {
        let env = Env::etcd("a:1", "/n")
            .collector("c1")
            .with(&[("LEASE_TTL", "30s"), ("X", "1")]);
        assert_eq!(
            env.into_vars(),
            [
                ("ETCD_ENDPOINTS", "a:1"),
                ("ETCD_NAMESPACE", "/n"),
                ("COLLECTOR_ID", "c1"),
                ("LEASE_TTL", "30s"),
                ("X", "1"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn unset_removes_a_variable() {
        let env = Env::new().gateway(8080).unset("GATEWAY_HOST");
        assert_eq!(env.get("GATEWAY_HOST"), None);
        assert_eq!(env.get("GATEWAY_PORT"), Some("8080"));
    }
}
