//! Saves: the synchronous `save`, and `Engine`, ckptio's asynchronous runtime for Python.

use std::path::PathBuf;
use std::time::Duration;

use ckptio::runtime::Backpressure;
use ckptio::{torch, AsyncCheckpointIo, CheckpointIo, SaveHandle, SaveOptions, TorchCheckpointIo};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::IntoPy;
use crate::storage::{PyStorage, StorageSpec};

/// A pickled checkpoint: the pickle (copied; it is small) and its storages in key order.
fn checkpoint(pickle: &Bound<'_, PyBytes>, storages: Vec<StorageSpec>) -> PyResult<ckptio::Value> {
    let storages = storages.into_iter().map(PyStorage::live).collect();
    torch::pickled(bytes::Bytes::copy_from_slice(pickle.as_bytes()), storages).py_err()
}

/// Writes a pickled checkpoint to `path` in the `torch.save` format, atomically (and durably
/// when `durable`), with the storages written straight from their memory. The GIL is released
/// while it writes.
#[pyfunction]
#[pyo3(signature = (path, pickle, storages, durable = true))]
pub(crate) fn save(
    py: Python<'_>,
    path: PathBuf,
    pickle: &Bound<'_, PyBytes>,
    storages: Vec<StorageSpec>,
    durable: bool,
) -> PyResult<()> {
    let value = checkpoint(pickle, storages)?;
    let options = SaveOptions::default().durable(durable);
    py.detach(|| TorchCheckpointIo::new().save_checkpoint(&value, &path, &options))
        .py_err()
}

/// `None` when this process may write-protect memory (`userfaultfd`), else the reason why not.
#[pyfunction]
pub(crate) fn write_protect_unavailable() -> Option<String> {
    ckptio::runtime::write_protect_available()
        .err()
        .map(|e| e.to_string())
}

/// Removes the checkpoint at `path` (a file or a directory); quiet when it is absent.
#[pyfunction]
pub(crate) fn remove(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    py.detach(|| TorchCheckpointIo::new().remove_checkpoint(&path))
        .py_err()
}

/// Removes the temporary files an interrupted save left in `dir`; returns how many.
#[pyfunction]
pub(crate) fn clean_temp_files(py: Python<'_>, dir: PathBuf) -> PyResult<usize> {
    py.detach(|| ckptio::clean_temp_files(&dir)).py_err()
}

fn backpressure(name: &str) -> PyResult<Backpressure> {
    match name {
        "block" => Ok(Backpressure::Block),
        "skip" => Ok(Backpressure::Skip),
        "error" => Ok(Backpressure::Error),
        other => Err(PyValueError::new_err(format!(
            "backpressure must be \"block\", \"skip\" or \"error\", not {other:?}"
        ))),
    }
}

