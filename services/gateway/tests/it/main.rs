//! Integration tests of the gateway against a real etcd holding data the real streamer and
//! collector wrote.

mod dashboard;
mod filters;
mod helpers;
mod large_values;
mod lean;
mod metrics;
mod openapi;
mod rest;
mod security;
mod window;
mod ws;
