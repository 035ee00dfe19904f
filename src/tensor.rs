//! Host tensors: a dtype, a shape, strides and an offset into a shared [`Storage`].
//!
//! A [`Storage`] is a run of bytes ([`bytes::Bytes`]: cheap to clone and slice, possibly backed by
//! a memory map or a pooled staging buffer) plus the device it was saved from. Tensors that share
//! a storage hold clones of the same [`Storage`]; the file writer recognises them by identity
//! ([`Storage::ptr_eq`]) and writes the bytes once, exactly as `torch.save` does.
//!
//! ```
//! use ckptio::{DType, HostTensor};
//! let t = HostTensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
//! assert_eq!(t.dtype(), DType::Float32);
//! assert_eq!(t.shape(), &[2, 2]);
//! assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
//! let col = t.transpose(0, 1).unwrap(); // a view: same storage, other strides
//! assert!(col.storage().ptr_eq(t.storage()));
//! assert_eq!(col.to_vec::<f32>().unwrap(), vec![1.0, 3.0, 2.0, 4.0]);
//! ```

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};

macro_rules! dtypes {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, $size:literal, $legacy:expr; )*) => {
        /// Element types that `torch.save` files of PyTorch 2.13 can hold.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum DType {
            $( $(#[$doc])* $variant, )*
        }

        impl DType {
            /// Every dtype ckptio knows.
            pub const ALL: &'static [DType] = &[$(DType::$variant),*];

            /// PyTorch's name, as in `torch.<name>` (`"float32"`, `"bfloat16"`, ...).
            pub fn name(self) -> &'static str {
                match self { $(DType::$variant => $name,)* }
            }

            /// Bytes per element (packed sub-byte types count their container byte).
            pub fn size(self) -> usize {
                match self { $(DType::$variant => $size,)* }
            }

            /// The legacy typed storage class (`"FloatStorage"`) that `torch.save` writes for
            /// this dtype, or `None` for dtypes saved as `UntypedStorage` with
            /// `_rebuild_tensor_v3`.
            pub fn storage_class(self) -> Option<&'static str> {
                match self { $(DType::$variant => $legacy,)* }
            }

            /// Looks a dtype up by PyTorch's name (`"float32"`; aliases such as `"float"`,
            /// `"half"` and `"long"` are accepted).
            pub fn from_name(name: &str) -> Option<DType> {
                let name = match name {
                    "float" => "float32",
                    "double" => "float64",
                    "half" => "float16",
                    "long" => "int64",
                    "int" => "int32",
                    "short" => "int16",
                    "cfloat" => "complex64",
                    "cdouble" => "complex128",
                    "chalf" => "complex32",
                    other => other,
                };
                match name { $($name => Some(DType::$variant),)* _ => None }
            }

            /// The dtype whose legacy storage class is `class` (`"FloatStorage"`).
            pub fn from_storage_class(class: &str) -> Option<DType> {
                DType::ALL.iter().copied().find(|d| d.storage_class() == Some(class))
            }
        }
    };
}

dtypes! {
    /// `torch.float64`
    Float64 = "float64", 8, Some("DoubleStorage");
    /// `torch.float32`
    Float32 = "float32", 4, Some("FloatStorage");
    /// `torch.float16`
    Float16 = "float16", 2, Some("HalfStorage");
    /// `torch.bfloat16`
    BFloat16 = "bfloat16", 2, Some("BFloat16Storage");
    /// `torch.int64`
    Int64 = "int64", 8, Some("LongStorage");
    /// `torch.int32`
    Int32 = "int32", 4, Some("IntStorage");
    /// `torch.int16`
    Int16 = "int16", 2, Some("ShortStorage");
    /// `torch.int8`
    Int8 = "int8", 1, Some("CharStorage");
    /// `torch.uint8`
    UInt8 = "uint8", 1, Some("ByteStorage");
    /// `torch.bool` (one byte per element, 0 or 1)
    Bool = "bool", 1, Some("BoolStorage");
    /// `torch.complex64`
    Complex64 = "complex64", 8, Some("ComplexFloatStorage");
    /// `torch.complex128`
    Complex128 = "complex128", 16, Some("ComplexDoubleStorage");
    /// `torch.complex32`
    Complex32 = "complex32", 4, None;
    /// `torch.uint16`
    UInt16 = "uint16", 2, None;
    /// `torch.uint32`
    UInt32 = "uint32", 4, None;
    /// `torch.uint64`
    UInt64 = "uint64", 8, None;
    /// `torch.float8_e5m2`
    Float8E5M2 = "float8_e5m2", 1, None;
    /// `torch.float8_e4m3fn`
    Float8E4M3Fn = "float8_e4m3fn", 1, None;
    /// `torch.float8_e5m2fnuz`
    Float8E5M2Fnuz = "float8_e5m2fnuz", 1, None;
    /// `torch.float8_e4m3fnuz`
    Float8E4M3Fnuz = "float8_e4m3fnuz", 1, None;
    /// `torch.float8_e8m0fnu`
    Float8E8M0Fnu = "float8_e8m0fnu", 1, None;
    /// `torch.float4_e2m1fn_x2` (two 4-bit values packed in a byte)
    Float4E2M1FnX2 = "float4_e2m1fn_x2", 1, None;
    /// `torch.bits8`
    Bits8 = "bits8", 1, None;
    /// `torch.bits16`
    Bits16 = "bits16", 2, None;
    /// `torch.bits1x8`
    Bits1x8 = "bits1x8", 1, None;
    /// `torch.bits2x4`
    Bits2x4 = "bits2x4", 1, None;
    /// `torch.bits4x2`
    Bits4x2 = "bits4x2", 1, None;
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust element type with a [`DType`], for building and reading host tensors.
pub trait Element: Copy + Send + Sync + 'static {
    /// The matching dtype.
    const DTYPE: DType;
    /// Appends the little-endian bytes of `self`.
    fn put_le(self, out: &mut Vec<u8>);
    /// Reads one element from exactly `Self::DTYPE.size()` little-endian bytes.
    fn get_le(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($t:ty, $d:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            fn put_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get_le(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(bytes);
                <$t>::from_le_bytes(a)
            }
        }
    };
}
element!(f64, Float64);
element!(f32, Float32);
element!(i64, Int64);
element!(i32, Int32);
element!(i16, Int16);
element!(i8, Int8);
element!(u8, UInt8);
element!(u16, UInt16);
element!(u32, UInt32);
element!(u64, UInt64);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    fn put_le(self, out: &mut Vec<u8>) {
        out.push(self as u8);
    }
    fn get_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
}

