//! The one public error type of ckptio.
//!
//! Every variant names the file it is about (when there is one) and says what was wrong, so a
//! message read in a log is enough to act on. Causes are kept as `source`, never flattened into
//! strings.

use std::path::{Path, PathBuf};

use crate::tensor::DType;

/// Result with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in ckptio.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("create temporary file", "read", "fsync directory", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The file is not a valid checkpoint: its container (zip), its layout or (for a sharded
    /// checkpoint) its `.metadata` is broken or inconsistent.
    #[error("{path}: not a valid checkpoint: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong, in words.
        reason: String,
    },

    /// The pickle stream inside the checkpoint is malformed or exceeds a limit.
    #[error("{path}: bad pickle data at byte {offset}: {reason}")]
    Pickle {
        /// The file.
        path: PathBuf,
        /// Byte offset in `data.pkl` where the problem was found.
        offset: u64,
        /// What was wrong.
        reason: String,
    },

    /// `weights_only` loading met something PyTorch's weights-only unpickler refuses.
    #[error(
        "{path}: refused under weights_only=true: {what} (PyTorch's weights-only unpickler \
         refuses it too; load with weights_only=false only if you trust this file)"
    )]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// The global or opcode that was refused.
        what: String,
    },

    /// A tensor's metadata does not fit its storage, or a storage is missing.
    #[error("{path}: bad tensor {what}: {reason}")]
    Tensor {
        /// The file (empty when the tensor was built in memory).
        path: PathBuf,
        /// Which tensor or storage.
        what: String,
        /// What was wrong.
        reason: String,
    },

    /// The checkpoint tree holds something the target format cannot represent.
    #[error("cannot save to {path}: {reason}")]
    Unsupported {
        /// The destination.
        path: PathBuf,
        /// What cannot be represented and why.
        reason: String,
    },

    /// Restoring state in place found keys that did not match (strict mode).
    #[error(
        "{path}: state does not match: missing keys {missing:?}, unexpected keys {unexpected:?}"
    )]
    KeyMismatch {
        /// The file the state came from.
        path: PathBuf,
        /// Keys the target expected that the file did not have.
        missing: Vec<String>,
        /// Keys the file had that the target did not expect.
        unexpected: Vec<String>,
    },

    /// An error from libtorch (feature `tch`).
    #[cfg(feature = "tch")]
    #[error("{path}: libtorch: {source}")]
    Torch {
        /// The file involved, if any.
        path: PathBuf,
        /// The tch error.
        #[source]
        source: tch::TchError,
    },

    /// A background operation (an async save or remove) failed.
    #[error("background operation on {path} failed: {source}")]
    Background {
        /// The checkpoint path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::sync::Arc<Error>,
    },

    /// Several errors, reported together (e.g. by teardown), each once.
    #[error("{} errors: {}", errors.len(), errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Multiple {
        /// The errors, oldest first.
        errors: Vec<Error>,
    },

    /// The backend, or a tensor's copy into a snapshot, panicked while handling this path; the
    /// writer survived.
    #[error("panic while checkpointing {path}: {message}")]
    Panic {
        /// The checkpoint path.
        path: PathBuf,
        /// The panic message.
        message: String,
    },

    /// The save queue was full and the backpressure policy is `Error`.
    #[error("save queue is full; {path} was not saved (backpressure policy Error)")]
    QueueFull {
        /// The checkpoint that was not saved.
        path: PathBuf,
    },

    /// Teardown gave up waiting.
    #[error("teardown timed out with {} operations pending: {pending:?}", pending.len())]
    TeardownTimeout {
        /// Paths whose operations were still pending.
        pending: Vec<PathBuf>,
    },

    /// A tensor operation was asked for something the tensor's shape or dtype does not allow
    /// ([`HostTensor::narrow`](crate::HostTensor::narrow) past the end,
    /// [`HostTensor::to_vec`](crate::HostTensor::to_vec) with another element type, a copy
    /// into a buffer of the wrong length).
    #[error("{op} on a {dtype} tensor of shape {shape:?}: {reason}")]
    TensorOp {
        /// The operation (`"narrow(dim=0, start=2, len=3)"`, `"to_vec::<f32>"`, ...).
        op: String,
        /// The tensor's element type.
        dtype: DType,
        /// The tensor's shape.
        shape: Vec<usize>,
        /// What does not fit.
        reason: String,
    },

    /// An argument of a call is out of its range or inconsistent with another one.
    #[error("argument `{name}`: {reason}")]
    Argument {
        /// The argument's name, as in the function's signature.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A checkpoint path cannot name a checkpoint file (empty, or without a file name).
    #[error("checkpoint path {path:?} cannot be used: {reason}")]
    Path {
        /// The path as given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },

    /// A [`CheckpointManager`](crate::manager::CheckpointManager) file name template is
    /// malformed, or renders a name that is not allowed.
    #[error("file name template {template:?}: {reason}")]
    Template {
        /// The template ([`ManagerConfig::filename`](crate::manager::ManagerConfig::filename)).
        template: String,
        /// What is wrong with it, or with the name it rendered.
        reason: String,
    },

    /// A saved state value does not have the form the
    /// [`Stateful`](crate::state::Stateful) restoring it expects (another type, a missing
    /// entry, an optimizer state dict for other parameters or hyperparameters).
    #[error("cannot restore state {}: {reason}", state_name(key))]
    State {
        /// The name the state was saved under (as given to [`state::load`](crate::state::load));
        /// empty when `load_state_dict` was called directly.
        key: String,
        /// What does not match.
        reason: String,
    },

    /// A device named by a location tag or asked for is unknown or not present in this
    /// process.
    #[error("device {device:?}: {reason}")]
    Device {
        /// The device (`"cuda:1"`, a location tag as saved).
        device: String,
        /// Why it cannot be used, and what to do.
        reason: String,
    },

    /// Staging a snapshot would take more memory than the staging pool may hold
    /// ([`Builder::pool_budget`](crate::runtime::Builder::pool_budget)).
    #[error(
        "staging for {needed} bytes would exceed the pool budget of {budget} bytes, {in_use} \
         of which are in use (Builder::pool_budget)"
    )]
    StagingBudget {
        /// Bytes the snapshot needs.
        needed: u64,
        /// The pool's budget.
        budget: u64,
        /// Bytes of the pool in use when the snapshot asked.
        in_use: u64,
    },

    /// A sharded (DCP) checkpoint directory is not committed: it has no `.metadata`, so it
    /// is incomplete (a save was interrupted, or is still running on some rank).
    #[error(
        "{path}: incomplete sharded checkpoint: no .metadata (a save was interrupted or has not \
         been committed yet)"
    )]
    Incomplete {
        /// The checkpoint directory.
        path: PathBuf,
    },

    /// The ranks' parts of a sharded checkpoint cannot be committed together: they disagree
    /// (a tensor's shape or dtype, which keys exist) or leave a tensor with missing or
    /// overlapping chunks. Nothing was committed; an earlier checkpoint is untouched.
    #[error("{path}: cannot commit the sharded checkpoint: {reason}")]
    Commit {
        /// The checkpoint directory.
        path: PathBuf,
        /// What the ranks disagree on.
        reason: String,
    },

    /// Some ranks did not hand in their part of a sharded checkpoint in time: it was not
    /// committed (the directory stays incomplete; an earlier checkpoint is untouched).
    #[error(
        "{path}: sharded checkpoint not committed: ranks {missing:?} did not finish their part \
         within {waited:?}"
    )]
    CommitTimeout {
        /// The checkpoint directory.
        path: PathBuf,
        /// The ranks whose part was missing.
        missing: Vec<usize>,
        /// How long the commit waited.
        waited: std::time::Duration,
    },

    /// Taking the snapshot of a save's live tensors failed (a tensor's copy failed or
    /// panicked); the file at the path is left as it was.
    #[error("snapshot of the live tensors for {path} failed: {source}")]
    Snapshot {
        /// The checkpoint path.
        path: PathBuf,
        /// Why the snapshot failed.
        #[source]
        source: std::sync::Arc<Error>,
    },
}

