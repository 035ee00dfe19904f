//! [`AsyncCheckpointIo`]: takes checkpoint writes off the training thread, wrapping any
//! synchronous [`CheckpointIo`] backend.
//!
//! # The path of a save
//! Every save runs the same stages, in both snapshot modes; a mode changes only *where* the
//! snapshot stages run (the `pipeline` module has them, written once):
//!
//! ```text
//!  save(tree, path) ─▶ plan ─▶ copy or protect ─▶ queue ─▶ write ─▶ complete
//!                      │       │                   │        │        │
//!                      │       Eager: the caller's thread,  │        handle resolved, buffer back
//!                      │       before save returns;         │        to the pool, errors told once
//!                      │       Deferred: the staging thread writer thread: inner backend
//!                      one pool buffer for all     bounded channel per writer,
//!                      live tensors; the job       per-path order
//! ```
//!
//! - **Host tensors** ([`HostTensor`](crate::HostTensor)) are immutable (`bytes::Bytes`): they
//!   are queued as they are, with no copy at all.
//! - **Live tensors** ([`LiveTensor`](crate::LiveTensor), e.g. from
//!   [`ckptio::tch::live`](crate::tch::live)) are copied once into one buffer from the
//!   [staging pool](StagingPool) (pinned when CUDA is available). In [`SnapshotMode::Eager`]
//!   (the default) the copy is taken before `save` returns; in [`SnapshotMode::Deferred`] a
//!   staging thread takes it and [`SaveHandle::staged`] resolves when it has: do not mutate the
//!   tensors before that (wait on it just before the optimizer step).
//!
//! CUDA tensors are copied device to host with libtorch's `copy_` into the pinned staging
//! buffer, which waits for the transfer: on the caller's thread in Eager mode, on the staging
//! thread in Deferred mode (so `save` returns at once and `staged()` resolves once the transfer
//! is complete). The copy runs on the device's default stream, after the work queued there
//! before it; a tensor written by work on another stream must have that work synchronized
//! before `save`.
//!
//! A dedicated writer thread calls the inner backend's `save_checkpoint`; the handle resolves
//! when the checkpoint is durable, and the staging buffer goes back to the pool. By default
//! ([`Builder::write_start`]), when the queue has room, a save that copies reaches the writer
//! before the copy ends, and a backend that
//! [accepts pending storages](CheckpointIo::accepts_pending_storages) (as
//! [`TorchCheckpointIo`](crate::TorchCheckpointIo) does) writes each storage as soon as it is
//! copied: the write of the first tensors overlaps the copy of the last. Other backends are
//! called once the copy has ended. A copy that fails fails the save with [`Error::Snapshot`];
//! the file at its path is left as it was.
//!
//! # Write-protected snapshots (opt-in)
//! With [`Builder::write_protect`]`(true)`, on Linux where the process may use `userfaultfd`
//! ([`write_protect_available`]), an Eager save does not copy large CPU tensors (1 MiB and
//! more, in contiguous memory) on the calling thread: it write-protects their pages, which
//! costs a fraction of a copy, and returns. A background copier thread copies them into the
//! staging buffer and lifts the protection chunk by chunk; a thread that writes a page before
//! its chunk is copied waits (in the kernel) for that chunk's copy, at most 8 MiB. Each tensor
//! goes to the copier as soon as it is protected, and a backend that accepts storages still
//! being copied writes each large one piece by piece as its copy advances. What is saved is
//! still the state at the moment `save` returned. Memory that is not private anonymous memory
//! (shared, file-backed), CUDA tensors and small tensors are copied as before, and so are tch
//! CPU tensors in a process where CUDA is available (tch can tell CUDA-pinned memory, which a
//! device may write, from ordinary memory only through a call that prints a libtorch
//! deprecation warning each time).
//!
//! When it pays: large CPU state (hundreds of MiB and more) with a core to spare for the copy;
//! the stall becomes page-table work instead of a memory copy. What it requires: Linux 6.4+,
//! and root, `CAP_SYS_PTRACE`, `vm.unprivileged_userfaultfd = 1` or access to
//! `/dev/userfaultfd`. What it risks: a device writing host memory by DMA is not seen by the
//! protection, and ckptio can tell CUDA-pinned memory apart but not memory registered for RDMA
//! (ibverbs, as gloo over InfiniBand uses), io_uring fixed buffers or VFIO; and growing a
//! tensor in place (`resize_`) in the moments after `save` frees the memory being copied (the
//! process may crash, or the checkpoint hold zeros there). Where a loop does either to the CPU
//! tensors it saves, leave write protection off (see `protect.rs` for the rest).
//! Between saves, the copier asks the kernel to back tensors that stay in place from save to
//! save with huge pages, which makes their protection cheaper still
//! ([`Builder::huge_pages`]). [`Status::write_protected`] counts the bytes snapshotted this
//! way.
//!
//! # Ordering
//! Each path is served by one writer thread, in submission order: `remove_checkpoint(path)`
//! runs after every save of that path submitted before it, and `load_checkpoint(path)` first
//! waits for them (you read your own writes). A path is the same path however it is spelled
//! relative to the working directory (`c.pt`, `./c.pt`, its absolute form); a relative path is
//! resolved when its operation runs, so do not change the working directory while operations
//! on relative paths are pending.
//!
//! # Backpressure and memory
//! The queue to each writer is a bounded channel ([`Builder::capacity`], default 1 queued save).
//! When it is full, [`Backpressure::Block`] (default) waits, [`Backpressure::Skip`] resolves the
//! handle as skipped (and counts it), [`Backpressure::Error`] returns [`Error::QueueFull`].
//! Staging memory never exceeds [`Builder::pool_budget`] (one save larger than the budget may
//! run alone).
//!
//! The first save of a given size allocates its staging buffer and maps its pages; later saves
//! reuse it. Mapping huge pages may make the kernel compact memory first, which costs up to
//! seconds per GiB, once. [`AsyncCheckpointIo::reserve`] pays that before the training loop
//! starts, so that no save in the loop allocates.
//!
//! # Tracing
//! Spans: `ckptio_save` (the `save` call), `ckptio_stage` (the snapshot: on the caller's thread
//! in Eager mode, on the staging thread in Deferred mode), `ckptio_write` (the writer's call
//! to the inner backend) and, inside it for [`TorchCheckpointIo`](crate::TorchCheckpointIo),
//! `ckptio_fsync` (the file's fsync, then its directory's). Events: "snapshot taken" (bytes,
//! `stage_ms`), the write's start (`queue_ms`), "checkpoint durable" (bytes, `stage_ms`,
//! `copied_ms`, `queue_ms`, `write_ms`, `fsync_ms`), and errors. The same figures are in each
//! [`SaveReport`], and the counters in [`AsyncCheckpointIo::status`].
//!
//! # Errors
//! A failed write (or a panic in the inner backend, which becomes [`Error::Panic`]) resolves its
//! handle with the error. If nobody took it from the handle, the next call (`save`, `remove`,
//! `load`, `flush`, `teardown`) returns it. Every error is reported once; several are reported
//! together ([`Error::Multiple`]). The writer keeps serving later operations.
//!
//! # Shutdown
//! [`AsyncCheckpointIo::teardown`] drains the queue, joins the threads, calls the inner
//! backend's teardown and returns every error not reported yet; the wrapper can be used again
//! afterwards (threads start on demand). Dropping the wrapper does the same and logs errors with
//! `tracing`. No save accepted by `save` is silently lost on a normal exit.
//!
//! ```no_run
//! use ckptio::{AsyncCheckpointIo, Dict, HostTensor, TorchCheckpointIo, Value};
//! # fn main() -> ckptio::Result<()> {
//! let io = AsyncCheckpointIo::new(TorchCheckpointIo::new());
//! let mut ckpt = Dict::new();
//! ckpt.insert("step", 10i64);
//! ckpt.insert("w", HostTensor::from_slice(&[1.0f32, 2.0], &[2])?);
//! let handle = io.save(&Value::from(ckpt), "runs/step-10.pt")?; // returns after the snapshot
//! // ... keep training ...
//! let report = handle.wait()?; // or `handle.await` in async code
//! println!("{} bytes durable after {:?}", report.bytes, report.write);
//! io.teardown()?;
//! # Ok(()) }
//! ```

