//! A PyTorch storage seen by ckptio: a live tensor of bytes whose memory Python owns.

use std::sync::Arc;

use bytes::Bytes;
use ckptio::{DType, HostMemory, LiveTensor, TensorSource, Value};
use pyo3::prelude::*;

/// What Python passes for each storage: its address, its length in bytes, its `torch.save`
/// location tag (`"cpu"`, or the device a host copy was taken from), and the object that owns
/// the memory (kept alive for as long as ckptio may read it).
pub(crate) type StorageSpec = (usize, usize, String, Py<PyAny>);

/// Keeps a Python object alive; dropped without the GIL, PyO3 releases it later.
struct Owner(#[allow(dead_code)] Py<PyAny>);

/// One storage's memory in place.
struct Region {
    addr: usize,
    len: usize,
    _owner: Arc<Owner>,
}

impl AsRef<[u8]> for Region {
    #[allow(unsafe_code)]
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the Python caller hands `addr`/`len` of a CPU storage's memory together with
        // the object owning it, which `_owner` keeps alive; see `PyStorage`.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

/// A PyTorch storage in host memory, as a one-dimensional `uint8` live tensor.
///
/// The contract with the Python layer (`ckptio/_pickling.py`), which builds these only for
/// CPU storages (or host copies of device storages) and only inside a call that either writes
/// them before returning (a synchronous save) or copies them before returning (an Eager save):
/// `addr` and `len` are the storage's `data_ptr()` and `nbytes()`, and the owner is the
/// storage itself.
pub(crate) struct PyStorage {
    addr: usize,
    len: usize,
    location: String,
    owner: Arc<Owner>,
}

impl PyStorage {
    pub(crate) fn live((addr, len, location, owner): StorageSpec) -> Value {
        Value::Live(LiveTensor::new(PyStorage {
            addr,
            len,
            location,
            owner: Arc::new(Owner(owner)),
        }))
    }

    fn region(&self) -> Region {
        Region {
            addr: self.addr,
            len: self.len,
            _owner: self.owner.clone(),
        }
    }
}

impl TensorSource for PyStorage {
    fn dtype(&self) -> DType {
        DType::UInt8
    }

    fn shape(&self) -> Vec<usize> {
        vec![self.len]
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
        dst.copy_from_slice(self.region().as_ref());
        Ok(())
    }

    fn host_memory(&self) -> Option<&dyn HostMemory> {
        Some(self)
    }
}

// SAFETY: the bytes are the storage's own memory, `len` long, kept allocated by the owner they
// hold; they are written only by the Python program that saves them (PyTorch has no thread of
// its own writing a CPU storage). `protectable_bytes` is not offered: the memory may be pinned
// for a device's DMA.
#[allow(unsafe_code)]
unsafe impl HostMemory for PyStorage {
    unsafe fn borrow_bytes(&self) -> Option<Bytes> {
        Some(Bytes::from_owner(self.region()))
    }
}
