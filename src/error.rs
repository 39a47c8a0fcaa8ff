//! The library's error type: what went wrong, as a value.

use crate::diag::Diagnostics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Parse and check errors, with spans into the sources.
    #[error("{0}")]
    Source(Diagnostics),
    /// `--params k=v` names a hyperparameter the loss does not have, or is malformed.
    #[error("{0}")]
    Params(String),
    /// Inputs of the wrong number, shape or size.
    #[error("{0}")]
    Shape(String),
    /// Something this backend cannot run yet.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The GPU path cannot run here: no CUDA driver, or no device.
    #[error("no GPU: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed.
    #[error("CUDA: {0}")]
    Device(String),
}

impl Error {
    /// The full report for a person: for source errors, the underlined source lines.
    pub fn render(&self) -> String {
        match self {
            Error::Source(d) => d.render(),
            other => format!("error: {other}\n"),
        }
    }
}
