//! The [`CheckpointIo`] trait: the synchronous backend contract.
//!
//! It mirrors PyTorch Lightning's `CheckpointIO` plugin: `save_checkpoint`, `load_checkpoint`,
//! `remove_checkpoint`, `teardown`, and the `restore_after_setup` / `requires_state_on_load`
//! flags with Lightning's defaults (`false`, `false`). Any backend implements it; wrappers (such as
//! the async runtime) implement it too and compose.
//!
//! The trait is object safe (`Box<dyn CheckpointIo>` works) and takes `&self`: backends that keep
//! state use interior mutability, so one backend can serve several writer threads.
//!
//! ```no_run
//! use ckptio::{CheckpointIo, Dict, LoadOptions, SaveOptions, TorchCheckpointIo, Value};
//! # fn main() -> ckptio::Result<()> {
//! let io: Box<dyn CheckpointIo> = Box::new(TorchCheckpointIo::new());
//! let mut ckpt = Dict::new();
//! ckpt.insert("epoch", 3i64);
//! io.save_checkpoint(&Value::from(ckpt), "runs/last.ckpt".as_ref(), &SaveOptions::default())?;
//! let back = io.load_checkpoint("runs/last.ckpt".as_ref(), &LoadOptions::default(), None)?;
//! assert_eq!(back.unwrap().get("epoch").and_then(Value::as_int), Some(3));
//! io.remove_checkpoint("runs/last.ckpt".as_ref())?;
//! # Ok(()) }
//! ```

use std::path::Path;

use crate::error::Result;
use crate::value::Value;

/// Where loaded tensors should live (PyTorch's `map_location`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MapLocation {
    /// Keep the location each storage was saved with (`"cpu"`, `"cuda:0"`, ...).
    #[default]
    AsSaved,
    /// Everything on the CPU.
    Cpu,
    /// Everything on CUDA device `n`.
    Cuda(usize),
}

impl MapLocation {
    /// The location tag a storage saved at `saved` gets under this mapping.
    pub fn map(&self, saved: &str) -> String {
        match self {
            MapLocation::AsSaved => saved.to_owned(),
            MapLocation::Cpu => "cpu".to_owned(),
            MapLocation::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

/// Options for [`CheckpointIo::save_checkpoint`] (Lightning's `storage_options`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SaveOptions {
    /// Make the checkpoint durable before returning (fsync file and directory). Default `true`.
    pub durable: bool,
}

/// What a backend measured while saving ([`CheckpointIo::save_checkpoint_measured`]): `None`
/// where it did not measure. [`AsyncCheckpointIo`](crate::AsyncCheckpointIo) puts it in each
/// save's [`SaveReport`](crate::SaveReport).
///
/// ```
/// use ckptio::WriteStats;
/// let mut s = WriteStats::default();
/// s.fsync = Some(std::time::Duration::from_millis(3));
/// assert_eq!(s.file_bytes, None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteStats {
    /// Bytes in the file (or files) written.
    pub file_bytes: Option<u64>,
    /// Time spent making the checkpoint durable (fsync of the file and of its directory);
    /// `Some(ZERO)` when the save was not durable.
    pub fsync: Option<std::time::Duration>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { durable: true }
    }
}

impl SaveOptions {
    /// Sets [`SaveOptions::durable`].
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
}

/// Options for [`CheckpointIo::load_checkpoint`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Where tensors land ([`MapLocation`]); applied to storage locations in the loaded tree and
    /// used by the tch conversions.
    pub map_location: MapLocation,
    /// Accept only what PyTorch's weights-only unpickler accepts. Default `true`: the safe choice
    /// for files from elsewhere. With `false`, unknown Python objects are kept as inert
    /// [`Object`](crate::Object)s; nothing is ever executed either way.
    pub weights_only: bool,
    /// Memory-map the file so tensors borrow its pages (like `torch.load(mmap=True)`).
    pub mmap: bool,
    /// Check each entry's CRC-32 (default `true`; skipped when memory-mapping, as torch does).
    pub verify_crc: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            map_location: MapLocation::AsSaved,
            weights_only: true,
            mmap: false,
            verify_crc: true,
        }
    }
}

impl LoadOptions {
    /// Sets [`LoadOptions::map_location`].
    pub fn map_location(mut self, map_location: MapLocation) -> Self {
        self.map_location = map_location;
        self
    }
    /// Sets [`LoadOptions::weights_only`].
    pub fn weights_only(mut self, weights_only: bool) -> Self {
        self.weights_only = weights_only;
        self
    }
    /// Sets [`LoadOptions::mmap`].
    pub fn mmap(mut self, mmap: bool) -> Self {
        self.mmap = mmap;
        self
    }
    /// Sets [`LoadOptions::verify_crc`].
    pub fn verify_crc(mut self, verify_crc: bool) -> Self {
        self.verify_crc = verify_crc;
        self
    }
}

/// Something a loaded checkpoint can be restored into, in place (a model, an optimizer, a whole
/// training state).
pub trait Restore {
    /// Takes what it needs from `loaded` and returns the rest: `None` when everything was
    /// restored in place (Lightning's contract for `load_checkpoint(..., state=...)`).
    fn restore(&mut self, loaded: Value, options: &LoadOptions) -> Result<Option<Value>>;
}

