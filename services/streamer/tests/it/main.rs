//! Integration tests of the streamer against a real etcd (one per test).

mod helpers;
mod parsing;
mod exactly_once;
mod operation;
