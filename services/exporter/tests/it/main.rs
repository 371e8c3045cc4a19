//! The exporter against real etcd, a real Prometheus and a real VictoriaMetrics, started by the
//! harness on free ports: the sample exported once, with SIGKILLs, a TSDB restart, two
//! exporters of one name, poison records, compaction, and VictoriaMetrics.

mod faults;
mod helpers;
mod prometheus;
mod victoria;
