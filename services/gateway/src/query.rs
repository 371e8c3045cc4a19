//! Parsing of the telemetry query (`start_time`, `end_time`, `metric`, `limit`, `offset`,
//! `cursor`, `order`) into key ranges, with a 400 naming the parameter for anything wrong.
//!
//! Records are keyed `{gpu prefix}{timestamp}_{ULID}` with a fixed-width timestamp, so a time
//! window is a key range and a cursor is simply the last key a page returned: the next page
//! starts right after it and costs O(limit) however deep it is. `offset` is offered too but
//! costs O(offset + limit); it is capped at [`MAX_OFFSET`].

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use telemetry_shared::{Timestamp, keys::prefix_end};
use utoipa::{
    IntoParams, ToSchema,
    openapi::{
        ObjectBuilder, Type,
        path::{Parameter, ParameterIn},
        schema::Object,
    },
};

use crate::{
    error::ApiError,
    negotiate::version_schema,
    params::{self, text_schema, time_schema, whole_schema},
};

/// Default page size.
pub(crate) const DEFAULT_LIMIT: u64 = 100;
/// Largest page size.
pub(crate) const MAX_LIMIT: u64 = 1000;
/// Largest `offset` (use `cursor` to go deeper).
pub(crate) const MAX_OFFSET: u64 = 100_000;
/// Longest cursor accepted (issued ones are about 90 characters).
const MAX_CURSOR_LEN: usize = 512;

/// Which end of the time range a page starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Newest first (the default: "the last N points").
    #[default]
    Desc,
    /// Oldest first.
    Asc,
}

impl Order {
    fn as_str(self) -> &'static str {
        match self {
            Order::Desc => "desc",
            Order::Asc => "asc",
        }
    }

    /// Reads `order`: exactly `asc` or `desc` (the names the document declares).
    fn parse(raw: Option<&str>) -> Result<Order, ApiError> {
        match raw {
            None => Ok(Order::default()),
            Some(text) => [Order::Desc, Order::Asc]
                .into_iter()
                .find(|o| o.as_str() == text)
                .ok_or_else(|| ApiError::invalid("order", format!("{text:?} is not asc or desc"))),
        }
    }
}

fn order_schema() -> Object {
    params::choice_schema(
        &[Order::Desc.as_str(), Order::Asc.as_str()],
        Order::default().as_str(),
    )
}

fn hostname_schema() -> Object {
    text_schema("mtv5-dgx1-hgpu-031")
}

fn metric_schema() -> Object {
    text_schema("DCGM_FI_DEV_GPU_UTIL")
}

fn limit_schema() -> Object {
    whole_schema(1, Some(MAX_LIMIT), Some(DEFAULT_LIMIT), 10)
}

fn offset_schema() -> Object {
    whole_schema(0, Some(MAX_OFFSET), Some(0), 20)
}

fn cursor_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[A-Za-z0-9_-]+$"))
        .max_length(Some(MAX_CURSOR_LEN))
        .build()
}

/// The query string of `GET /api/v1/gpus/{id}/telemetry`, as received (every value a string,
/// so that a bad one is reported by name rather than by the extractor). Its parameters in the
/// document (see the `IntoParams` implementation) declare the rules [`TelemetryQuery::parse`]
/// applies.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawTelemetryQuery {
    /// Host of the GPU when `{id}` is a gpu_id.
    pub hostname: Option<String>,
    /// Inclusive lower time bound.
    pub start_time: Option<String>,
    /// Inclusive upper time bound.
    pub end_time: Option<String>,
    /// Metric filter.
    pub metric: Option<String>,
    /// Page size.
    pub limit: Option<String>,
    /// Matching records to skip.
    pub offset: Option<String>,
    /// Where the previous page stopped.
    pub cursor: Option<String>,
    /// `asc` or `desc`.
    pub order: Option<String>,
    /// Payload schema version.
    pub schema: Option<String>,
    /// Read as of this etcd revision.
    pub revision: Option<String>,
}

impl IntoParams for RawTelemetryQuery {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        use params::query;
        vec![
            query(
                "hostname",
                "Host of the GPU when `{id}` is a gpu_id rather than a UUID (a gpu_id is unique \
                 only per host). Must not be blank.",
                hostname_schema(),
            ),
            query(
                "start_time",
                "Inclusive lower bound on the record's processing time (RFC 3339). Must not be \
                 after `end_time` (400).",
                time_schema(),
            ),
            query(
                "end_time",
                "Inclusive upper bound on the record's processing time (RFC 3339).",
                time_schema(),
            ),
            query(
                "metric",
                "Only records of this metric; numbers and booleans compare as text (`7`, `2.5`, \
                 `true`). Must not be blank.",
                metric_schema(),
            ),
            query("limit", "Page size.", limit_schema()),
            query(
                "offset",
                "Matching records to skip before the page (costs O(offset); prefer `cursor`).",
                offset_schema(),
            ),
            query(
                "cursor",
                "Opaque: the `next_cursor` of the previous page, passed as given, with the same \
                 `order` (the `next` link of the 200 response). Any other value is refused \
                 with 400.",
                cursor_schema(),
            ),
            query("order", "`desc` (newest first) or `asc`.", order_schema()),
            query(
                "schema",
                "Payload schema version; wins over `Accept`. An unknown version is a 406.",
                version_schema(),
            ),
            query(
                "revision",
                "Read the page from etcd as it was at this revision (the `revision` of an earlier \
                 page, say, to page through one consistent view). A revision etcd has not \
                 reached is a 400; one it has compacted away is a 410.",
                params::whole_schema(1, Some(i64::MAX as u64), None, 42),
            ),
        ]
    }
}

