//! The writer threads and the staging thread: the only places that block on I/O.
//!
//! Each path is routed to one writer (by hash), so every operation on a path runs in the order
//! it was submitted; different paths may run in parallel on several writers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::handle::{Completion, SaveReport};
use super::staging::StagingPool;
use super::Shared;
use crate::error::{Error, Result};
use crate::io::{CheckpointIo, SaveOptions};
use crate::tensor::{HostTensor, LiveTensor, Storage};
use crate::value::Value;

/// One operation for a writer.
pub(crate) enum Job {
    Save {
        path: PathBuf,
        tree: Value,
        options: SaveOptions,
        done: Arc<Completion>,
        enqueued: Instant,
        stage: Duration,
        bytes: u64,
    },
    Remove {
        path: PathBuf,
        done: Arc<Completion>,
    },
    /// Resolves once everything queued before it on this writer has finished.
    Barrier { done: Arc<Completion> },
}

/// Work for the staging thread (Deferred mode): snapshots, and operations that must stay
/// ordered behind them.
pub(crate) enum StageJob {
    Save {
        path: PathBuf,
        tree: Value,
        options: SaveOptions,
        done: Arc<Completion>,
    },
    Forward(Job),
    /// A barrier for one path's writer.
    PathBarrier(PathBuf, Arc<Completion>),
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs `f`, turning a panic into [`Error::Panic`].
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::Panic {
            path: path.to_path_buf(),
            message: panic_message(p),
        }),
    }
}

pub(crate) fn writer_loop<I: CheckpointIo>(shared: Arc<Shared<I>>, rx: Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        match job {
            Job::Save {
                path,
                tree,
                options,
                done,
                enqueued,
                stage,
                bytes,
            } => {
                let queue_wait = enqueued.elapsed();
                let span = tracing::info_span!("ckptio_write", path = %path.display(), bytes);
                let _g = span.enter();
                let start = Instant::now();
                let r = guarded(&path, || {
                    shared.inner.save_checkpoint(&tree, &path, &options)
                });
                let write = start.elapsed();
                // Staging buffers go back to the pool before anyone hears the save is done.
                drop(tree);
                shared
                    .bytes_in_flight
                    .fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
                match r {
                    Ok(()) => {
                        tracing::info!(
                            stage_ms = stage.as_secs_f64() * 1e3,
                            queue_ms = queue_wait.as_secs_f64() * 1e3,
                            write_ms = write.as_secs_f64() * 1e3,
                            durable = options.durable,
                            "checkpoint durable"
                        );
                        shared.counters.saved(bytes);
                        done.finish(Ok(SaveReport {
                            path,
                            bytes,
                            stage,
                            queue_wait,
                            write,
                            durable: options.durable,
                            skipped: false,
                        }));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "checkpoint write failed");
                        shared.counters.failed();
                        done.finish(Err(Arc::new(e)));
                    }
                }
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
}

/// Bytes of every distinct storage in `tree`.
pub(crate) fn storage_bytes(tree: &Value) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut n = 0u64;
    for t in tree.tensors() {
        if seen.insert(t.storage().id()) {
            n += t.storage().len() as u64;
        }
    }
    n
}

/// Alignment of each snapshot inside the one staging buffer of a save.
const SLICE_ALIGN: usize = 64;

/// Copies every live tensor of `tree` into one staging buffer (one pool request per save, so a
/// save never holds part of the budget while waiting for the rest) and returns the tree over
/// the snapshot. Host tensors are immutable and are kept as they are: no copy.
///
/// `None` when `block` is false and the budget is exhausted.
pub(crate) fn snapshot(
    pool: &StagingPool,
    tree: &Value,
    block: bool,
    parallel: bool,
) -> Result<Option<Value>> {
    let live = tree.live_tensors();
    if live.is_empty() {
        return Ok(Some(tree.clone()));
    }
    let mut offsets = Vec::with_capacity(live.len());
    let mut total = 0usize;
    for l in &live {
        offsets.push(total);
        total += l.nbytes().div_ceil(SLICE_ALIGN) * SLICE_ALIGN;
    }
    let mut buf = if block {
        pool.acquire(total)
    } else {
        match pool.try_acquire(total) {
            Some(b) => b,
            None => return Ok(None),
        }
    };
    copy_parallel(&live, &offsets, buf.as_mut_slice(), parallel)?;
    let bytes = buf.freeze();
    let mut views: std::collections::HashMap<usize, HostTensor> = Default::default();
    for (l, &off) in live.iter().zip(&offsets) {
        let storage =
            Storage::with_location(bytes.slice(off..off + l.nbytes()), l.source().location());
        views.insert(l.id(), l.host_view(storage)?);
    }
    let out = tree.replace_live(&mut |l| {
        views
            .get(&l.id())
            .cloned()
            .ok_or_else(|| Error::InvalidArgument("live tensor vanished".into()))
    })?;
    Ok(Some(out))
}

/// Snapshots below this size are copied on the calling thread alone.
const PARALLEL_COPY_MIN: usize = 16 << 20;