/// Bytes of one storage, shared by every tensor that views it.
///
/// Cloning is cheap (a reference count); [`Storage::ptr_eq`] tells whether two tensors share one.
///
/// # Storages still being filled
/// The async runtime hands its writer a snapshot before the copy into it has finished, so the
/// write can start on the first tensors while the last ones are still being copied. Such a
/// storage knows its length at once; [`Storage::try_bytes`] (and [`Storage::bytes`]) wait until
/// its bytes are in. Storages built from bytes are filled from the start and never wait.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<StorageInner>,
}

struct StorageInner {
    data: Data,
    location: String,
}

enum Data {
    Ready(Bytes),
    Pending(Pending),
}

/// The bytes of a storage that is being filled, once they are in (or why they never will be).
struct Pending {
    len: usize,
    cell: std::sync::OnceLock<std::result::Result<Bytes, String>>,
    /// Where the bytes are being copied, for a storage filled front to back whose first bytes
    /// can be read before the last are in.
    progress: Option<Progress>,
    lock: std::sync::Mutex<()>,
    filled: std::sync::Condvar,
}

/// The memory a storage is being filled in, and how much of it is in, from the start.
struct Progress {
    base: *const u8,
    /// Bytes in from `base` on: written, and never written again.
    ready: std::sync::atomic::AtomicUsize,
    /// Keeps `base..base + len` allocated.
    _keep: Arc<dyn Send + Sync + std::panic::RefUnwindSafe>,
}

// SAFETY: `base` points into memory `_keep` owns (which is Send + Sync); through it, only the
// bytes before `ready`, which are never written again, are read (see `Pending::wait_prefix`).
#[allow(unsafe_code)]
unsafe impl Send for Progress {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Progress {}

impl Pending {
    /// At least the first `min(at_least, len)` bytes, or all that are in once the storage is
    /// filled; waits for them.
    fn wait_prefix(&self, at_least: usize) -> std::result::Result<&[u8], &str> {
        let at_least = at_least.min(self.len);
        let ready = || -> Option<std::result::Result<&[u8], &str>> {
            if let Some(r) = self.cell.get() {
                return Some(r.as_ref().map(|b| &b[..]).map_err(|e| e.as_str()));
            }
            let p = self.progress.as_ref()?;
            let n = p.ready.load(std::sync::atomic::Ordering::Acquire);
            // SAFETY: the first `n` bytes from `base` are in (`n` was published with Release
            // after they were written, and is at most `len`), are never written again, and
            // stay allocated while `_keep`, owned by `self`, lives.
            #[allow(unsafe_code)]
            let prefix = unsafe { std::slice::from_raw_parts(p.base, n) };
            (n >= at_least).then_some(Ok(prefix))
        };
        self.wait_until(ready)
    }

    /// Waits until `check` has an answer: checked now, then under the lock after each
    /// notification (`set` and `advance` take the lock between their store and their
    /// notification, so none is missed).
    fn wait_until<T>(&self, check: impl Fn() -> Option<T>) -> T {
        if let Some(r) = check() {
            return r;
        }
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = check() {
                return r;
            }
            g = self.filled.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Says the first `n` bytes are in. Short of the end, readers are told about whole pages
    /// only (up to a page boundary of memory), so a direct-I/O writer that writes each piece as
    /// it comes never has a partial page to gather between two pieces.
    fn advance(&self, n: usize) {
        if let Some(p) = &self.progress {
            let mut n = n.min(self.len);
            if n < self.len {
                let end = (p.base as usize).wrapping_add(n);
                n = n.saturating_sub(end % crate::aligned::PAGE);
            }
            p.ready.fetch_max(n, std::sync::atomic::Ordering::Release);
            drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
            self.filled.notify_all();
        }
    }

    fn wait(&self) -> &std::result::Result<Bytes, String> {
        self.wait_until(|| self.cell.get())
    }

    fn set(&self, r: std::result::Result<Bytes, String>) {
        let _ = self.cell.set(r);
        // Taking the lock orders this notification after any waiter's check of the cell.
        drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
        self.filled.notify_all();
    }
}

/// Fills a storage made by [`Storage::pending`]. Dropping it unfilled fails the storage, so a
/// reader never waits forever.
pub(crate) struct StorageFiller {
    inner: Arc<StorageInner>,
}

impl StorageFiller {
    /// Publishes the bytes (which must be exactly the storage's length).
    pub(crate) fn fill(self, bytes: Bytes) {
        if let Data::Pending(p) = &self.inner.data {
            if bytes.len() == p.len {
                p.set(Ok(bytes));
            } else {
                p.set(Err(format!(
                    "snapshot holds {} bytes, the storage {}",
                    bytes.len(),
                    p.len
                )));
            }
        }
    }

    /// Marks the storage as never to be filled, with the reason.
    pub(crate) fn fail(self, reason: impl Into<String>) {
        if let Data::Pending(p) = &self.inner.data {
            p.set(Err(reason.into()));
        }
    }

