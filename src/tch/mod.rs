//! tch integration (feature `tch`): `tch::Tensor` <-> [`HostTensor`], and state dicts of
//! `tch::nn::VarStore`.
//!
//! ```no_run
//! use ckptio::tch::{load_state_dict, state_dict, StateDictRestore};
//! use ckptio::{CheckpointIo, LoadOptions, SaveOptions, TorchCheckpointIo};
//! use tch::{nn, Device};
//! # fn main() -> ckptio::Result<()> {
//! let vs = nn::VarStore::new(Device::Cpu);
//! let _layer = nn::linear(vs.root() / "fc", 4, 2, Default::default());
//! let io = TorchCheckpointIo::new();
//! io.save_checkpoint(&state_dict(&vs)?, "model.pt".as_ref(), &SaveOptions::default())?; // torch.load-able
//!
//! let mut vs2 = nn::VarStore::new(Device::Cpu);
//! let _layer2 = nn::linear(vs2.root() / "fc", 4, 2, Default::default());
//! let mut target = StateDictRestore::new(&mut vs2).strict(true);
//! let rest = io.load_checkpoint("model.pt".as_ref(), &LoadOptions::default(), Some(&mut target))?;
//! assert!(rest.is_none()); // fully restored in place
//! # Ok(()) }
//! ```

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::{LoadOptions, MapLocation, Restore};
use crate::tensor::{
    contiguous_strides, DType, HostMemory, HostTensor, LiveTensor, Storage, TensorSource,
};
use crate::value::{Dict, Key, Value};

fn torch_err(source: tch::TchError) -> Error {
    Error::Torch {
        path: PathBuf::new(),
        source,
    }
}

/// The tch kind for a dtype, if tch has one.
pub fn kind_of(dtype: DType) -> Option<Kind> {
    Some(match dtype {
        DType::Float64 => Kind::Double,
        DType::Float32 => Kind::Float,
        DType::Float16 => Kind::Half,
        DType::BFloat16 => Kind::BFloat16,
        DType::Int64 => Kind::Int64,
        DType::Int32 => Kind::Int,
        DType::Int16 => Kind::Int16,
        DType::Int8 => Kind::Int8,
        DType::UInt8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
        DType::Complex32 => Kind::ComplexHalf,
        DType::Complex64 => Kind::ComplexFloat,
        DType::Complex128 => Kind::ComplexDouble,
        DType::Float8E5M2 => Kind::Float8e5m2,
        DType::Float8E4M3Fn => Kind::Float8e4m3fn,
        DType::Float8E5M2Fnuz => Kind::Float8e5m2fnuz,
        DType::Float8E4M3Fnuz => Kind::Float8e4m3fnuz,
        _ => return None,
    })
}

/// The dtype of a tch kind, if ckptio can save it.
pub fn dtype_of(kind: Kind) -> Option<DType> {
    DType::ALL
        .iter()
        .copied()
        .find(|&d| kind_of(d) == Some(kind))
}

/// The `torch.save` location tag of a device (`"cpu"`, `"cuda:0"`).
pub fn location_of(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        _ => "cpu".into(),
    }
}

/// The device a location tag names; an [`Error::Device`] for a tag tch has no device for.
pub fn device_of(location: &str) -> Result<Device> {
    let refuse = |reason: &str| Error::Device {
        device: location.to_owned(),
        reason: reason.to_owned(),
    };
    if location == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = location.strip_prefix("cuda") {
        let n = n.strip_prefix(':').unwrap_or("0");
        let n: usize = n
            .parse()
            .map_err(|_| refuse("not a CUDA device index (expected cuda:N)"))?;
        return Ok(Device::Cuda(n));
    }
    if location == "mps" {
        return Ok(Device::Mps);
    }
    Err(refuse(
        "not a device ckptio can place tensors on (cpu, cuda:N, mps); load with map_location",
    ))
}

/// The tch device a [`MapLocation`] sends a storage saved at `saved` to.
pub fn map_device(map: &MapLocation, saved: &str) -> Result<Device> {
    device_of(&map.map(saved))
}

