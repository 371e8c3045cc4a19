//! The sink: one remote-write request, what its answer means, and how a refused request is
//! narrowed down to the records responsible.
//!
//! - **2xx**: the samples landed (a request is all or nothing).
//! - **5xx, 429, no answer** (connection refused, reset, timed out): nothing is known to have
//!   landed; the same request is retried with backoff, for as long as it takes. Never dropped.
//! - **400, 413, 422**: the server refuses something *in* the request (a sample out of order or
//!   out of bounds, a bad label, too large). The request is bisected: each half is sent on its
//!   own, and a refused half is split again, until the refused records stand alone. They are
//!   rejected (counted, logged, listed); the rest lands. A poison record costs about
//!   2·log2(n) requests and never blocks the stream.
//! - **500 "too old sample"**: Prometheus 2.x before 2.45 answers 500 for a sample older than
//!   its out-of-order window; it is refused for its content like a 400 (later releases say 400),
//!   since retrying would stall the stream for ever.
//! - **Other 4xx** (401, 403, 404, 405, 415, …) say the exporter or the server is
//!   misconfigured (wrong URL, receiver disabled, authentication): rejecting records would
//!   reject all of them, so these are retried with backoff, and logged as errors, like an
//!   outage.

use std::{ops::Range, time::Duration};

use telemetry_shared::observe::error_chain;

use crate::remote_write;

/// What a request's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Acknowledged: every sample landed.
    Landed,
    /// Not acknowledged: send it again later.
    Retry(String),
    /// Refused because of its content: bisect.
    Refused(String),
    /// Refused because of the configuration: send it again later, and say so loudly.
    Misconfigured(String),
}

impl Outcome {
    /// The metric label of the outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Landed => "landed",
            Outcome::Retry(_) => "retried",
            Outcome::Refused(_) => "refused",
            Outcome::Misconfigured(_) => "misconfigured",
        }
    }
}

/// Longest part of an answer's body kept in a reason.
const MAX_REASON: usize = 300;

/// Classifies an HTTP answer (status and body).
pub(crate) fn classify(status: u16, body: &str) -> Outcome {
    let body = body.trim();
    let body = match body.char_indices().nth(MAX_REASON) {
        Some((cut, _)) => &body[..cut],
        None => body,
    };
    let reason = if body.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {body}")
    };
    match status {
        200..=299 => Outcome::Landed,
        400 | 413 | 422 => Outcome::Refused(reason),
        500 if body.contains("too old sample") => Outcome::Refused(reason),
        429 | 500..=599 => Outcome::Retry(reason),
        _ => Outcome::Misconfigured(reason),
    }
}

/// Narrows a refused request down to the records responsible: a stack of index ranges still to
/// send, smallest first at the top. Pure; the loop sends [`Bisect::next`] and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bisect {
    todo: Vec<Range<usize>>,
    rejected: Vec<(usize, String)>,
}

impl Bisect {
    /// Starts with the whole request of `n` records.
    pub fn new(n: usize) -> Self {
        Bisect {
            todo: (n > 0).then_some(0..n).into_iter().collect(),
            rejected: Vec::new(),
        }
    }

    /// The records to send next, if any are left.
    pub fn next(&self) -> Option<Range<usize>> {
        self.todo.last().cloned()
    }

    /// They landed.
    pub fn landed(&mut self) {
        self.todo.pop();
    }

    /// They were refused: one record is rejected; more are split in halves, sent in order.
    pub fn refused(&mut self, reason: String) {
        let Some(range) = self.todo.pop() else { return };
        if range.len() == 1 {
            self.rejected.push((range.start, reason));
        } else {
            let mid = range.start + range.len() / 2;
            self.todo.push(mid..range.end);
            self.todo.push(range.start..mid);
        }
    }

    /// The rejected records (indices in order) and why.
    pub fn rejected(mut self) -> Vec<(usize, String)> {
        self.rejected.sort_by_key(|(i, _)| *i);
        self.rejected
    }
}

/// Sends remote-write requests to one URL.
#[derive(Debug, Clone)]
pub(crate) struct Sender {
    http: reqwest::Client,
    url: reqwest::Url,
}

impl Sender {
    /// A sender for `url`, each request limited to `timeout`.
    pub fn new(url: reqwest::Url, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(remote_write::USER_AGENT)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()?;
        Ok(Sender { http, url })
    }

    /// The URL requests go to.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// The HTTP client (the server check uses it too).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Sends one request body and classifies the answer.
    pub async fn send(&self, body: Vec<u8>) -> Outcome {
        let mut request = self.http.post(self.url.clone()).body(body);
        for (name, value) in remote_write::HEADERS {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap_or_default();
                classify(status, &body)
            }
            Err(err) => Outcome::Retry(format!("no answer: {}", error_chain(&err))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_mean_what_the_specification_says() {
        assert_eq!(classify(204, ""), Outcome::Landed);
        assert_eq!(classify(200, "ok"), Outcome::Landed);
        assert_eq!(
            classify(400, "out of order sample\n"),
            Outcome::Refused("HTTP 400: out of order sample".into())
        );
        assert!(matches!(classify(413, ""), Outcome::Refused(_)));
        assert!(matches!(classify(429, ""), Outcome::Retry(_)));
        assert!(matches!(classify(500, "too old"), Outcome::Retry(_)));
        assert!(matches!(classify(500, "too old sample"), Outcome::Refused(_)));
        assert!(matches!(classify(503, ""), Outcome::Retry(_)));
        for status in [401, 403, 404, 405, 415] {
            assert!(
                matches!(classify(status, ""), Outcome::Misconfigured(_)),
                "{status}"
            );
        }
        let long = "é".repeat(1000);
        let Outcome::Refused(reason) = classify(400, &long) else {
            panic!("refused")
        };
        assert!(reason.chars().count() < 320, "{reason}");
    }

    /// Runs a bisection against a server that refuses any request holding a poison record.
    fn bisect(n: usize, poison: &[usize]) -> (Vec<usize>, usize, Vec<usize>) {
        let mut b = Bisect::new(n);
        let mut requests = 0;
        let mut landed = Vec::new();
        while let Some(range) = b.next() {
            requests += 1;
            if range.clone().any(|i| poison.contains(&i)) {
                b.refused(format!("bad {range:?}"));
            } else {
                landed.extend(range);
                b.landed();
            }
        }
        let rejected = b.rejected().into_iter().map(|(i, _)| i).collect();
        landed.sort_unstable();
        (rejected, requests, landed)
    }

    #[test]
    fn bisection_rejects_exactly_the_poison_and_lands_the_rest() {
        let (rejected, requests, landed) = bisect(1000, &[3, 500, 999]);
        assert_eq!(rejected, vec![3, 500, 999]);
        assert_eq!(landed.len(), 997);
        assert!(landed.iter().all(|i| ![3, 500, 999].contains(i)));
        assert!(requests <= 3 * 2 * 11, "{requests} requests");
        let (rejected, requests, landed) = bisect(10, &[]);
        assert_eq!((rejected.len(), requests, landed.len()), (0, 1, 10));
        let (rejected, _, landed) = bisect(4, &[0, 1, 2, 3]);
        assert_eq!((rejected, landed), (vec![0, 1, 2, 3], vec![]));
        assert_eq!(Bisect::new(0).next(), None);
    }

    #[test]
    fn a_refused_single_record_carries_the_servers_reason() {
        let mut b = Bisect::new(1);
        b.refused("HTTP 400: out of bounds".into());
        assert_eq!(b.next(), None);
        assert_eq!(b.rejected(), vec![(0, "HTTP 400: out of bounds".into())]);
    }
}