/// A validated telemetry query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryQuery {
    /// The GPU's host, when `{id}` is a gpu_id.
    pub hostname: Option<String>,
    /// Inclusive lower time bound.
    pub start: Option<Timestamp>,
    /// Inclusive upper time bound.
    pub end: Option<Timestamp>,
    /// Metric filter.
    pub metric: Option<String>,
    /// Page size.
    pub limit: usize,
    /// Matching records to skip.
    pub offset: usize,
    /// Where the previous page stopped.
    pub cursor: Option<Cursor>,
    /// Page order.
    pub order: Order,
    /// Read as of this revision (from etcd).
    pub at: Option<i64>,
}

/// Where a page stopped: the key suffix (`{timestamp}_{ULID}`) of the last record examined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The order the cursor was issued for.
    pub order: Order,
    /// The record key below the GPU's prefix.
    pub suffix: String,
}

const CURSOR_TAG: &str = "c1";

impl Cursor {
    /// The opaque text handed to clients.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{CURSOR_TAG}:{}:{}", self.order.as_str(), self.suffix))
    }

    /// Reads a cursor back; anything we did not issue is rejected.
    pub fn decode(text: &str) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::invalid(
                "cursor",
                "not a cursor this gateway issued (use next_cursor as given)",
            )
        };
        if text.len() > MAX_CURSOR_LEN {
            return Err(bad());
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let mut parts = text.splitn(3, ':');
        let (Some(CURSOR_TAG), Some(order), Some(suffix)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let order = Order::parse(Some(order)).map_err(|_| bad())?;
        if suffix.is_empty() || suffix.contains('/') || suffix.chars().any(char::is_control) {
            return Err(bad());
        }
        Ok(Cursor {
            order,
            suffix: suffix.to_string(),
        })
    }
}

fn count(
    param: &str,
    raw: Option<&str>,
    range: std::ops::RangeInclusive<u64>,
    default: u64,
) -> Result<usize, ApiError> {
    let value = params::whole(param, raw, range, Some(default))?.unwrap_or(default);
    Ok(usize::try_from(value).unwrap_or(usize::MAX))
}

impl TelemetryQuery {
    /// Validates the raw query.
    pub fn parse(raw: &RawTelemetryQuery) -> Result<Self, ApiError> {
        let start = params::time("start_time", raw.start_time.as_deref())?;
        let end = params::time("end_time", raw.end_time.as_deref())?;
        if let (Some(s), Some(e)) = (start, end)
            && s > e
        {
            return Err(ApiError::invalid("start_time", "is after end_time"));
        }
        let order = Order::parse(raw.order.as_deref())?;
        let cursor = raw.cursor.as_deref().map(Cursor::decode).transpose()?;
        if let Some(c) = &cursor
            && c.order != order
        {
            return Err(ApiError::invalid(
                "cursor",
                format!(
                    "was issued for order={}, not order={}",
                    c.order.as_str(),
                    order.as_str()
                ),
            ));
        }
        Ok(TelemetryQuery {
            hostname: params::text("hostname", raw.hostname.clone())?,
            metric: params::text("metric", raw.metric.clone())?,
            start,
            end,
            limit: count("limit", raw.limit.as_deref(), 1..=MAX_LIMIT, DEFAULT_LIMIT)?,
            offset: count("offset", raw.offset.as_deref(), 0..=MAX_OFFSET, 0)?,
            cursor,
            order,
            at: params::whole("revision", raw.revision.as_deref(), 1..=i64::MAX as u64, None)?
                .map(|r| r as i64),
        })
    }

