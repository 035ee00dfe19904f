//! Sharded checkpoints from every rank, in PyTorch's Distributed Checkpoint (DCP) format, and
//! loads at any world size.
//!
//! A DCP checkpoint is a directory: one or more data files per rank (`__{rank}_{n}.distcp`),
//! each a back-to-back sequence of items, every tensor chunk a complete `torch.save` archive
//! of that chunk and every other value the bytes of a `torch.save` of it; and `.metadata`, a
//! pickle naming every tensor's global shape, its chunks and where each item lies. PyTorch's
//! `torch.distributed.checkpoint.load` and `format_utils.dcp_to_torch_save` read what
//! [`DcpCheckpointIo`] writes, and [`DcpReader`] reads what `torch.distributed.checkpoint.save`
//! writes.
//!
//! # The tree
//! A sharded checkpoint is a state dict. Its [`ShardedTensor`] leaves hold the chunks this rank
//! owns (each rank writes its own); whole tensors and plain values are the same on every rank
//! and are written once, each by one rank (spread over the ranks by size, as DCP's planner
//! dedups them). Nested dicts and lists of tensors flatten to dotted keys as DCP flattens them
//! (`model.layers.0.weight`), and the nesting comes back on load. With the `tch` feature,
//! `optim::ShardedOptimizer` gives an optimizer over this rank's rows a state of sharded
//! tensors.
//!
//! # Commit
//! Ranks learn their rank and the world size from `RANK` and `WORLD_SIZE` (what `torchrun`
//! sets; [`Rank::from_env`]) or from the caller ([`DcpCheckpointIo::new`]). Each rank writes
//! its data file (atomically, durably) and then a small record of its chunks; rank 0 waits
//! for every rank's record, merges them into `.metadata` and writes it last, atomically
//! (temporary name, fsync, rename, directory fsync). A directory without `.metadata` is
//! incomplete: loads refuse it ([`Error::Incomplete`]), and
//! [`CheckpointManager`](crate::manager::CheckpointManager) never resumes from it (and its
//! `finish` removes it). A rank that
//! does not finish in time fails the commit with [`Error::CommitTimeout`]; what the directory
//! held before (an earlier committed checkpoint) stays loadable, since a save never overwrites
//! a data file (it picks the next free `n`) and `.metadata` is replaced last. A rank's next
//! save of a directory waits until its previous one there is committed.
//!
//! The ranks meet through the file system by default ([`FileCollective`]); a program with a
//! process group can pass its own [`Collective`]. Ranks match their parts by a save id, `{run
//! id}-{n}` where `n` counts this process's saves of the directory and the run id comes from
//! `CKPTIO_RUN_ID`, `TORCHELASTIC_RUN_ID` with `TORCHELASTIC_RESTART_COUNT` (set by
//! `torchrun`, so each restart of a job has its own) or
//! [`DcpCheckpointIo::run_id`]: every rank must make the same saves of a directory in the same
//! order (under [`AsyncCheckpointIo`](crate::AsyncCheckpointIo), use the default
//! [`Backpressure::Block`](crate::Backpressure::Block), so no rank skips a save the others
//! make).
//!
//! # DDP: one file from rank 0
//! When every rank holds the same state (DDP), [`RankZeroIo`] wraps any backend so that rank 0
//! alone writes one file and the other ranks' saves return at once, or once rank 0's file is
//! durable ([`RankZeroIo::wait_for_rank_zero`]).
//!
//! # Under the async runtime
//! `AsyncCheckpointIo::new(DcpCheckpointIo::from_env()?)` snapshots each rank's live chunks
//! through the staging pool and writes them on the writer thread like any backend. A rank's
//! [`SaveHandle`](crate::SaveHandle) resolves when its part is durable (rank 0's when the
//! checkpoint is committed); [`DcpCheckpointIo::wait_committed`] waits for the commit on any
//! rank.
//!
//! ```no_run
//! use ckptio::dcp::{DcpCheckpointIo, DcpReader, Chunk, Rank, ShardedTensor};
//! use ckptio::{CheckpointIo, DType, Dict, HostTensor, SaveOptions, Value};
//! # fn main() -> ckptio::Result<()> {
//! let rank = Rank::from_env()?; // RANK, WORLD_SIZE as torchrun sets them
//! let rows = 8 / rank.world_size;
//! let local = HostTensor::from_slice(&vec![rank.rank as f32; rows * 4], &[rows, 4])?;
//! let w = ShardedTensor::new(vec![8, 4], DType::Float32)
//!     .with_shard(vec![rank.rank * rows, 0], local)?;
//! let mut state = Dict::new();
//! state.insert("w", w);
//! state.insert("step", 100i64);
//! let io = DcpCheckpointIo::new(rank);
//! io.save_checkpoint(&Value::from(state), "ckpt/step-100".as_ref(), &SaveOptions::default())?;
//! io.wait_committed("ckpt/step-100".as_ref())?;
//! // Any world size reads it back: here, rows 2..6 of w.
//! let reader = DcpReader::open("ckpt/step-100")?;
//! let part = reader.read_chunk("w", &Chunk::new(vec![2, 0], vec![4, 4]))?;
//! # Ok(()) }
//! ```

