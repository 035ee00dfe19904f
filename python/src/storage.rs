//! A PyTorch storage seen by ckptio: a live tensor of bytes whose memory Python owns.

use std::sync::Arc;

use bytes::Bytes;
use ckptio::{DType, HostMemory, LiveTensor, TensorSource, Value};
use pyo3::prelude::*;

/// What Python passes for each storage: its address, its length in bytes, its `torch.save`
/// location tag (`"cpu"`, or the device a host copy was taken from), the object that owns
/// the memory (kept alive for as long as ckptio may read it), and whether the memory may be
/// write-protected instead of copied (a CPU storage that is not pinned for a device's DMA).
pub(crate) type StorageSpec = (usize, usize, String, Py<PyAny>, bool);

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
    protectable: bool,
}

impl PyStorage {
    pub(crate) fn live((addr, len, location, owner, protectable): StorageSpec) -> Value {
        Value::Live(LiveTensor::new(PyStorage {
            addr,
            len,
            location,
            owner: Arc::new(Owner(owner)),
            protectable,
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

// SAFETY: the bytes are the storage's own memory, `len` long, kept allocated at the same
// address by the storage object they hold, for as long as they are held (the storage may be
// dropped by the program, not freed); they are written only by the Python program that saves
// them (PyTorch has no thread of its own writing a CPU storage). `protectable_bytes` is offered
// only for storages the Python layer found not pinned (`is_pinned()`), so no device writes them
// by DMA; the rest of its promise (no RDMA registration, no `resize_` right after a save) is
// the opt-in's documented condition (`write_protect=True`).
#[allow(unsafe_code)]
unsafe impl HostMemory for PyStorage {
    unsafe fn borrow_bytes(&self) -> Option<Bytes> {
        Some(Bytes::from_owner(self.region()))
    }

    unsafe fn protectable_bytes(&self) -> Option<Bytes> {
        self.protectable.then(|| Bytes::from_owner(self.region()))
    }
}
