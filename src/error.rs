//! The library's error type.

use std::path::PathBuf;

/// Every error the isonn library returns.
///
/// Messages name the file or value that failed, what is wrong with it and,
/// where one exists, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(candle_core::Error),

    /// Reading or writing a file failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error. It is part of the message, not a
        /// separate source, so that error chains print it once.
        cause: std::io::Error,
    },

    /// A data file is malformed (bad magic number, truncated, inconsistent).
    #[error("{path}: {message}")]
    Data {
        /// The file that failed to parse.
        path: PathBuf,
        /// Problem and fix.
        message: String,
    },

    /// A data set could not be found in any of the searched places.
    #[error("{0}")]
    DataNotFound(String),

    /// A model directory or `model.json` is invalid.
    #[error("{path}: {message}")]
    Model {
        /// The model file or directory.
        path: PathBuf,
        /// Problem and fix.
        message: String,
    },

    /// A network cannot be transformed into a non-negative one.
    #[error("cannot transform layer {layer}: {message}")]
    Transform {
        /// The index of the offending layer.
        layer: usize,
        /// Why, and what to change.
        message: String,
    },

    /// A configuration value is out of its valid range.
    #[error("invalid {name} {value}: {message}")]
    Config {
        /// The setting, as the user spells it (`--epochs`, `lr_out`).
        name: String,
        /// The offending value.
        value: String,
        /// Description of the valid values.
        message: String,
    },

    /// Training produced a non-finite loss or parameter. Nothing of the
    /// diverged state is saved.
    #[error(
        "training diverged at epoch {epoch}, batch {batch}: {detail}; nothing was saved from the \
         diverged state, and {last_good}; lower the learning rate and train again"
    )]
    Diverged {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based batch within the epoch.
        batch: usize,
        /// The loss or parameter that became non-finite.
        detail: String,
        /// The last good checkpoint, or that there is none.
        last_good: String,
    },

    /// Training stopped on request (Ctrl-C, SIGTERM) after a batch.
    #[error("training interrupted at epoch {epoch} after batch {batch}{}", match checkpoint {
        Some(p) => format!("; checkpoint written to {}", p.display()),
        None => "; no checkpoint directory was set, so nothing was saved".into(),
    })]
    Interrupted {
        /// The checkpoint written, if a checkpoint directory was set.
        checkpoint: Option<PathBuf>,
        /// 1-based epoch.
        epoch: usize,
        /// Batches of the epoch finished.
        batch: usize,
    },

    /// Shapes of a network and its inputs do not fit together.
    #[error("{0}")]
    Shape(String),

    /// A network cannot be exported to, or imported from, another format
    /// (ONNX, PyTorch state dicts).
    #[error("{location}: {message}")]
    Interop {
        /// The file, node or layer involved (`model.onnx: node /fc1/Gemm`,
        /// `layers.3`).
        location: String,
        /// Problem and fix.
        message: String,
    },
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }

    /// Builds a data-format error for `path`.
    pub fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Builds an import or export error for `location`.
    pub fn interop(location: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Interop {
            location: location.into(),
            message: message.into(),
        }
    }

    /// Builds a configuration error.
    pub fn config(
        name: impl Into<String>,
        value: impl std::fmt::Display,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            name: name.into(),
            value: value.to_string(),
            message: message.into(),
        }
    }
}
