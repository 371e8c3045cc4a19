//! Integration tests of the streamer against a real etcd (one per test).

mod exactly_once;
mod helpers;
mod metrics;
mod operation;
mod parsing;
mod scrape;
mod source_identity;
