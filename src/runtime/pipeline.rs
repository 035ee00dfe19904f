//! The path of one save, written once for both snapshot modes:
//!
//! ```text
//!  plan ──▶ hand over early ──▶ copy or protect ──▶ end the snapshot ──▶ queue ──▶ write ──▶ complete
//!  a pool     where the write     every live           staged; the        bounded    writer thread
//!  buffer,    may overlap the     tensor into its      copy's outcome     channel    (threads.rs)
//!  the job    copy (WriteStart)   region of the        for the writer
//! ```
//!
//! [`run`] takes a save from its plan to its writer's queue. A mode changes only *where* it
//! runs ([`SnapshotAt`]): on the caller's thread before `save` returns (Eager), or on the
//! staging thread (Deferred). The writer's stages (write, complete) are
//! [`threads::serve_write`](super::threads).
//!
//! A save that never reaches a writer is ended here, on every path (refused, failed, writers
//! gone), and its staging buffer and bytes in flight go back before its handle hears.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::handle::{Completion, SaveReport};
use super::job::{abandon, queue, send_held, Job, Queued};
use super::protect::Protector;
use super::snapshot::{prepare, storage_bytes, CopyEnd, CopyPlan, CopySetter, SnapshotCopy};
use super::threads::guarded;
use super::{Backpressure, Shared, WriteStart};
use crate::error::{Error, Result};
use crate::io::SaveOptions;
use crate::value::Value;

/// One save, as `save` was asked for it.
pub(crate) struct SaveRequest {
    pub(crate) path: PathBuf,
    pub(crate) options: SaveOptions,
    pub(crate) done: Arc<Completion>,
}

/// Where a save's snapshot is taken: the snapshot mode, as data.
#[derive(Clone, Copy)]
pub(crate) enum SnapshotAt<'a> {
    /// Eager: on the caller's thread, before `save` returns. Large snapshots are copied on up
    /// to four threads, or write-protected where a `protector` runs.
    Caller {
        protector: Option<&'a Protector>,
        policy: Backpressure,
    },
    /// Deferred: on the staging thread, one copy thread, which waits for room.
    StagingThread,
}

impl SnapshotAt<'_> {
    /// What this save does when the queue is full: the staging thread always waits.
    fn policy(&self) -> Backpressure {
        match self {
            SnapshotAt::Caller { policy, .. } => *policy,
            SnapshotAt::StagingThread => Backpressure::Block,
        }
    }

    /// Whether this save waits for staging memory and queue room (or is refused without them).
    fn waits(&self) -> bool {
        self.policy() == Backpressure::Block
    }

    fn protector(&self) -> Option<&Protector> {
        match self {
            SnapshotAt::Caller { protector, .. } => *protector,
            SnapshotAt::StagingThread => None,
        }
    }

    /// Whether the caller waits in `save` and hears of a failed snapshot from it (its handle
    /// then never reports it again).
    fn caller_hears(&self) -> bool {
        matches!(self, SnapshotAt::Caller { .. })
    }

    fn label(&self) -> &'static str {
        match self {
            SnapshotAt::Caller { .. } => "eager",
            SnapshotAt::StagingThread => "deferred",
        }
    }
}