#![warn(clippy::too_many_lines)]

mod handle;
mod job;
mod pipeline;
mod pool;
mod protect;
mod snapshot;
mod threads;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender, TrySendError};
use std::borrow::Cow;

use self::handle::Completion;
pub use self::handle::{SaveHandle, SaveReport, Staged};
use self::job::{fail_job, Job, StageJob};
use self::pipeline::{SaveRequest, SnapshotAt};
pub use self::pool::{cuda_available, PoolStats, StagingBuf, StagingPool};
pub use self::protect::write_protect_available;
use self::protect::Protector;
use self::snapshot::staging_len;
use self::threads::{guarded, stage_loop, writer_loop};
use crate::error::{Error, Result};
use crate::io::{CheckpointIo, LoadOptions, Restore, SaveOptions};
use crate::value::Value;

/// When the snapshot of live tensors is taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SnapshotMode {
    /// `save` returns once the copy is taken; the caller may mutate its tensors at once.
    #[default]
    Eager,
    /// `save` returns at once; a staging thread copies, and [`SaveHandle::staged`] resolves when
    /// it has. The caller must not mutate the tensors until then.
    Deferred,
}

/// What `save` does when the queue is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backpressure {
    /// Wait for room.
    #[default]
    Block,
    /// Drop this save: its handle resolves as skipped, and the skip is counted.
    Skip,
    /// Return [`Error::QueueFull`].
    Error,
}

