//! The schema versions of the telemetry payload: their names and JSON Schemas.
//!
//! This module depends on nothing else in the crate: the message model ([`crate::message`])
//! names its version with it, and the conversions ([`crate::schema`]) use both.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A payload schema version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SchemaVersion {
    /// The current version.
    #[serde(rename = "v1")]
    V1,
    /// Second beta: RFC 3339 timestamps, `fields`.
    #[serde(rename = "v1beta2")]
    V1beta2,
    /// First beta: Unix-millisecond timestamps, `payload`.
    #[serde(rename = "v1beta1")]
    V1beta1,
}

impl SchemaVersion {
    /// Every supported version, newest first.
    pub const ALL: [SchemaVersion; 3] = [SchemaVersion::V1, SchemaVersion::V1beta2, SchemaVersion::V1beta1];

    /// The version written by current producers and stored by the collector.
    pub const CURRENT: SchemaVersion = SchemaVersion::V1;

    /// The version's name as it appears in payloads (`v1`, `v1beta2`, `v1beta1`).
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaVersion::V1 => "v1",
            SchemaVersion::V1beta2 => "v1beta2",
            SchemaVersion::V1beta1 => "v1beta1",
        }
    }

    /// The JSON Schema (draft 2020-12) of this version, as shipped in `schemas/`.
    pub fn json_schema(self) -> &'static str {
        match self {
            SchemaVersion::V1 => include_str!("../../schemas/v1.json"),
            SchemaVersion::V1beta2 => include_str!("../../schemas/v1beta2.json"),
            SchemaVersion::V1beta1 => include_str!("../../schemas/v1beta1.json"),
        }
    }
}

impl fmt::Display for SchemaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown schema version name.
#[derive(Debug, Clone, Error, PartialEq)]
#[error("unknown schema version {0:?} (supported: v1, v1beta2, v1beta1)")]
pub struct UnknownVersion(pub String);

impl FromStr for SchemaVersion {
    type Err = UnknownVersion;

    fn from_str(s: &str) -> Result<Self, UnknownVersion> {
        SchemaVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownVersion(s.to_string()))
    }
}
