//! The JSON Schemas in `schemas/` and the shared model agree: every version the code emits
//! validates against its schema, and payloads that break a schema are refused by the decoder.

use serde_json::{Value, json};
use telemetry_shared::{
    Fields, Message, SchemaVersion, SourcePosition, Timestamp,
    schema::{decode, decode_value},
};

fn validator(version: SchemaVersion) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(version.json_schema()).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn sample() -> Message {
    let mut fields = Fields::new();
    fields.insert("Hostname".into(), json!("mtv5-dgx1-hgpu-031"));
    fields.insert("gpu_id".into(), json!(0.0));
    fields.insert("throttled".into(), json!(false));
    fields.insert("container".into(), json!(""));
    Message {
        schema_version: SchemaVersion::V1,
        id: "01JD0000000000000000000000".parse().expect("ulid"),
        timestamp: Timestamp::now(),
        idempotency_key: "0123456789abcdef".repeat(4),
        source: Some(SourcePosition {
            stream_id: "dcgm-w0".into(),
            pass: 0,
            row: 1,
        }),
        fields,
    }
}

#[test]
fn every_emitted_version_validates_against_its_schema() {
    let msg = sample();
    for version in SchemaVersion::ALL {
        let payload = msg.to_version(version);
        let errors: Vec<String> = validator(version)
            .iter_errors(&payload)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{version}: {errors:?}\n{payload:#}");
        // And no other version's schema accepts it (schema_version is a const).
        for other in SchemaVersion::ALL.into_iter().filter(|v| *v != version) {
            assert!(
                !validator(other).is_valid(&payload),
                "{other} accepted a {version} payload"
            );
        }
    }
}

#[test]
fn migrated_messages_validate_as_v1() {
    for version in [SchemaVersion::V1beta1, SchemaVersion::V1beta2] {
        let (migrated, seen) = decode_value(sample().to_version(version)).expect("decodes");
        assert_eq!(seen, version);
        let payload = serde_json::to_value(&migrated).expect("encodes");
        assert!(
            validator(SchemaVersion::V1).is_valid(&payload),
            "{version} migrated: {payload:#}"
        );
    }
}

#[test]
fn schema_violations_are_refused_by_the_decoder_too() {
    let v1 = validator(SchemaVersion::V1);
    let mut bad = sample().to_version(SchemaVersion::V1);
    bad["fields"]["nested"] = json!([1, 2]);
    assert!(!v1.is_valid(&bad));
    assert!(decode(&serde_json::to_vec(&bad).expect("json")).is_err());
    let mut bad = sample().to_version(SchemaVersion::V1);
    bad["idempotency_key"] = json!("XYZ");
    assert!(!v1.is_valid(&bad));
    assert!(decode_value(bad).is_err());
}