/// When the writer may start on a save whose snapshot is still being taken
/// ([`Builder::write_start`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteStart {
    /// Once the snapshot is wholly taken: the save's copy runs alone.
    AfterSnapshot,
    /// While the snapshot is copied: a save that copies (Deferred, or Eager without write
    /// protection) goes to the writer before its copy when the queue has room, and the writer
    /// writes each storage as soon as it is copied. A write-protected save goes once every
    /// tensor is protected (when `save` returns), and its storages are written as the
    /// background copier advances.
    #[default]
    WhileCopying,
    /// As `WhileCopying`, and a write-protected save goes to the writer as soon as its first
    /// tensor is protected, so the write also overlaps the protection of the rest: a shorter
    /// time to durable, but a longer stall (the write competes with the protection).
    WhileProtecting,
}

/// Counters and gauges a user can read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// Operations submitted and not finished yet.
    pub pending: usize,
    /// Bytes of snapshots queued or being written.
    pub bytes_in_flight: u64,
    /// Saves made durable.
    pub saves: u64,
    /// Bytes written by those saves.
    pub bytes_written: u64,
    /// Saves skipped by backpressure.
    pub skips: u64,
    /// Operations that failed.
    pub errors: u64,
    /// The staging pool.
    pub pool: PoolStats,
    /// Bytes of Eager snapshots taken by write-protecting the tensors instead of copying them
    /// on the calling thread ([`Builder::write_protect`]).
    pub write_protected: u64,
    /// Writes to write-protected tensors that had to wait for their chunk's copy (each waited
    /// for at most 8 MiB to be copied).
    pub write_protect_waits: u64,
    /// 2 MiB blocks of saved tensors the kernel has moved into huge pages at the background
    /// copier's request ([`Builder::huge_pages`]), since the wrapper was made.
    pub huge_page_blocks: u64,
    /// Requests for such a block that the kernel refused (no free huge page, most often); a
    /// block refused twice is not asked for again while it stays saved. Refused blocks keep
    /// 4 KiB pages, whose protection costs more at each save.
    pub huge_page_refusals: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    saves: AtomicU64,
    bytes: AtomicU64,
    skips: AtomicU64,
    errors: AtomicU64,
    protected: AtomicU64,
    /// Shared with the copier of write-protected snapshots.
    protect: Arc<protect::ProtectCounters>,
}

impl Counters {
    fn saved(&self, bytes: u64) {
        self.saves.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    fn failed(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) struct Shared<I> {
    pub(crate) inner: I,
    pub(crate) pool: StagingPool,
    pub(crate) counters: Counters,
    pub(crate) bytes_in_flight: Arc<AtomicU64>,
    /// The inner backend's `accepts_pending_storages`, asked once.
    pub(crate) pending_storages_ok: bool,
    /// When a save may reach the writer ([`Builder::write_start`]).
    pub(crate) write_start: WriteStart,
    /// Every operation not yet known to be finished and reported.
    pending: Mutex<Vec<Arc<Completion>>>,
}

struct Workers {
    writers: Vec<Sender<Job>>,
    stager: Option<Sender<StageJob>>,
    threads: Vec<JoinHandle<()>>,
    /// The copier of write-protected Eager snapshots, where available.
    protector: Option<Protector>,
}

/// Configures an [`AsyncCheckpointIo`].
#[derive(Clone, Debug)]
pub struct Builder {
    capacity: usize,
    writers: usize,
    pool_budget: usize,
    mode: SnapshotMode,
    backpressure: Backpressure,
    pin: bool,
    write_start: WriteStart,
    protect: bool,
    huge_pages: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            capacity: 1,
            writers: 1,
            pool_budget: 8 << 30,
            mode: SnapshotMode::Eager,
            backpressure: Backpressure::Block,
            pin: true,
            write_start: WriteStart::WhileCopying,
            protect: false,
            huge_pages: true,
        }
    }
}