mod commit;
mod flatten;
mod metadata;
mod rank_zero;
mod read;
mod shard;
mod write;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use self::commit::{committed_save_id, is_part_file, Collective, FileCollective, METADATA};
pub use self::metadata::{Entry, Item, Metadata, TensorEntry};
pub use self::rank_zero::RankZeroIo;
pub use self::read::DcpReader;
pub use self::shard::{Chunk, Shard, ShardedTensor};
use crate::atomic::{remove_path, sync_dir};
use crate::error::{Error, Result};
use crate::io::{finish_load, CheckpointIo, LoadOptions, Restore, SaveOptions, WriteStats};
use crate::value::Value;

/// Restores named state in place from the sharded checkpoint in `dir`, reading only what this
/// rank needs: each state's current [`state_dict`](crate::state::Stateful::state_dict) is the
/// template ([`DcpReader::read_into`]), so its [`ShardedTensor`] leaves name the boxes to read
/// (a checkpoint saved at any world size), and each state's `load_state_dict` gets the same
/// tree with those boxes filled. Returns `None` (what the checkpoint holds beyond the names
/// asked for is not read); in `strict` mode a name the checkpoint lacks is an
/// [`Error::KeyMismatch`] and nothing is restored.
pub fn load_state(
    dir: &Path,
    state: &mut [(&str, &mut dyn crate::state::Stateful)],
    strict: bool,
) -> Result<Option<Value>> {
    let reader = DcpReader::open(dir)?;
    let saved = |name: &str| {
        reader
            .metadata()
            .paths
            .values()
            .any(|p| p.first().and_then(crate::Key::as_str) == Some(name))
            || reader.metadata().entries.contains_key(name)
    };
    let mut template = crate::Dict::new();
    for (name, s) in state.iter() {
        if saved(name) {
            template.insert(*name, s.state_dict()?);
        }
    }
    let tree = reader.read_into(&Value::Dict(template))?;
    crate::state::restore(tree, dir, state, strict)
}

/// This process's place in the job: its rank and the number of ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
}

impl Rank {
    /// Rank `rank` of `world_size`; refused unless `rank < world_size`.
    pub fn new(rank: usize, world_size: usize) -> Result<Rank> {
        if rank >= world_size {
            return Err(Error::Argument {
                name: "rank",
                reason: format!("rank {rank} is not below the world size {world_size}"),
            });
        }
        Ok(Rank { rank, world_size })
    }

    /// The only rank of a job of one process.
    pub fn single() -> Rank {
        Rank {
            rank: 0,
            world_size: 1,
        }
    }

    /// From `RANK` and `WORLD_SIZE`, as `torchrun` sets them; [`Rank::single`] when neither is
    /// set.
    pub fn from_env() -> Result<Rank> {
        let var = |name: &'static str| -> Result<Option<usize>> {
            match std::env::var(name) {
                Ok(v) => v.trim().parse().map(Some).map_err(|_| Error::Argument {
                    name,
                    reason: format!("environment variable {name}={v:?} is not a number"),
                }),
                Err(_) => Ok(None),
            }
        };
        match (var("RANK")?, var("WORLD_SIZE")?) {
            (None, None) => Ok(Rank::single()),
            (Some(r), Some(w)) => Rank::new(r, w),
            _ => Err(Error::Argument {
                name: "RANK",
                reason: "set both RANK and WORLD_SIZE, or neither".into(),
            }),
        }
    }
}

