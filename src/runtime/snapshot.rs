//! The snapshot of one save: live tensors copied into one staging buffer from the pool, each
//! storage published to the writer as soon as its copy is done (or, for a write-protected
//! tensor, as the background copier advances).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::handle::Completion;
use super::pool::{StagingBuf, StagingPool};
use super::protect::{Arming, Protector, PROTECT_MIN};
use super::threads::panic_message;
use crate::error::{Error, Result};
use crate::tensor::{HostTensor, LiveTensor, Storage, StorageFiller};
use crate::value::Value;

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

/// How the copy of one snapshot ended: shared by whoever copies (the training thread in Eager
/// mode, the staging thread in Deferred mode, the background copier for write-protected
/// tensors) and the writer, which starts before it ends.
pub(crate) struct SnapshotCopy {
    state: Mutex<Option<std::result::Result<CopyEnd, Arc<Error>>>>,
    cond: Condvar,
}

/// A snapshot's copy, once ended: what `SaveReport::stage` and `SaveReport::copied` report.
#[derive(Clone, Copy)]
pub(crate) struct CopyEnd {
    pub(crate) stage: Duration,
    pub(crate) copied: Duration,
}

impl CopyEnd {
    /// A copy that ended when its staging did.
    pub(crate) fn at(stage: Duration) -> CopyEnd {
        CopyEnd {
            stage,
            copied: stage,
        }
    }
}

impl SnapshotCopy {
    pub(crate) fn new() -> Arc<SnapshotCopy> {
        Arc::new(SnapshotCopy {
            state: Mutex::new(None),
            cond: Condvar::new(),
        })
    }

    pub(crate) fn set(&self, r: std::result::Result<CopyEnd, Arc<Error>>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_none() {
            *s = Some(r);
        }
        drop(s);
        self.cond.notify_all();
    }

    /// The producer's side: ends the staging with the copy's outcome, or, if dropped without
    /// (a panic, an early return), with an error, so the writer never waits forever.
    pub(crate) fn setter(self: &Arc<Self>) -> CopySetter {
        CopySetter(Some(self.clone()))
    }

    /// The error, if the copy has already failed.
    pub(crate) fn failed(&self) -> Option<Arc<Error>> {
        match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// Waits for the copy to end: how long it took, or why it failed.
    pub(crate) fn wait(&self) -> std::result::Result<CopyEnd, Arc<Error>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = &*s {
                return r.clone();
            }
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Ends a [`SnapshotCopy`]; see [`SnapshotCopy::setter`].
pub(crate) struct CopySetter(Option<Arc<SnapshotCopy>>);

impl CopySetter {
    pub(crate) fn set(mut self, r: std::result::Result<CopyEnd, Arc<Error>>) {
        if let Some(s) = self.0.take() {
            s.set(r);
        }
    }
}

impl Drop for CopySetter {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.set(Err(Arc::new(Error::Panic {
                path: PathBuf::new(),
                message: "the snapshot's copy was abandoned (a panic while copying?)".into(),
            })));
        }
    }
}

/// One save's staging buffer, written region by region through a raw pointer while the
/// regions already copied are read (as [`Bytes`]) by the writer.
struct Slab {
    base: *mut u8,
    len: usize,
    /// Owns the memory; goes back to the pool when the last region is dropped.
    _buf: StagingBuf,
}

// SAFETY: the slab only hands out disjoint regions: each is written (through `region_mut` by
// one thread, or for a write-protected tensor by the training thread at its two ends and the
// copier thread in the middle) before it is read: as a `Region` once it is published, or a
// large one front to back as its storage's progress says its first bytes are in, and never
// written again (see `CopyPlan::run`, `copy_streamed` and `CopyPlan::run_protected`); the pool
// buffer itself may move between threads.
#[allow(unsafe_code)]
unsafe impl Send for Slab {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Slab {}

impl Slab {
    fn new(mut buf: StagingBuf) -> Slab {
        let s = buf.as_mut_slice();
        Slab {
            base: s.as_mut_ptr(),
            len: s.len(),
            _buf: buf,
        }
    }