    /// A handle that says how far the filling has come (for a storage made by
    /// [`Storage::pending_in`]; a no-op otherwise).
    pub(crate) fn progress(&self) -> StorageProgress {
        StorageProgress {
            inner: self.inner.clone(),
        }
    }
}

/// Says how much of a storage made by [`Storage::pending_in`] is in, from the start.
pub(crate) struct StorageProgress {
    inner: Arc<StorageInner>,
}

impl StorageProgress {
    /// Says the first `n` bytes are in: readers may read them from now on.
    ///
    /// # Safety
    /// The first `n` bytes of the storage's memory must have been written, and must never be
    /// written again.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn advance(&self, n: usize) {
        if let Data::Pending(p) = &self.inner.data {
            p.advance(n);
        }
    }
}

impl Drop for StorageFiller {
    fn drop(&mut self) {
        if let Data::Pending(p) = &self.inner.data {
            if p.cell.get().is_none() {
                p.set(Err(
                    "the snapshot was abandoned before this storage was copied".into(),
                ));
            }
        }
    }
}

impl Storage {
    /// A CPU storage over `bytes`.
    pub fn new(bytes: impl Into<Bytes>) -> Storage {
        Storage::with_location(bytes, "cpu")
    }

    /// A storage with a `torch.save` location tag such as `"cpu"` or `"cuda:0"`.
    pub fn with_location(bytes: impl Into<Bytes>, location: impl Into<String>) -> Storage {
        Storage {
            inner: Arc::new(StorageInner {
                data: Data::Ready(bytes.into()),
                location: location.into(),
            }),
        }
    }

    /// A storage of `len` bytes that is not filled yet, and the filler that fills it.
    pub(crate) fn pending(len: usize, location: impl Into<String>) -> (Storage, StorageFiller) {
        Storage::new_pending(len, location.into(), None)
    }

    /// [`Storage::pending`] for bytes being copied front to back into `base..base + len`
    /// (which `keep` keeps allocated): [`Storage::try_prefix`] reads the first bytes once
    /// [`StorageProgress::advance`] says they are in, before the rest is.
    ///
    /// # Safety
    /// `base..base + len` must stay allocated while `keep` lives, and each byte must be
    /// written before an `advance` past it and never written again afterwards.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn pending_in(
        len: usize,
        location: impl Into<String>,
        base: *const u8,
        keep: Arc<dyn Send + Sync + std::panic::RefUnwindSafe>,
    ) -> (Storage, StorageFiller) {
        let progress = Progress {
            base,
            ready: std::sync::atomic::AtomicUsize::new(0),
            _keep: keep,
        };
        Storage::new_pending(len, location.into(), Some(progress))
    }

    fn new_pending(
        len: usize,
        location: String,
        progress: Option<Progress>,
    ) -> (Storage, StorageFiller) {
        let inner = Arc::new(StorageInner {
            data: Data::Pending(Pending {
                len,
                cell: std::sync::OnceLock::new(),
                progress,
                lock: std::sync::Mutex::new(()),
                filled: std::sync::Condvar::new(),
            }),
            location,
        });
        (
            Storage {
                inner: inner.clone(),
            },
            StorageFiller { inner },
        )
    }

    /// The bytes, waiting for them if the storage is still being filled; an error
    /// ([`Error::Tensor`]) if filling it failed (the snapshot's copy failed).
    pub fn try_bytes(&self) -> Result<&Bytes> {
        match &self.inner.data {
            Data::Ready(b) => Ok(b),
            Data::Pending(p) => p
                .wait()
                .as_ref()
                .map_err(|reason| Error::tensor("", "storage", reason.clone())),
        }
    }

    /// The first bytes in: at least `min(at_least, len)` of them, waiting for them if the
    /// storage is still being filled front to back (all of its bytes once it is filled, or for
    /// a storage that is not filled front to back); an error as [`Storage::try_bytes`] gives.
    /// A writer reads a large snapshot storage this way as its copy advances.
    pub fn try_prefix(&self, at_least: usize) -> Result<&[u8]> {
        match &self.inner.data {
            Data::Ready(b) => Ok(b),
            Data::Pending(p) => p
                .wait_prefix(at_least)
                .map_err(|reason| Error::tensor("", "storage", reason.to_owned())),
        }
    }

    /// The bytes, waiting for them if the storage is still being filled.
    ///
    /// # Panics
    /// If the storage was being filled by a snapshot whose copy failed; backends that may be
    /// handed snapshots should use [`Storage::try_bytes`]. Storages built from bytes never panic.
    pub fn bytes(&self) -> &Bytes {
        match self.try_bytes() {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }

    /// For a storage still being filled front to back ([`Storage::pending_in`]), the address
    /// its bytes will have: a writer can then place and write them piece by piece with
    /// [`Storage::try_prefix`] as they come.
    pub(crate) fn filling_at(&self) -> Option<usize> {
        match &self.inner.data {
            Data::Pending(p) if p.cell.get().is_none() => {
                p.progress.as_ref().map(|g| g.base as usize)
            }
            _ => None,
        }
    }

    /// Whether the bytes are in (always true unless the storage is a snapshot being filled).
    pub fn is_ready(&self) -> bool {
        match &self.inner.data {
            Data::Ready(_) => true,
            Data::Pending(p) => p.cell.get().is_some(),
        }
    }

    /// Number of bytes (known at once, even while the storage is being filled).
    pub fn len(&self) -> usize {
        match &self.inner.data {
            Data::Ready(b) => b.len(),
            Data::Pending(p) => p.len,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The location tag (`"cpu"`, `"cuda:0"`, ...).
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    /// Whether both are the same storage (not merely equal bytes).
    pub fn ptr_eq(&self, other: &Storage) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A stable identity for this storage while it is alive (for de-duplication maps).
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("len", &self.len())
            .field("location", &self.location())
            .finish()
    }
}

/// A tensor whose bytes are on the host: dtype, shape, strides (in elements) and a storage
/// offset (in elements) into a [`Storage`].
#[derive(Clone, Debug)]
pub struct HostTensor {
    storage: Storage,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
    requires_grad: bool,
    parameter: bool,
}

/// Row-major (C-contiguous) strides for `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1usize;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc = acc.saturating_mul(d);
    }
    strides
}