/// A [`CheckpointIo`] whose path is a directory holding a sharded checkpoint in PyTorch's DCP
/// format (see the [module docs](self)).
///
/// - **Save** writes this rank's part (its chunks, and the whole tensors and values assigned
///   to it) and hands its record to rank 0, which commits `.metadata` once every rank's part
///   is durable. Returns on rank 0 once committed, on other ranks once their part is durable.
/// - **Load** reads the whole checkpoint into one process ([`DcpReader::read_all`]); use
///   [`DcpReader::read_into`] or [`DcpReader::read_chunk`] to read only this rank's chunks.
/// - **Remove** is done by rank 0 (the others return at once): `.metadata` goes first, so a
///   crash part-way leaves an incomplete directory, never a torn checkpoint.
#[derive(Debug)]
pub struct DcpCheckpointIo {
    rank: Rank,
    collective: Arc<dyn Collective>,
    ids: SaveIds,
    commit_timeout: Duration,
    /// The id of this process's last save of each directory not yet seen committed.
    pending: Mutex<HashMap<PathBuf, String>>,
}

/// Save ids, `{run id}-{n}`, `n` counting this process's saves of each path: what the ranks
/// of a job agree on without talking to each other.
#[derive(Debug)]
pub(crate) struct SaveIds {
    pub(crate) run_id: String,
    counts: Mutex<HashMap<PathBuf, u64>>,
}

impl SaveIds {
    /// The run id from `CKPTIO_RUN_ID`, else torchrun's `TORCHELASTIC_RUN_ID` with
    /// `TORCHELASTIC_RESTART_COUNT`, else `"ckptio"`.
    pub(crate) fn from_env() -> SaveIds {
        let var = |v: &str| std::env::var(v).ok().filter(|s| !s.is_empty());
        let run_id = var("CKPTIO_RUN_ID")
            .or_else(|| {
                // torchrun keeps the run id across restarts of a job and counts them.
                let restart = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
                var("TORCHELASTIC_RUN_ID").map(|id| format!("{id}.{restart}"))
            })
            .unwrap_or_else(|| "ckptio".to_owned());
        SaveIds {
            run_id,
            counts: Mutex::default(),
        }
    }

    /// The id of the next save of `path`.
    pub(crate) fn next(&self, path: &Path) -> String {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(path_key(path)).or_insert(0);
        *n += 1;
        format!("{}-{n}", self.run_id)
    }
}

