//! One error type for everything a user can hand us: each message names the
//! file or value and says what is wrong, in one line.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

impl ModelError {
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        ModelError::File { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        ModelError::Invalid(msg.into())
    }
}

impl From<zmlx_core::CoreError> for ModelError {
    fn from(e: zmlx_core::CoreError) -> Self {
        ModelError::Invalid(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
