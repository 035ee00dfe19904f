//! The `torch.save` file format and [`TorchCheckpointIo`], the backend that writes and reads it.
//!
//! Files written here load in Python with `torch.load(path, weights_only=True)`; files written by
//! `torch.save` (and Lightning `.ckpt` files) load here. See the crate docs for the format's
//! details and the limits the reader enforces.
//!
//! ```no_run
//! use ckptio::{torch, HostTensor, Dict, LoadOptions, Value};
//! # fn main() -> ckptio::Result<()> {
//! let mut sd = Dict::ordered();
//! sd.insert("weight", HostTensor::from_slice(&[0.5f32; 6], &[2, 3])?);
//! torch::save(&Value::from(sd), "model.pt")?;               // torch.load("model.pt") reads it
//! let back = torch::load("model.pt", &LoadOptions::default())?;
//! # Ok(()) }
//! ```

pub(crate) mod archive;
pub(crate) mod pickle;
mod pickled;
pub(crate) mod read;
mod records;
pub(crate) mod zip;

use std::io::Write;
use std::path::Path;

use bytes::Bytes;

pub use self::archive::archive_prefix;
pub use self::pickle::reader::Limits;
pub use self::pickled::pickled;
pub use self::records::{RecordSpan, Records};
use crate::atomic::{remove_path, write_atomic};
use crate::error::{Error, Result};
use crate::io::{finish_load, CheckpointIo, LoadOptions, Restore, SaveOptions, WriteStats};
use crate::value::Value;

/// Saves `value` to `path` in the `torch.save` format, atomically and durably.
pub fn save(value: &Value, path: impl AsRef<Path>) -> Result<()> {
    TorchCheckpointIo::new().save_checkpoint(value, path.as_ref(), &SaveOptions::default())
}

/// Writes `value` in the `torch.save` format to any writer, with entries under `prefix/`
/// (`torch.save` to a buffer uses `"archive"`).
pub fn save_to_writer<W: Write>(value: &Value, prefix: &str, writer: W) -> Result<W> {
    // SAFETY: the borrowed tree is dropped before this function returns, and the caller cannot
    // write the live tensors while it runs (a synchronous save; see `save_checkpoint`).
    #[allow(unsafe_code)]
    let value = unsafe { value.materialize_borrowed()? };
    archive::write_archive(&value, prefix, zip::Plain(writer), Path::new("<writer>")).map(|w| w.0)
}

/// Loads the `torch.save` file at `path`.
pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Value> {
    TorchCheckpointIo::new().load(path.as_ref(), options)
}

/// Loads a `torch.save` archive held in memory. `name` is used in error messages.
pub fn load_from_bytes(data: Bytes, name: &str, options: &LoadOptions) -> Result<Value> {
    TorchCheckpointIo::new().load_bytes(&data, Path::new(name), options)
}

/// A [`CheckpointIo`] that writes and reads PyTorch's `torch.save` format (PyTorch 2.13).
///
/// - **Save** is atomic and (by default) durable: a temporary file in the same directory,
///   fsync, rename, fsync of the directory. Parent directories are created. Storage bytes are
///   written straight from the tensors' buffers; tensors that share a storage share it in the
///   file. Live tensors ([`crate::LiveTensor`]) in host memory are written in place, with no
///   copy, as `torch.save` does: like there, they must not be written by another thread until
///   the save returns (wrap the backend in [`crate::AsyncCheckpointIo`] to snapshot them
///   instead).
/// - **Load** reads the file into memory (or memory-maps it with [`LoadOptions::mmap`]) and
///   slices each storage out of it without further copies. `weights_only` (the default) refuses
///   anything PyTorch's weights-only unpickler refuses.
/// - **Remove** deletes a file or a directory, quietly when absent.
///
/// # How the bytes reach the disk
/// Durable saves use direct I/O (Linux `O_DIRECT`) where the file system allows it: large
/// storages go from the tensors' memory to the disk with no copy into the page cache, which
/// saves the kernel's copy of every byte, keeps a checkpoint from pushing the training data out
/// of the page cache, and makes the final fsync cheap. Non-durable saves, file systems that
/// refuse `O_DIRECT`, other systems, and a process run with `CKPTIO_DIRECT_IO=0` write through
/// the page cache instead; durable ones then ask the kernel to start writing back every 32 MiB
/// (`CKPTIO_WRITEBACK_MIB=N` sets another interval in MiB, 0 turns it off), so the final fsync
/// has little left to do.
#[derive(Clone, Debug, Default)]
pub struct TorchCheckpointIo {
    limits: Limits,
}

impl TorchCheckpointIo {
    /// A backend with default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the reader's limits (nesting depth, expansion budget).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Loads `path` into a tree.
    pub fn load(&self, path: &Path, options: &LoadOptions) -> Result<Value> {
        if options.mmap {
            let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
            let data = map_file(&file, path)?;
            return self.load_with(&data, path, options, None);
        }
        // Read on two threads, each hashing (when checked) the blocks it reads.
        let f = read::CheckedFile::read(path, options.verify_crc)?;
        let crcs = options.verify_crc.then_some(&f);
        self.load_with(&f.data, path, options, crcs)
    }