/// The kind and element count of `t`, checked for what ckptio can save.
pub fn check_savable(t: &Tensor) -> Result<(DType, usize)> {
    let kind = t.f_kind().map_err(torch_err)?;
    let dtype = dtype_of(kind).ok_or_else(|| {
        Error::unsupported(
            "",
            format!("tensors of kind {kind:?} cannot be saved by ckptio"),
        )
    })?;
    Ok((dtype, t.numel()))
}

/// Copies the elements of `t` (any device, any layout, conjugate and negative views resolved)
/// in row-major order into `dst`, which must hold exactly `numel * element size` bytes.
///
/// One copy, straight into `dst`: CPU contiguous tensors by `memcpy`; everything else by
/// libtorch's `copy_` into a tensor over `dst`, so a strided view is gathered in one pass and a
/// CUDA tensor goes device-to-host in one transfer (a direct DMA when `dst` is pinned, as the
/// async runtime's staging buffers are when CUDA is available).
pub fn copy_into(t: &Tensor, dst: &mut [u8]) -> Result<()> {
    let (dtype, numel) = check_savable(t)?;
    if dst.len() != numel * dtype.size() {
        return Err(Error::TensorOp {
            op: "copy_into".into(),
            dtype,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            reason: format!(
                "the destination holds {} bytes, the tensor {}",
                dst.len(),
                numel * dtype.size()
            ),
        });
    }
    if numel == 0 {
        return Ok(());
    }
    let src = t.f_detach().map_err(torch_err)?;
    let src = if src.is_sparse() || src.is_mkldnn() {
        src.f_to_dense(None, false).map_err(torch_err)?
    } else {
        src
    };
    let plain = src.device() == Device::Cpu
        && src.is_contiguous()
        && !src.f_is_conj().map_err(torch_err)?
        && !src.f_is_neg().map_err(torch_err)?;
    if plain {
        return src.f_copy_data_u8(dst, numel).map_err(torch_err);
    }
    if (dst.as_ptr() as usize) % dtype.size() != 0 {
        // libtorch writes whole elements, which need aligned memory: resolve the view into a
        // temporary (which `copy_data_u8` makes host and contiguous), then copy its bytes.
        let tmp = src
            .f_resolve_conj()
            .and_then(|t| t.f_resolve_neg())
            .map_err(torch_err)?;
        return tmp.f_copy_data_u8(dst, numel).map_err(torch_err);
    }
    let kind = src.f_kind().map_err(torch_err)?;
    let shape = src.size();
    // SAFETY: `dst` is valid for writes of `numel * element size` bytes (checked above) and
    // borrowed mutably for this whole call; the view over it is a contiguous CPU tensor of
    // exactly that many elements, is never resized, and is dropped before this returns.
    #[allow(unsafe_code)]
    let mut view = unsafe { Tensor::f_from_blob(dst.as_mut_ptr(), &shape, &[], kind, Device::Cpu) }
        .map_err(torch_err)?;
    view.f_copy_(&src).map_err(torch_err)
}

