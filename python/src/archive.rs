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

/// The size of a transparent huge page.
const HUGE: usize = 2 << 20;

/// Asks the kernel to back the whole 2 MiB blocks of `len` bytes at `addr` with transparent
/// huge pages (a hint; failures are ignored). A fresh buffer's first write otherwise takes one
/// page fault per 4 KiB, which costs more than reading the file into it.
fn advise_huge_pages(addr: usize, len: usize) {
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: `madvise(MADV_HUGEPAGE)` changes how the range is backed, never its contents;
        // the range lies inside the caller's buffer.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE)
        };
    }
}

/// A `torch.save` archive, opened and checked: every record located inside the file, every
/// record's CRC-32 checked (unless memory-mapped or asked not to), and the small records
/// copied out. It keeps no pointer into the file's bytes: storages are handed to torch by
/// offset, into memory torch owns.
#[pyclass(frozen, module = "ckptio._ckptio")]
pub(crate) struct Archive {
    path: PathBuf,
    prefix: String,
    names: Vec<String>,
    spans: HashMap<String, RecordSpan>,
    small: HashMap<String, Vec<u8>>,
}

impl Archive {
    fn new(
        path: &Path,
        data: &[u8],
        records: &Records,
        check_storages: bool,
    ) -> ckptio::Result<Self> {
        let mut spans = HashMap::new();
        let mut small = HashMap::new();
        for name in records.names() {
            spans.insert(name.to_owned(), records.span(name)?);
            if !is_storage(name) {
                small.insert(name.to_owned(), records.record(data, name)?.to_vec());
            } else if check_storages {
                records.record(data, name)?;
            }
        }
        Ok(Archive {
            path: path.to_path_buf(),
            prefix: records.prefix().to_owned(),
            names: records.names().map(str::to_owned).collect(),
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
    /// Reads the file at `path` into the `nbytes` bytes at address `addr` (memory `owner`
    /// owns; exactly the file's length), with the GIL released, and checks it.
    #[staticmethod]
    #[pyo3(signature = (path, addr, nbytes, owner, verify_crc = true))]
    fn read(
        py: Python<'_>,
        path: PathBuf,
        addr: usize,
        nbytes: usize,
        owner: Py<PyAny>,
        verify_crc: bool,
    ) -> PyResult<Archive> {
        if addr == 0 && nbytes != 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "null buffer address",
            ));
        }
        let result = py.detach(|| {
            advise_huge_pages(addr, nbytes);
            // SAFETY: the Python caller (`ckptio/_loading.py`) passes a storage it has just
            // allocated with `nbytes` bytes, which nothing else references until this returns,
            // and `owner` keeps it alive meanwhile. No pointer into it outlives this call.
            #[allow(unsafe_code)]
            let data: &mut [u8] = if nbytes == 0 {
                &mut []
            } else {
                unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, nbytes) }
            };
            let records = Records::read_into(&path, data, verify_crc)?;
            Archive::new(&path, data, &records, verify_crc)
        });
        drop(owner);
        result.py_err()
    }

    /// Indexes the file at `path` through a memory map (for a load whose storages torch maps
    /// itself); CRC-32s are not checked, since that would read every page.
    #[staticmethod]
    fn map(py: Python<'_>, path: PathBuf) -> PyResult<Archive> {
        py.detach(|| {
            let file = std::fs::File::open(&path).map_err(|e| Error::Io {
                op: "open",
                path: path.clone(),
                source: e,
            })?;
            // SAFETY: a read-only map dropped before this returns; ckptio never rewrites a file
            // in place (saves are renamed into place), so it cannot change under the map.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io {
                op: "memory-map",
                path: path.clone(),
                source: e,
            })?;
            let records = Records::index(&map, &path, false)?;
            Archive::new(&path, &map, &records, false)
        })
        .py_err()
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
