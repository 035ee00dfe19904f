//! [`SaveHandle`]: what `save` returns. A runtime-agnostic future (works under tokio, under
//! `futures::executor`, or with the blocking [`SaveHandle::wait`]), plus [`SaveHandle::staged`].
//! Dropping a handle never cancels the save.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::error::{Error, Result};

/// What a finished save measured.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct SaveReport {
    /// The checkpoint's path.
    pub path: PathBuf,
    /// Bytes of tensor storage written.
    pub bytes: u64,
    /// Time to take the snapshot: take a staging buffer and copy the live tensors into it (on
    /// the training thread in Eager mode, on the staging thread in Deferred mode). For an
    /// Eager save that write-protected tensors, the time `save` took on the training thread,
    /// the background copy not included.
    pub stage: Duration,
    /// Time from the start of the snapshot (as `stage` counts it) until the snapshot was wholly
    /// copied into its staging buffer. For an Eager save that write-protected tensors, this
    /// includes their copy by the background copier after `save` returned; for every other
    /// save it is `stage`.
    pub copied: Duration,
    /// Time between being queued and the writer starting on it.
    pub queue_wait: Duration,
    /// Time from the writer's start on it to the end of the inner backend's save, including
    /// fsync when durable. The writer starts before the snapshot's copy has ended, so this
    /// includes any wait for storages still being copied (the two overlap).
    pub write: Duration,
    /// Whether it was made durable (fsync) before the handle resolved.
    pub durable: bool,
    /// The part of `write` spent in fsync (of the file and of its directory), as the inner
    /// backend measured it ([`CheckpointIo::save_checkpoint_measured`](crate::CheckpointIo::save_checkpoint_measured);
    /// [`TorchCheckpointIo`](crate::TorchCheckpointIo) does): `None` when the backend does not
    /// measure it, `Some(ZERO)` when the save was not durable.
    pub fsync: Option<Duration>,
    /// Bytes in the file (or files) written, when the inner backend tells: the storages in
    /// `bytes` plus whatever the format adds (for `TorchCheckpointIo`, the pickled tree and
    /// the archive's headers).
    pub file_bytes: Option<u64>,
    /// Whether the save was skipped by [`Backpressure::Skip`](super::Backpressure::Skip)
    /// (then nothing was written).
    pub skipped: bool,
}

#[derive(Default)]
struct State {
    staged: Option<std::result::Result<(), Arc<Error>>>,
    done: Option<std::result::Result<SaveReport, Arc<Error>>>,
    wakers: Vec<Waker>,
}

impl State {
    /// Keeps `waker` to wake at the end, once: a future polled again and again (in a
    /// `select!` loop, say) must not grow the list with clones of the same waker.
    fn register(&mut self, waker: &Waker) {
        if !self.wakers.iter().any(|w| w.will_wake(waker)) {
            self.wakers.push(waker.clone());
        }
    }
}