/// How a [`Error::State`] message names its state.
fn state_name(key: &str) -> String {
    if key.is_empty() {
        "value".to_owned()
    } else {
        format!("{key:?}")
    }
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub(crate) fn format(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(
        path: impl AsRef<Path>,
        what: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.as_ref().to_path_buf(),
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }

    /// A [`Error::State`] not yet knowing its key ([`state::restore`](crate::state::restore)
    /// adds it): what a [`Stateful::load_state_dict`](crate::state::Stateful::load_state_dict)
    /// returns when the state it is given does not have the form it expects.
    pub fn state(reason: impl Into<String>) -> Self {
        Error::State {
            key: String::new(),
            reason: reason.into(),
        }
    }

    /// This error, naming `key` when it is a [`Error::State`] that names no key yet.
    pub(crate) fn in_state(self, key: &str) -> Self {
        match self {
            Error::State { key: k, reason } if k.is_empty() => Error::State {
                key: key.to_owned(),
                reason,
            },
            other => other,
        }
    }

    /// The path this error is about, if it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::Format { path, .. }
            | Error::Pickle { path, .. }
            | Error::Unsafe { path, .. }
            | Error::Tensor { path, .. }
            | Error::Unsupported { path, .. }
            | Error::KeyMismatch { path, .. }
            | Error::Background { path, .. }
            | Error::Panic { path, .. }
            | Error::QueueFull { path }
            | Error::Path { path, .. }
            | Error::Incomplete { path }
            | Error::Commit { path, .. }
            | Error::CommitTimeout { path, .. }
            | Error::Snapshot { path, .. } => Some(path),
            #[cfg(feature = "tch")]
            Error::Torch { path, .. } => Some(path),
            Error::Multiple { .. }
            | Error::TeardownTimeout { .. }
            | Error::TensorOp { .. }
            | Error::Argument { .. }
            | Error::Template { .. }
            | Error::State { .. }
            | Error::Device { .. }
            | Error::StagingBudget { .. } => None,
        }
    }
}