/// Runs one save from its plan to its writer's queue (see the [module docs](self)). `tree` is
/// dropped once the copy is done, before the save is staged. Every path ends the save's
/// completion or hands it to the writer; the error is returned only to a caller that waits
/// in `save` ([`SnapshotAt::Caller`]), which is then told nothing else.
pub(crate) fn run<I>(
    shared: &Shared<I>,
    writer: &Sender<Job>,
    req: SaveRequest,
    tree: Cow<'_, Value>,
    at: SnapshotAt<'_>,
) -> Result<()> {
    let started = Instant::now();
    let span = tracing::debug_span!("ckptio_stage", path = %req.path.display(), mode = at.label())
        .entered();
    // Plan: a staging buffer for the live tensors, and the job that will carry them. A save
    // that protects lets the copier fault in new staging pages as it copies.
    let fault_in = at.protector().is_none();
    let planned = guarded(&req.path, || {
        prepare(&shared.pool, &tree, at.waits(), fault_in)
    });
    let (snap, plan) = match planned {
        Ok(Some(planned)) => planned,
        Ok(None) => return refuse(shared, at.policy(), &req.done, &req.path),
        Err(e) => return fail(shared, &at, &req, None, e),
    };
    let bytes = storage_bytes(&snap);
    let copy = SnapshotCopy::new();
    let mut setter = Some(copy.setter());
    let mut slot = Slot {
        shared,
        writer,
        job: Some(Job::save(&req, snap, bytes, copy, &shared.bytes_in_flight)),
    };
    // Hand over early: the write of the first storages overlaps the copy of the last.
    if plan.is_some() && at.protector().is_none() && shared.write_start != WriteStart::AfterSnapshot
    {
        match slot.offer() {
            Offered::Queued | Offered::Nothing => {}
            Offered::Gone => return Ok(()),
            Offered::Full if !at.waits() => {
                drop(plan); // the plan holds the staging buffer: it goes back first
                drop(slot);
                return refuse(shared, at.policy(), &req.done, &req.path);
            }
            Offered::Full => {}
        }
    }
    let copied = guarded(&req.path, || {
        copy_or_protect(plan, &at, started, &mut setter, &req.done, &mut slot)
    });
    drop(tree);
    let protected = match copied {
        Ok(protected) => protected,
        Err(e) => return fail(shared, &at, &req, Some((setter, slot)), e),
    };
    end_snapshot(shared, &req, bytes, protected, started, setter);
    drop(span);
    slot.send(at.waits())
        .map_or_else(|()| refuse(shared, at.policy(), &req.done, &req.path), Ok)
}

/// Copies the live tensors into the plan's staging buffer, or write-protects them for the
/// background copier; returns the bytes protected. A write-protected save is handed to the
/// writer by `on_first` as the protection goes (see [`CopyPlan::run_protected`]).
fn copy_or_protect<I>(
    plan: Option<CopyPlan>,
    at: &SnapshotAt<'_>,
    started: Instant,
    setter: &mut Option<CopySetter>,
    done: &Arc<Completion>,
    slot: &mut Slot<'_, I>,
) -> Result<u64> {
    let Some(plan) = plan else { return Ok(0) };
    match at {
        SnapshotAt::Caller {
            protector: Some(p), ..
        } => {
            let write_start = slot.shared.write_start;
            let mut on_first = |protected: bool| {
                let go = if protected {
                    write_start == WriteStart::WhileProtecting
                } else {
                    write_start != WriteStart::AfterSnapshot
                };
                if go {
                    let _ = slot.offer();
                }
            };
            plan.run_protected(p, started, setter, done, at.waits(), &mut on_first)
        }
        SnapshotAt::Caller {
            protector: None, ..
        } => plan.run(true).map(|()| 0),
        SnapshotAt::StagingThread => plan.run(false).map(|()| 0),
    }
}

/// Ends a snapshot that was taken: staged first (the writer may finish as soon as the setter
/// is set). With write protection the caller may write its tensors at once, so the save is
/// staged now; the copier ended the copy's setter, which it took, once its copy is done.
fn end_snapshot<I>(
    shared: &Shared<I>,
    req: &SaveRequest,
    bytes: u64,
    protected: u64,
    started: Instant,
    setter: Option<CopySetter>,
) {
    shared
        .counters
        .protected
        .fetch_add(protected, Ordering::Relaxed);
    let stage = started.elapsed();
    req.done.set_staged(Ok(()));
    if let Some(s) = setter {
        s.set(Ok(CopyEnd::at(stage)));
    }
    tracing::debug!(
        bytes,
        stage_ms = stage.as_secs_f64() * 1e3,
        protected,
        "snapshot taken"
    );
}