impl HostTensor {
    /// A view into `storage`, checked: every element must lie inside the storage.
    pub fn from_parts(
        storage: Storage,
        dtype: DType,
        shape: Vec<usize>,
        strides: Vec<usize>,
        offset: usize,
    ) -> Result<HostTensor> {
        let t = HostTensor {
            storage,
            dtype,
            shape,
            strides,
            offset,
            requires_grad: false,
            parameter: false,
        };
        t.validate()
            .map_err(|reason| Error::tensor("", "view", reason))?;
        Ok(t)
    }

    /// Checks that the view fits its storage; returns the reason when it does not.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        if self.shape.len() != self.strides.len() {
            return Err(format!(
                "shape has {} dims but strides have {}",
                self.shape.len(),
                self.strides.len()
            ));
        }
        let numel = checked_numel(&self.shape).ok_or("element count overflows")?;
        let elem = self.dtype.size();
        if numel
            .checked_mul(elem)
            .is_none_or(|b| b > isize::MAX as usize)
        {
            return Err(format!(
                "{numel} elements of {} overflow the address space",
                self.dtype
            ));
        }
        let cap = self.storage.len() / elem;
        if numel == 0 {
            // torch keeps any offset on an empty view (`zeros(0, 3)[:, 1:]` has offset 1 on an
            // empty storage): no element is ever read through it.
            return Ok(());
        }
        let mut last = self.offset;
        for (&d, &s) in self.shape.iter().zip(&self.strides) {
            let span = (d - 1).checked_mul(s).ok_or("stride overflow")?;
            last = last.checked_add(span).ok_or("offset overflow")?;
        }
        if last >= cap {
            return Err(format!(
                "shape {:?} strides {:?} offset {} reach element {} but the {} storage holds {} \
                 elements ({} bytes)",
                self.shape,
                self.strides,
                self.offset,
                last,
                self.dtype,
                cap,
                self.storage.len()
            ));
        }
        Ok(())
    }

    /// A contiguous tensor over `bytes` (little-endian elements, row-major).
    pub fn from_bytes(
        dtype: DType,
        shape: &[usize],
        bytes: impl Into<Bytes>,
    ) -> Result<HostTensor> {
        let bytes = bytes.into();
        let numel = checked_numel(shape)
            .ok_or_else(|| Error::tensor("", "new tensor", "element count overflows"))?;
        let want = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::tensor("", "new tensor", "byte size overflows"))?;
        if bytes.len() != want {
            return Err(Error::tensor(
                "",
                "new tensor",
                format!(
                    "{} {:?} needs {} bytes, got {}",
                    dtype,
                    shape,
                    want,
                    bytes.len()
                ),
            ));
        }
        HostTensor::from_parts(
            Storage::new(bytes),
            dtype,
            shape.to_vec(),
            contiguous_strides(shape),
            0,
        )
    }

    /// A contiguous tensor holding a copy of `data`.
    ///
    /// Large tensors' bytes start on a page, so durable saves can write them with direct I/O.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<HostTensor> {
        let (mut out, pad) = crate::aligned::page_start_vec(std::mem::size_of_val(data));
        for &x in data {
            x.put_le(&mut out);
        }
        HostTensor::from_bytes(T::DTYPE, shape, Bytes::from(out).slice(pad..))
    }

    /// A 0-dim tensor.
    pub fn scalar<T: Element>(x: T) -> HostTensor {
        let mut out = Vec::new();
        x.put_le(&mut out);
        HostTensor {
            storage: Storage::new(out),
            dtype: T::DTYPE,
            shape: vec![],
            strides: vec![],
            offset: 0,
            requires_grad: false,
            parameter: false,
        }
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The sizes of each dimension.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The strides of each dimension, in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    /// The offset of the first element in the storage, in elements.
    pub fn storage_offset(&self) -> usize {
        self.offset
    }
    /// Whether the tensor was saved with `requires_grad=True`.
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }
    /// Whether the tensor was saved as a `torch.nn.Parameter`.
    pub fn is_parameter(&self) -> bool {
        self.parameter
    }
    /// Sets `requires_grad`.
    pub fn with_requires_grad(mut self, requires_grad: bool) -> HostTensor {
        self.requires_grad = requires_grad;
        self
    }
    /// Marks the tensor as a `torch.nn.Parameter` (or not).
    pub fn with_parameter(mut self, parameter: bool) -> HostTensor {
        self.parameter = parameter;
        self
    }
    /// The same view over another storage (same length expected; checked).
    pub fn with_storage(&self, storage: Storage) -> Result<HostTensor> {
        let t = HostTensor {
            storage,
            ..self.clone()
        };
        t.validate()
            .map_err(|reason| Error::tensor("", "view", reason))?;
        Ok(t)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the elements this tensor views (not of its whole storage).
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// Whether the elements are laid out row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect = expect.saturating_mul(d);
        }
        true
    }

    /// The elements in row-major order as little-endian bytes. Borrows the storage (no copy)
    /// when the tensor is contiguous; gathers otherwise.
    pub fn contiguous_bytes(&self) -> Bytes {
        let elem = self.dtype.size();
        if self.numel() == 0 {
            return Bytes::new();
        }
        if self.is_contiguous() {
            let start = self.offset * elem;
            return self.storage.bytes().slice(start..start + self.nbytes());
        }
        let src = self.storage.bytes();
        let mut out = Vec::with_capacity(self.nbytes());
        let mut index = vec![0usize; self.shape.len()];
        let n = self.numel();
        for _ in 0..n {
            let pos: usize = self.offset
                + index
                    .iter()
                    .zip(&self.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(&src[pos * elem..(pos + 1) * elem]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Bytes::from(out)
    }

    /// The elements in row-major order; an [`Error::TensorOp`] when `T` does not match the
    /// dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(self.op_error(
                format!("to_vec::<{}>", std::any::type_name::<T>()),
                format!("its elements are {}, not {}", self.dtype, T::DTYPE),
            ));
        }
        let b = self.contiguous_bytes();
        Ok(b.chunks_exact(self.dtype.size()).map(T::get_le).collect())
    }

    /// A contiguous copy with its own storage (same dtype, shape and flags).
    pub fn to_contiguous(&self) -> HostTensor {
        let bytes = if self.is_contiguous() {
            Bytes::copy_from_slice(&self.contiguous_bytes())
        } else {
            self.contiguous_bytes()
        };
        HostTensor {
            storage: Storage::with_location(bytes, self.storage.location()),
            dtype: self.dtype,
            strides: contiguous_strides(&self.shape),
            shape: self.shape.clone(),
            offset: 0,
            requires_grad: self.requires_grad,
            parameter: self.parameter,
        }
    }

    /// A view with dimensions `a` and `b` swapped (shares the storage); an
    /// [`Error::TensorOp`] when the tensor lacks one of them.
    pub fn transpose(&self, a: usize, b: usize) -> Result<HostTensor> {
        if a >= self.shape.len() || b >= self.shape.len() {
            return Err(self.op_error(
                format!("transpose({a}, {b})"),
                format!("the tensor has {} dimensions", self.shape.len()),
            ));
        }
        let mut t = self.clone();
        t.shape.swap(a, b);
        t.strides.swap(a, b);
        Ok(t)
    }

    /// A view of indices `start..start + len` of dimension `dim` (shares the storage); an
    /// [`Error::TensorOp`] when the range is not inside the tensor.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<HostTensor> {
        if dim >= self.shape.len() || start.checked_add(len).is_none_or(|e| e > self.shape[dim]) {
            return Err(self.op_error(
                format!("narrow(dim={dim}, start={start}, len={len})"),
                "the range is outside the tensor",
            ));
        }
        let mut t = self.clone();
        if len > 0 {
            t.offset += start * self.strides[dim];
        }
        t.shape[dim] = len;
        Ok(t)
    }

    /// An [`Error::TensorOp`] for `op` on this tensor.
    fn op_error(&self, op: String, reason: impl Into<String>) -> Error {
        Error::TensorOp {
            op,
            dtype: self.dtype,
            shape: self.shape.clone(),
            reason: reason.into(),
        }
    }

    /// Whether both have the same dtype, shape and elements (bit for bit), whatever their
    /// layout or storage.
    pub fn data_eq(&self, other: &HostTensor) -> bool {
        self.dtype == other.dtype
            && self.shape == other.shape
            && self.contiguous_bytes() == other.contiguous_bytes()
    }
}