    fn load_bytes(&self, data: &Bytes, path: &Path, options: &LoadOptions) -> Result<Value> {
        self.load_with(data, path, options, None)
    }

    fn load_with(
        &self,
        data: &Bytes,
        path: &Path,
        options: &LoadOptions,
        precomputed: Option<&read::CheckedFile>,
    ) -> Result<Value> {
        let _span = tracing::debug_span!("torch_load", path = %path.display(), bytes = data.len())
            .entered();
        archive::read_archive(
            data,
            path,
            &archive::ReadSettings {
                weights_only: options.weights_only,
                verify_crc: options.verify_crc && !options.mmap,
                map_location: &options.map_location,
                limits: &self.limits,
                crc_of: precomputed.map(|f| move |start: usize, len: usize| f.crc(start, len)),
            },
        )
    }
}

#[allow(unsafe_code)]
pub(super) fn map_file(file: &std::fs::File, path: &Path) -> Result<Bytes> {
    // SAFETY: the map is read-only. Like `torch.load(mmap=True)`, it relies on nobody truncating
    // or rewriting the file while tensors borrow its pages; ckptio itself never writes a file in
    // place (saves go to a temporary file and are renamed), so its own writers cannot do that.
    let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| Error::io("memory-map", path, e))?;
    Ok(Bytes::from_owner(map))
}

impl CheckpointIo for TorchCheckpointIo {
    fn save_checkpoint(
        &self,
        checkpoint: &Value,
        path: &Path,
        options: &SaveOptions,
    ) -> Result<()> {
        self.save_checkpoint_measured(checkpoint, path, options)
            .map(drop)
    }

    fn save_checkpoint_measured(
        &self,
        checkpoint: &Value,
        path: &Path,
        options: &SaveOptions,
    ) -> Result<WriteStats> {
        let start = std::time::Instant::now();
        let prefix = archive_prefix(path);
        // SAFETY: the borrowed tree is dropped before this returns; live tensors must not be
        // written during a synchronous save (documented on `TorchCheckpointIo`).
        #[allow(unsafe_code)]
        let checkpoint = unsafe { checkpoint.materialize_borrowed()? };
        let stats = write_atomic(path, options.durable, |w| {
            archive::write_archive(&checkpoint, &prefix, w, path)?;
            Ok(())
        })?;
        tracing::debug!(
            path = %path.display(),
            bytes = stats.bytes,
            direct = stats.direct,
            direct_in_place = stats.direct_in_place,
            fsync_ms = stats.fsync.as_secs_f64() * 1e3,
            elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
            "torch save"
        );
        Ok(WriteStats {
            file_bytes: Some(stats.bytes),
            fsync: Some(stats.fsync),
        })
    }

    fn load_checkpoint(
        &self,
        path: &Path,
        options: &LoadOptions,
        state: Option<&mut dyn Restore>,
    ) -> Result<Option<Value>> {
        let tree = self.load(path, options)?;
        finish_load(tree, options, state)
    }

    fn remove_checkpoint(&self, path: &Path) -> Result<()> {
        remove_path(path)
    }

    /// Storages are read with `Storage::try_bytes`, one at a time as they are written, and a
    /// failed one fails the save before its rename.
    fn accepts_pending_storages(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dict, HostTensor};

    #[test]
    fn a_corrupt_byte_in_a_file_fails_its_crc_unless_unchecked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.pt");
        let data: Vec<f32> = (0..3_000_000).map(|i| i as f32).collect();
        let mut d = Dict::new();
        d.insert("w", HostTensor::from_slice(&data, &[data.len()]).unwrap());
        save(&Value::Dict(d), &p).unwrap();
        let good = load(&p, &LoadOptions::default()).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.len() / 2; // inside the 12 MB storage, past the first CRC block
        bytes[at] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        let err = load(&p, &LoadOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::Tensor { .. }) && err.to_string().contains("CRC-32"),
            "{err}"
        );
        let unchecked = load(&p, &LoadOptions::default().verify_crc(false)).unwrap();
        assert_ne!(unchecked, good);
    }

    /// Saves `v` durably the way `save_checkpoint` does and returns what the sink measured.
    fn save_stats(v: &Value, p: &Path) -> crate::sink::SinkStats {
        write_atomic(p, true, |w| {
            archive::write_archive(v, "c", w, p)?;
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn host_tensors_and_loaded_checkpoints_are_saved_again_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.pt");
        let n = 3 << 20; // 12 MiB of f32
        let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut d = Dict::new();
        d.insert("w", HostTensor::from_slice(&data, &[n]).unwrap());
        let first = save_stats(&Value::Dict(d), &p);
        let loaded = load(&p, &LoadOptions::default()).unwrap();
        let t = loaded.get("w").and_then(Value::as_tensor).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), data);
        let again = save_stats(&loaded, &dir.path().join("d.pt"));
        if !first.direct {
            // The temporary directory's file system refuses O_DIRECT: nothing to place.
            return;
        }
        // All but a ragged first and last block of the storage went from its own memory.
        for stats in [first, again] {
            assert!(stats.direct_in_place >= 4 * n as u64 - 8192, "{stats:?}");
        }
    }
}
