//! The trainer library's one error type, so that callers and tests match on what went wrong
//! instead of on message text. The binary (`main.rs`) prints these with their causes.

use std::path::{Path, PathBuf};

/// Everything the trainer library reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config key or value that cannot be used; `key` names it.
    #[error("{message}")]
    Config { key: String, message: String },
    /// The training loss stopped being finite at step `step` (counted from 1, as `metrics.jsonl`
    /// counts), after `last_checkpoint`.
    #[error(
        "the loss became {value} at step {step}: training stopped. The last good checkpoint ({}) \
         is intact: continue from it with --resume --change-schedule and a lower lr or a faster \
         warmup (--set lr=..., --set warmup_epochs=...)",
        last_checkpoint.as_ref().map_or("none yet".to_string(), |p| p.display().to_string())
    )]
    NonFiniteLoss {
        step: u64,
        value: f64,
        last_checkpoint: Option<PathBuf>,
    },
    /// A stop signal (SIGTERM, SIGINT) ended the run after `step`, checkpointed in `checkpoint`.
    #[error(
        "stopped by a signal after step {step}; checkpoint {checkpoint} holds it: continue with \
         the same command and --resume"
    )]
    Interrupted { step: u64, checkpoint: PathBuf },
    /// Rank `rank` of a data-parallel run failed with `source`; the other ranks were stopped.
    #[error("rank {rank} failed, and the other ranks were stopped: {source}")]
    Rank { rank: usize, source: Box<Error> },
    /// An operating-system error while doing `action` on `path`.
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose contents are not what the trainer expects.
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    /// A checkpoint whose `what` does not fit the model built from the run's config.
    #[error("checkpoint {path} has no matching {what} (was it made with another config?)")]
    Checkpoint {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: Box<candle_core::Error>,
    },
    /// Input data that does not fit the job (dataset size, view shards, labels).
    #[error("{0}")]
    Data(String),
    /// A run folder in a state the request does not fit (resume, existing checkpoints).
    #[error("{0}")]
    Run(String),
    /// A device that this build or machine does not have.
    #[error("{0}")]
    Device(String),
    /// Two computations that must agree do not (parity).
    #[error("{0}")]
    Mismatch(String),
    /// Drawing a plot failed.
    #[error("plot: {0}")]
    Plot(String),
    /// A tensor operation failed (boxed: Candle's error is large).
    #[error(transparent)]
    Tensor(Box<candle_core::Error>),
    /// Reading shards or running the input pipeline failed.
    #[error(transparent)]
    Shards(#[from] shared::error::Error),
    /// A JSON document could not be read or written.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Result with the trainer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A config error on `key`.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Tensor(Box::new(e))
    }
}

/// Attaches what was being done, and to which path, to an I/O error.
pub trait IoContext<T> {
    /// `Err(e)` becomes [`Error::Io`] naming `action` and `path`.
    fn io(self, action: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io(self, action: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            action,
            path: path.to_path_buf(),
            source,
        })
    }
}