    /// # Safety
    /// `off..off + len` must be in bounds, written by no other thread, and not yet published
    /// as a [`Region`].
    #[allow(unsafe_code, clippy::mut_from_ref)]
    unsafe fn region_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds and exclusive, per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(off), len) }
    }
}

/// A published (copied) region of a slab.
struct Region {
    slab: Arc<Slab>,
    off: usize,
    len: usize,
}

impl AsRef<[u8]> for Region {
    #[allow(unsafe_code)]
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the region is in bounds, and it is published only after its one writer has
        // finished with it; nobody writes it again while the slab lives.
        unsafe { std::slice::from_raw_parts(self.slab.base.add(self.off), self.len) }
    }
}

/// The copies a snapshot still has to make: each live tensor into its region of the slab,
/// each published to its storage as soon as it is done.
pub(crate) struct CopyPlan {
    slab: Arc<Slab>,
    items: Vec<CopyItem>,
}

struct CopyItem {
    live: LiveTensor,
    off: usize,
    /// The bytes its region holds, fixed when the buffer was sized.
    len: usize,
    filler: Mutex<Option<StorageFiller>>,
}

/// Takes one staging buffer for every live tensor of `tree` (one pool request per save, so a
/// save never holds part of the budget while waiting for the rest) and returns the tree over
/// storages that [`CopyPlan::run`] fills. Host tensors are immutable and are kept as they are:
/// no copy. The tree can go to the writer before the copy starts: the writer waits for each
/// storage's bytes only when it reaches that storage.
///
/// `None` when `block` is false and the budget is exhausted. Without `fault_in`, new staging
/// memory is faulted in by whoever writes it (see [`StagingPool::get`]).
pub(crate) fn prepare(
    pool: &StagingPool,
    tree: &Value,
    block: bool,
    fault_in: bool,
) -> Result<Option<(Value, Option<CopyPlan>)>> {
    let live = tree.live_tensors();
    if live.is_empty() {
        return Ok(Some((tree.clone(), None)));
    }
    // Sizes are read once: a source whose shape changes later cannot grow its region.
    let lens: Vec<usize> = live.iter().map(LiveTensor::nbytes).collect();
    let (offsets, total) = slab_layout(&lens)?;
    let Some(buf) = pool.get(total, block, fault_in) else {
        return Ok(None);
    };
    let slab = Arc::new(Slab::new(buf));
    let mut views: HashMap<usize, HostTensor> = HashMap::with_capacity(live.len());
    let mut items = Vec::with_capacity(live.len());
    for ((l, &off), &len) in live.iter().zip(&offsets).zip(&lens) {
        let (storage, filler) = if len >= PROTECT_MIN {
            // SAFETY: `off..off + len` is this item's region of the slab (in bounds: the slab
            // holds `total`), which the slab (kept by the storage) keeps allocated. It is written
            // once, by the copy, each byte before the storage's progress passes it
            // (`copy_streamed` and `run_protected` advance it after each piece they copy), and
            // never written again.
            #[allow(unsafe_code)]
            unsafe {
                Storage::pending_in(
                    len,
                    l.source().location(),
                    slab.base.wrapping_add(off),
                    slab.clone(),
                )
            }
        } else {
            Storage::pending(len, l.source().location())
        };
        views.insert(l.id(), l.host_view(storage)?);
        items.push(CopyItem {
            live: l.clone(),
            off,
            len,
            filler: Mutex::new(Some(filler)),
        });
    }
    let out = tree.replace_live(&mut |l| {
        views
            .get(&l.id())
            .cloned()
            .ok_or_else(|| Error::tensor("", "live tensor", "not found in its own snapshot"))
    })?;
    Ok(Some((out, Some(CopyPlan { slab, items }))))
}

/// Where each region of a slab starts (each rounded up to [`SLICE_ALIGN`]) and the slab's size.
fn slab_layout(lens: &[usize]) -> Result<(Vec<usize>, usize)> {
    let mut offsets = Vec::with_capacity(lens.len());
    let mut total = 0usize;
    for &len in lens {
        offsets.push(total);
        total = len
            .div_ceil(SLICE_ALIGN)
            .checked_mul(SLICE_ALIGN)
            .and_then(|n| n.checked_add(total))
            .filter(|&n| n <= crate::tensor::MAX_SNAPSHOT)
            .ok_or_else(|| {
                Error::tensor(
                    "",
                    "snapshot",
                    format!(
                        "its size overflows the address space (more than {} bytes)",
                        crate::tensor::MAX_SNAPSHOT
                    ),
                )
            })?;
    }
    Ok((offsets, total))
}

