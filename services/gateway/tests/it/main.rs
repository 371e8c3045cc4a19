//! Integration tests of the gateway against a real etcd holding data the real streamer and
//! collector wrote.

mod dashboard;
mod helpers;
mod rest;
mod ws;
