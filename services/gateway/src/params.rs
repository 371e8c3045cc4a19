//! What a query parameter may hold. Each rule here both parses a parameter's text (a 400 that
//! names the parameter for anything else) and declares the same rule as the parameter's schema
//! in the OpenAPI document, so a client generated from the document sends only what the server
//! accepts, and the server refuses only what the document excludes.
//!
//! The rules are strict on purpose: no white space around numbers, enum values or times, no
//! `+` before a number, no leap seconds, no space for the `T` of a time. Text values (a host, a
//! metric) are refused when blank, and their surrounding white space is dropped; "white space"
//! is the six ASCII characters of [`BLANK`], which every regular-expression engine agrees on.

use std::ops::RangeInclusive;

use telemetry_shared::Timestamp;
use utoipa::openapi::{
    KnownFormat, ObjectBuilder, Required, SchemaFormat, Type,
    path::{Parameter, ParameterBuilder, ParameterIn},
    schema::Object,
};

use crate::error::ApiError;

/// An optional query parameter, for an `IntoParams` implementation: its name (the field of
/// the struct that receives it), what it means, and its rule's schema.
pub(crate) fn query(name: &str, description: &str, schema: Object) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

/// A path parameter (always required).
pub(crate) fn path(name: &str, description: &str, schema: Object) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

/// The characters a blank value consists of (tab, line feed, vertical tab, form feed, carriage
/// return, space).
const BLANK: [char; 6] = ['\t', '\n', '\u{b}', '\u{c}', '\r', ' '];

/// A value holding anything but [`BLANK`] characters (unanchored: one such character suffices).
pub(crate) const NONBLANK_PATTERN: &str = r"[^\t\n\v\f\r ]";

/// The `date-time` forms accepted: `T` (or `t`) between date and time, seconds 00 to 59, an
/// optional fraction, `Z` or a `±hh:mm` offset. Together with `format: date-time` (which checks
/// the calendar and the ranges) this is exactly what [`time`] accepts.
pub(crate) const TIME_PATTERN: &str =
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-5][0-9](\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$";

/// An example time, for the document.
pub(crate) const TIME_EXAMPLE: &str = "2025-07-18T20:42:34Z";

/// The earliest and latest times a key can hold (keys carry a four-digit year); times outside
/// are moved to them, so a bound with an offset past the year 9999 still means "everything".
const KEY_TIMES: (&str, &str) = ("0000-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z");

/// A text parameter that must hold something other than white space; surrounding white space
/// is dropped.
pub(crate) fn text(param: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.chars().all(|c| BLANK.contains(&c)) => {
            Err(ApiError::invalid(param, "must not be empty or blank"))
        }
        other => Ok(other.map(|v| v.trim_matches(BLANK).to_string())),
    }
}

/// The schema of a [`text`] parameter.
pub(crate) fn text_schema(example: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(NONBLANK_PATTERN))
        .examples([example])
        .build()
}