/// A tensor whose bytes live outside ckptio (a `tch::Tensor`, a device buffer) and may change
/// after the save call returns: the runtime snapshots it once per save.
///
/// # The live-tensor contract
/// A save takes its snapshot of a live tensor at one moment: before an Eager `save` returns, or
/// before a Deferred save's [`staged`](crate::SaveHandle::staged) resolves (and within a
/// synchronous backend's `save_checkpoint`). The caller must not write the tensor until then;
/// a write racing the snapshot leaves a mix of old and new values in the checkpoint.
///
/// A plain source is read only through [`copy_to`](TensorSource::copy_to): ckptio copies it,
/// and nothing of it is held once the snapshot is taken. That is all this (safe) trait asks.
/// A source may opt in to having its memory read in place, without a copy, by returning a
/// [`HostMemory`] from [`host_memory`](TensorSource::host_memory): that is an `unsafe` trait,
/// whose implementer vouches for the memory.
pub trait TensorSource: Send + Sync {
    /// Element type.
    fn dtype(&self) -> DType;
    /// Sizes of each dimension.
    fn shape(&self) -> Vec<usize>;
    /// The `torch.save` location tag of its device (`"cpu"`, `"cuda:0"`).
    fn location(&self) -> String {
        "cpu".to_owned()
    }
    /// Whether it requires grad.
    fn requires_grad(&self) -> bool {
        false
    }
    /// Copies the elements, row-major, little-endian, into `dst` (exactly `nbytes` long).
    fn copy_to(&self, dst: &mut [u8]) -> Result<()>;

    /// The tensor's host memory, when the source lets ckptio read it in place (see
    /// [`HostMemory`]); `None`, the default, to have it copied with
    /// [`copy_to`](TensorSource::copy_to) every time.
    fn host_memory(&self) -> Option<&dyn HostMemory> {
        None
    }
}

