//! One scrape over HTTP: GET with a deadline, the `Accept` header Prometheus sends, a bounded
//! body, and the body parsed in the format the answer declares. Every way it can fail is a
//! [`FetchError`] of one of four kinds, counted per target; none is fatal.

use std::time::Duration;

use telemetry_shared::observe::error_chain;

use super::parse::{self, ACCEPT, Format, Series};

/// Largest body read from a target (a dcgm-exporter answer is a few hundred KiB).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Why a scrape failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FetchError {
    /// No connection, or it broke.
    #[error("target unreachable: {0}")]
    Down(String),
    /// No complete answer within `SCRAPE_TIMEOUT`.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// An answer other than 2xx.
    #[error("answered HTTP {0}")]
    Http(u16),
    /// The body is not exposition text (or too large, or not UTF-8).
    #[error("{0}")]
    Malformed(String),
}

impl FetchError {
    /// The `reason` label of `streamer_scrape_failures_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            FetchError::Down(_) => "down",
            FetchError::Timeout(_) => "timeout",
            FetchError::Http(_) => "http",
            FetchError::Malformed(_) => "malformed",
        }
    }
}

/// Fetches `url` and parses its samples, all within `timeout`.
pub(crate) async fn fetch(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<Vec<Series>, FetchError> {
    let (body, format) = tokio::time::timeout(timeout, get(http, url))
        .await
        .map_err(|_| FetchError::Timeout(timeout))??;
    let text = String::from_utf8(body).map_err(|_| FetchError::Malformed("body is not UTF-8".into()))?;
    parse::parse(&text, format).map_err(|e| FetchError::Malformed(e.to_string()))
}

async fn get(http: &reqwest::Client, url: &str) -> Result<(Vec<u8>, Format), FetchError> {
    let mut resp = http
        .get(url)
        .header(reqwest::header::ACCEPT, ACCEPT)
        .send()
        .await
        .map_err(|e| FetchError::Down(error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(FetchError::Http(resp.status().as_u16()));
    }
    let format = Format::of_content_type(
        resp.headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::Down(error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(FetchError::Malformed(format!(
                "body larger than {MAX_BODY} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, format))
}
