//! What travels on the queues: a writer's jobs, the staging thread's jobs, and the plumbing
//! that puts them there (bounded channels, held jobs, jobs that can never be served).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};

use super::handle::Completion;
use super::pipeline::SaveRequest;
use super::snapshot::SnapshotCopy;
use super::Shared;
use crate::error::Error;
use crate::io::SaveOptions;
use crate::value::Value;

/// One operation for a writer.
pub(crate) enum Job {
    Save {
        path: PathBuf,
        tree: Value,
        options: SaveOptions,
        done: Arc<Completion>,
        enqueued: Instant,
        /// The snapshot's copy, which may still be running when the writer starts.
        copy: Arc<SnapshotCopy>,
        /// Its bytes, counted in flight until the job is dropped.
        bytes: InFlight,
    },
    Remove {
        path: PathBuf,
        done: Arc<Completion>,
    },
    /// Resolves once everything queued before it on this writer has finished.
    Barrier { done: Arc<Completion> },
}

impl Job {
    /// The writer's job for a planned save: `snap` is the tree over the staging buffer's
    /// storages, `bytes` theirs (counted in flight from now), and `copy` says when (and
    /// whether) they are all copied.
    pub(crate) fn save(
        req: &SaveRequest,
        snap: Value,
        bytes: u64,
        copy: Arc<SnapshotCopy>,
        counter: &Arc<AtomicU64>,
    ) -> Job {
        Job::Save {
            path: req.path.clone(),
            tree: snap,
            options: req.options.clone(),
            done: req.done.clone(),
            enqueued: Instant::now(),
            copy,
            bytes: InFlight::new(counter, bytes),
        }
    }

    /// The checkpoint path it acts on (none for a barrier).
    pub(crate) fn path(&self) -> &Path {
        match self {
            Job::Save { path, .. } | Job::Remove { path, .. } => path,
            Job::Barrier { .. } => Path::new(""),
        }
    }

    pub(crate) fn done(&self) -> &Arc<Completion> {
        match self {
            Job::Save { done, .. } | Job::Remove { done, .. } | Job::Barrier { done } => done,
        }
    }
}

/// A save's storage bytes, counted in [`Status::bytes_in_flight`](super::Status) from its
/// snapshot until its job is dropped: written, refused, abandoned, or lost to a panic on the
/// way.
pub(crate) struct InFlight {
    counter: Arc<AtomicU64>,
    bytes: u64,
}

impl InFlight {
    /// Counts `bytes` in flight.
    pub(crate) fn new(counter: &Arc<AtomicU64>, bytes: u64) -> InFlight {
        counter.fetch_add(bytes, Ordering::AcqRel);
        InFlight {
            counter: Arc::clone(counter),
            bytes,
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Work for the staging thread (Deferred mode): snapshots, and operations that must stay
/// ordered behind them.
pub(crate) enum StageJob {
    /// A save whose snapshot the staging thread takes.
    Save(SaveRequest, Value),
    /// A removal, for its path's writer.
    Forward(Job),
    /// A barrier for one path's writer.
    PathBarrier(PathBuf, Arc<Completion>),
}

/// Whether [`queue`] queued a job.
pub(crate) enum Queued {
    Yes,
    /// The queue is full: the job is handed back.
    Full(Job),
    /// The writer is gone: the job has been failed.
    Gone,
}

/// Queues `job` if there is room now.
pub(crate) fn queue<I>(shared: &Shared<I>, writer: &Sender<Job>, job: Job) -> Queued {
    match writer.try_send(job) {
        Ok(()) => Queued::Yes,
        Err(TrySendError::Full(job)) => Queued::Full(job),
        Err(TrySendError::Disconnected(job)) => {
            fail_job(shared, job);
            Queued::Gone
        }
    }
}

/// Queues a job held back while the queue was full, waiting for room.
pub(crate) fn send_held<I>(shared: &Shared<I>, writer: &Sender<Job>, mut job: Job) {
    if let Job::Save { enqueued, .. } = &mut job {
        *enqueued = Instant::now();
    }
    if let Err(e) = writer.send(job) {
        fail_job(shared, e.0);
    }
}

/// A job that could not be queued because the writers are gone.
pub(crate) fn fail_job<I>(shared: &Shared<I>, job: Job) {
    let e = Error::io(
        "queue",
        job.path(),
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the checkpoint writer has stopped",
        ),
    );
    abandon(shared, job, Arc::new(e));
}

/// Finishes a job that will never reach a writer with `e`, undoing what queuing it counted.
pub(crate) fn abandon<I>(shared: &Shared<I>, job: Job, e: Arc<Error>) {
    let done = match job {
        Job::Save {
            done, tree, bytes, ..
        } => {
            // Its staging buffers and bytes in flight go back before anyone hears of it.
            drop(tree);
            drop(bytes);
            shared.counters.failed();
            done
        }
        Job::Remove { done, .. } => {
            shared.counters.failed();
            done
        }
        Job::Barrier { done } => done,
    };
    done.finish(Err(e));
}