impl Builder {
    /// Saves that may wait in each writer's queue (default 1; at least 1).
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n.max(1);
        self
    }
    /// Writer threads (default 1). Operations on one path always run in order.
    pub fn writers(mut self, n: usize) -> Self {
        self.writers = n.max(1);
        self
    }
    /// Most bytes of staging memory in use at once (default 8 GiB).
    pub fn pool_budget(mut self, bytes: usize) -> Self {
        self.pool_budget = bytes;
        self
    }
    /// Eager (default) or Deferred snapshots.
    pub fn snapshot_mode(mut self, mode: SnapshotMode) -> Self {
        self.mode = mode;
        self
    }
    /// What to do when the queue is full (default Block).
    pub fn backpressure(mut self, b: Backpressure) -> Self {
        self.backpressure = b;
        self
    }
    /// Use CUDA-pinned staging memory when CUDA is available (default true).
    pub fn pin_memory(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }
    /// When the writer may start on a save whose snapshot is still being taken (default
    /// [`WriteStart::WhileCopying`]). Starting early shortens the time to durable by up to one
    /// copy, for backends that [accept pending storages](CheckpointIo::accepts_pending_storages);
    /// in Eager mode the training thread waits for the copy, and a write running beside it can
    /// slow that copy down a little ([`WriteStart::AfterSnapshot`] keeps the stall to the copy
    /// alone). See `docs/benchmarks.md` for both side by side.
    pub fn write_start(mut self, when: WriteStart) -> Self {
        self.write_start = when;
        self
    }
    /// Whether an Eager save may write-protect large CPU tensors instead of copying them on the
    /// calling thread (default `false`: opt in; Linux with `userfaultfd` only). `save` then
    /// returns after changing page tables, a fraction of a copy, and a background thread
    /// copies; a write to a tensor not copied yet waits for that part's copy (at most 8 MiB).
    ///
    /// It pays for large CPU state (hundreds of MiB and more) on a machine with a core to spare
    /// for the copy. It requires Linux 6.4+ and the right to use `userfaultfd` (root,
    /// `CAP_SYS_PTRACE`, `vm.unprivileged_userfaultfd = 1`, or access to `/dev/userfaultfd`;
    /// [`write_protect_available`] tells); where the kernel refuses, saves copy as they would
    /// with this off. Do not turn it on where a device writes the CPU tensors you save by DMA
    /// (RDMA-registered memory, io_uring fixed buffers: the kernel does not see those writes),
    /// or where the loop grows them in place (`resize_`) just after a save (the process may
    /// crash, or the checkpoint hold zeros there): see the
    /// [module docs](self#write-protected-snapshots).
    pub fn write_protect(mut self, on: bool) -> Self {
        self.protect = on;
        self
    }
    /// Whether the background copier of write-protected saves ([`Builder::write_protect`])
    /// asks the kernel, between saves, to back the tensors that two saves in a row protected
    /// at the same address with 2 MiB transparent huge pages (`MADV_COLLAPSE`, Linux 6.1).
    /// Default true. Protecting memory costs page-table work per page, and a huge page is one
    /// entry where 4 KiB pages are 512: from the third save of a state that stays in place,
    /// its protected stall is a fraction of what it was (see `docs/benchmarks.md`). Only
    /// 2 MiB blocks wholly inside a tensor are asked for, and the contents never change. The
    /// price is paid once, in the background: the kernel copies each block into a huge page
    /// (on the order of a millisecond per MiB), holding the process's
    /// memory-map lock for a moment per block, when no save was being protected or copied as
    /// the block was started (a save that starts meanwhile waits for that one block; a block
    /// that took over 20 ms ends the requests until the next save). Memory: a block's pages
    /// that took none before (never written, swapped out, or shared copy-on-write with a
    /// forked child) take their share once it is a huge page. Where the kernel refuses (no
    /// huge page free, an older kernel, a mapping marked `MADV_NOHUGEPAGE`), nothing changes;
    /// where transparent huge pages are turned off (`never`) or are not 2 MiB, nothing is
    /// asked. Turn it off to leave the state's pages as the allocator made them.
    pub fn huge_pages(mut self, on: bool) -> Self {
        self.huge_pages = on;
        self
    }
    /// Builds the wrapper around `inner`.
    pub fn build<I: CheckpointIo + 'static>(self, inner: I) -> AsyncCheckpointIo<I> {
        AsyncCheckpointIo {
            shared: Arc::new(Shared {
                pending_storages_ok: inner.accepts_pending_storages(),
                write_start: self.write_start,
                inner,
                pool: StagingPool::new(self.pool_budget, self.pin),
                counters: Counters::default(),
                bytes_in_flight: Arc::new(AtomicU64::new(0)),
                pending: Mutex::new(Vec::new()),
            }),
            workers: Mutex::new(None),
            config: self,
        }
    }
}