/// Reads the box `want` of tensor `fqn` of a sharded checkpoint into `dst`, in place: straight
/// into its memory when it is a contiguous CPU tensor of the saved dtype and the box's shape
/// (no host buffer in between), else through a host tensor and `copy_` (a CUDA tensor, a
/// strided view).
pub fn read_chunk_into(
    reader: &crate::dcp::DcpReader,
    fqn: &str,
    want: &crate::dcp::Chunk,
    dst: &mut Tensor,
) -> Result<()> {
    let shape: Vec<usize> = dst.size().iter().map(|&d| d as usize).collect();
    let dtype = dst.f_kind().ok().and_then(dtype_of);
    let saved = match reader.metadata().entries.get(fqn) {
        Some(crate::dcp::Entry::Tensor(t)) => Some(t.dtype),
        _ => None,
    };
    let direct = dst.device() == Device::Cpu
        && dst.is_contiguous()
        && shape == want.sizes
        && dtype.is_some()
        && dtype == saved;
    if !direct {
        let host = reader.read_chunk(fqn, want)?;
        let src = to_tch(&host, dst.device())?;
        return tch::no_grad(|| dst.f_copy_(&src)).map_err(torch_err);
    }
    let len = dst.numel() * dst.f_kind().map_err(torch_err)?.elt_size_in_bytes();
    if len == 0 {
        return reader.read_chunk_into(fqn, want, &mut []);
    }
    // SAFETY: `dst` is a contiguous CPU tensor of `len` bytes at `data_ptr`, borrowed mutably
    // for this call, so nothing in this program resizes or frees it meanwhile; the slice is
    // dropped before this returns. Writing its elements is what `copy_` would do.
    #[allow(unsafe_code)]
    let out = unsafe { std::slice::from_raw_parts_mut(dst.data_ptr() as *mut u8, len) };
    reader.read_chunk_into(fqn, want, out)
}

/// Copies a tch tensor to a new [`HostTensor`] (contiguous), keeping its dtype, shape,
/// `requires_grad` and the location tag of its device.
pub fn to_host(t: &Tensor) -> Result<HostTensor> {
    let (dtype, numel) = check_savable(t)?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    // Large copies start on a page, so a durable save can write them with direct I/O.
    let mut buf = crate::aligned::PageVec::zeroed(numel * dtype.size());
    copy_into(t, buf.as_mut_slice())?;
    let storage = Storage::with_location(buf.into_bytes(), location_of(t.device()));
    let strides = contiguous_strides(&shape);
    Ok(HostTensor::from_parts(storage, dtype, shape, strides, 0)?
        .with_requires_grad(t.requires_grad()))
}

/// A new tch tensor on `device` holding the elements of `t`.
///
/// Fails with [`Error::Device`] (never a panic) when `device` is a CUDA device this
/// process does not have, as when a checkpoint saved on a GPU is loaded with its saved
/// locations on a machine without one: load it with [`MapLocation::Cpu`](crate::MapLocation).
pub fn to_tch(t: &HostTensor, device: Device) -> Result<Tensor> {
    if let Device::Cuda(i) = device {
        let have = if tch::Cuda::is_available() {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        };
        if i >= have {
            let why = if have == 0 {
                "CUDA is not available in this process".to_string()
            } else {
                format!("this process sees {have} CUDA device(s)")
            };
            return Err(Error::Device {
                device: format!("cuda:{i}"),
                reason: format!(
                    "cannot place a tensor there: {why}; load with map_location \
                     (MapLocation::Cpu, or another device) to read it here"
                ),
            });
        }
    }
    let kind = kind_of(t.dtype()).ok_or_else(|| {
        Error::unsupported("", format!("tch has no kind for {} tensors", t.dtype()))
    })?;
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    let bytes = t.contiguous_bytes();
    let out = Tensor::f_from_data_size(&bytes, &shape, kind).map_err(torch_err)?;
    let out = if device == Device::Cpu {
        out
    } else {
        out.f_to(device).map_err(torch_err)?
    };
    Ok(if t.requires_grad() {
        out.f_set_requires_grad(true).map_err(torch_err)?
    } else {
        out
    })
}

/// A [`HostTensor`] placed per `options.map_location` (its saved location otherwise).
pub fn to_tch_mapped(t: &HostTensor, options: &LoadOptions) -> Result<Tensor> {
    to_tch(
        t,
        map_device(&options.map_location, t.storage().location())?,
    )
}

/// A live view of a tch tensor: [`TensorSource`] over a shallow clone (same memory). Saving a
/// tree that holds it copies the tensor's current contents once, at snapshot time.
struct TchSource {
    tensor: std::sync::Mutex<Tensor>,
    dtype: DType,
    shape: Vec<usize>,
    location: String,
    requires_grad: bool,
}

