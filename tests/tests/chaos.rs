//! The short chaos variant inside the test suite: the real service binaries (built by the same
//! `cargo nextest run --workspace`) on a 3-member etcd with a Prometheus, each of the six faults
//! once, then the audit of etcd and Prometheus. A failure prints the seed, the schedule and the table; `scripts/chaos --seed N`
//! replays it (the long variant is `scripts/chaos`).

use telemetry_tests::chaos::{ChaosOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_under_every_kind_of_fault() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let work = tempfile::tempdir().expect("work dir");
    let options = ChaosOptions {
        rows: 20_000,
        rounds: 1,
        gap_s: 6.0,
        seed,
        bin_dir: telemetry_harness::workspace_bin_dir(),
        work_dir: work.path().to_path_buf(),
    };
    let report = run(&options).await.expect("the chaos run completes");
    println!("{}", report.table());
    if !report.problems.is_empty() {
        // Keep the logs for whoever reads the failure.
        let kept = work.keep();
        panic!(
            "chaos run failed (logs in {}):\n{}",
            kept.display(),
            report.table()
        );
    }
}
