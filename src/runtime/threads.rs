//! The writer threads and the staging thread: the only places that block on I/O. Each runs
//! the stages of the [pipeline](super::pipeline) that are its own.
//!
//! Each path is routed to one writer (by hash), so every operation on a path runs in the order
//! it was submitted; different paths may run in parallel on several writers.

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::handle::{Completion, SaveReport};
use super::job::{fail_job, Job, StageJob};
use super::pipeline::{self, SnapshotAt};
use super::snapshot::{CopyEnd, SnapshotCopy};
use super::Shared;
use crate::error::{Error, Result};
use crate::io::{CheckpointIo, SaveOptions, WriteStats};
use crate::value::Value;

pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs `f`, turning a panic into [`Error::Panic`].
pub(crate) fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::Panic {
            path: path.to_path_buf(),
            message: panic_message(p),
        }),
    }
}

/// Runs `serve` on one job taken from a thread's queue; a panic that escapes it (outside the
/// backend's calls, which `guarded` catches: a bug of ckptio's, or a `tracing` layer that
/// panics) ends that job with the panic as its error, if nothing ended it yet, and the thread
/// goes on with the next one. A job left unfinished would hold `flush` and `teardown` forever.
fn serve_one<J>(
    shared_failed: impl FnOnce(),
    done: Arc<Completion>,
    path: PathBuf,
    job: J,
    serve: impl FnOnce(J),
    settle: impl FnOnce(),
) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| serve(job))) {
        // What the lost job shared with other threads ends before its handle hears.
        settle();
        let message = panic_message(p);
        let shown = format!("{}: {message}", path.display());
        if done.fail_if_pending(Arc::new(Error::Panic { path, message })) {
            shared_failed();
        }
        // After the job has ended: a `tracing` layer that panicked may panic again here.
        let _ = catch_unwind(|| {
            tracing::error!(error = %shown, "ckptio: a checkpoint thread panicked");
        });
    }
}

pub(crate) fn writer_loop<I: CheckpointIo>(shared: Arc<Shared<I>>, rx: Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        // A save's copy may still be running (on the training thread, the staging thread or
        // the copier) when the writer starts on it: a panic here waits for it to end, so its
        // staging buffer is back in the pool when the handle hears of the panic. It always
        // ends: a copy that stops without saying how says so when its setter is dropped.
        let copy = match &job {
            Job::Save { copy, .. } => Some(Arc::clone(copy)),
            _ => None,
        };
        serve_one(
            || shared.counters.failed(),
            job.done().clone(),
            job.path().to_path_buf(),
            job,
            |job| serve_write(&shared, job),
            || {
                if let Some(c) = copy {
                    let _ = c.wait();
                }
            },
        );
    }
}

/// Serves one job of a writer's queue.
fn serve_write<I: CheckpointIo>(shared: &Shared<I>, job: Job) {
    match job {
        Job::Save {
            path,
            tree,
            options,
            done,
            enqueued,
            copy,
            bytes,
        } => {
            let queue_wait = enqueued.elapsed();
            let n = bytes.bytes();
            let span = tracing::info_span!("ckptio_write", path = %path.display(), bytes = n);
            let _g = span.enter();
            tracing::debug!(
                queue_ms = queue_wait.as_secs_f64() * 1e3,
                "ckptio: write starts after its queue wait"
            );
            let written = write(shared, &path, &tree, &options, &copy);
            // Staging buffers go back to the pool before anyone hears the save is done.
            drop(tree);
            drop(bytes);
            complete(shared, path, &options, n, queue_wait, written, &done);
        }
        Job::Remove { path, done } => {
            let r = guarded(&path, || shared.inner.remove_checkpoint(&path));
            match r {
                Ok(()) => done.finish(Ok(SaveReport {
                    path,
                    ..SaveReport::default()
                })),
                Err(e) => {
                    tracing::error!(error = %e, path = %path.display(), "checkpoint remove failed");
                    shared.counters.failed();
                    done.finish(Err(Arc::new(e)));
                }
            }
        }
        Job::Barrier { done } => done.finish(Ok(SaveReport::default())),
    }
}

