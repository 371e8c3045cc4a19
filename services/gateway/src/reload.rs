//! Files the gateway reads again when they change: the TLS certificate and key, and the API
//! tokens.
//!
//! The files are read every `GATEWAY_RELOAD_INTERVAL` and compared by content (a SHA-256 of
//! all of them), so a renewal written in place, a new file renamed over the old one and the
//! symlink swap Kubernetes does for a mounted Secret are all seen, with no file-notification
//! machinery to miss one. Changed content is handed to the owner's `apply`: content it
//! rejects (a certificate without its key yet, a key that does not match, a malformed token
//! line) is logged once and the previous content stays in use; the next change is tried again.

use std::{path::PathBuf, time::Duration};

use sha2::{Digest, Sha256};
use telemetry_shared::observe::emit;
use tokio_util::sync::CancellationToken;

use crate::events::FileReloaded;

/// A file the gateway could not use, naming the variable that points at it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{var}={path}: {reason}")]
pub struct FileError {
    /// The variable naming the file, e.g. `GATEWAY_TLS_CERT_FILE`.
    pub var: &'static str,
    /// The file.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One watched file and the variable that names it.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub var: &'static str,
    pub path: PathBuf,
}

impl Source {
    /// The file's bytes.
    pub(crate) fn read(&self) -> Result<Vec<u8>, FileError> {
        std::fs::read(&self.path).map_err(|e| self.error(format!("cannot be read: {e}")))
    }

    /// An error about this file.
    pub(crate) fn error(&self, reason: impl Into<String>) -> FileError {
        FileError {
            var: self.var,
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// A set of files read together, and the content last handed to the owner.
pub(crate) struct Watched {
    /// `tls` or `tokens` (the metric's `file` label).
    pub what: &'static str,
    pub sources: Vec<Source>,
}

impl Watched {
    /// Every file's bytes, in order.
    pub(crate) fn read(&self) -> Result<Vec<Vec<u8>>, FileError> {
        self.sources.iter().map(Source::read).collect()
    }

    fn paths(&self) -> String {
        self.sources
            .iter()
            .map(|s| s.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn digest(contents: &[Vec<u8>]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for content in contents {
        hasher.update((content.len() as u64).to_be_bytes());
        hasher.update(content);
    }
    hasher.finalize().into()
}

/// Reads `files` every `interval` until `shutdown` and hands content that differs from the
/// last seen (starting with `first`) to `apply`, which returns a summary of what is now in use
/// or why the content was rejected.
pub(crate) async fn follow(
    files: Watched,
    first: Vec<Vec<u8>>,
    interval: Duration,
    shutdown: CancellationToken,
    mut apply: impl FnMut(&[Vec<u8>]) -> Result<String, FileError> + Send,
) {
    let mut seen = digest(&first);
    drop(first);
    let mut unreadable: Option<FileError> = None;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let paths = files.paths();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let contents = match files.read() {
            Ok(contents) => contents,
            Err(error) => {
                // Logged once per distinct failure (a file being replaced may vanish briefly).
                if unreadable.as_ref() != Some(&error) {
                    emit(FileReloaded {
                        file: files.what,
                        path: &paths,
                        outcome: Err(error.to_string()),
                    });
                    unreadable = Some(error);
                }
                continue;
            }
        };
        unreadable = None;
        let now = digest(&contents);
        if now == seen {
            continue;
        }
        seen = now;
        emit(FileReloaded {
            file: files.what,
            path: &paths,
            outcome: apply(&contents).map_err(|e| e.to_string()),
        });
    }
}
