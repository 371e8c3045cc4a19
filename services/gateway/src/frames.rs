//! What `/api/v1/ws/telemetry` sends: its three JSON text frames and the codes it closes with.
//! The types here are what the session serializes (hello, error) or the shape it writes by hand
//! (telemetry, whose records are pre-encoded once per version for every subscriber), and they
//! are the frames' schemas in the OpenAPI document's `components`.

use serde::Serialize;
use utoipa::{
    ToSchema,
    openapi::{ArrayBuilder, OneOfBuilder, Ref, RefOr, schema::Schema},
};

use crate::{hub::Filter, negotiate::version_schema};

/// The component name of a payload version's JSON Schema (see [`crate::openapi`]):
/// `PayloadV1`, `PayloadV1beta2`, `PayloadV1beta1`.
pub(crate) fn payload_component(version: telemetry_shared::SchemaVersion) -> String {
    format!("Payload{}", version_suffix(version))
}

/// `V1`, `V1beta2`, `V1beta1`: a version's name as a component-name suffix.
pub(crate) fn version_suffix(version: telemetry_shared::SchemaVersion) -> String {
    let name = version.as_str();
    format!("{}{}", name[..1].to_ascii_uppercase(), &name[1..])
}

/// `type` of a [`HelloFrame`].
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum HelloType {
    /// Always `hello`.
    Hello,
}

/// The first frame of every session.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct HelloFrame {
    /// Always `hello`.
    #[schema(inline)]
    pub r#type: HelloType,
    /// The live feed starts after this revision: every record written later arrives in
    /// `telemetry` frames (and, with `since_revision`, every record after it first).
    pub revision: i64,
    /// The `since_revision` asked for, if any.
    pub since_revision: Option<i64>,
    /// The payload version of every record on this socket.
    #[schema(schema_with = version_schema)]
    pub schema_version: &'static str,
    /// The filter in effect (absent fields match everything).
    pub filter: Filter,
}

/// `type` of a [`TelemetryFrame`].
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[cfg_attr(not(test), allow(dead_code))]
#[serde(rename_all = "lowercase")]
pub(crate) enum TelemetryType {
    /// Always `telemetry`.
    Telemetry,
}

fn records_schema() -> Schema {
    let versions = telemetry_shared::SchemaVersion::ALL
        .iter()
        .map(|v| Ref::from_schema_name(payload_component(*v)));
    let mut one_of = OneOfBuilder::new();
    for r in versions {
        one_of = one_of.item(RefOr::Ref(r));
    }
    ArrayBuilder::new()
        .items(RefOr::T(Schema::OneOf(one_of.build())))
        .min_items(Some(1))
        .into()
}

/// Every matching record written at one etcd revision, in the negotiated payload version (the
/// hello frame's `schema_version`). Revisions only go up; remember the last one to resume
/// with `?since_revision=`.
#[derive(Debug, Clone, Serialize, ToSchema)]
// Documents the frame `telemetry_frame` writes around pre-encoded records; built only in tests.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct TelemetryFrame {
    /// Always `telemetry`.
    #[schema(inline)]
    pub r#type: TelemetryType,
    /// The etcd revision the records were written at.
    pub revision: i64,
    /// The records (at least one).
    #[schema(schema_with = records_schema)]
    pub records: Vec<serde_json::Value>,
}

/// A [`TelemetryFrame`] around records already encoded as JSON.
pub(crate) fn telemetry_frame(revision: i64, records: &[&str]) -> String {
    format!(
        "{{\"type\":\"telemetry\",\"revision\":{revision},\"records\":[{}]}}",
        records.join(",")
    )
}

/// `type` of an [`ErrorFrame`].
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ErrorType {
    /// Always `error`.
    Error,
}

/// Why the server ends a session; the close frame's code says the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CloseReason {
    /// The subscriber read slower than telemetry arrived (close code 4001); reconnect with
    /// `since_revision=last_revision`.
    SlowSubscriber,
    /// `since_revision` is older than etcd's compacted history (4002); read the gap over REST,
    /// then reconnect without `since_revision`.
    Compacted,
    /// The gateway's own feed lost history (4003); read the gap over REST, then reconnect.
    Gap,
    /// No pong within two ping intervals (4004).
    PingTimeout,
    /// The gateway is shutting down (1001, going away); reconnect with
    /// `since_revision=last_revision`.
    ShuttingDown,
}

impl CloseReason {
    /// The WebSocket close code.
    pub(crate) fn code(self) -> u16 {
        match self {
            CloseReason::SlowSubscriber => 4001,
            CloseReason::Compacted => 4002,
            CloseReason::Gap => 4003,
            CloseReason::PingTimeout => 4004,
            CloseReason::ShuttingDown => 1001,
        }
    }

    /// The reason's name, as in the frame's `error`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CloseReason::SlowSubscriber => "slow_subscriber",
            CloseReason::Compacted => "compacted",
            CloseReason::Gap => "gap",
            CloseReason::PingTimeout => "ping_timeout",
            CloseReason::ShuttingDown => "shutting_down",
        }
    }
}

/// The last frame before the server closes the socket; the close frame carries the code of
/// `error` and `"{error} last_revision={last_revision}"` as its reason.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct ErrorFrame {
    /// Always `error`.
    #[schema(inline)]
    pub r#type: ErrorType,
    /// Why the session ends.
    pub error: CloseReason,
    /// What happened and what to do, for a person.
    pub detail: String,
    /// The last revision fully sent on this socket (or the resume point): resume after it.
    pub last_revision: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_are_their_serialized_form_and_codes_are_distinct() {
        let all = [
            CloseReason::SlowSubscriber,
            CloseReason::Compacted,
            CloseReason::Gap,
            CloseReason::PingTimeout,
            CloseReason::ShuttingDown,
        ];
        for reason in all {
            assert_eq!(serde_json::json!(reason), serde_json::json!(reason.as_str()));
        }
        let codes: std::collections::BTreeSet<u16> = all.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), all.len());
    }
}