/// The staging bytes a save of `tree` takes from the pool (what [`prepare`] asks for): 0 when
/// it holds no live tensor.
pub(crate) fn staging_len(tree: &Value) -> Result<usize> {
    let lens: Vec<usize> = tree.live_tensors().iter().map(LiveTensor::nbytes).collect();
    Ok(slab_layout(&lens)?.1)
}

/// Snapshots below this size are copied on the calling thread alone.
const PARALLEL_COPY_MIN: usize = 16 << 20;

impl CopyPlan {
    /// Copies every live tensor into its region and publishes it. With `parallel` (Eager mode,
    /// where the training thread waits for the copy anyway) and a large snapshot, up to four
    /// threads take the tensors in order, since the copy is bound by memory bandwidth, which
    /// one core does not saturate. In order, so the writer (which writes them in order) can
    /// start on the first while the last are copied.
    ///
    /// On failure every storage not yet filled fails with the reason, so the writer stops.
    pub(crate) fn run(self, parallel: bool) -> Result<()> {
        let threads = if parallel && self.slab.len >= PARALLEL_COPY_MIN && self.items.len() > 1 {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4)
                .min(self.items.len())
        } else {
            1
        };
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let result = on_threads(threads, || self.copy_next(&next, &stop));
        if let Err(e) = &result {
            // Fail what nobody copied, with the reason.
            for item in &self.items {
                let f = item.filler.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(f) = f {
                    f.fail(format!("not copied: {e}"));
                }
            }
        }
        result
    }

    /// One copy thread's work: claims the next item in order and copies it, until none is
    /// left, one fails (which stops the others through `stop`), or this thread panics.
    fn copy_next(&self, next: &AtomicUsize, stop: &AtomicBool) -> Result<()> {
        /// Stops the other copy threads if this one panics.
        struct StopOnPanic<'a>(&'a AtomicBool);
        impl Drop for StopOnPanic<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
        }
        let _stop_on_panic = StopOnPanic(stop);
        while !stop.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = self.items.get(i) else {
                return Ok(());
            };
            let filler = item.filler.lock().unwrap_or_else(|e| e.into_inner()).take();
            let Some(filler) = filler else { continue };
            let len = item.len;
            // Each item's region is disjoint from every other's (offsets are cumulative,
            // rounded up), in bounds (the slab holds the total; checked), taken by exactly
            // one thread (the index is claimed once), and published only below.
            match copy_streamed(&item.live, &self.slab, item.off, len, &filler) {
                Ok(()) => filler.fill(Bytes::from_owner(Region {
                    slab: self.slab.clone(),
                    off: item.off,
                    len,
                })),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    filler.fail(e.to_string());
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// Runs `work` on `threads` threads (this one among them) and returns the first error; a
/// thread that panicked is an [`Error::Panic`].
fn on_threads(threads: usize, work: impl Fn() -> Result<()> + Sync) -> Result<()> {
    if threads < 2 {
        return work();
    }
    std::thread::scope(|scope| {
        let joins: Vec<_> = (1..threads).map(|_| scope.spawn(&work)).collect();
        let mut r = work();
        for j in joins {
            let jr = j.join().unwrap_or_else(|p| {
                Err(Error::Panic {
                    path: PathBuf::new(),
                    message: format!("a snapshot copy thread panicked: {}", panic_message(p)),
                })
            });
            if r.is_ok() {
                r = jr;
            }
        }
        r
    })
}

/// The piece a large tensor is copied in when its bytes can be read in place: the writer may
/// write each piece as soon as it is copied.
const STREAM_CHUNK: usize = 8 << 20;

/// Copies `live` into its region of the slab (`off..off + len`, which the calling thread alone
/// writes and nobody has read yet): a large tensor whose bytes can be read in place piece by
/// piece, telling the storage's progress after each piece (so the writer can start on it),
/// anything else in one `copy_to`.
#[allow(unsafe_code)]
fn copy_streamed(
    live: &LiveTensor,
    slab: &Slab,
    off: usize,
    len: usize,
    filler: &StorageFiller,
) -> Result<()> {
    if len >= PROTECT_MIN {
        // SAFETY: the bytes are read only here, inside the snapshot's copy, while the caller
        // does not write the tensor (an Eager save has not returned; a Deferred save's
        // `staged()` has not resolved), and dropped before this returns.
        let src = unsafe { live.borrow_bytes() };
        if let Some(src) = src.filter(|b| b.len() == len) {
            let progress = filler.progress();
            let mut at = 0;
            for piece in src.chunks(STREAM_CHUNK) {
                // SAFETY: a part of this item's region not yet written or read (see above);
                // the slice ends before the progress below lets the writer read it.
                let dst = unsafe { slab.region_mut(off + at, piece.len()) };
                dst.copy_from_slice(piece);
                at += piece.len();
                // SAFETY: the first `at` bytes of the region are written, and never again.
                unsafe { progress.advance(at) };
            }
            return Ok(());
        }
    }
    // SAFETY: this item's region, written by this thread alone and read by nobody until it is
    // filled (nothing advances its progress here).
    let dst = unsafe { slab.region_mut(off, len) };
    live.source().copy_to(dst)
}

impl CopyPlan {
    /// [`CopyPlan::run`] for an Eager save, with write protection: each large CPU tensor that
    /// offers [`protectable_bytes`](crate::HostMemory::protectable_bytes) is write-protected
    /// instead of copied (see [`protect`](super::protect)), and the copier thread copies it in
    /// the background; the rest is copied here, first, so that the protection is set up in one
    /// short step. Each tensor goes to the copier as soon as it is protected, and `on_first`
    /// runs once the first has (with `true`), or before the copy when nothing is protected
    /// (with `false`, also when every protection was refused: the save is then a copying
    /// one), where the caller may hand the save to the writer, so that the write also starts
    /// while the rest is protected or copied. Returns the bytes protected. The staging
    /// (`setter`, and `done`'s staged state) is then ended by the copier once its copy is
    /// done; when nothing was protected, `setter` is left for the caller. Without `block`, a
    /// save that would wait for the previous protected snapshot's copy copies instead.
    ///
    /// On failure the ranges not yet handed to the copier are unprotected at once (those
    /// handed over are copied, then unprotected, by the copier), and every storage that will
    /// not be filled fails.
    pub(crate) fn run_protected(
        self,
        protector: &Protector,
        started: Instant,
        setter: &mut Option<CopySetter>,
        done: &Arc<Completion>,
        block: bool,
        on_first: &mut dyn FnMut(bool),
    ) -> Result<u64> {
        let CopyPlan { slab, items } = self;
        let (candidates, rest) = protectable(items);
        if candidates.is_empty() {
            on_first(false);
            return copy_items(&slab, rest).map(|()| 0);
        }
        copy_items(&slab, rest)?;
        let Some(mut arming) = protector.arm(block) else {
            on_first(false);
            let all = candidates.into_iter().map(|(i, _)| i).collect();
            return copy_items(&slab, all).map(|()| 0);
        };
        let mut fallback = Vec::new();
        let mut protected = 0u64;
        let mut handed_over = false;
        for (item, live_bytes) in candidates {
            match protect_item(&slab, &mut arming, item, live_bytes) {
                Ok(None) => {}
                Ok(Some(bytes)) => {
                    protected += bytes;
                    if !handed_over {
                        handed_over = true;
                        on_first(true);
                    }
                }
                Err(item) => fallback.push(item),
            }
        }
        if !handed_over {
            // Every protection was refused: a copying save after all.
            on_first(false);
        }
        copy_items(&slab, fallback)?;
        // Only the protected tensors' regions (their fillers, the copier's jobs) hold the
        // buffer now, so it goes back to the pool as soon as the last of them is done with it,
        // even if the writer, handed the save early, is done before this returns.
        drop(slab);
        if protected > 0 {
            let stage = started.elapsed();
            let setter = setter.take();
            let done = done.clone();
            arming.submit(Box::new(move || {
                // Staged first: the writer may finish as soon as the setter is set.
                done.set_staged(Ok(()));
                if let Some(s) = setter {
                    s.set(Ok(CopyEnd {
                        stage,
                        copied: started.elapsed(),
                    }));
                }
            }));
        }
        Ok(protected)
    }
}

/// Splits `items` into those whose memory may be write-protected (large, offering their bytes
/// in place, as long as their region), with those bytes, and the rest.
#[allow(unsafe_code)]
fn protectable(items: Vec<CopyItem>) -> (Vec<(CopyItem, Bytes)>, Vec<CopyItem>) {
    let mut candidates = Vec::new();
    let mut rest = Vec::with_capacity(items.len());
    for item in items {
        if item.len >= PROTECT_MIN {
            // SAFETY: the bytes are read only while write-protected (the ends: in
            // `protect_item`, on this thread, before `save` returns), so never while the
            // tensor is written.
            if let Some(b) = unsafe { item.live.protectable_bytes() } {
                if b.len() == item.len {
                    candidates.push((item, b));
                    continue;
                }
            }
        }
        rest.push(item);
    }
    (candidates, rest)
}

/// Copies `items` into their regions of `slab` on this thread (see [`CopyPlan::run`]).
fn copy_items(slab: &Arc<Slab>, items: Vec<CopyItem>) -> Result<()> {
    CopyPlan {
        slab: slab.clone(),
        items,
    }
    .run(true)
}

/// Write-protects one item's memory, copies its two ends (the partial pages) here, and hands
/// the middle to the copier; returns the bytes protected (`None` for an item filled
/// already), or the item back when its memory could not be protected (it is copied then).
#[allow(unsafe_code)]
fn protect_item(
    slab: &Arc<Slab>,
    arming: &mut Arming<'_>,
    item: CopyItem,
    live_bytes: Bytes,
) -> std::result::Result<Option<u64>, CopyItem> {
    let filler = item.filler.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(filler) = filler else {
        // Never filled twice; nothing to copy.
        return Ok(None);
    };
    let addr = live_bytes.as_ptr() as usize;
    let Some(range) = arming.protect(addr, item.len) else {
        *item.filler.lock().unwrap_or_else(|e| e.into_inner()) = Some(filler);
        return Err(item);
    };
    let (head, tail) = (range.start - addr, range.end - addr);
    // SAFETY: the two ends of this item's region, disjoint from every other's and in
    // bounds (see `run`), written by this thread now (the copier writes the middle,
    // `push`'s contract); each slice ends here, before anyone may read the region.
    unsafe { slab.region_mut(item.off, head) }.copy_from_slice(&live_bytes[..head]);
    // SAFETY: as above.
    unsafe { slab.region_mut(item.off + tail, item.len - tail) }
        .copy_from_slice(&live_bytes[tail..]);
    let middle = slab.base.wrapping_add(item.off + head);
    // The writer may read the region from its start as the copy advances: the head now,
    // the middle as the copier copies it in order (the tail comes with the rest).
    let progress = filler.progress();
    // SAFETY: the first `head` bytes of the region were written above, and never again.
    unsafe { progress.advance(head) };
    let on_progress: Box<dyn Fn(usize) + Send> = Box::new(move |n| {
        // SAFETY: the copier tells `n` once the first `n` bytes of the range are copied
        // (`Item::copy_chunk`), and never writes them again.
        unsafe { progress.advance(head + n) }
    });
    let (slab, off, len) = (slab.clone(), item.off, item.len);
    let protected = (range.end - range.start) as u64;
    // SAFETY: `middle` is the range's length inside this item's region, which nothing
    // else writes, and nobody reads before the copier has copied it (`on_progress`,
    // `on_copied`); `slab` (owned by `on_copied`) keeps it alive.
    unsafe {
        arming.push(
            range,
            middle,
            Box::new((live_bytes, item.live.clone())),
            on_progress,
            Box::new(move || filler.fill(Bytes::from_owner(Region { slab, off, len }))),
        );
    }
    Ok(Some(protected))
}