/// ckptio's asynchronous runtime over the `torch.save` backend: a save copies the storages
/// into the staging pool before it returns and writes them on a background writer thread.
#[pyclass(frozen, module = "ckptio._ckptio")]
pub(crate) struct Engine {
    io: AsyncCheckpointIo<TorchCheckpointIo>,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (*, capacity = 1, writers = 1, backpressure = "block", pool_budget = None, write_protect = false))]
    fn new(
        capacity: usize,
        writers: usize,
        backpressure: &str,
        pool_budget: Option<usize>,
        write_protect: bool,
    ) -> PyResult<Self> {
        if writers == 0 {
            return Err(PyValueError::new_err("writers must be at least 1"));
        }
        let mut b = AsyncCheckpointIo::<TorchCheckpointIo>::builder()
            .capacity(capacity)
            .writers(writers)
            .backpressure(self::backpressure(backpressure)?)
            .write_protect(write_protect);
        if let Some(budget) = pool_budget {
            b = b.pool_budget(budget);
        }
        Ok(Engine {
            io: b.build(TorchCheckpointIo::new()),
        })
    }

    /// Copies the storages into the staging pool (GIL released), queues the write and returns
    /// its handle.
    #[pyo3(signature = (path, pickle, storages, durable = true))]
    fn save(
        &self,
        py: Python<'_>,
        path: PathBuf,
        pickle: &Bound<'_, PyBytes>,
        storages: Vec<StorageSpec>,
        durable: bool,
    ) -> PyResult<Handle> {
        let value = checkpoint(pickle, storages)?;
        let options = SaveOptions::default().durable(durable);
        let handle = py
            .detach(|| self.io.save_with_options(&value, &path, &options))
            .py_err()?;
        // The storages were copied: the Python objects may go (dropped here, with the GIL).
        drop(value);
        Ok(Handle { inner: handle })
    }

    /// Allocates the staging memory `saves` saves of this checkpoint will use, now (GIL
    /// released), so that no save in the loop allocates; returns the bytes reserved. Only the
    /// storages' sizes are used: their memory is not read.
    #[pyo3(signature = (pickle, storages, saves = 1))]
    fn reserve(
        &self,
        py: Python<'_>,
        pickle: &Bound<'_, PyBytes>,
        storages: Vec<StorageSpec>,
        saves: usize,
    ) -> PyResult<usize> {
        let value = checkpoint(pickle, storages)?;
        let reserved = py.detach(|| self.io.reserve(&value, saves)).py_err();
        drop(value);
        reserved
    }

    /// Queues the removal of `path` after every save of it submitted before.
    fn remove(&self, py: Python<'_>, path: PathBuf) -> PyResult<Handle> {
        let handle = py.detach(|| self.io.remove(&path)).py_err()?;
        Ok(Handle { inner: handle })
    }

    /// Waits for every pending operation on `path`.
    fn wait_path(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.io.wait_path(&path)).py_err()
    }

    /// Waits for every pending operation; raises the errors nobody was told of yet.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.io.flush()).py_err()
    }

    /// Drains the queue and joins the threads; raises the errors nobody was told of yet. The
    /// engine can be used again afterwards.
    #[pyo3(signature = (timeout = None))]
    fn teardown(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        match timeout {
            None => py.detach(|| self.io.teardown()).py_err(),
            Some(t) => {
                let t = seconds(t)?;
                py.detach(|| self.io.teardown_timeout(t)).py_err()
            }
        }
    }

    /// The runtime's counters, as a dict.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.io.status();
        let d = PyDict::new(py);
        d.set_item("pending", s.pending)?;
        d.set_item("bytes_in_flight", s.bytes_in_flight)?;
        d.set_item("saves", s.saves)?;
        d.set_item("bytes_written", s.bytes_written)?;
        d.set_item("skips", s.skips)?;
        d.set_item("errors", s.errors)?;
        d.set_item("pool_bytes", s.pool.in_use + s.pool.free)?;
        d.set_item("pool_allocations", s.pool.allocations)?;
        d.set_item("write_protected", s.write_protected)?;
        Ok(d)
    }
}

fn seconds(t: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(t).map_err(|_| {
        PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds, not {t}"
        ))
    })
}

/// One queued operation.
#[pyclass(frozen, module = "ckptio._ckptio")]
pub(crate) struct Handle {
    inner: SaveHandle,
}

#[pymethods]
impl Handle {
    /// The checkpoint's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    /// Whether the operation has finished (written, failed or skipped).
    fn done(&self) -> bool {
        self.inner.is_finished()
    }

    /// Waits (GIL released) until it finished and returns what it measured, or `None` when
    /// `timeout` seconds passed first; raises its error (which is then reported only here).
    #[pyo3(signature = (timeout = None))]
    fn wait<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let result = match timeout {
            None => Some(py.detach(|| self.inner.wait())),
            Some(t) => {
                let t = seconds(t)?;
                py.detach(|| self.inner.wait_timeout(t))
            }
        };
        let Some(result) = result else {
            return Ok(None);
        };
        let r = result.py_err()?;
        let d = PyDict::new(py);
        d.set_item("path", &r.path)?;
        d.set_item("bytes", r.bytes)?;
        d.set_item("skipped", r.skipped)?;
        d.set_item("durable", r.durable)?;
        d.set_item("stage_s", r.stage.as_secs_f64())?;
        d.set_item("queue_wait_s", r.queue_wait.as_secs_f64())?;
        d.set_item("write_s", r.write.as_secs_f64())?;
        d.set_item("file_bytes", r.file_bytes)?;
        Ok(Some(d))
    }

    fn __repr__(&self) -> String {
        format!(
            "<ckptio Handle {} {}>",
            self.inner.path().display(),
            if self.inner.is_finished() {
                "finished"
            } else {
                "pending"
            }
        )
    }
}
