//! Integration tests of the collector against a real etcd (one per test).

mod faults;
mod helpers;
mod messages;
mod pipeline;