/// What the write stage of a save measured, or why it failed.
type Written = std::result::Result<(CopyEnd, WriteStats, Duration), Arc<Error>>;

/// The write stage: the inner backend's save of `tree`, whose snapshot `copy` may still be
/// running, then the wait for that copy to end. A snapshot whose copy already failed is not
/// written at all; one that fails while being written makes the backend fail on that storage
/// (before its rename, so the previous checkpoint stays).
fn write<I: CheckpointIo>(
    shared: &Shared<I>,
    path: &Path,
    tree: &Value,
    options: &SaveOptions,
    copy: &SnapshotCopy,
) -> Written {
    let start = Instant::now();
    if !shared.pending_storages_ok {
        // This backend reads storages as if they were all in: let the copy end.
        let _ = copy.wait();
    }
    let r = match copy.failed() {
        Some(e) => Err(e),
        None => guarded(path, || {
            shared.inner.save_checkpoint_measured(tree, path, options)
        })
        .map_err(Arc::new),
    };
    let took = start.elapsed();
    // The copy's own error explains a failure better than what the backend saw.
    let copied = copy.wait()?;
    r.map(|measured| (copied, measured, took))
}

/// The complete stage: counters, the "checkpoint durable" event, and the handle resolved.
fn complete<I>(
    shared: &Shared<I>,
    path: PathBuf,
    options: &SaveOptions,
    bytes: u64,
    queue_wait: Duration,
    written: Written,
    done: &Completion,
) {
    let (CopyEnd { stage, copied }, measured, write) = match written {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "checkpoint write failed");
            shared.counters.failed();
            done.finish(Err(e));
            return;
        }
    };
    tracing::info!(
        bytes,
        stage_ms = stage.as_secs_f64() * 1e3,
        copied_ms = copied.as_secs_f64() * 1e3,
        queue_ms = queue_wait.as_secs_f64() * 1e3,
        write_ms = write.as_secs_f64() * 1e3,
        fsync_ms = measured.fsync.map(|d| d.as_secs_f64() * 1e3),
        durable = options.durable,
        "{}",
        if options.durable {
            "checkpoint durable"
        } else {
            "checkpoint written (not durable: no fsync)"
        }
    );
    shared.counters.saved(bytes);
    done.finish(Ok(SaveReport {
        path,
        bytes,
        stage,
        copied,
        queue_wait,
        write,
        durable: options.durable,
        fsync: measured.fsync,
        file_bytes: measured.file_bytes,
        skipped: false,
    }));
}

/// The staging thread (Deferred mode): takes each save's snapshot through the
/// [pipeline](super::pipeline), and forwards the operations queued behind saves to their
/// path's writer, in order.
pub(crate) fn stage_loop<I: CheckpointIo>(
    shared: Arc<Shared<I>>,
    rx: Receiver<StageJob>,
    writers: Vec<Sender<Job>>,
) {
    let route = |path: &Path| &writers[super::route(path, writers.len())];
    while let Ok(job) = rx.recv() {
        let (done, path) = match &job {
            StageJob::Save(req, _) => (req.done.clone(), req.path.clone()),
            StageJob::PathBarrier(path, done) => (done.clone(), path.clone()),
            StageJob::Forward(j) => (j.done().clone(), j.path().to_path_buf()),
        };
        serve_one(
            || shared.counters.failed(),
            done,
            path,
            job,
            |job| match job {
                StageJob::Save(req, tree) => {
                    let writer = route(&req.path);
                    // Errors end the save's handle; nobody waits in `save` for them.
                    let _ = pipeline::run(
                        &shared,
                        writer,
                        req,
                        Cow::Owned(tree),
                        SnapshotAt::StagingThread,
                    );
                }
                StageJob::PathBarrier(path, done) => {
                    if let Err(e) = route(&path).send(Job::Barrier { done }) {
                        fail_job(&shared, e.0);
                    }
                }
                StageJob::Forward(job) => {
                    // A removal (saves come as `Save`, barriers as `PathBarrier`).
                    if let Err(e) = route(job.path()).send(job) {
                        fail_job(&shared, e.0);
                    }
                }
            },
            // This thread is the copy: unwinding has ended it, and dropped what it held.
            || {},
        );
    }
}
