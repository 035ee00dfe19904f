//! ckptio's errors as the Python exceptions a Python user expects.
//!
//! - I/O failures are `OSError` with the errno, a message naming the operation and the path,
//!   and `filename`: Python turns them into `FileNotFoundError`, `PermissionError`, ... by errno.
//! - A file that is not a valid checkpoint is `CheckpointFormatError`.
//! - A full queue under the `"error"` backpressure policy is `QueueFullError`.
//! - A bad argument is `ValueError`.
//! - Anything else is `CheckpointError`, the base of ckptio's own exceptions.

use ckptio::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    ckptio,
    CheckpointError,
    PyRuntimeError,
    "A checkpoint operation failed (the message names the path and the cause)."
);
create_exception!(
    ckptio,
    CheckpointFormatError,
    CheckpointError,
    "A file is not a valid torch.save checkpoint: truncated, corrupt (CRC-32), or malformed."
);
create_exception!(
    ckptio,
    QueueFullError,
    CheckpointError,
    "The save queue was full and the backpressure policy is \"error\": nothing was saved."
);

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add(
        "CheckpointFormatError",
        py.get_type::<CheckpointFormatError>(),
    )?;
    m.add("QueueFullError", py.get_type::<QueueFullError>())?;
    Ok(())
}

/// The Python exception for `e`.
pub(crate) fn to_py(e: Error) -> PyErr {
    let message = e.to_string();
    match root(&e) {
        Error::Io { path, source, .. } => match source.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, message, path.display().to_string())),
            None => PyOSError::new_err(message),
        },
        Error::Format { .. } | Error::Pickle { .. } | Error::Tensor { .. } => {
            CheckpointFormatError::new_err(message)
        }
        Error::QueueFull { .. } => QueueFullError::new_err(message),
        Error::Argument { .. } | Error::Path { .. } | Error::Template { .. } => {
            PyValueError::new_err(message)
        }
        _ => CheckpointError::new_err(message),
    }
}

/// The error behind the wrappers a background operation adds (`Background`, `Snapshot`).
fn root(e: &Error) -> &Error {
    match e {
        Error::Background { source, .. } | Error::Snapshot { source, .. } => root(source),
        other => other,
    }
}

/// `Result` into `PyResult`.
pub(crate) trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for ckptio::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
