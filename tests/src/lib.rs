//! Cross-service integration tests of the telemetry pipeline, run against a real etcd started by
//! `telemetry-harness`. The tests themselves are in `tests/tests/`; the benchmark binary is
//! `src/bin/bench.rs`.

pub mod chaos;
pub mod gateway_bench;
pub mod pipeline_bench;
