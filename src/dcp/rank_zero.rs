//! DDP semantics: one checkpoint file, written by rank 0 only ([`RankZeroIo`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::atomic::{remove_path, write_atomic};
use crate::dcp::commit::poll;
use crate::dcp::{Rank, SaveIds};
use crate::error::{Error, Result};
use crate::io::{CheckpointIo, LoadOptions, Restore, SaveOptions, WriteStats};
use crate::value::Value;

/// Wraps any backend with DDP's semantics, as Lightning's `strategy="ddp"` saves: the state is
/// the same on every rank, so rank 0 alone writes the checkpoint (one file, through `inner`)
/// and the other ranks' saves return at once, or, with
/// [`wait_for_rank_zero`](RankZeroIo::wait_for_rank_zero), once rank 0's file is durable.
///
/// Rank 0 marks each durable save in a small file beside the checkpoint
/// (`.{name}.ckptio-saved`, holding the save's id, counted per path as
/// [`DcpCheckpointIo`](crate::DcpCheckpointIo) counts its saves), which is what the other
/// ranks wait for. Loads read the file on every rank; removes are done by rank 0.
///
/// ```no_run
/// use ckptio::dcp::{Rank, RankZeroIo};
/// use ckptio::{AsyncCheckpointIo, TorchCheckpointIo};
/// # fn main() -> ckptio::Result<()> {
/// let io = AsyncCheckpointIo::new(RankZeroIo::new(TorchCheckpointIo::new(), Rank::from_env()?));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RankZeroIo<I> {
    inner: I,
    rank: Rank,
    wait: Option<Duration>,
    ids: SaveIds,
}

impl<I: CheckpointIo> RankZeroIo<I> {
    /// `inner` saving on rank 0 only; other ranks' saves return at once.
    pub fn new(inner: I, rank: Rank) -> Self {
        RankZeroIo {
            inner,
            rank,
            wait: None,
            ids: SaveIds::from_env(),
        }
    }

    /// Makes the other ranks' saves return once rank 0's file is durable, waiting up to
    /// `timeout` ([`Error::CommitTimeout`] after it).
    pub fn wait_for_rank_zero(mut self, timeout: Duration) -> Self {
        self.wait = Some(timeout);
        self
    }

    /// Sets the run id save ids start with (see [`DcpCheckpointIo::run_id`](crate::DcpCheckpointIo::run_id)).
    pub fn run_id(mut self, run_id: impl Into<String>) -> Self {
        self.ids.run_id = run_id.into();
        self
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &I {
        &self.inner
    }

    fn wait_for(&self, marker: &Path, id: &str, timeout: Duration) -> Result<()> {
        poll(marker, timeout, || match std::fs::read_to_string(marker) {
            Ok(s) if s == id => Ok(Ok(())),
            Ok(_) => Ok(Err(vec![0])),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Err(vec![0])),
            Err(e) => Err(Error::io("read", marker, e)),
        })
    }
}

/// The file rank 0 writes beside `path` once a save of it is durable.
fn marker_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| Error::Path {
        path: path.to_path_buf(),
        reason: "it has no file name".into(),
    })?;
    Ok(path.with_file_name(format!(".{}.ckptio-saved", name.to_string_lossy())))
}

impl<I: CheckpointIo> CheckpointIo for RankZeroIo<I> {
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
        let id = self.ids.next(path);
        let marker = marker_path(path)?;
        if self.rank.rank == 0 {
            let stats = self
                .inner
                .save_checkpoint_measured(checkpoint, path, options)?;
            write_atomic(&marker, options.durable, |w| {
                std::io::Write::write_all(w, id.as_bytes())
                    .map_err(|e| Error::io("write", &marker, e))
            })?;
            return Ok(stats);
        }
        if let Some(timeout) = self.wait {
            self.wait_for(&marker, &id, timeout)?;
        }
        Ok(WriteStats::default())
    }

    fn load_checkpoint(
        &self,
        path: &Path,
        options: &LoadOptions,
        state: Option<&mut dyn Restore>,
    ) -> Result<Option<Value>> {
        self.inner.load_checkpoint(path, options, state)
    }

    fn remove_checkpoint(&self, path: &Path) -> Result<()> {
        if self.rank.rank != 0 {
            return Ok(());
        }
        self.inner.remove_checkpoint(path)?;
        remove_path(&marker_path(path)?)
    }

    fn teardown(&self) -> Result<()> {
        self.inner.teardown()
    }

    fn restore_after_setup(&self) -> bool {
        self.inner.restore_after_setup()
    }

    fn requires_state_on_load(&self) -> bool {
        self.inner.requires_state_on_load()
    }

    fn accepts_pending_storages(&self) -> bool {
        self.inner.accepts_pending_storages()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dict, TorchCheckpointIo};

    fn tree(step: i64) -> Value {
        let mut d = Dict::new();
        d.insert("step", step);
        Value::Dict(d)
    }

    #[test]
    fn rank_zero_writes_and_the_others_wait_for_its_durable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.pt");
        let rank = |r| Rank::new(r, 2).unwrap();
        let zero = RankZeroIo::new(TorchCheckpointIo::new(), rank(0)).run_id("t");
        let one = RankZeroIo::new(TorchCheckpointIo::new(), rank(1))
            .run_id("t")
            .wait_for_rank_zero(Duration::from_secs(30));
        let opts = SaveOptions::default();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| one.save_checkpoint(&tree(1), &path, &opts));
            zero.save_checkpoint(&tree(1), &path, &opts).unwrap();
            waiter.join().unwrap().unwrap();
        });
        let back = one
            .load_checkpoint(&path, &LoadOptions::default(), None)
            .unwrap();
        assert_eq!(back.unwrap().get("step").and_then(Value::as_int), Some(1));
        // Rank 1 alone writes nothing, and without waiting returns at once.
        let alone = RankZeroIo::new(TorchCheckpointIo::new(), rank(1));
        alone
            .save_checkpoint(&tree(2), &dir.path().join("d.pt"), &opts)
            .unwrap();
        assert!(!dir.path().join("d.pt").exists());
        // A rank that waits for a save rank 0 never makes times out.
        let late = RankZeroIo::new(TorchCheckpointIo::new(), rank(1))
            .wait_for_rank_zero(Duration::from_millis(50));
        let e = late
            .save_checkpoint(&tree(3), &dir.path().join("e.pt"), &opts)
            .unwrap_err();
        assert!(matches!(e, Error::CommitTimeout { .. }), "{e}");
        one.remove_checkpoint(&path).unwrap();
        assert!(path.exists(), "only rank 0 removes");
        zero.remove_checkpoint(&path).unwrap();
        assert!(!path.exists() && !marker_path(&path).unwrap().exists());
    }
}