/// Ends a save whose snapshot failed, with [`Error::Snapshot`]: its copy's setter and staged
/// state carry the error to the writer (if the save was handed over early) and to the handle;
/// a job still held is abandoned (its buffer back first). The caller of an Eager save hears
/// it from `save` and the handle never reports it again.
fn fail<I>(
    shared: &Shared<I>,
    at: &SnapshotAt<'_>,
    req: &SaveRequest,
    made: Option<(Option<CopySetter>, Slot<'_, I>)>,
    e: Error,
) -> Result<()> {
    let source = Arc::new(e);
    let why = || Error::Snapshot {
        path: req.path.clone(),
        source: source.clone(),
    };
    if at.caller_hears() {
        req.done.mark_reported();
    }
    let err = Arc::new(why());
    req.done.set_staged(Err(err.clone()));
    match made {
        Some((setter, slot)) => {
            if let Some(s) = setter {
                s.set(Err(err.clone()));
            }
            // A job handed over already is finished by the writer, with the copy's error.
            if let Some(job) = slot.job {
                abandon(shared, job, err);
            }
        }
        None => {
            shared.counters.failed();
            req.done.finish(Err(err));
        }
    }
    if at.caller_hears() {
        Err(why())
    } else {
        Ok(())
    }
}

/// Ends a save that found no room (the queue, or the staging budget, under a policy that does
/// not wait) as skipped: [`Backpressure::Error`] returns [`Error::QueueFull`] too, and
/// [`Backpressure::Skip`] counts it.
pub(crate) fn refuse<I>(
    shared: &Shared<I>,
    policy: Backpressure,
    done: &Completion,
    path: &Path,
) -> Result<()> {
    done.finish(Ok(SaveReport {
        path: path.to_path_buf(),
        skipped: true,
        ..SaveReport::default()
    }));
    match policy {
        Backpressure::Error => Err(Error::QueueFull {
            path: path.to_path_buf(),
        }),
        Backpressure::Block | Backpressure::Skip => {
            tracing::warn!(path = %path.display(), "queue full: save skipped");
            shared.counters.skips.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}

/// A save's job between its plan and its writer's queue.
struct Slot<'a, I> {
    shared: &'a Shared<I>,
    writer: &'a Sender<Job>,
    /// `None` once queued (or failed on the way).
    job: Option<Job>,
}

/// What [`Slot::offer`] did.
enum Offered {
    Queued,
    /// Nothing to offer: the job was queued (or ended) before.
    Nothing,
    /// No room: the job is still held.
    Full,
    /// The writer is gone: the job has been failed.
    Gone,
}

impl<I> Slot<'_, I> {
    /// Queues the job if there is room now.
    fn offer(&mut self) -> Offered {
        let Some(job) = self.job.take() else {
            return Offered::Nothing;
        };
        match queue(self.shared, self.writer, job) {
            Queued::Yes => Offered::Queued,
            Queued::Gone => Offered::Gone,
            Queued::Full(job) => {
                self.job = Some(job);
                Offered::Full
            }
        }
    }

    /// Queues the job if it is still held: waiting for room when `wait`, or else handing
    /// back `Err` (the job dropped, its bytes in flight with it) when there is none.
    fn send(mut self, wait: bool) -> std::result::Result<(), ()> {
        let Some(job) = self.job.take() else {
            return Ok(());
        };
        if wait {
            send_held(self.shared, self.writer, job);
            return Ok(());
        }
        // The queue filled up since the check on entry. A write-protected save refused here
        // resolves as skipped while the copier may still be copying into its buffer, which
        // goes back to the pool once it is done: waiting for it here would stall the caller
        // that asked not to wait.
        match queue(self.shared, self.writer, job) {
            Queued::Yes | Queued::Gone => Ok(()),
            Queued::Full(job) => {
                drop(job);
                Err(())
            }
        }
    }
}