/// A whole number in `range` written in decimal digits without leading zeros, or `default`
/// when absent.
pub(crate) fn whole(
    param: &str,
    raw: Option<&str>,
    range: RangeInclusive<u64>,
    default: Option<u64>,
) -> Result<Option<u64>, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    let canonical = |r: &&str| r.bytes().all(|b| b.is_ascii_digit()) && (*r == "0" || !r.starts_with('0'));
    let value = Some(raw)
        .filter(|r| !r.is_empty() && canonical(r))
        .and_then(|r| r.parse::<u64>().ok())
        .filter(|v| range.contains(v));
    match value {
        Some(v) => Ok(Some(v)),
        None => Err(ApiError::invalid(
            param,
            format!(
                "{raw:?} is not a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// The schema of a [`whole`] parameter from `min` to `max` (`None`: the int64 maximum).
pub(crate) fn whole_schema(min: u64, max: Option<u64>, default: Option<u64>, example: u64) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(min as usize))
        .maximum(max.map(|m| m as usize))
        .default(default.map(Into::into))
        .examples([example])
        .build()
}

/// An RFC 3339 time as [`TIME_PATTERN`] describes it, in UTC, within [`KEY_TIMES`].
pub(crate) fn time(param: &str, raw: Option<&str>) -> Result<Option<Timestamp>, ApiError> {
    let Some(text) = raw else { return Ok(None) };
    let bytes = text.as_bytes();
    let shape_ok = matches!(bytes.get(10), Some(b'T' | b't')) && bytes.get(17).is_some_and(|b| *b < b'6');
    match Timestamp::parse(text) {
        Ok(t) if shape_ok => Ok(Some(clamp_to_keys(t))),
        _ => Err(ApiError::invalid(
            param,
            format!("{text:?} is not an RFC 3339 time such as {TIME_EXAMPLE} (seconds 00 to 59)"),
        )),
    }
}

fn clamp_to_keys(t: Timestamp) -> Timestamp {
    let bound = |text| Timestamp::parse(text).unwrap_or(t);
    t.clamp(bound(KEY_TIMES.0), bound(KEY_TIMES.1))
}

/// The schema of a [`time`] parameter.
pub(crate) fn time_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .pattern(Some(TIME_PATTERN))
        .examples([TIME_EXAMPLE])
        .build()
}

/// The schema of a parameter that takes one of `choices` (parsed by the caller, whose type
/// owns the names), defaulting to `default`.
pub(crate) fn choice_schema(choices: &[&str], default: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(choices.iter().copied()))
        .default(Some(default.into()))
        .examples([default])
        .build()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn validator(schema: Object) -> jsonschema::Validator {
        let schema = serde_json::to_value(schema).expect("schema");
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("compiles")
    }

    #[test]
    fn times_accept_exactly_the_declared_forms() {
        let schema = validator(time_schema());
        for (text, ok) in [
            ("2026-01-01T00:00:00Z", true),
            ("2026-01-01t00:00:00z", true),
            ("2026-01-01T00:00:00.123456789+05:30", true),
            ("2024-02-29T23:59:59-23:59", true),
            ("0000-01-01T00:00:00+01:00", true),
            ("9999-12-31T23:59:59-01:00", true),
            ("2026-01-01 00:00:00Z", false),
            ("2026-12-31T23:59:60Z", false),
            ("2026-02-29T00:00:00Z", false),
            ("2026-01-01T24:00:00Z", false),
            ("2026-01-01T00:00:00", false),
            ("2026-01-01T00:00:00+24:00", false),
            ("2026-01-01T00:00:00.Z", false),
            (" 2026-01-01T00:00:00Z", false),
            ("yesterday", false),
        ] {
            let value = serde_json::json!(text);
            assert_eq!(schema.is_valid(&value), ok, "schema on {text}");
            assert_eq!(time("t", Some(text)).is_ok(), ok, "server on {text}");
        }
        // Times past the key range mean its ends.
        let late = time("t", Some("9999-12-31T23:59:59-01:00"))
            .expect("valid")
            .expect("some");
        assert_eq!(late.to_string(), "9999-12-31T23:59:59.999999Z");
    }

    proptest! {
        /// The server's blank rule and the declared pattern agree on every string.
        #[test]
        fn text_rule_matches_its_pattern(value in "[ \t\n\r\u{b}\u{c}\u{a0}\u{3000}a-c]{0,4}") {
            let schema = validator(text_schema("x"));
            let declared = schema.is_valid(&serde_json::json!(value));
            prop_assert_eq!(text("p", Some(value.clone())).is_ok(), declared, "{:?}", value);
        }

        /// The server's whole-number rule and the declared integer schema agree.
        #[test]
        fn whole_rule_matches_its_schema(value in "[-+ 0-9a.]{0,6}") {
            let schema = validator(whole_schema(1, Some(1000), Some(100), 5));
            let declared = serde_json::from_str::<serde_json::Value>(&value)
                .ok()
                .filter(|v| v.is_u64() && serde_json::to_string(v).is_ok_and(|t| t == value))
                .is_some_and(|v| schema.is_valid(&v));
            prop_assert_eq!(whole("p", Some(&value), 1..=1000, None).is_ok(), declared, "{:?}", value);
        }

        /// Times built from date-time-like pieces: accepted exactly when the schema says so.
        #[test]
        fn time_rule_matches_its_schema(
            date in "[0-9]{4}-(0[0-9]|1[0-3])-[0-3][0-9]",
            sep in "[Tt ]",
            clock in "[0-2][0-9]:[0-6][0-9]:[0-6][0-9]",
            fraction in "(\\.[0-9]{0,3})?",
            zone in "(Z|z|[+-][0-2][0-9]:[0-6][0-9])?",
        ) {
            let text = format!("{date}{sep}{clock}{fraction}{zone}");
            let schema = validator(time_schema());
            let declared = schema.is_valid(&serde_json::json!(text));
            prop_assert_eq!(time("p", Some(&text)).is_ok(), declared, "{}", text);
        }
    }
}