/// The shared completion of one queued operation.
pub(crate) struct Completion {
    pub(crate) path: PathBuf,
    state: Mutex<State>,
    cond: Condvar,
    /// Set once the error (if any) has been handed to someone: the handle or a later call.
    reported: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Completion {
    pub(crate) fn new(path: &Path) -> Arc<Completion> {
        Arc::new(Completion {
            path: path.to_path_buf(),
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            reported: AtomicBool::new(false),
        })
    }

    pub(crate) fn set_staged(&self, r: std::result::Result<(), Arc<Error>>) {
        let mut s = lock(&self.state);
        if s.staged.is_none() {
            s.staged = Some(r);
        }
        let w = std::mem::take(&mut s.wakers);
        drop(s);
        self.cond.notify_all();
        w.into_iter().for_each(Waker::wake);
    }

    pub(crate) fn finish(&self, r: std::result::Result<SaveReport, Arc<Error>>) {
        self.end(r, false);
    }

    /// Ends the operation with `e` unless it has ended already; whether it did.
    pub(crate) fn fail_if_pending(&self, e: Arc<Error>) -> bool {
        self.end(Err(e), true)
    }

    fn end(&self, r: std::result::Result<SaveReport, Arc<Error>>, only_if_pending: bool) -> bool {
        let mut s = lock(&self.state);
        if only_if_pending && s.done.is_some() {
            return false;
        }
        if s.staged.is_none() {
            s.staged = Some(match &r {
                Ok(_) => Ok(()),
                Err(e) => Err(e.clone()),
            });
        }
        s.done = Some(r);
        let w = std::mem::take(&mut s.wakers);
        drop(s);
        self.cond.notify_all();
        w.into_iter().for_each(Waker::wake);
        true
    }

    /// Marks the error (if any) as told: the caller heard of it some other way.
    pub(crate) fn mark_reported(&self) {
        self.reported.store(true, Ordering::Release);
    }

    pub(crate) fn is_done(&self) -> bool {
        lock(&self.state).done.is_some()
    }

    /// The error, if the operation failed and nobody was told yet; marks it told.
    pub(crate) fn take_unreported_error(&self) -> Option<Arc<Error>> {
        let s = lock(&self.state);
        match &s.done {
            Some(Err(e)) if !self.reported.swap(true, Ordering::AcqRel) => Some(e.clone()),
            _ => None,
        }
    }

    fn result(&self, r: &std::result::Result<SaveReport, Arc<Error>>) -> Result<SaveReport> {
        match r {
            Ok(rep) => Ok(rep.clone()),
            Err(e) => {
                self.reported.store(true, Ordering::Release);
                Err(Error::Background {
                    path: self.path.clone(),
                    source: e.clone(),
                })
            }
        }
    }

    /// Waits for the end (at most `timeout`); its error, if any, is handed to the caller and
    /// marked told.
    pub(crate) fn wait_done(&self, timeout: Option<Duration>) -> Option<Result<SaveReport>> {
        // Marked told under the lock, so a concurrent `take_unreported_error` cannot hand the
        // same error to a later call as well.
        self.wait_end(timeout, |s| self.result(s))
    }

    /// Waits for the end (at most `timeout`; false if it has not come), leaving its error, if
    /// any, for whoever is told of it next.
    pub(crate) fn wait_finished(&self, timeout: Option<Duration>) -> bool {
        self.wait_end(timeout, |_| ()).is_some()
    }

    fn wait_end<T>(
        &self,
        timeout: Option<Duration>,
        on_end: impl FnOnce(&std::result::Result<SaveReport, Arc<Error>>) -> T,
    ) -> Option<T> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut s = lock(&self.state);
        loop {
            if let Some(r) = &s.done {
                return Some(on_end(r));
            }
            match deadline {
                None => s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return None;
                    }
                    s = self
                        .cond
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// A failed snapshot fails the save with the same error: whoever hears it from `staged`
    /// has heard the save's error, which is then not reported again.
    fn staged_result(&self, r: std::result::Result<(), Arc<Error>>) -> Result<()> {
        r.map_err(|e| {
            self.reported.store(true, Ordering::Release);
            Error::Background {
                path: self.path.clone(),
                source: e,
            }
        })
    }

    fn wait_staged(&self) -> Result<()> {
        let mut s = lock(&self.state);
        loop {
            if let Some(r) = &s.staged {
                return self.staged_result(r.clone());
            }
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn poll_done(&self, cx: &mut Context<'_>) -> Poll<Result<SaveReport>> {
        let mut s = lock(&self.state);
        if let Some(r) = &s.done {
            return Poll::Ready(self.result(r));
        }
        s.register(cx.waker());
        Poll::Pending
    }

    fn poll_staged(&self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut s = lock(&self.state);
        if let Some(r) = &s.staged {
            return Poll::Ready(self.staged_result(r.clone()));
        }
        s.register(cx.waker());
        Poll::Pending
    }
}

/// The handle of one save. Await it (any executor) or [`wait`](SaveHandle::wait) for the
/// checkpoint to be durable; await [`staged`](SaveHandle::staged) for the snapshot to be taken.
/// Dropping it never cancels the save; an error nobody awaited is returned by the next call on
/// the [`AsyncCheckpointIo`](super::AsyncCheckpointIo).
#[must_use = "dropping a handle does not cancel the save, but its result is then reported by the next call"]
pub struct SaveHandle {
    pub(crate) completion: Arc<Completion>,
}

impl std::fmt::Debug for SaveHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveHandle")
            .field("path", &self.completion.path)
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl SaveHandle {
    /// The checkpoint's path.
    pub fn path(&self) -> &Path {
        &self.completion.path
    }

    /// Whether the save has finished (written, failed or skipped).
    pub fn is_finished(&self) -> bool {
        self.completion.is_done()
    }

    /// Blocks until the checkpoint is durable (or failed); works with no async runtime.
    pub fn wait(&self) -> Result<SaveReport> {
        match self.completion.wait_done(None) {
            Some(r) => r,
            None => unreachable!("waiting without a timeout always yields a result"),
        }
    }

    /// Like [`wait`](SaveHandle::wait), giving up after `timeout` (then `None`).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<SaveReport>> {
        self.completion.wait_done(Some(timeout))
    }

    /// Blocks until the snapshot has been taken: from then on the caller may mutate the tensors
    /// it saved (Deferred mode; in Eager mode this is already so when `save` returns).
    pub fn wait_staged(&self) -> Result<()> {
        self.completion.wait_staged()
    }

    /// A future that resolves when the snapshot has been taken.
    pub fn staged(&self) -> Staged {
        Staged {
            completion: self.completion.clone(),
        }
    }
}

impl Future for SaveHandle {
    type Output = Result<SaveReport>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.completion.poll_done(cx)
    }
}

/// Future returned by [`SaveHandle::staged`].
pub struct Staged {
    completion: Arc<Completion>,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("path", &self.completion.path)
            .finish()
    }
}

impl Future for Staged {
    type Output = Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.completion.poll_staged(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_handle_polled_again_and_again_keeps_one_waker_and_wakes_it_once() {
        let c = Completion::new(Path::new("p.pt"));
        let mut handle = SaveHandle {
            completion: c.clone(),
        };
        let mut staged = handle.staged();
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..1000 {
            assert!(Pin::new(&mut handle).poll(&mut cx).is_pending());
            assert!(Pin::new(&mut staged).poll(&mut cx).is_pending());
        }
        assert_eq!(lock(&c.state).wakers.len(), 1);
        // Another task's waker is kept beside it.
        let other = Waker::from(Arc::new(Count(Default::default())));
        assert!(Pin::new(&mut handle)
            .poll(&mut Context::from_waker(&other))
            .is_pending());
        assert_eq!(lock(&c.state).wakers.len(), 2);
        c.finish(Ok(SaveReport::default()));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(Pin::new(&mut handle).poll(&mut cx).is_ready());
    }

    #[test]
    fn an_error_handed_to_the_handle_is_not_handed_to_a_later_call() {
        let c = Completion::new(Path::new("p.pt"));
        c.finish(Err(Arc::new(Error::io(
            "write",
            "c.pt",
            std::io::Error::other("disk full"),
        ))));
        let handle = SaveHandle {
            completion: c.clone(),
        };
        assert!(handle.wait().is_err());
        assert!(c.take_unreported_error().is_none(), "told twice");
        // Not awaited: the next call gets it, once.
        let c = Completion::new(Path::new("q.pt"));
        c.finish(Err(Arc::new(Error::io(
            "write",
            "c.pt",
            std::io::Error::other("disk full"),
        ))));
        assert!(c.take_unreported_error().is_some());
        assert!(c.take_unreported_error().is_none());
    }
}