impl TensorSource for TchSource {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }
    fn location(&self) -> String {
        self.location.clone()
    }
    fn requires_grad(&self) -> bool {
        self.requires_grad
    }
    fn copy_to(&self, dst: &mut [u8]) -> Result<()> {
        let t = self.tensor.lock().unwrap_or_else(|e| e.into_inner());
        copy_into(&t, dst)
    }
    fn host_memory(&self) -> Option<&dyn HostMemory> {
        Some(self)
    }
}

// SAFETY: `in_place` hands out the memory of a plain CPU row-major tensor of this dtype and
// length only, as bytes that own a tch tensor sharing its storage (which keeps the memory
// allocated). libtorch itself writes a CPU tensor only when the user's code asks it to. For
// `protectable_bytes`, the owner is a detached alias holding the storage itself, so the memory
// stays at its address however the user's tensor changes (short of `resize_`, see below), and
// CPU memory that a device may write (CUDA-pinned) is never offered.
#[allow(unsafe_code)]
unsafe impl HostMemory for TchSource {
    unsafe fn borrow_bytes(&self) -> Option<bytes::Bytes> {
        let t = self.tensor.lock().unwrap_or_else(|e| e.into_inner());
        self.in_place(&t, t.shallow_clone())
    }

    /// As `borrow_bytes`, held through a detached alias: the alias holds the storage itself,
    /// which stays allocated when the tensor is dropped or pointed at another storage (`set_`).
    /// Growing the tensor in place (`resize_` past its storage) replaces the storage's memory
    /// and frees the old one: do not do that to a tensor whose write-protected snapshot is
    /// still being copied.
    ///
    /// `None` in a process where CUDA is available. CUDA-pinned memory must not be protected
    /// (a device writes it without the kernel seeing), and the one way tch has to tell it from
    /// ordinary memory, `is_pinned(device)`, prints a libtorch deprecation warning to stderr at
    /// every call: once per tensor per save. There, CPU tensors are copied instead.
    unsafe fn protectable_bytes(&self) -> Option<bytes::Bytes> {
        if crate::runtime::cuda_available() {
            return None;
        }
        let t = self.tensor.lock().unwrap_or_else(|e| e.into_inner());
        let alias = t.f_detach().ok()?;
        self.in_place(&t, alias)
    }
}

impl TchSource {
    /// `t`'s elements in place when they are plain CPU row-major memory, with `keep` (sharing
    /// its storage) holding them.
    fn in_place(&self, t: &Tensor, keep: Tensor) -> Option<bytes::Bytes> {
        let len = self.shape.iter().product::<usize>() * self.dtype.size();
        let plain = t.device() == Device::Cpu
            && !t.is_sparse()
            && !t.is_mkldnn()
            && t.is_contiguous()
            && t.f_is_conj().ok() == Some(false)
            && t.f_is_neg().ok() == Some(false)
            && t.f_kind().ok().and_then(dtype_of) == Some(self.dtype)
            && t.numel() * self.dtype.size() == len;
        let ptr = t.data_ptr() as *const u8;
        if !plain || len == 0 || ptr.is_null() || keep.data_ptr() as *const u8 != ptr {
            return None;
        }
        Some(bytes::Bytes::from_owner(Borrowed {
            _tensor: keep,
            ptr,
            len,
        }))
    }
}

/// The memory of a CPU contiguous tch tensor, borrowed in place; the shallow clone keeps the
/// storage alive.
struct Borrowed {
    _tensor: Tensor,
    ptr: *const u8,
    len: usize,
}