    /// The key range `[lo, hi)` of this query under a GPU's data prefix, cursor applied.
    pub fn key_range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let mut lo = match self.start {
            Some(start) => format!("{prefix}{start}").into_bytes(),
            None => prefix.as_bytes().to_vec(),
        };
        let mut hi = match self.end {
            // Inclusive end: every `{end}_{ULID}` key is below the end of the `{end}_` prefix.
            Some(end) => prefix_end(&format!("{prefix}{end}_")),
            None => prefix_end(prefix),
        };
        if let Some(cursor) = &self.cursor {
            let key = format!("{prefix}{}", cursor.suffix).into_bytes();
            match cursor.order {
                Order::Asc => {
                    let mut after = key;
                    after.push(0);
                    lo = lo.max(after);
                }
                Order::Desc => hi = hi.min(key),
            }
        }
        (lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw(pairs: &[(&str, &str)]) -> RawTelemetryQuery {
        let mut q = RawTelemetryQuery::default();
        for (k, v) in pairs {
            let v = Some(v.to_string());
            match *k {
                "start_time" => q.start_time = v,
                "end_time" => q.end_time = v,
                "metric" => q.metric = v,
                "limit" => q.limit = v,
                "offset" => q.offset = v,
                "cursor" => q.cursor = v,
                "order" => q.order = v,
                _ => panic!("unknown {k}"),
            }
        }
        q
    }

    #[test]
    fn defaults() {
        let q = TelemetryQuery::parse(&raw(&[])).expect("valid");
        assert_eq!((q.limit, q.offset, q.order), (100, 0, Order::Desc));
    }

    #[test]
    fn errors_name_the_parameter() {
        for (param, value) in [
            ("limit", "0"),
            ("limit", "1001"),
            ("limit", "ten"),
            ("offset", "-1"),
            ("offset", "100001"),
            ("start_time", "yesterday"),
            ("end_time", "2026-13-01T00:00:00Z"),
            ("order", "random"),
            ("cursor", "!!"),
            ("metric", ""),
        ] {
            let err = TelemetryQuery::parse(&raw(&[(param, value)])).expect_err(param);
            assert_eq!(err.status.as_u16(), 400);
            assert!(err.body.detail.starts_with(param), "{param}: {}", err.body.detail);
        }
        let err = TelemetryQuery::parse(&raw(&[
            ("start_time", "2026-01-02T00:00:00Z"),
            ("end_time", "2026-01-01T00:00:00Z"),
        ]))
        .expect_err("inverted");
        assert!(err.body.detail.contains("after end_time"));
    }

    #[test]
    fn ranges_are_inclusive_and_cursors_continue() {
        let q = TelemetryQuery::parse(&raw(&[
            ("start_time", "2026-01-01T00:00:00Z"),
            ("end_time", "2026-01-01T00:00:01+00:00"),
        ]))
        .expect("valid");
        let (lo, hi) = q.key_range("/d/h/0/");
        let inside = b"/d/h/0/2026-01-01T00:00:01.000000Z_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_vec();
        let first = b"/d/h/0/2026-01-01T00:00:00.000000Z_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_vec();
        let after = b"/d/h/0/2026-01-01T00:00:01.000001Z_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_vec();
        assert!(lo <= first && first < hi && inside < hi && after >= hi);

        let cursor = Cursor {
            order: Order::Asc,
            suffix: "2026-01-01T00:00:00.000000Z_01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor.clone()));
        let q =
            TelemetryQuery::parse(&raw(&[("order", "asc"), ("cursor", &cursor.encode())])).expect("valid");
        let (lo, _) = q.key_range("/d/h/0/");
        assert!(lo > first);
        let err = TelemetryQuery::parse(&raw(&[("cursor", &cursor.encode())])).expect_err("order mismatch");
        assert!(err.body.detail.contains("order=asc"));
    }

    proptest! {
        /// Whatever the query string holds, parsing answers (a query or a 400), never panics.
        #[test]
        fn parsing_never_panics(
            start in proptest::option::of(".{0,40}"),
            end in proptest::option::of(".{0,40}"),
            limit in proptest::option::of(".{0,12}"),
            offset in proptest::option::of(".{0,12}"),
            cursor in proptest::option::of(".{0,80}"),
            order in proptest::option::of(".{0,8}"),
            metric in proptest::option::of(".{0,20}"),
        ) {
            let q = RawTelemetryQuery {
                hostname: None, start_time: start, end_time: end, metric, limit, offset, cursor, order,
                schema: None, revision: None,
            };
            match TelemetryQuery::parse(&q) {
                Ok(parsed) => {
                    prop_assert!((1..=MAX_LIMIT as usize).contains(&parsed.limit));
                    let (lo, hi) = parsed.key_range("/p/");
                    prop_assert!(lo.starts_with(b"/p/"));
                    let _ = hi;
                }
                Err(err) => prop_assert_eq!(err.status.as_u16(), 400),
            }
        }

        /// Any suffix survives a cursor round trip.
        #[test]
        fn cursors_round_trip(suffix in "[0-9A-Za-z:._-]{1,60}") {
            let c = Cursor { order: Order::Desc, suffix };
            prop_assert_eq!(Cursor::decode(&c.encode()), Ok(c));
        }
    }
}