/// Copies each live tensor to its offset in `dst`, splitting the tensors between up to four
/// threads (by bytes) when the snapshot is large and `parallel` (Eager mode, where the training
/// thread waits for the copy anyway): the copy is bound by memory bandwidth, which
/// one core does not saturate.
fn copy_parallel(
    live: &[LiveTensor],
    offsets: &[usize],
    dst: &mut [u8],
    parallel: bool,
) -> Result<()> {
    let total = dst.len();
    let threads = if parallel {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4)
    } else {
        1
    };
    if threads < 2 || total < PARALLEL_COPY_MIN || live.len() < 2 {
        for (l, &off) in live.iter().zip(offsets) {
            l.source().copy_to(&mut dst[off..off + l.nbytes()])?;
        }
        return Ok(());
    }
    // Cut the tensor list into `threads` groups of about equal bytes, and dst with it.
    let mut groups: Vec<(usize, usize)> = Vec::new(); // tensor index ranges
    let mut start = 0;
    for g in 1..=threads {
        let target = total * g / threads;
        let mut end = start;
        while end < live.len() && (end == start || offsets[end] < target) {
            end += 1;
        }
        if g == threads {
            end = live.len();
        }
        if end > start {
            groups.push((start, end));
        }
        start = end;
    }
    std::thread::scope(|scope| {
        let mut rest = dst;
        let mut consumed = 0;
        let mut joins = Vec::new();
        for &(a, b) in &groups {
            let end_byte = if b < live.len() {
                offsets[b]
            } else {
                consumed + rest.len()
            };
            let (mine, tail) = rest.split_at_mut(end_byte - consumed);
            let base = consumed;
            consumed = end_byte;
            rest = tail;
            let part = &live[a..b];
            let offs = &offsets[a..b];
            joins.push(scope.spawn(move || -> Result<()> {
                for (l, &off) in part.iter().zip(offs) {
                    l.source()
                        .copy_to(&mut mine[off - base..off - base + l.nbytes()])?;
                }
                Ok(())
            }));
        }
        for j in joins {
            match j.join() {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::InvalidArgument(
                        "a snapshot copy thread panicked".into(),
                    ))
                }
            }
        }
        Ok(())
    })
}

pub(crate) fn stage_loop<I: CheckpointIo>(
    shared: Arc<Shared<I>>,
    rx: Receiver<StageJob>,
    writers: Vec<Sender<Job>>,
) {
    let route = |path: &Path| &writers[super::route(path, writers.len())];
    while let Ok(job) = rx.recv() {
        match job {
            StageJob::Save {
                path,
                tree,
                options,
                done,
            } => {
                let start = Instant::now();
                // Deferred snapshots overlap the training step: one thread, so the copy leaves the
                // compute its cores.
                let r = guarded(&path, || snapshot(&shared.pool, &tree, true, false));
                drop(tree);
                let stage = start.elapsed();
                match r {
                    Ok(Some(snap)) => {
                        done.set_staged(Ok(()));
                        let bytes = storage_bytes(&snap);
                        shared
                            .bytes_in_flight
                            .fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
                        let job = Job::Save {
                            path: path.clone(),
                            tree: snap,
                            options,
                            done,
                            enqueued: Instant::now(),
                            stage,
                            bytes,
                        };
                        if let Err(e) = route(&path).send(job) {
                            fail_job(e.0);
                        }
                    }
                    Ok(None) => unreachable_skip(&done),
                    Err(e) => {
                        shared.counters.failed();
                        done.finish(Err(Arc::new(e)));
                    }
                }
            }
            StageJob::PathBarrier(path, done) => {
                if let Err(e) = route(&path).send(Job::Barrier { done }) {
                    fail_job(e.0);
                }
            }
            StageJob::Forward(job) => {
                let path = match &job {
                    Job::Save { path, .. } | Job::Remove { path, .. } => Some(path.clone()),
                    Job::Barrier { .. } => None,
                };
                match path {
                    Some(p) => {
                        if let Err(e) = route(&p).send(job) {
                            fail_job(e.0);
                        }
                    }
                    None => {
                        // A barrier must pass every writer: chain one per writer, then resolve.
                        let mut inner = Vec::new();
                        for w in &writers {
                            let c = Completion::new(Path::new(""));
                            if w.send(Job::Barrier { done: c.clone() }).is_ok() {
                                inner.push(c);
                            }
                        }
                        for c in inner {
                            let _ = c.wait_done(None);
                        }
                        if let Job::Barrier { done } = job {
                            done.finish(Ok(SaveReport::default()));
                        }
                    }
                }
            }
        }
    }
}

fn unreachable_skip(done: &Completion) {
    // Blocking snapshots always get a buffer; kept total for safety.
    done.finish(Ok(SaveReport {
        skipped: true,
        ..SaveReport::default()
    }));
}

/// A job that could not be queued because the writers are gone.
pub(crate) fn fail_job(job: Job) {
    let (path, done) = match job {
        Job::Save { path, done, .. } | Job::Remove { path, done } => (path, done),
        Job::Barrier { done } => (PathBuf::new(), done),
    };
    done.finish(Err(Arc::new(Error::io(
        "queue",
        &path,
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the checkpoint writer has stopped",
        ),
    ))));
}
