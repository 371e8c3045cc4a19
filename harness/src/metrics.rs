//! A service's Prometheus endpoint: scraping it, and what `promtool check metrics` says of it.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::HarnessError;

/// `GET /metrics` on `127.0.0.1:{port}` with a bare HTTP/1.0 request; returns the body. Retries
/// the connection for up to 5 s (a service opens its metrics port as it starts); a response
/// other than 200 is an error.
pub async fn scrape_metrics(port: u16) -> Result<String, HarnessError> {
    match http_get(port, "/metrics").await? {
        (200, body) => Ok(body),
        (status, _) => Err(HarnessError::Io {
            context: format!("scraping port {port}"),
            source: std::io::Error::other(format!("not a 200 response: {status}")),
        }),
    }
}

/// `GET path` on `127.0.0.1:port` (HTTP/1.0, retrying the connection for up to 5 s while the
/// port is not open yet): the status and the body. For `/metrics`, `/livez` and `/readyz`.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String), HarnessError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut stream = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(stream) => break stream,
            Err(err) if Instant::now() > deadline => {
                return Err(HarnessError::Io {
                    context: format!("connecting to port {port}"),
                    source: err,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let context = || format!("GET {path} on port {port}");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .map_err(crate::io(context()))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(crate::io(context()))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HarnessError::Io {
            context: context(),
            source: std::io::Error::other(format!("not an HTTP response: {head}")),
        })?;
    Ok((status, body.to_string()))
}

/// Runs `promtool check metrics` (Debian's `prometheus` package; `PROMTOOL_BIN` overrides) on a
/// Prometheus text exposition. `Ok` when promtool finds nothing to complain about; otherwise
/// its complaints (or why it could not run).
pub fn promtool_check_metrics(exposition: &str) -> Result<(), String> {
    use std::io::Write as _;
    let bin = std::env::var("PROMTOOL_BIN").unwrap_or_else(|_| "promtool".into());
    let mut child = std::process::Command::new(&bin)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {bin} (install Debian's prometheus package): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(exposition.as_bytes())
            .map_err(|e| format!("writing to promtool: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for promtool: {e}"))?;
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && complaints.trim().is_empty() {
        Ok(())
    } else {
        Err(complaints)
    }
}