impl AsRef<[u8]> for Borrowed {
    #[allow(unsafe_code)]
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` is the data pointer of the contiguous CPU tensor `_tensor`, whose
        // `len` bytes stay allocated while this struct holds it. That nobody writes them
        // meanwhile is the contract of `HostMemory::borrow_bytes`, whose caller drops these
        // bytes before the tensor can be written.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

// SAFETY: the pointer is into memory owned by `_tensor` (libtorch tensors may move between
// threads) and only read through `as_ref`.
#[allow(unsafe_code)]
unsafe impl Send for Borrowed {}
// SAFETY: as above; shared access only reads.
#[allow(unsafe_code)]
unsafe impl Sync for Borrowed {}

/// A [`LiveTensor`] over `t` (no copy now; the save snapshots it).
pub fn live(t: &Tensor) -> Result<LiveTensor> {
    let (dtype, _) = check_savable(t)?;
    Ok(LiveTensor::new(TchSource {
        dtype,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        location: location_of(t.device()),
        requires_grad: false,
        tensor: std::sync::Mutex::new(t.shallow_clone()),
    }))
}

/// The variables of a VarStore sorted by name (shallow clones sharing their memory): the one
/// order ckptio's state dicts and optimizers use.
pub fn named_variables(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The state dict of a VarStore as live tensors: an `OrderedDict` of name -> [`LiveTensor`],
/// names sorted. Saving it through [`AsyncCheckpointIo`](crate::AsyncCheckpointIo) copies each
/// variable once into a staging buffer.
pub fn live_state_dict(vs: &tch::nn::VarStore) -> Result<Value> {
    let mut d = Dict::ordered();
    for (name, t) in named_variables(vs) {
        d.insert(name, live(&t)?);
    }
    Ok(Value::Dict(d))
}

/// The state dict of a VarStore: an `OrderedDict` of name -> tensor, names sorted (what
/// `torch.load` gives back as `model.state_dict()`-like).
pub fn state_dict(vs: &tch::nn::VarStore) -> Result<Value> {
    let mut d = Dict::ordered();
    for (name, t) in named_variables(vs) {
        d.insert(name, to_host(&t)?.with_requires_grad(false));
    }
    Ok(Value::Dict(d))
}

/// What [`load_state_dict`] did not match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Variables of the store that the state dict did not have.
    pub missing: Vec<String>,
    /// Entries of the state dict that the store does not have.
    pub unexpected: Vec<String>,
}

/// Copies the tensors of `sd` into the variables of `vs`, in place (`copy_` under no_grad, so
/// dtype and device convert as needed). Every shape is checked before anything is copied. In
/// `strict` mode, a missing or unexpected key is an error and nothing is changed.
pub fn load_state_dict(vs: &mut tch::nn::VarStore, sd: &Value, strict: bool) -> Result<LoadReport> {
    let d = sd.as_dict().ok_or_else(|| {
        Error::state(format!(
            "a state dict must be a dict, got {}",
            sd.type_name()
        ))
    })?;
    let vars = named_variables(vs);
    let mut report = LoadReport::default();
    let mut pairs = Vec::new();
    for (name, var) in &vars {
        match d.get(name.as_str()) {
            Some(Value::Tensor(h)) => {
                let want: Vec<usize> = var.size().iter().map(|&x| x as usize).collect();
                if h.shape() != want.as_slice() {
                    return Err(Error::tensor(
                        "",
                        name.as_str(),
                        format!(
                            "shape {:?} in the checkpoint, {:?} in the model",
                            h.shape(),
                            want
                        ),
                    ));
                }
                pairs.push((var.shallow_clone(), h));
            }
            Some(other) => {
                return Err(Error::tensor(
                    "",
                    name.as_str(),
                    format!("expected a tensor, got {}", other.type_name()),
                ))
            }
            None => report.missing.push(name.clone()),
        }
    }
    for k in d.keys() {
        let known = k.as_str().is_some_and(|s| vars.iter().any(|(n, _)| n == s));
        if !known {
            report.unexpected.push(k.to_string());
        }
    }
    if strict && (!report.missing.is_empty() || !report.unexpected.is_empty()) {
        return Err(Error::KeyMismatch {
            path: PathBuf::new(),
            missing: report.missing,
            unexpected: report.unexpected,
        });
    }
    tch::no_grad(|| -> Result<()> {
        for (mut var, h) in pairs {
            let src = to_tch(&h.clone().with_requires_grad(false), Device::Cpu)?;
            var.f_copy_(&src).map_err(torch_err)?;
        }
        Ok(())
    })?;
    Ok(report)
}

/// Restores a VarStore in place from a loaded checkpoint (for
/// [`CheckpointIo::load_checkpoint`](crate::CheckpointIo::load_checkpoint)'s `state`).
///
/// With [`StateDictRestore::key`] (e.g. `"state_dict"` for Lightning files) the state dict is that
/// entry of the checkpoint and the other entries are returned; without it, the whole checkpoint
/// is the state dict and what the store did not take (unexpected keys) is returned.
pub struct StateDictRestore<'a> {
    vs: &'a mut tch::nn::VarStore,
    key: Option<String>,
    strip_prefix: Option<String>,
    strict: bool,
    report: LoadReport,
}

impl std::fmt::Debug for StateDictRestore<'_> {
    /// The settings and the last report (not the VarStore).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDictRestore")
            .field("key", &self.key)
            .field("strip_prefix", &self.strip_prefix)
            .field("strict", &self.strict)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl<'a> StateDictRestore<'a> {
    /// Restores `vs`, non-strict, from the whole checkpoint.
    pub fn new(vs: &'a mut tch::nn::VarStore) -> Self {
        StateDictRestore {
            vs,
            key: None,
            strip_prefix: None,
            strict: false,
            report: LoadReport::default(),
        }
    }
    /// Takes the state dict from entry `key` of the checkpoint.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Strips `prefix` from state-dict names first (Lightning's `"model."`).
    pub fn strip_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.strip_prefix = Some(prefix.into());
        self
    }
    /// Errors on missing or unexpected keys.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }
    /// What the last restore did not match.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }
}

impl Restore for StateDictRestore<'_> {
    fn restore(&mut self, loaded: Value, _options: &LoadOptions) -> Result<Option<Value>> {
        let (sd, mut rest) = match &self.key {
            Some(k) => {
                let mut top = match loaded {
                    Value::Dict(d) => d,
                    other => {
                        return Err(Error::State {
                            key: k.clone(),
                            reason: format!(
                                "the checkpoint is a {}, not a dict holding it",
                                other.type_name()
                            ),
                        })
                    }
                };
                let sd = top
                    .remove(&Key::Str(k.clone()))
                    .ok_or_else(|| Error::State {
                        key: k.clone(),
                        reason: "the checkpoint has no such entry".into(),
                    })?;
                (sd, Some(top))
            }
            None => (loaded, None),
        };
        let sd = match (&self.strip_prefix, sd) {
            (Some(p), Value::Dict(d)) => {
                let mut out = Dict::new();
                out.set_kind(d.kind());
                for (k, v) in d {
                    let k = match k {
                        Key::Str(s) => {
                            Key::Str(s.strip_prefix(p.as_str()).unwrap_or(&s).to_owned())
                        }
                        other => other,
                    };
                    out.insert(k, v);
                }
                Value::Dict(out)
            }
            (_, sd) => sd,
        };
        self.report = load_state_dict(self.vs, &sd, self.strict)?;
        if rest.is_none() && !self.report.unexpected.is_empty() {
            let mut extra = Dict::new();
            if let Value::Dict(d) = sd {
                for (k, v) in d {
                    if self.report.unexpected.contains(&k.to_string()) {
                        extra.insert(k, v);
                    }
                }
            }
            rest = Some(extra);
        }
        Ok(rest.filter(|d| !d.is_empty()).map(Value::Dict))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_saved_on_a_cuda_device_this_process_lacks_is_an_error_not_a_panic() {
        let missing = if tch::Cuda::is_available() {
            tch::Cuda::device_count() as usize
        } else {
            0
        };
        let bytes: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let storage = Storage::with_location(bytes, format!("cuda:{missing}"));
        let h = HostTensor::from_parts(storage, DType::Float32, vec![2], vec![1], 0).unwrap();
        // As saved: refused with a way out.
        match to_tch_mapped(&h, &LoadOptions::default()) {
            Err(Error::Device { device, reason }) => {
                assert_eq!(device, format!("cuda:{missing}"));
                assert!(reason.contains("map_location"), "{reason}");
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("placed on a device the process lacks"),
        }
        // The way out works.
        let to_cpu = LoadOptions::default().map_location(MapLocation::Cpu);
        let t = to_tch_mapped(&h, &to_cpu).unwrap();
        assert_eq!(t.device(), Device::Cpu);
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn tensors_round_trip_through_tch() {
        let t = Tensor::arange(12, (Kind::Float, Device::Cpu))
            .reshape([3, 4])
            .transpose(0, 1);
        let h = to_host(&t).unwrap();
        assert_eq!(h.shape(), &[4, 3]);
        let back = to_tch(&h, Device::Cpu).unwrap();
        assert!(back.equal(&t));
        for &d in DType::ALL {
            if let Some(k) = kind_of(d) {
                assert_eq!(dtype_of(k), Some(d));
            }
        }
    }

    /// The bytes of a `u64` buffer (8-byte aligned memory).
    fn bytemuck_bytes(v: &mut [u64]) -> &mut [u8] {
        let len = std::mem::size_of_val(v);
        // SAFETY: any initialised u64 memory is valid as bytes; the slice borrows `v` mutably.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), len)
        }
    }

    #[test]
    fn copies_hold_the_values_of_every_kind_of_view() {
        let base = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([2, 3, 4]);
        let c = Tensor::complex(&base, &(-&base)); // complex64, 2x3x4
        let views = [
            ("transposed", base.transpose(0, 2)),
            ("offset narrow", base.narrow(2, 1, 2)),
            ("f16 strided", base.to_kind(Kind::Half).transpose(1, 2)),
            ("conj", c.conj()),
            ("conj transposed", c.conj().transpose(0, 1)),
            ("neg view", c.conj().imag()),
            (
                "expanded",
                Tensor::arange(3, (Kind::Int64, Device::Cpu)).expand([4, 3], false),
            ),
            ("bool", base.gt(7.0).transpose(0, 1)),
            ("scalar", Tensor::from(2.5f64)),
        ];
        for (what, t) in views {
            let want = t.resolve_conj().resolve_neg().contiguous();
            let (dtype, numel) = check_savable(&t).unwrap();
            let n = numel * dtype.size();
            let mut expect = vec![0u8; n];
            want.copy_data_u8(&mut expect, numel);
            // Into aligned memory and, for multi-byte elements, into memory that is not.
            let mut buf = vec![0u64; n / 8 + 2];
            let bytes: &mut [u8] = bytemuck_bytes(&mut buf);
            for shift in [0, 1] {
                let got = &mut bytes[shift..shift + n];
                copy_into(&t, got).unwrap();
                assert_eq!(got, &expect[..], "{what}, shift {shift}");
            }
            let h = to_host(&t).unwrap();
            assert!(to_tch(&h, Device::Cpu).unwrap().equal(&want), "{what}");
        }
    }

    #[test]
    fn varstore_state_dict_loads_strictly() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let _l = tch::nn::linear(vs.root() / "fc", 3, 2, Default::default());
        let sd = state_dict(&vs).unwrap();
        let mut vs2 = tch::nn::VarStore::new(Device::Cpu);
        let _l2 = tch::nn::linear(vs2.root() / "fc", 3, 2, Default::default());
        let r = load_state_dict(&mut vs2, &sd, true).unwrap();
        assert_eq!(r, LoadReport::default());
        let a = vs.variables();
        let b = vs2.variables();
        for (k, v) in a {
            assert!(v.equal(&b[&k]), "{k}");
        }
        let mut partial = sd.as_dict().unwrap().clone();
        partial.remove(&Key::Str("fc.bias".into()));
        partial.insert("extra", HostTensor::scalar(1.0f32));
        let err = load_state_dict(&mut vs2, &Value::Dict(partial.clone()), true).unwrap_err();
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
        let r = load_state_dict(&mut vs2, &Value::Dict(partial), false).unwrap();
        assert_eq!(r.missing, vec!["fc.bias".to_string()]);
        assert_eq!(r.unexpected, vec!["extra".to_string()]);
    }
}
