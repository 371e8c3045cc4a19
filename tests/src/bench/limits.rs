//! What the bench needs from its environment: the open-file limit of the gateway load phase,
//! and where the release service binaries are.

use std::path::PathBuf;

use anyhow::Context as _;

/// Where the release service binaries are: next to this binary (`target/release/`).
pub fn service_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating telemetry-bench")?;
    Ok(exe
        .parent()
        .context("telemetry-bench has no directory")?
        .to_path_buf())
}

/// The soft and hard open-file limits of this process, from `/proc/self/limits`
/// (`None` stands for unlimited).
pub fn open_file_limits() -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no \"Max open files\" in /proc/self/limits")?;
    let mut values = line["Max open files".len()..].split_whitespace();
    let mut parse = || -> anyhow::Result<Option<u64>> {
        match values.next().context("short \"Max open files\" line")? {
            "unlimited" => Ok(None),
            v => Ok(Some(v.parse()?)),
        }
    };
    let soft = parse()?;
    let hard = parse()?;
    Ok((soft, hard))
}

/// Fails with what to run when the soft open-file limit is below `needed`.
pub fn ensure_open_files(needed: u64) -> anyhow::Result<()> {
    let (soft, hard) = open_file_limits()?;
    if let Some(soft) = soft
        && soft < needed
    {
        let hard = hard.map_or("unlimited".to_string(), |h| h.to_string());
        anyhow::bail!(
            "the open-file limit is {soft} (hard limit {hard}), and the gateway load phase needs about \
             {needed} descriptors (client and server side of every REST connection and WebSocket, in \
             this one process). Raise it with `ulimit -n {needed}` in this shell (scripts/bench raises \
             the soft limit to the hard one), or pass smaller --rest-clients/--ws-load-subscribers."
        );
    }
    Ok(())
}
