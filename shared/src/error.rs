//! The one error type of the `shared` crate.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while reading, writing or checking data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are not what they must be.
    #[error("{path}: {msg}")]
    Corrupt { path: PathBuf, msg: String },
    /// An image could not be decoded or is refused.
    #[error("{0}")]
    Decode(String),
    /// A user-supplied value or input layout is wrong.
    #[error("{0}")]
    Invalid(String),
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A corruption found in the named file.
    pub fn corrupt(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// Attaches a path to I/O results: `fs::read(p).at(p)?`.
pub trait IoContext<T> {
    /// Maps an `io::Error` to [`Error::Io`] naming `path`.
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