/// Wraps a synchronous backend and writes in the background. See the [module docs](self).
pub struct AsyncCheckpointIo<I: CheckpointIo + 'static> {
    shared: Arc<Shared<I>>,
    workers: Mutex<Option<Workers>>,
    config: Builder,
}

impl<I: CheckpointIo + 'static> std::fmt::Debug for AsyncCheckpointIo<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncCheckpointIo")
            .field("config", &self.config)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer that serves `path`: one writer for every spelling of the same path (`a.pt`,
/// `./a.pt` and its absolute form, against the working directory), so that a removal or a
/// load cannot overtake a save of the same file spelled another way. (`..` and symbolic links
/// are left as they are, as `std::path::absolute` does.)
pub(crate) fn route(path: &Path, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % n as u64) as usize
}

impl<I: CheckpointIo + 'static> AsyncCheckpointIo<I> {
    /// Wraps `inner` with the default configuration.
    pub fn new(inner: I) -> Self {
        Builder::default().build(inner)
    }

    /// A builder.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The inner backend.
    pub fn inner(&self) -> &I {
        &self.shared.inner
    }

    /// The staging pool.
    pub fn pool(&self) -> &StagingPool {
        &self.shared.pool
    }

    /// Readies the staging pool for `saves` saves of trees like `tree` in flight at once (the
    /// same live tensor sizes), before the training loop: afterwards the pool holds that many
    /// free buffers large enough for `tree`, with their pages mapped (pinned where the pool
    /// pins), so the first saves take their staging from the pool as later ones do, with no
    /// allocation and no page fault on the training thread. Returns the bytes allocated (0 when
    /// the pool already held them). Build the tree as the loop will save it: an optimizer whose
    /// state is created at its first step has no state to reserve for before it.
    ///
    /// One save in flight at a time (`saves = 1`) is the steady state when each write ends
    /// before the next save; a save that starts while the previous one is written needs a
    /// second buffer.
    ///
    /// Fails with [`Error::StagingBudget`] when the buffers would not fit
    /// [`Builder::pool_budget`] beside the staging in use now (see
    /// [`StagingPool::reserve`]); nothing is allocated then.
    ///
    /// ```
    /// use ckptio::runtime::Builder;
    /// use ckptio::{DType, Dict, LiveTensor, TensorSource, Value};
    ///
    /// // A tensor source of the caller's own (with tch, `ckptio::tch::live(&tensor)`).
    /// struct Weights(Vec<f32>);
    /// impl TensorSource for Weights {
    ///     fn dtype(&self) -> DType { DType::Float32 }
    ///     fn shape(&self) -> Vec<usize> { vec![self.0.len()] }
    ///     fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
    ///         for (d, x) in dst.chunks_exact_mut(4).zip(&self.0) {
    ///             d.copy_from_slice(&x.to_le_bytes());
    ///         }
    ///         Ok(())
    ///     }
    /// }
    /// # fn main() -> ckptio::Result<()> {
    /// let dir = tempfile::tempdir().expect("a temporary directory");
    /// let io = Builder::default().build(ckptio::TorchCheckpointIo::new());
    /// let w = LiveTensor::new(Weights(vec![0.5; 1 << 20]));
    /// let tree = |step: i64| {
    ///     let mut d = Dict::new();
    ///     d.insert("w", w.clone());
    ///     d.insert("step", step);
    ///     Value::from(d)
    /// };
    /// io.reserve(&tree(0), 1)?; // before the loop: allocates and maps 4 MiB once
    /// for step in 1..=3 {
    ///     io.save(&tree(step), dir.path().join(format!("step-{step}.pt")))?.wait()?;
    /// }
    /// assert_eq!(io.status().pool.allocations, 1, "no save allocated");
    /// io.teardown()?;
    /// # Ok(()) }
    /// ```
    pub fn reserve(&self, tree: &Value, saves: usize) -> Result<usize> {
        self.shared.pool.reserve(staging_len(tree)?, saves)
    }

    /// Counters and gauges.
    pub fn status(&self) -> Status {
        let pending = lock(&self.shared.pending)
            .iter()
            .filter(|c| !c.is_done())
            .count();
        let c = &self.shared.counters;
        Status {
            pending,
            bytes_in_flight: self.shared.bytes_in_flight.load(Ordering::Acquire),
            saves: c.saves.load(Ordering::Relaxed),
            bytes_written: c.bytes.load(Ordering::Relaxed),
            skips: c.skips.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            pool: self.shared.pool.stats(),
            write_protected: c.protected.load(Ordering::Relaxed),
            write_protect_waits: c.protect.waits.load(Ordering::Relaxed),
            huge_page_blocks: c.protect.huge_collapsed.load(Ordering::Relaxed),
            huge_page_refusals: c.protect.huge_refused.load(Ordering::Relaxed),
        }
    }

    fn start(&self) -> std::sync::MutexGuard<'_, Option<Workers>> {
        let mut w = lock(&self.workers);
        if w.is_none() {
            let mut writers = Vec::new();
            let mut threads = Vec::new();
            for i in 0..self.config.writers {
                let (tx, rx) = bounded::<Job>(self.config.capacity);
                let shared = self.shared.clone();
                let t = std::thread::Builder::new()
                    .name(format!("ckptio-writer-{i}"))
                    .spawn(move || writer_loop(shared, rx));
                match t {
                    Ok(t) => threads.push(t),
                    Err(e) => tracing::error!(error = %e, "cannot spawn a checkpoint writer"),
                }
                writers.push(tx);
            }
            let stager = if self.config.mode == SnapshotMode::Deferred {
                let (tx, rx) = bounded::<StageJob>(self.config.capacity);
                let shared = self.shared.clone();
                let ws = writers.clone();
                match std::thread::Builder::new()
                    .name("ckptio-stager".into())
                    .spawn(move || stage_loop(shared, rx, ws))
                {
                    Ok(t) => threads.push(t),
                    Err(e) => tracing::error!(error = %e, "cannot spawn the staging thread"),
                }
                Some(tx)
            } else {
                None
            };
            let protector = if self.config.mode == SnapshotMode::Eager && self.config.protect {
                match Protector::start(self.shared.counters.protect.clone(), self.config.huge_pages)
                {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::debug!(error = %e, "write protection not available: Eager saves copy");
                        None
                    }
                }
            } else {
                None
            };
            *w = Some(Workers {
                writers,
                stager,
                threads,
                protector,
            });
        }
        w
    }

    /// Errors of finished operations nobody has been told about; forgets finished operations.
    fn take_errors(&self) -> Vec<Error> {
        let mut pending = lock(&self.shared.pending);
        let mut errors = Vec::new();
        pending.retain(|c| {
            if c.is_done() {
                if let Some(e) = c.take_unreported_error() {
                    errors.push(Error::Background {
                        path: c.path.clone(),
                        source: e,
                    });
                }
                false
            } else {
                true
            }
        });
        errors
    }

    fn check_errors(&self) -> Result<()> {
        combine(self.take_errors())
    }

    fn track(&self, c: &Arc<Completion>) {
        lock(&self.shared.pending).push(c.clone());
    }

    /// Saves `tree` to `path` in the background. Returns after the snapshot (Eager) or at once
    /// (Deferred); the handle resolves when the checkpoint is durable.
    ///
    /// Fails at once with an earlier background error nobody was told about (the save is then
    /// not queued), with a snapshot error, or with [`Error::QueueFull`].
    pub fn save(&self, tree: &Value, path: impl AsRef<Path>) -> Result<SaveHandle> {
        self.save_with_options(tree, path, &SaveOptions::default())
    }

    /// [`save`](Self::save) with options for the inner backend.
    pub fn save_with_options(
        &self,
        tree: &Value,
        path: impl AsRef<Path>,
        options: &SaveOptions,
    ) -> Result<SaveHandle> {
        let path = path.as_ref().to_path_buf();
        let _span = tracing::debug_span!("ckptio_save", path = %path.display()).entered();
        self.check_errors()?;
        let done = Completion::new(&path);
        let handle = SaveHandle {
            completion: done.clone(),
        };
        let request = SaveRequest {
            path,
            options: options.clone(),
            done: done.clone(),
        };
        // Held for the whole save, copy included: per-path order rests on it, since a save
        // held back by a full queue is sent after its copy, and no other save or `submit`
        // may reach a writer in between.
        let guard = self.start();
        let Some(workers) = guard.as_ref() else {
            return Err(stopped(&request.path));
        };
        self.track(&done);
        match &workers.stager {
            Some(stager) => self.to_stager(stager, request, tree)?,
            None => {
                let writer = &workers.writers[route(&request.path, workers.writers.len())];
                let policy = self.config.backpressure;
                if policy != Backpressure::Block && writer.is_full() {
                    pipeline::refuse(&self.shared, policy, &done, &request.path)?;
                } else {
                    let at = SnapshotAt::Caller {
                        protector: workers.protector.as_ref(),
                        policy,
                    };
                    pipeline::run(&self.shared, writer, request, Cow::Borrowed(tree), at)?;
                }
            }
        }
        Ok(handle)
    }

    /// Hands a Deferred save to the staging thread, which takes its snapshot
    /// ([`Backpressure`] applies to the staging thread's queue).
    fn to_stager(&self, stager: &Sender<StageJob>, req: SaveRequest, tree: &Value) -> Result<()> {
        let done = req.done.clone();
        let job = StageJob::Save(req, tree.clone());
        let policy = self.config.backpressure;
        let sent = if policy != Backpressure::Block {
            stager.try_send(job)
        } else {
            stager
                .send(job)
                .map_err(|e| TrySendError::Disconnected(e.0))
        };
        match sent {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => pipeline::refuse(&self.shared, policy, &done, &done.path),
            Err(TrySendError::Disconnected(_)) => {
                self.shared.counters.failed();
                done.finish(Err(Arc::new(stopped(&done.path))));
                Ok(())
            }
        }
    }

    /// Queues an operation behind everything submitted before it on its path.
    fn submit(&self, job: Job, path: &Path) {
        let guard = self.start();
        let Some(workers) = guard.as_ref() else {
            fail_job(&self.shared, job);
            return;
        };
        match &workers.stager {
            Some(stager) => {
                let sj = match job {
                    Job::Barrier { done } => StageJob::PathBarrier(path.to_path_buf(), done),
                    other => StageJob::Forward(other),
                };
                if let Err(e) = stager.send(sj) {
                    match e.0 {
                        StageJob::Forward(j) => fail_job(&self.shared, j),
                        StageJob::PathBarrier(_, done) => {
                            fail_job(&self.shared, Job::Barrier { done })
                        }
                        StageJob::Save(req, _) => {
                            self.shared.counters.failed();
                            fail_job(&self.shared, Job::Barrier { done: req.done })
                        }
                    }
                }
            }
            None => {
                if let Err(e) = workers.writers[route(path, workers.writers.len())].send(job) {
                    fail_job(&self.shared, e.0);
                }
            }
        }
    }

    /// Removes `path` after every save of it submitted before; returns a handle for the removal.
    pub fn remove(&self, path: impl AsRef<Path>) -> Result<SaveHandle> {
        let path = path.as_ref();
        self.check_errors()?;
        let done = Completion::new(path);
        self.track(&done);
        self.submit(
            Job::Remove {
                path: path.to_path_buf(),
                done: done.clone(),
            },
            path,
        );
        Ok(SaveHandle { completion: done })
    }

    /// Waits until every operation on `path` submitted so far has finished; returns errors
    /// nobody was told about.
    pub fn wait_path(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let done = Completion::new(path);
        self.submit(Job::Barrier { done: done.clone() }, path);
        let _ = done.wait_done(None);
        self.check_errors()
    }

    /// Waits until every operation submitted so far has finished; returns errors nobody was
    /// told about.
    pub fn flush(&self) -> Result<()> {
        self.flush_timeout(None)
    }

    /// Waits for the completion of every save and removal submitted so far (all of them are
    /// tracked from before they are queued), without sending anything down the queues: a full
    /// queue in front of a hung backend cannot then hold the wait past its `timeout`, nor hold
    /// the writers' lock while it waits.
    fn flush_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let waiting: Vec<Arc<Completion>> = lock(&self.shared.pending)
            .iter()
            .filter(|c| !c.is_done())
            .cloned()
            .collect();
        for c in &waiting {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if !c.wait_finished(left) {
                let pending = lock(&self.shared.pending)
                    .iter()
                    .filter(|c| !c.is_done())
                    .map(|c| c.path.clone())
                    .collect();
                return Err(Error::TeardownTimeout { pending });
            }
        }
        self.check_errors()
    }

    /// Drains the queue, joins the threads, tears the inner backend down and returns every
    /// error not reported yet. The wrapper can be used again afterwards.
    pub fn teardown(&self) -> Result<()> {
        self.teardown_inner(None)
    }

    /// [`teardown`](Self::teardown) that gives up after `timeout`, reporting what is still
    /// pending ([`Error::TeardownTimeout`]) instead of hanging; the threads then keep running.
    pub fn teardown_timeout(&self, timeout: Duration) -> Result<()> {
        self.teardown_inner(Some(timeout))
    }

    fn teardown_inner(&self, timeout: Option<Duration>) -> Result<()> {
        let mut errors = Vec::new();
        match self.flush_timeout(timeout) {
            Ok(()) => {}
            Err(e @ Error::TeardownTimeout { .. }) => return Err(e),
            Err(e) => errors.push(e),
        }
        let workers = lock(&self.workers).take();
        if let Some(w) = workers {
            drop(w.stager);
            drop(w.writers);
            for t in w.threads {
                if t.join().is_err() {
                    errors.push(Error::Panic {
                        path: PathBuf::new(),
                        message: "a checkpoint thread panicked".into(),
                    });
                }
            }
            // Every write has ended, so every protected copy too: stop the copier.
            drop(w.protector);
        }
        errors.extend(self.take_errors());
        // A panic in the inner backend's teardown is an error like one in its save (and never
        // a panic out of `Drop`).
        if let Err(e) = guarded(Path::new(""), || self.shared.inner.teardown()) {
            errors.push(e);
        }
        combine(flatten(errors))
    }
}

