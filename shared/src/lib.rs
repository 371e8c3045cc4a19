//! The common library of the GPU telemetry pipeline.
//!
//! One place defines what the three services must agree on:
//! - [`access`]: each service's etcd role: what it may read and write, by key prefix;
//! - [`config`]: environment-variable configuration and its errors;
//! - [`keys`]: the etcd key layout;
//! - [`version`]: the schema versions and their JSON Schemas;
//! - [`message`]: the message model (current schema version);
//! - [`schema`]: the older wire forms, validation and migration;
//! - [`record`]: lean records (profiles plus what varies per message) on the queue and in the
//!   store;
//! - [`model`]: the index, stats and dead-letter records beside the telemetry;
//! - [`credentials`]: the CA, client certificate and password shown to etcd, read from files;
//! - [`etcd`]: connection, error classification, bounded transactions, bucketed leases;
//! - [`lease`]: a lease kept alive on the holder's own timer, that says when it is lost;
//! - [`watch`]: following a prefix in revision order, exactly once;
//! - [`retry`]: the one retry policy (capped exponential backoff with jitter);
//! - [`exposition`]: records as Prometheus samples, named and labelled like dcgm-exporter;
//! - [`observe`]: tracing, Prometheus metrics, shutdown signals;
//! - [`health`]: liveness and readiness (`/livez`, `/readyz`).
//!
//! With its default `mimalloc` feature it also sets the global allocator of every binary that
//! links it (all of the workspace's): mimalloc. The services allocate many small, short-lived
//! buffers per message (fields, keys, encoded values, gRPC frames); glibc's allocator spent a
//! fifth of their CPU on them in the end-to-end bench, mimalloc markedly less.

/// The allocator of every binary of the workspace (see the crate documentation). The
/// `mimalloc` feature (on by default) sets it; without it, binaries keep the system allocator
/// or set their own.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod access;
pub mod config;
pub mod credentials;
pub mod etcd;
pub mod exposition;
pub mod health;
pub mod keys;
pub mod lease;
pub mod message;
pub mod model;
pub mod observe;
pub mod profiles;
pub mod record;
pub mod retry;
pub mod schema;
pub mod version;
pub mod watch;

pub use config::{CommonConfig, ConfigError};
pub use keys::Keyspace;
pub use message::{Checkpoint, Fields, Message, SourcePosition, Timestamp};
pub use version::SchemaVersion;