/// A synchronous checkpoint backend (Lightning's `CheckpointIO`).
///
/// Implementations document their atomicity and durability; [`TorchCheckpointIo`] makes each
/// save atomic (temporary file, fsync, rename, fsync of the directory).
///
/// [`TorchCheckpointIo`]: crate::TorchCheckpointIo
pub trait CheckpointIo: Send + Sync {
    /// Saves `checkpoint` to `path`, creating parent directories.
    ///
    /// Under [`AsyncCheckpointIo`](crate::AsyncCheckpointIo), a backend that says
    /// [`accepts_pending_storages`](Self::accepts_pending_storages) is called while the
    /// snapshot's storages may still be being copied.
    fn save_checkpoint(&self, checkpoint: &Value, path: &Path, options: &SaveOptions)
        -> Result<()>;

    /// [`save_checkpoint`](Self::save_checkpoint), returning what the backend measured while
    /// saving (the time its fsyncs took, the bytes in the file): the method
    /// [`AsyncCheckpointIo`](crate::AsyncCheckpointIo)'s writer calls. The default calls
    /// `save_checkpoint` and measures nothing; a backend that measures overrides this one and
    /// makes `save_checkpoint` call it. A backend that wraps another forwards both methods
    /// (as `Box` and `Arc` do), or the inner backend's figures are lost.
    fn save_checkpoint_measured(
        &self,
        checkpoint: &Value,
        path: &Path,
        options: &SaveOptions,
    ) -> Result<WriteStats> {
        self.save_checkpoint(checkpoint, path, options)
            .map(|()| WriteStats::default())
    }

    /// Loads the checkpoint at `path`.
    ///
    /// Without `state`, returns `Some(tree)`. With a `state`, restores it in place and returns
    /// what was not restored (`None` when fully restored).
    fn load_checkpoint(
        &self,
        path: &Path,
        options: &LoadOptions,
        state: Option<&mut dyn Restore>,
    ) -> Result<Option<Value>>;

    /// Removes the checkpoint at `path` (a file or a directory); quiet when it is absent.
    fn remove_checkpoint(&self, path: &Path) -> Result<()>;

    /// Releases resources; called when training ends. Default: nothing to do.
    fn teardown(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the checkpoint should be restored after the model is set up (Lightning's
    /// `_restore_after_setup`). Default `false`.
    fn restore_after_setup(&self) -> bool {
        false
    }

    /// Whether `load_checkpoint` needs the `state` argument (Lightning's
    /// `_requires_state_on_load`). Default `false`.
    fn requires_state_on_load(&self) -> bool {
        false
    }

    /// Whether `save_checkpoint` may be handed a tree whose storages are still being copied
    /// (by [`AsyncCheckpointIo`](crate::AsyncCheckpointIo), which then starts the write before
    /// the copy ends). Such a backend must read storages with
    /// [`Storage::try_bytes`](crate::Storage::try_bytes), which waits for each one's bytes and
    /// fails if its copy failed, and must then fail the save without replacing what `path`
    /// held. Default `false`: the backend is called once every storage is in.
    /// [`TorchCheckpointIo`](crate::TorchCheckpointIo) says `true`.
    fn accepts_pending_storages(&self) -> bool {
        false
    }
}

/// Restores `loaded` into `state` if one was given; the helper every backend's
/// `load_checkpoint` ends with.
pub fn finish_load(
    loaded: Value,
    options: &LoadOptions,
    state: Option<&mut dyn Restore>,
) -> Result<Option<Value>> {
    match state {
        Some(s) => s.restore(loaded, options),
        None => Ok(Some(loaded)),
    }
}

/// Forwards every method to the pointee, so `Box<dyn CheckpointIo>` and `Arc<I>` are backends.
macro_rules! forward_checkpoint_io {
    ($($ptr:ident),*) => {$(
        impl<T: CheckpointIo + ?Sized> CheckpointIo for $ptr<T> {
            fn save_checkpoint(&self, c: &Value, p: &Path, o: &SaveOptions) -> Result<()> {
                (**self).save_checkpoint(c, p, o)
            }
            fn save_checkpoint_measured(
                &self,
                c: &Value,
                p: &Path,
                o: &SaveOptions,
            ) -> Result<WriteStats> {
                (**self).save_checkpoint_measured(c, p, o)
            }
            fn load_checkpoint(
                &self,
                p: &Path,
                o: &LoadOptions,
                s: Option<&mut dyn Restore>,
            ) -> Result<Option<Value>> {
                (**self).load_checkpoint(p, o, s)
            }
            fn remove_checkpoint(&self, p: &Path) -> Result<()> {
                (**self).remove_checkpoint(p)
            }
            fn teardown(&self) -> Result<()> {
                (**self).teardown()
            }
            fn restore_after_setup(&self) -> bool {
                (**self).restore_after_setup()
            }
            fn requires_state_on_load(&self) -> bool {
                (**self).requires_state_on_load()
            }
            fn accepts_pending_storages(&self) -> bool {
                (**self).accepts_pending_storages()
            }
        }
    )*};
}

use std::sync::Arc;
forward_checkpoint_io!(Box, Arc);