/// A path as a map key: absolute, so that `c` and `./c` are one path.
fn path_key(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

impl DcpCheckpointIo {
    /// The backend of rank `rank`, meeting the other ranks through the file system
    /// ([`FileCollective`], 10 minute timeout).
    pub fn new(rank: Rank) -> Self {
        DcpCheckpointIo {
            rank,
            collective: Arc::new(FileCollective::default()),
            ids: SaveIds::from_env(),
            commit_timeout: Duration::from_secs(600),
            pending: Mutex::default(),
        }
    }

    /// The backend of the rank `RANK` and `WORLD_SIZE` name ([`Rank::from_env`]).
    pub fn from_env() -> Result<Self> {
        Ok(Self::new(Rank::from_env()?))
    }

    /// Uses `collective` to gather the ranks' records (a process group's gather and barrier).
    pub fn with_collective(mut self, collective: impl Collective + 'static) -> Self {
        self.collective = Arc::new(collective);
        self
    }

    /// How long rank 0 waits for the other ranks' parts, and a rank for the commit of its
    /// previous save of a directory (default 10 minutes). Sets the timeout of the default
    /// [`FileCollective`] too.
    pub fn commit_timeout(mut self, timeout: Duration) -> Self {
        self.commit_timeout = timeout;
        self.collective = Arc::new(FileCollective::new(timeout));
        self
    }

    /// Sets the run id that save ids start with (default: `CKPTIO_RUN_ID`, else
    /// `TORCHELASTIC_RUN_ID.TORCHELASTIC_RESTART_COUNT`, else `"ckptio"`). A job restarted into the directories of an
    /// earlier attempt should get a new one, so no rank's part of the old attempt is taken
    /// for one of the new.
    pub fn run_id(mut self, run_id: impl Into<String>) -> Self {
        self.ids.run_id = run_id.into();
        self
    }

    /// This process's rank.
    pub fn rank(&self) -> Rank {
        self.rank
    }

    /// Waits until this process's last save of `dir` is committed (at once on rank 0, whose
    /// save returns committed, and when it never saved `dir`); [`Error::CommitTimeout`] after
    /// the commit timeout. Under [`AsyncCheckpointIo`](crate::AsyncCheckpointIo), wait for the
    /// save's handle first (this rank's part is durable), then call this through
    /// [`AsyncCheckpointIo::inner`](crate::AsyncCheckpointIo::inner).
    pub fn wait_committed(&self, dir: &Path) -> Result<()> {
        let key = path_key(dir);
        let pending = self.lock().get(&key).cloned();
        let Some(id) = pending else { return Ok(()) };
        let r = commit::wait_committed(dir, &id, self.commit_timeout);
        let mut pending = self.lock();
        if pending.get(&key) == Some(&id) {
            pending.remove(&key);
        }
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of the next save of `dir`, after this process's previous save of it committed.
    fn begin_save(&self, dir: &Path) -> Result<String> {
        self.wait_committed(dir)?;
        Ok(self.ids.next(dir))
    }

    fn save(&self, tree: &Value, dir: &Path, options: &SaveOptions) -> Result<WriteStats> {
        let start = std::time::Instant::now();
        crate::atomic::create_dirs(dir, options.durable)?;
        let save_id = self.begin_save(dir)?;
        let (record, written) = write::write_rank(tree, dir, self.rank, &save_id, options.durable)?;
        let gathered =
            self.collective
                .gather(dir, &save_id, self.rank, commit::encode_record(&record)?)?;
        let mut fsync = written.fsync;
        match gathered {
            Some(records) => {
                let records = records
                    .iter()
                    .map(|r| commit::decode_record(r, dir))
                    .collect::<Result<Vec<_>>>()?;
                let meta = commit::merge(dir, &save_id, &records)?;
                fsync += commit::commit(dir, &meta)?;
            }
            None => {
                self.lock().insert(path_key(dir), save_id.clone());
            }
        }
        self.collective.barrier(dir, &save_id, self.rank)?;
        tracing::debug!(
            path = %dir.display(),
            rank = self.rank.rank,
            bytes = written.bytes,
            elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
            "dcp save"
        );
        Ok(WriteStats {
            file_bytes: Some(written.bytes),
            fsync: Some(fsync),
        })
    }
}

impl CheckpointIo for DcpCheckpointIo {
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
        // SAFETY: the borrowed tree is dropped before this returns; live tensors must not be
        // written during a synchronous save (as for `TorchCheckpointIo`).
        #[allow(unsafe_code)]
        let tree = unsafe { checkpoint.materialize_borrowed()? };
        self.save(&tree, path, options)
    }

    fn load_checkpoint(
        &self,
        path: &Path,
        options: &LoadOptions,
        state: Option<&mut dyn Restore>,
    ) -> Result<Option<Value>> {
        let tree = DcpReader::open(path)?
            .verify_crc(options.verify_crc)
            .weights_only(options.weights_only)
            .read_all()?;
        finish_load(tree, options, state)
    }

    fn remove_checkpoint(&self, path: &Path) -> Result<()> {
        if self.rank.rank != 0 {
            return Ok(());
        }
        let meta = path.join(METADATA);
        if meta.exists() {
            remove_path(&meta)?;
            sync_dir(path)?;
        }
        remove_path(path)
    }

    fn accepts_pending_storages(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dict, HostTensor, Object, ObjectKind};

    #[test]
    fn a_value_holding_a_python_object_loads_only_when_asked_to() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ck");
        let hparams = Value::Object(Box::new(Object {
            state: Some(Value::Dict(Dict::from_iter([("lr", 0.1)]))),
            ..Object::new("argparse", "Namespace", ObjectKind::NewObj)
        }));
        let mut state = Dict::new();
        state.insert("w", HostTensor::from_slice(&[1f32, 2.], &[2]).unwrap());
        state.insert("hparams", hparams.clone());
        let io = DcpCheckpointIo::new(Rank::single());
        io.save_checkpoint(&Value::Dict(state), &ck, &SaveOptions::default())
            .unwrap();
        let safe = DcpReader::open(&ck).unwrap().read_value("hparams");
        assert!(matches!(safe, Err(Error::Unsafe { .. })), "{safe:?}");
        let trusted = DcpReader::open(&ck).unwrap().weights_only(false);
        assert_eq!(trusted.read_value("hparams").unwrap(), hparams);
        let all = io
            .load_checkpoint(&ck, &LoadOptions::default().weights_only(false), None)
            .unwrap()
            .unwrap();
        assert_eq!(all.get("hparams"), Some(&hparams));
    }
}