/// A live tensor's elements in host memory, which ckptio may read in place instead of copying
/// them: a synchronous save writes them straight from there, as `torch.save` does, and an Eager
/// save with [`Builder::write_protect`](crate::runtime::Builder::write_protect) write-protects
/// them instead of copying them on the calling thread. A [`TensorSource`] offers it through
/// [`TensorSource::host_memory`].
///
/// # Safety
///
/// The implementer promises, for every `Some(bytes)` its methods return:
/// - `bytes` are exactly the tensor's elements, row-major and little-endian, as
///   [`TensorSource::copy_to`] would copy them, and [`LiveTensor::nbytes`] long;
/// - `bytes` (and each clone of them) keep that memory allocated for as long as they are held;
/// - the memory is written only through the tensor itself, that is, only in ways the user who
///   saves the tensor controls (no thread or device of the source's own writes it behind the
///   user's back).
///
/// [`protectable_bytes`](HostMemory::protectable_bytes) asks for more, since ckptio holds those
/// bytes after `save` has returned and the tensor is written again:
/// - they keep the very memory they point to allocated, at the same address, for as long as
///   they or a clone are held, even after the tensor is dropped, pointed at other memory, or
///   written;
/// - the memory is written only by this process's CPU threads and system calls: not by a
///   device's DMA (CUDA-pinned memory, RDMA registrations), not by another process through
///   shared memory.
///
/// ckptio checks the length of what it is given (and copies otherwise), and checks itself that
/// memory it write-protects is private anonymous memory.
#[allow(unsafe_code)]
pub unsafe trait HostMemory: Send + Sync {
    /// The elements in place, or `None` when they are not row-major little-endian host memory
    /// now (ckptio then copies them with [`TensorSource::copy_to`]).
    ///
    /// # Safety
    ///
    /// The bytes alias the tensor's memory, which its owner may write again later. The caller
    /// must drop them, and every clone of them, before the tensor can be written: in ckptio
    /// they live only inside one synchronous save call, or one snapshot's copy (while an Eager
    /// `save` has not returned, or before a Deferred save's `staged()` resolves).
    unsafe fn borrow_bytes(&self) -> Option<Bytes>;

    /// The elements in place, as [`borrow_bytes`](HostMemory::borrow_bytes) gives them, for an
    /// Eager snapshot that write-protects them instead of copying them on the calling thread;
    /// `None` (the default) to have them copied.
    ///
    /// # Safety
    ///
    /// The caller may hold the bytes after the tensor can be written again, but must read them
    /// only while nothing can write them: before the tensor can be written, or while their
    /// pages are write-protected so that a write waits until the read is done. ckptio reads
    /// them only while their pages are write-protected.
    unsafe fn protectable_bytes(&self) -> Option<Bytes> {
        None
    }
}

/// A shared handle to a [`TensorSource`]: a tensor to be snapshotted when saved.
#[derive(Clone)]
pub struct LiveTensor(Arc<dyn TensorSource>);

/// The most bytes a snapshot may take: 128 TiB, the user address space of x86_64 and aarch64
/// with 4-level page tables. A larger size comes from a bad shape, and allocating it would
/// abort the process rather than fail.
pub const MAX_SNAPSHOT: usize = 1 << 47;

impl LiveTensor {
    /// Wraps a source. A save snapshots it as the [live-tensor contract](TensorSource) says:
    /// by copying it with [`TensorSource::copy_to`], unless the source offers its memory in
    /// place through [`TensorSource::host_memory`] (an `unsafe` opt-in, see [`HostMemory`]).
    pub fn new(source: impl TensorSource + 'static) -> LiveTensor {
        LiveTensor(Arc::new(source))
    }
    /// The source.
    pub fn source(&self) -> &dyn TensorSource {
        &*self.0
    }
    /// Bytes a snapshot takes; `usize::MAX` when that does not fit a `usize`. A snapshot of
    /// more than [`MAX_SNAPSHOT`] bytes is refused with an error.
    pub fn nbytes(&self) -> usize {
        checked_numel(&self.0.shape())
            .and_then(|n| n.checked_mul(self.0.dtype().size()))
            .unwrap_or(usize::MAX)
    }
    /// [`nbytes`](Self::nbytes), or an error when it is more than any allocation can hold.
    fn alloc_nbytes(&self) -> Result<usize> {
        let n = self.nbytes();
        if n > MAX_SNAPSHOT {
            return Err(Error::tensor(
                "",
                "snapshot",
                format!(
                    "{:?} elements of {} overflow the address space",
                    self.0.shape(),
                    self.0.dtype()
                ),
            ));
        }
        Ok(n)
    }
    /// Whether both handles are the same source.
    pub fn ptr_eq(&self, other: &LiveTensor) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
    /// An identity for de-duplication while alive.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as *const u8 as usize
    }
    /// Copies it into `buf` (exactly [`LiveTensor::nbytes`] long) and returns the host tensor
    /// viewing `storage`, which must be the storage made from `buf` afterwards: use
    /// [`LiveTensor::to_host`] unless you manage buffers.
    pub fn host_view(&self, storage: Storage) -> Result<HostTensor> {
        let shape = self.0.shape();
        let strides = contiguous_strides(&shape);
        Ok(
            HostTensor::from_parts(storage, self.0.dtype(), shape, strides, 0)?
                .with_requires_grad(self.0.requires_grad()),
        )
    }
    /// The elements in place, when the source offers them ([`HostMemory::borrow_bytes`]) and
    /// they are [`nbytes`](Self::nbytes) long.
    ///
    /// # Safety
    ///
    /// As [`HostMemory::borrow_bytes`]: the bytes, and every clone of them, must be dropped
    /// before the tensor can be written again.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn borrow_bytes(&self) -> Option<Bytes> {
        // SAFETY: the caller takes on the contract of `borrow_bytes`.
        let b = unsafe { self.0.host_memory()?.borrow_bytes()? };
        (b.len() == self.nbytes()).then_some(b)
    }

    /// The elements in place for a write-protected snapshot, when the source offers them
    /// ([`HostMemory::protectable_bytes`]) and they are [`nbytes`](Self::nbytes) long.
    ///
    /// # Safety
    ///
    /// As [`HostMemory::protectable_bytes`]: the bytes must be read only while nothing can
    /// write them (before the tensor can be written, or while their pages are write-protected).
    #[allow(unsafe_code)]
    pub(crate) unsafe fn protectable_bytes(&self) -> Option<Bytes> {
        // SAFETY: the caller takes on the contract of `protectable_bytes`.
        let b = unsafe { self.0.host_memory()?.protectable_bytes()? };
        (b.len() == self.nbytes()).then_some(b)
    }

    /// The tensor in place (see [`HostMemory::borrow_bytes`]), or a copy when it cannot be
    /// borrowed.
    ///
    /// # Safety
    ///
    /// As [`HostMemory::borrow_bytes`]: the result must be dropped before the tensor can be
    /// written again.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn borrow_host(&self) -> Result<HostTensor> {
        // SAFETY: the caller takes on the contract of `borrow_bytes`.
        match unsafe { self.borrow_bytes() } {
            Some(b) => self.host_view(Storage::with_location(b, self.0.location())),
            None => self.to_host(),
        }
    }

    /// A snapshot into newly allocated memory (starting on a page when large, so a durable save
    /// can write it with direct I/O).
    pub fn to_host(&self) -> Result<HostTensor> {
        let mut buf = crate::aligned::PageVec::zeroed(self.alloc_nbytes()?);
        self.0.copy_to(buf.as_mut_slice())?;
        self.host_view(Storage::with_location(buf.into_bytes(), self.0.location()))
    }
}

