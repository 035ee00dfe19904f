//! Loads: a `torch.save` archive read and checked by ckptio, for PyTorch's unpickler.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ckptio::torch::{RecordSpan, Records};
use ckptio::Error;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::IntoPy;

/// Records that are not storages (`data.pkl`, `byteorder`, ...) are copied out when the archive
/// is opened; storages (`data/...`) are left where they are, for torch to use in place.
fn is_storage(name: &str) -> bool {
    name.starts_with("data/")
}

/// A `torch.save` archive, opened and checked: every record located inside the file, and the
/// small records copied out and checked against their CRC-32s (unless asked not to). It keeps
/// no pointer into the file's bytes: storages are read into memory torch owns
/// (`read_storages`, checked the same way), or mapped by torch itself.
#[pyclass(frozen, module = "ckptio._ckptio")]
pub(crate) struct Archive {
    path: PathBuf,
    records: Records,
    prefix: String,
    names: Vec<String>,
    spans: HashMap<String, RecordSpan>,
    small: HashMap<String, Vec<u8>>,
}

impl Archive {
    fn new(path: &Path, data: &[u8], records: Records) -> ckptio::Result<Self> {
        let mut spans = HashMap::new();
        let mut small = HashMap::new();
        for name in records.names() {
            spans.insert(name.to_owned(), records.span(name)?);
            if !is_storage(name) {
                small.insert(name.to_owned(), records.record(data, name)?.to_vec());
            }
        }
        Ok(Archive {
            path: path.to_path_buf(),
            prefix: records.prefix().to_owned(),
            names: records.names().map(str::to_owned).collect(),
            records,
            spans,
            small,
        })
    }

    fn span(&self, name: &str) -> PyResult<&RecordSpan> {
        self.spans.get(name).ok_or_else(|| {
            crate::errors::to_py(Error::Format {
                path: self.path.clone(),
                reason: format!("no record {}/{name}", self.prefix),
            })
        })
    }
}

#[pymethods]
impl Archive {
    /// Indexes the file at `path` through a memory map and copies its small records out
    /// (checked against their CRC-32s when `verify_crc`); storages are left in the file, for
    /// [`read_storages`](Self::read_storages) or for a map of torch's own.
    #[staticmethod]
    #[pyo3(signature = (path, verify_crc = true))]
    fn open(py: Python<'_>, path: PathBuf, verify_crc: bool) -> PyResult<Archive> {
        py.detach(|| {
            let (records, map) = Records::map(&path, verify_crc)?;
            Archive::new(&path, &map, records)
        })
        .py_err()
    }

    /// Reads storage records into buffers Python allocated, one per record: each target is
    /// `(name, address, nbytes, owner)`, `nbytes` the record's length. Two threads read, with
    /// the GIL released, each checking what it read against its CRC-32 (unless the archive was
    /// opened without checks).
    fn read_storages(
        &self,
        py: Python<'_>,
        targets: Vec<(String, usize, usize, Py<PyAny>)>,
    ) -> PyResult<()> {
        let mut seen = std::collections::HashSet::new();
        for (name, addr, nbytes, _) in &targets {
            if *nbytes != 0 && (*addr == 0 || !seen.insert(*addr)) {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "target for {name}: a null or repeated buffer address"
                )));
            }
        }
        let result = py.detach(|| {
            // SAFETY: the Python caller (`ckptio/_loading.py`) passes, for each record, a
            // storage it has just allocated with `nbytes` bytes, distinct from every other
            // (checked above), referenced by nothing else until this returns, and kept alive by
            // its owner in `targets` meanwhile. No pointer into them outlives this call.
            #[allow(unsafe_code)]
            let slices: Vec<(&str, &mut [u8])> = targets
                .iter()
                .map(|(name, addr, nbytes, _)| {
                    let dst: &mut [u8] = if *nbytes == 0 {
                        &mut []
                    } else {
                        unsafe { std::slice::from_raw_parts_mut(*addr as *mut u8, *nbytes) }
                    };
                    (name.as_str(), dst)
                })
                .collect();
            self.records.read_records_into(slices)
        });
        drop(targets);
        result.py_err()
    }

    /// The archive's folder (`archive/` in `archive/data.pkl`).
    #[getter]
    fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every record's name, without the folder.
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Whether record `name` exists.
    fn has(&self, name: &str) -> bool {
        self.spans.contains_key(name)
    }

    /// A record that is not a storage, as bytes.
    fn record<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyBytes>> {
        match self.small.get(name) {
            Some(b) => Ok(PyBytes::new(py, b)),
            None => {
                self.span(name)?;
                Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "{}: record {name} is a storage; use its offset",
                    self.path.display()
                )))
            }
        }
    }

    /// `(header offset, data offset, length)` of record `name` in the file.
    fn span_of(&self, name: &str) -> PyResult<(u64, u64, u64)> {
        let s = self.span(name)?;
        Ok((s.header_offset, s.offset, s.len))
    }
}