fn flatten(errors: Vec<Error>) -> Vec<Error> {
    let mut out = Vec::new();
    for e in errors {
        match e {
            Error::Multiple { errors } => out.extend(flatten(errors)),
            other => out.push(other),
        }
    }
    out
}

fn combine(mut errors: Vec<Error>) -> Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(Error::Multiple { errors }),
    }
}

fn stopped(path: &Path) -> Error {
    Error::io(
        "queue",
        path,
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the checkpoint writer has stopped",
        ),
    )
}

impl<I: CheckpointIo + 'static> Drop for AsyncCheckpointIo<I> {
    fn drop(&mut self) {
        // After an explicit teardown (and no use since) the inner backend was torn down already:
        // only errors nobody heard of are left to log.
        let r = if lock(&self.workers).is_none() {
            self.check_errors()
        } else {
            self.teardown()
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "checkpoint errors at drop (call teardown() to handle them)");
        }
    }
}

impl<I: CheckpointIo + 'static> CheckpointIo for AsyncCheckpointIo<I> {
    /// Returns after staging; the write happens in the background (its error, if any, is
    /// returned by the next call).
    fn save_checkpoint(
        &self,
        checkpoint: &Value,
        path: &Path,
        options: &SaveOptions,
    ) -> Result<()> {
        let h = self.save_with_options(checkpoint, path, options)?;
        h.wait_staged()
    }

    /// Waits for pending operations on `path`, then loads on the calling thread.
    fn load_checkpoint(
        &self,
        path: &Path,
        options: &LoadOptions,
        state: Option<&mut dyn Restore>,
    ) -> Result<Option<Value>> {
        self.wait_path(path)?;
        self.shared.inner.load_checkpoint(path, options, state)
    }

    /// Queues the removal behind pending saves of `path` and returns.
    fn remove_checkpoint(&self, path: &Path) -> Result<()> {
        self.remove(path).map(drop)
    }

    fn teardown(&self) -> Result<()> {
        AsyncCheckpointIo::teardown(self)
    }

    fn restore_after_setup(&self) -> bool {
        self.shared.inner.restore_after_setup()
    }

    fn requires_state_on_load(&self) -> bool {
        self.shared.inner.requires_state_on_load()
    }

    fn accepts_pending_storages(&self) -> bool {
        self.shared.inner.accepts_pending_storages()
    }
}