impl fmt::Debug for LiveTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveTensor")
            .field("dtype", &self.0.dtype())
            .field("shape", &self.0.shape())
            .finish()
    }
}

impl PartialEq for LiveTensor {
    /// The same source (live tensors have no stable contents to compare).
    fn eq(&self, other: &Self) -> bool {
        self.ptr_eq(other)
    }
}

/// Product of `shape` without overflow.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_storage_knows_its_length_and_waits_for_its_bytes() {
        let (s, filler) = Storage::pending(4, "cpu");
        assert_eq!(s.len(), 4);
        assert!(!s.is_ready());
        let reader = {
            let s = s.clone();
            std::thread::spawn(move || s.try_bytes().map(|b| b.to_vec()))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!reader.is_finished());
        filler.fill(Bytes::from_static(&[1, 2, 3, 4]));
        assert_eq!(reader.join().unwrap().unwrap(), vec![1, 2, 3, 4]);
        assert!(s.is_ready());
        assert_eq!(&s.bytes()[..], &[1, 2, 3, 4]);
    }

    #[test]
    fn a_pending_storage_that_is_never_filled_is_an_error_not_a_hang() {
        let (s, filler) = Storage::pending(4, "cpu");
        drop(filler);
        let e = s.try_bytes().unwrap_err().to_string();
        assert!(e.contains("abandoned"), "{e}");

        let (s, filler) = Storage::pending(4, "cpu");
        filler.fill(Bytes::from_static(&[1, 2]));
        let e = s.try_bytes().unwrap_err().to_string();
        assert!(e.contains("snapshot holds 2 bytes"), "{e}");

        let (s, filler) = Storage::pending(4, "cpu");
        filler.fail("device lost");
        let e = s.try_bytes().unwrap_err().to_string();
        assert!(e.contains("device lost"), "{e}");
        let p = std::panic::catch_unwind(|| s.bytes().len());
        assert!(p.is_err());
    }

    /// Page-aligned memory filled through a raw pointer while a storage reads its first bytes.
    struct Raw(*mut u8, std::alloc::Layout);
    // SAFETY (test): written at disjoint places before each `advance`, read only below it.
    #[allow(unsafe_code)]
    unsafe impl Send for Raw {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl Sync for Raw {}
    impl Raw {
        #[allow(unsafe_code)]
        fn new(len: usize) -> Arc<Raw> {
            let layout = std::alloc::Layout::from_size_align(len, crate::aligned::PAGE).unwrap();
            // SAFETY: a non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!p.is_null());
            Arc::new(Raw(p, layout))
        }
    }
    impl Drop for Raw {
        #[allow(unsafe_code)]
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout, freed once.
            unsafe { std::alloc::dealloc(self.0, self.1) };
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_storage_filled_front_to_back_can_be_read_as_its_first_pages_come() {
        const P: usize = crate::aligned::PAGE;
        let len = 3 * P + 100;
        let raw = Raw::new(len);
        let base = raw.0;
        let byte = |i: usize| (i % 251) as u8;
        // SAFETY: `raw` keeps the memory; each byte is written before `advance` passes it.
        let (s, filler) = unsafe { Storage::pending_in(len, "cpu", base, raw.clone()) };
        assert_eq!(s.filling_at(), Some(base as usize));
        let progress = filler.progress();
        let reader = {
            let s = s.clone();
            std::thread::spawn(move || s.try_prefix(P).unwrap().len())
        };
        for i in 0..2 * P + 10 {
            // SAFETY: in bounds; the reader reads only below what was advanced.
            unsafe { base.add(i).write(byte(i)) };
        }
        // Readers hear of whole pages only, short of the end.
        // SAFETY: those bytes were written above, and are not written again.
        unsafe {
            progress.advance(P - 1);
            progress.advance(2 * P + 10);
        }
        assert_eq!(reader.join().unwrap(), 2 * P);
        let prefix = s.try_prefix(1).unwrap();
        assert!(prefix.len() == 2 * P && prefix.iter().enumerate().all(|(i, &b)| b == byte(i)));
        assert!(!s.is_ready());
        for i in 2 * P + 10..len {
            // SAFETY: in bounds, past what was advanced.
            unsafe { base.add(i).write(byte(i)) };
        }
        // The end is told as it is, page or not.
        // SAFETY: every byte is written.
        unsafe { progress.advance(len) };
        assert_eq!(s.try_prefix(len).unwrap().len(), len);
        // SAFETY: the whole buffer, written.
        let all = unsafe { std::slice::from_raw_parts(base, len) }.to_vec();
        filler.fill(Bytes::from(all));
        assert!(s.is_ready() && s.filling_at().is_none());
        assert!(s
            .try_prefix(1)
            .unwrap()
            .iter()
            .enumerate()
            .all(|(i, &b)| b == byte(i)));

        // A copy that fails midway: readers of what was not in get the error.
        let raw = Raw::new(len);
        // SAFETY: as above (zeroed memory, never written).
        let (s, filler) = unsafe { Storage::pending_in(len, "cpu", raw.0, raw.clone()) };
        // SAFETY: the zeroed memory counts as written; nothing writes it.
        unsafe { filler.progress().advance(P) };
        assert_eq!(s.try_prefix(P).unwrap().len(), P);
        filler.fail("device lost");
        let e = s.try_prefix(2 * P).unwrap_err().to_string();
        assert!(e.contains("device lost"), "{e}");
    }

    #[test]
    fn dtype_names_round_trip() {
        for &d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            if let Some(c) = d.storage_class() {
                assert_eq!(DType::from_storage_class(c), Some(d));
            }
        }
        assert_eq!(DType::from_name("half"), Some(DType::Float16));
        assert_eq!(DType::from_name("nope"), None);
    }

    #[test]
    fn views_out_of_bounds_are_refused() {
        let s = Storage::new(vec![0u8; 16]);
        assert!(HostTensor::from_parts(s.clone(), DType::Float32, vec![4], vec![1], 0).is_ok());
        assert!(HostTensor::from_parts(s.clone(), DType::Float32, vec![4], vec![1], 1).is_err());
        assert!(
            HostTensor::from_parts(s.clone(), DType::Float32, vec![2, 2], vec![3, 1], 0).is_err()
        );
        assert!(HostTensor::from_parts(
            s.clone(),
            DType::Float32,
            vec![usize::MAX, 2],
            vec![1, 1],
            0
        )
        .is_err());
        assert!(HostTensor::from_parts(s, DType::Float32, vec![0, 5], vec![5, 1], 4).is_ok());
    }

    #[test]
    fn out_of_range_views_and_other_element_types_are_refused_naming_the_operation() {
        let t = HostTensor::from_slice(&[0i64, 1, 2, 3, 4, 5], &[2, 3]).unwrap();
        let errors = [
            t.narrow(1, 2, 2).unwrap_err(),
            t.narrow(2, 0, 1).unwrap_err(),
            t.transpose(0, 2).unwrap_err(),
            t.to_vec::<f32>().unwrap_err(),
        ];
        for (e, op) in errors
            .iter()
            .zip(["narrow", "narrow", "transpose", "to_vec"])
        {
            match e {
                Error::TensorOp {
                    op: o,
                    dtype,
                    shape,
                    ..
                } => {
                    assert!(o.starts_with(op), "{o}");
                    assert_eq!((*dtype, shape.as_slice()), (DType::Int64, &[2, 3][..]));
                }
                other => panic!("unexpected error {other}"),
            }
        }
    }

    /// A source over a vector that offers it in place, `short` bytes too short when asked.
    struct InPlace {
        data: Bytes,
        short: usize,
    }
    impl TensorSource for InPlace {
        fn dtype(&self) -> DType {
            DType::UInt8
        }
        fn shape(&self) -> Vec<usize> {
            vec![self.data.len()]
        }
        fn copy_to(&self, dst: &mut [u8]) -> Result<()> {
            dst.copy_from_slice(&self.data);
            Ok(())
        }
        fn host_memory(&self) -> Option<&dyn HostMemory> {
            Some(self)
        }
    }
    // SAFETY (test): immutable bytes, which own their memory.
    #[allow(unsafe_code)]
    unsafe impl HostMemory for InPlace {
        unsafe fn borrow_bytes(&self) -> Option<Bytes> {
            Some(self.data.slice(self.short..))
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn live_tensors_are_read_in_place_only_when_the_source_offers_bytes_of_their_length() {
        let data = Bytes::from(vec![7u8; 64]);
        let whole = LiveTensor::new(InPlace {
            data: data.clone(),
            short: 0,
        });
        // SAFETY (test, both): the bytes are never written.
        let b = unsafe { whole.borrow_host() }.unwrap();
        assert_eq!(b.storage().bytes().as_ptr(), data.as_ptr(), "read in place");
        assert!(
            unsafe { whole.protectable_bytes() }.is_none(),
            "not offered"
        );

        let short = LiveTensor::new(InPlace {
            data: data.clone(),
            short: 1,
        });
        // SAFETY: as above.
        assert!(unsafe { short.borrow_bytes() }.is_none());
        let c = unsafe { short.borrow_host() }.unwrap();
        assert_ne!(c.storage().bytes().as_ptr(), data.as_ptr(), "copied");
        assert_eq!(c.to_vec::<u8>().unwrap(), vec![7u8; 64]);
    }

    #[test]
    fn non_contiguous_gathers_row_major() {
        let t = HostTensor::from_slice(&[0i64, 1, 2, 3, 4, 5], &[2, 3]).unwrap();
        let tt = t.transpose(0, 1).unwrap();
        assert!(!tt.is_contiguous());
        assert_eq!(tt.to_vec::<i64>().unwrap(), vec![0, 3, 1, 4, 2, 5]);
        let row = t.narrow(0, 1, 1).unwrap();
        assert_eq!(row.to_vec::<i64>().unwrap(), vec![3, 4, 5]);
        assert!(row.is_contiguous());
    }
}
