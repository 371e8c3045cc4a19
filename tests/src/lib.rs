//! Cross-service tests of the telemetry pipeline, run against real etcd started by
//! `telemetry-harness`, and the tools built on the same parts.
//!
//! # Layout
//! - [`Pipeline`] (`pipeline.rs`): the whole pipeline in process (streamer, collectors,
//!   gateway through their public `run` functions, the gateway on port 0) on a fresh or given
//!   etcd: the way every cross-service test starts it.
//! - [`bench`]: the measurements of `telemetry-bench` (`src/bin/bench.rs`) and their table.
//! - [`chaos`]: the chaos run of `telemetry-chaos` (`src/bin/chaos.rs`) and of
//!   `tests/chaos.rs`: the real binaries on a 3-member cluster, faults, an audit.
//! - `tests/`: the tests themselves.
//!
//! Test support that does not need the services (etcd, the sample, environments, processes,
//! reading the keyspace) is in `telemetry-harness`, which the services' own tests use too.

pub mod bench;
pub mod chaos;
pub mod pipeline;

pub use pipeline::{Pipeline, PipelineBuilder, Stopped};
