//! Schema-version negotiation: which payload version a client gets.
//!
//! `?schema=<version>` wins; otherwise the `Accept` header is read for
//! `application/vnd.telemetry.<version>+json` (quality values respected); otherwise `v1`. A
//! version we do not know is a 406 that lists the supported ones. Generic types
//! (`application/json`, `*/*`) mean "the default".

use std::str::FromStr;

use telemetry_shared::SchemaVersion;
use utoipa::openapi::schema::Object;

use crate::{error::ApiError, params::choice_schema};

/// The schema of the `schema` query parameter: the supported versions, current by default.
pub(crate) fn version_schema() -> Object {
    let names: Vec<&str> = SchemaVersion::ALL.iter().map(|v| v.as_str()).collect();
    choice_schema(&names, SchemaVersion::CURRENT.as_str())
}

/// The media type of a payload version, e.g. `application/vnd.telemetry.v1+json`.
pub fn media_type(version: SchemaVersion) -> String {
    format!("application/vnd.telemetry.{}+json", version.as_str())
}

/// Picks the payload version from the `schema` query parameter and the `Accept` header.
pub fn negotiate(schema_param: Option<&str>, accept: Option<&str>) -> Result<SchemaVersion, ApiError> {
    if let Some(asked) = schema_param {
        return SchemaVersion::from_str(asked).map_err(|_| ApiError::unsupported_version(asked));
    }
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(SchemaVersion::CURRENT);
    };
    let mut ranges: Vec<(f32, &str)> = Vec::new();
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim();
        let mut quality = 1.0_f32;
        for param in parts {
            if let Some(q) = param.trim().strip_prefix("q=") {
                quality = q.trim().parse().unwrap_or(0.0);
            }
        }
        if !media.is_empty() && quality > 0.0 {
            ranges.push((quality, media));
        }
    }
    // Stable sort: equal qualities keep the client's order.
    ranges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut unknown: Option<&str> = None;
    let mut generic = false;
    for (_, media) in &ranges {
        let lower = media.to_ascii_lowercase();
        if let Some(version) = lower
            .strip_prefix("application/vnd.telemetry.")
            .and_then(|rest| rest.strip_suffix("+json"))
        {
            match SchemaVersion::from_str(version) {
                Ok(v) => return Ok(v),
                Err(_) => unknown = unknown.or(Some(media)),
            }
        } else if matches!(lower.as_str(), "application/json" | "application/*" | "*/*") {
            generic = true;
        }
    }
    match unknown {
        Some(media) if !generic => Err(ApiError::unsupported_version(media)),
        _ => Ok(SchemaVersion::CURRENT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameter_wins() {
        assert_eq!(
            negotiate(Some("v1beta1"), Some("application/vnd.telemetry.v1+json")),
            Ok(SchemaVersion::V1beta1)
        );
        let err = negotiate(Some("v2"), None).expect_err("unknown");
        assert_eq!(err.status.as_u16(), 406);
        assert!(
            err.body.detail.contains("v1, v1beta2, v1beta1"),
            "{}",
            err.body.detail
        );
    }

    #[test]
    fn accept_header() {
        assert_eq!(negotiate(None, None), Ok(SchemaVersion::V1));
        assert_eq!(negotiate(None, Some("*/*")), Ok(SchemaVersion::V1));
        assert_eq!(
            negotiate(None, Some("application/vnd.telemetry.v1beta2+json")),
            Ok(SchemaVersion::V1beta2)
        );
        assert_eq!(
            negotiate(
                None,
                Some("application/vnd.telemetry.v1beta1+json;q=0.5, application/vnd.telemetry.v1beta2+json")
            ),
            Ok(SchemaVersion::V1beta2)
        );
        assert_eq!(
            negotiate(None, Some("application/vnd.telemetry.v9+json, application/json")),
            Ok(SchemaVersion::V1)
        );
        let err = negotiate(None, Some("application/vnd.telemetry.v9+json")).expect_err("unknown");
        assert_eq!(err.status.as_u16(), 406);
        assert_eq!(media_type(SchemaVersion::V1), "application/vnd.telemetry.v1+json");
    }
}
