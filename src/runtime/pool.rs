//! The staging pool: reusable host buffers that snapshots are copied into.
//!
//! # Allocation behaviour
//! A buffer is taken from the pool (best fit among free buffers at least as large as asked) or,
//! when none fits, allocated; it goes back to the pool when the last [`bytes::Bytes`] that
//! borrows it is dropped, which is when its checkpoint has been written. In steady state (same
//! tensor sizes each save) no save allocates: [`PoolStats::allocations`] stops growing.
//!
//! # Budget
//! The bytes handed out at once never exceed the budget, except for one buffer larger than
//! the whole budget, which is allowed alone. [`StagingPool::acquire`] blocks until enough is
//! returned; [`StagingPool::try_acquire`] fails instead. Free buffers count against the budget
//! too, so the pool's whole footprint is bounded: free buffers are released to make room.
//!
//! # Memory kind
//! Buffers are ordinary heap memory, written once when allocated so that their pages are
//! faulted in before the first snapshot. Page-locked (CUDA pinned) buffers are used when the
//! `tch` feature is on and CUDA is available, so device-to-host copies are direct DMA
//! transfers. If pinning fails, ordinary memory is used and a warning is logged. libtorch's
//! pinned allocator rounds sizes up (to a power of two by default) and caches freed pinned
//! memory, so the page-locked memory a pinned pool holds can exceed its budget by up to that
//! rounding.

use std::sync::{Arc, Condvar, Mutex};

use crate::aligned::AlignedBuf;
use bytes::Bytes;

/// Counters a user can read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// The budget in bytes.
    pub budget: usize,
    /// Bytes in buffers handed out now.
    pub in_use: usize,
    /// Bytes in free buffers kept for reuse.
    pub free: usize,
    /// Buffers allocated since the pool was made, by saves and by
    /// [`StagingPool::reserve`] (growth between saves means saves are allocating).
    pub allocations: u64,
    /// Times a request was served from a free buffer.
    pub reuses: u64,
    /// Whether buffers are page-locked (CUDA pinned).
    pub pinned: bool,
    /// Buffers allocated in ordinary memory because pinning them failed (with `pinned`; a
    /// warning is logged for each).
    pub pinned_fallbacks: u64,
}

enum Mem {
    Heap(AlignedBuf),
    #[cfg(feature = "tch")]
    Pinned(PinnedBuf),
}

impl Mem {
    fn is_pinned(&self) -> bool {
        match self {
            Mem::Heap(_) => false,
            #[cfg(feature = "tch")]
            Mem::Pinned(_) => true,
        }
    }
    fn len(&self) -> usize {
        match self {
            Mem::Heap(v) => v.len(),
            #[cfg(feature = "tch")]
            Mem::Pinned(p) => p.len,
        }
    }
    fn as_slice(&self) -> &[u8] {
        match self {
            Mem::Heap(v) => v.as_slice(),
            #[cfg(feature = "tch")]
            Mem::Pinned(p) => p.as_slice(),
        }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Mem::Heap(v) => v.as_mut_slice(),
            #[cfg(feature = "tch")]
            Mem::Pinned(p) => p.as_mut_slice(),
        }
    }
}

/// A CUDA-pinned host buffer owned through a uint8 tch tensor.
#[cfg(feature = "tch")]
struct PinnedBuf {
    tensor: tch::Tensor,
    len: usize,
}

#[cfg(feature = "tch")]
#[allow(unsafe_code)]
impl PinnedBuf {
    /// A page-locked buffer of `len` bytes from libtorch's pinned allocator.
    ///
    /// Through `_pin_memory`, not `pin_memory`: since libtorch 2.x, `pin_memory(device)` and
    /// `is_pinned(device)` print a deprecation warning to stderr at every call from C++ (and
    /// tch cannot leave the device out), and `pin_memory` would first check whether a fresh
    /// tensor is pinned. The source is `empty`, not `zeros`: `_pin_memory` copies it into the
    /// pinned storage, and a fresh `empty` above `malloc`'s mmap threshold is untouched memory,
    /// which costs no resident memory to read, where `zeros` would first write `len` bytes of
    /// ordinary memory.
    fn new(len: usize) -> Result<PinnedBuf, tch::TchError> {
        let t = tch::Tensor::f_empty([len as i64], (tch::Kind::Uint8, tch::Device::Cpu))?;
        let t = t.f_internal_pin_memory(tch::Device::Cuda(0))?;
        Ok(PinnedBuf { tensor: t, len })
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: the tensor is a contiguous uint8 CPU tensor of `len` elements that this struct
        // owns exclusively (never shared, never resized), so its data is valid for `len` bytes
        // for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees no other slice of it exists.
        unsafe { std::slice::from_raw_parts_mut(self.tensor.data_ptr() as *mut u8, self.len) }
    }
}

// SAFETY: the pinned tensor is owned exclusively by the buffer; libtorch tensors may be moved
// between threads.
#[cfg(feature = "tch")]
#[allow(unsafe_code)]
unsafe impl Sync for PinnedBuf {}

struct State {
    free: Vec<Mem>,
    free_bytes: usize,
    in_use: usize,
    /// Bytes being allocated now (outside the lock), counted against the budget already.
    pending: usize,
    allocations: u64,
    reuses: u64,
    pinned_fallbacks: u64,
}

struct Inner {
    budget: usize,
    pinned: bool,
    state: Mutex<State>,
    returned: Condvar,
}

/// A bounded pool of reusable staging buffers. Cheap to clone (shared).
#[derive(Clone)]
pub struct StagingPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StagingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingPool")
            .field("stats", &self.stats())
            .finish()
    }
}

/// A buffer being filled; [`StagingBuf::freeze`] turns it into [`Bytes`] that give it back to
/// the pool when dropped.
pub struct StagingBuf {
    mem: Option<Mem>,
    len: usize,
    pool: Arc<Inner>,
}

impl std::fmt::Debug for StagingBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingBuf")
            .field("len", &self.len)
            .field("pinned", &self.mem.as_ref().is_some_and(Mem::is_pinned))
            .finish()
    }
}

impl StagingPool {
    /// A pool that hands out at most `budget` bytes at once. Pinned memory is used when
    /// `pin` is true and CUDA is available.
    pub fn new(budget: usize, pin: bool) -> StagingPool {
        let pinned = pin && cuda_available();
        StagingPool {
            inner: Arc::new(Inner {
                budget,
                pinned,
                state: Mutex::new(State {
                    free: Vec::new(),
                    free_bytes: 0,
                    in_use: 0,
                    pending: 0,
                    allocations: 0,
                    reuses: 0,
                    pinned_fallbacks: 0,
                }),
                returned: Condvar::new(),
            }),
        }
    }

    /// The counters.
    pub fn stats(&self) -> PoolStats {
        let s = lock(&self.inner.state);
        PoolStats {
            budget: self.inner.budget,
            in_use: s.in_use,
            free: s.free_bytes,
            allocations: s.allocations,
            reuses: s.reuses,
            pinned: self.inner.pinned,
            pinned_fallbacks: s.pinned_fallbacks,
        }
    }

    /// A buffer of `len` bytes, waiting for returns while the budget is exhausted.
    pub fn acquire(&self, len: usize) -> StagingBuf {
        self.get(len, true, true)
            .expect("blocking acquire always succeeds")
    }

    /// A buffer of `len` bytes, or `None` when the budget is exhausted now.
    pub fn try_acquire(&self, len: usize) -> Option<StagingBuf> {
        self.get(len, false, true)
    }

    /// Readies `count` free buffers of at least `len` bytes each, with their pages mapped
    /// (page-locked when the pool pins), so that the next `count` requests of up to `len`
    /// bytes held at once take no new memory and fault no page: allocation and page faults
    /// (huge pages may make the kernel compact memory first, which can take seconds per GiB)
    /// happen now instead of in a save. Returns the bytes allocated.
    ///
    /// The smallest free buffers that fit count toward `count`; when the budget needs the room,
    /// free buffers too small for `len` are released first, then fitting ones larger than
    /// `len`, which new buffers of `len` replace. Call it before saves start: a save running at
    /// the same time may take the buffers it readies.
    ///
    /// Fails with [`Error::StagingBudget`](crate::Error::StagingBudget), allocating and
    /// releasing nothing, when the buffers would not fit the budget beside the bytes in use
    /// now, or when `len` alone is larger than the budget: the pool does not keep such a
    /// buffer (one save that large runs alone, with a buffer allocated for it and freed after).
    ///
    /// ```
    /// use ckptio::runtime::StagingPool;
    ///
    /// let pool = StagingPool::new(64 << 20, false);
    /// assert_eq!(pool.reserve(8 << 20, 2).unwrap(), 16 << 20);
    /// assert_eq!(pool.reserve(4 << 20, 2).unwrap(), 0, "the two buffers fit");
    /// let (a, b) = (pool.acquire(8 << 20), pool.acquire(6 << 20));
    /// assert_eq!(pool.stats().allocations, 2, "both taken from the reserve");
    /// # drop((a, b));
    /// assert!(pool.reserve(40 << 20, 2).is_err(), "80 MiB is over the budget");
    /// ```
    pub fn reserve(&self, len: usize, count: usize) -> crate::Result<usize> {
        if len == 0 || count == 0 {
            return Ok(0);
        }
        let inner = &self.inner;
        let refuse = |in_use: usize| crate::Error::StagingBudget {
            needed: (count as u64).saturating_mul(len as u64),
            budget: inner.budget as u64,
            in_use: in_use as u64,
        };
        // The pool keeps no buffer larger than its budget (one save that large runs alone).
        if len > inner.budget {
            return Err(refuse(0));
        }
        let mut s = lock(&inner.state);
        let taken = s.in_use + s.pending;
        // The free buffers that will serve: the smallest that fit, up to `count`; the others
        // may be released to make room.
        let mut all = std::mem::take(&mut s.free);
        all.sort_by_key(Mem::len);
        let first_fit = all.partition_point(|m| m.len() < len);
        let mut others: Vec<Mem> = all.drain(..first_fit).collect();
        let mut kept = all;
        others.extend(kept.drain(count.min(kept.len())..));
        let footprint = |kept: &[Mem]| {
            (count - kept.len())
                .checked_mul(len)
                .and_then(|n| n.checked_add(kept.iter().map(Mem::len).sum()))
                .and_then(|n| n.checked_add(taken))
        };
        // Kept buffers larger than `len` make way for new ones of `len` if that is what fits.
        while footprint(&kept).is_none_or(|f| f > inner.budget) {
            match kept.last() {
                Some(m) if m.len() > len => others.extend(kept.pop()),
                _ => {
                    s.free = kept.into_iter().chain(others).collect();
                    return Err(refuse(taken));
                }
            }
        }
        let need = count - kept.len();
        // Bounded by the footprint checked above.
        let new = need * len;
        // Make room: release free buffers not kept, largest first.
        let kept_bytes: usize = kept.iter().map(Mem::len).sum();
        let mut others_bytes: usize = others.iter().map(Mem::len).sum();
        while taken + kept_bytes + others_bytes + new > inner.budget {
            let Some(m) = others.pop() else { break };
            others_bytes -= m.len();
        }
        s.free = kept.into_iter().chain(others).collect();
        s.free_bytes = kept_bytes + others_bytes;
        if need == 0 {
            return Ok(0);
        }
        let (mut s, made) = inner.allocate(s, len, need, true);
        for m in made {
            s.free_bytes += m.len();
            s.free.push(m);
        }
        drop(s);
        // Fewer bytes are taken now (pending went down, free buffers do not count): a request
        // that waited while these were allocated may go on.
        inner.returned.notify_all();
        Ok(new)
    }

    /// As [`StagingPool::acquire`] (with `block`) or [`StagingPool::try_acquire`]; without
    /// `fault_in`, new memory (not pinned) has its pages mapped only when first written, by
    /// whichever thread writes them: for a buffer another thread fills (a write-protected
    /// save's background copy), so that the first save does not fault it in on the caller's
    /// time.
    pub(crate) fn get(&self, len: usize, block: bool, fault_in: bool) -> Option<StagingBuf> {
        let inner = &self.inner;
        let mut s = lock(&inner.state);
        loop {
            let taken = s.in_use + s.pending;
            let fits = taken == 0 || taken.saturating_add(len) <= inner.budget;
            if fits {
                break;
            }
            if !block {
                return None;
            }
            s = inner.returned.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        // Best fit among free buffers.
        let best = s
            .free
            .iter()
            .enumerate()
            .filter(|(_, m)| m.len() >= len)
            .min_by_key(|(_, m)| m.len())
            .map(|(i, _)| i);
        let mem = match best {
            Some(i) => {
                let m = s.free.swap_remove(i);
                s.free_bytes -= m.len();
                s.reuses += 1;
                m
            }
            None => {
                // Make room: drop free buffers until the footprint fits the budget.
                while !s.free.is_empty()
                    && (s.in_use + s.pending + s.free_bytes).saturating_add(len) > inner.budget
                {
                    let i = (0..s.free.len())
                        .max_by_key(|&i| s.free[i].len())
                        .unwrap_or(0);
                    let m = s.free.swap_remove(i);
                    s.free_bytes -= m.len();
                }
                let (relocked, mut made) = inner.allocate(s, len, 1, fault_in);
                s = relocked;
                made.pop().expect("one buffer was made")
            }
        };
        s.in_use += mem.len();
        Some(StagingBuf {
            mem: Some(mem),
            len,
            pool: inner.clone(),
        })
    }
}

impl Inner {
    /// Allocates `count` buffers of `len` bytes (their total fits a `usize`: the caller checked
    /// it against the budget) with the lock released, their bytes counted as pending meanwhile;
    /// returns the lock again, with the buffers counted as allocated.
    fn allocate<'a>(
        &'a self,
        mut s: std::sync::MutexGuard<'a, State>,
        len: usize,
        count: usize,
        fault_in: bool,
    ) -> (std::sync::MutexGuard<'a, State>, Vec<Mem>) {
        let bytes = len * count;
        s.pending += bytes;
        drop(s);
        let mut guard = Pending { inner: self, bytes };
        let made: Vec<Mem> = (0..count)
            .map(|_| alloc(len, self.pinned, fault_in))
            .collect();
        let mut s = lock(&self.state);
        s.pending -= bytes;
        guard.bytes = 0;
        s.allocations += made.len() as u64;
        s.pinned_fallbacks += made
            .iter()
            .filter(|m| self.pinned && !m.is_pinned())
            .count() as u64;
        (s, made)
    }
}

/// Bytes counted as being allocated outside the pool's lock: given back, and waiters woken, if
/// the allocation unwinds (the normal path gives them back under the lock and zeroes this).
struct Pending<'a> {
    inner: &'a Inner,
    bytes: usize,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            lock(&self.inner.state).pending -= self.bytes;
            self.inner.returned.notify_all();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn alloc(len: usize, pinned: bool, fault_in: bool) -> Mem {
    #[cfg(feature = "tch")]
    if pinned {
        match PinnedBuf::new(len.max(1)) {
            Ok(p) => return Mem::Pinned(p),
            Err(e) => tracing::warn!(
                len,
                error = %e,
                "ckptio: cannot allocate page-locked (pinned) staging memory; using ordinary \
                 memory, into which device-to-host copies are slower"
            ),
        }
    }
    let _ = pinned;
    // Page-aligned, so storages copied into it can be written with direct I/O and no second
    // copy; unless another thread fills it, every page is written now (unlike a zeroed
    // allocation, which the kernel maps lazily), so the first snapshot into it does not pay
    // for page faults.
    if fault_in {
        Mem::Heap(AlignedBuf::filled(len, 1))
    } else {
        Mem::Heap(AlignedBuf::zeroed_lazy(len))
    }
}

/// Whether CUDA is available (feature `tch`); `false` otherwise. Asked of libtorch once per
/// process (it counts its devices once too).
pub fn cuda_available() -> bool {
    #[cfg(feature = "tch")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(tch::Cuda::is_available)
    }
    #[cfg(not(feature = "tch"))]
    {
        false
    }
}

impl StagingBuf {
    /// The bytes to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        match &mut self.mem {
            Some(m) => &mut m.as_mut_slice()[..len],
            None => &mut [],
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Read-only bytes that return the buffer to the pool when the last clone is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for StagingBuf {
    fn as_ref(&self) -> &[u8] {
        match &self.mem {
            Some(m) => &m.as_slice()[..self.len],
            None => &[],
        }
    }
}

impl Drop for StagingBuf {
    fn drop(&mut self) {
        if let Some(m) = self.mem.take() {
            let mut s = lock(&self.pool.state);
            s.in_use -= m.len();
            if s.in_use + s.pending + s.free_bytes + m.len() <= self.pool.budget {
                s.free_bytes += m.len();
                s.free.push(m);
            }
            drop(s);
            self.pool.returned.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned memory where CUDA is available; without CUDA, libtorch's pinned allocator fails
    /// and the buffer falls back to ordinary memory, as large and as usable, with no panic.
    #[cfg(feature = "tch")]
    #[test]
    fn a_pinned_buffer_is_asked_of_libtorch_and_falls_back_to_ordinary_memory_without_cuda() {
        let len = (3 << 20) + 5;
        let mut m = alloc(len, true, true);
        assert_eq!(m.is_pinned(), cuda_available());
        assert_eq!(m.len(), len);
        m.as_mut_slice()[len - 1] = 7;
        m.as_mut_slice()[0] = 9;
        assert_eq!((m.as_slice()[0], m.as_slice()[len - 1]), (9, 7));
        if cuda_available() {
            let Mem::Pinned(p) = &m else { unreachable!() };
            assert!(p.tensor.f_is_pinned(tch::Device::Cuda(0)).unwrap_or(false));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_buffer_asked_for_without_fault_in_takes_memory_only_as_it_is_written() {
        use crate::aligned::tests::resident;
        let pool = StagingPool::new(64 << 20, false);
        let mut lazy = pool.get(16 << 20, true, false).expect("within budget");
        assert_eq!(resident(lazy.as_ref()), 0, "nothing in memory yet");
        lazy.as_mut_slice()[..4096].fill(1);
        assert!(resident(lazy.as_ref()) > 0);
        let eager = pool.acquire(8 << 20);
        assert_eq!(
            resident(eager.as_ref()),
            (8usize << 20).div_ceil(4096),
            "faulted in"
        );
    }

    #[test]
    fn a_reserve_maps_its_buffers_and_makes_room_by_releasing_smaller_free_ones() {
        let pool = StagingPool::new(24 << 20, false);
        drop((pool.acquire(6 << 20), pool.acquire(6 << 20)));
        assert_eq!(pool.stats().free, 12 << 20);
        // 2 x 8 MiB beside 12 MiB of free buffers too small for them: over the 24 MiB budget
        // until one 6 MiB buffer goes, and only one.
        assert_eq!(pool.reserve(8 << 20, 2).unwrap(), 16 << 20);
        let s = pool.stats();
        assert_eq!((s.free, s.allocations), (22 << 20, 4), "{s:?}");
        let (a, b) = (pool.acquire(7 << 20), pool.acquire(7 << 20));
        assert_eq!((a.len(), pool.stats().allocations), (7 << 20, 4));
        #[cfg(target_os = "linux")]
        for buf in [&a, &b] {
            // SAFETY: sysconf has no preconditions.
            #[allow(unsafe_code)]
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
            let mapped = crate::aligned::tests::resident(buf.as_ref());
            assert_eq!(mapped, (7usize << 20) / page, "every page mapped");
        }
    }

    #[test]
    fn a_reserve_replaces_a_larger_free_buffer_when_only_that_fits_and_refuses_what_cannot() {
        let pool = StagingPool::new(24 << 20, false);
        drop(pool.acquire(20 << 20));
        // Keeping the 20 MiB buffer and adding one of 5 MiB is over budget: two of 5 MiB fit.
        assert_eq!(pool.reserve(5 << 20, 2).unwrap(), 10 << 20);
        let s = pool.stats();
        assert_eq!((s.free, s.allocations), (10 << 20, 3), "{s:?}");
        // One of them fits as it is.
        assert_eq!(pool.reserve(4 << 20, 1).unwrap(), 0);
        // Refused, and nothing released: the 30 MiB asked for is over the budget, and so is
        // any buffer over 24 MiB (the pool never keeps one).
        let held = pool.acquire(5 << 20);
        for (len, count, in_use) in [(10 << 20, 3, 5 << 20), (25 << 20, 1, 0)] {
            match pool.reserve(len, count) {
                Err(crate::Error::StagingBudget {
                    needed,
                    budget,
                    in_use: used,
                }) => assert_eq!(
                    (needed, budget, used),
                    ((len * count) as u64, 24 << 20, in_use)
                ),
                other => panic!("expected a budget refusal, got {other:?}"),
            }
        }
        let s = pool.stats();
        assert_eq!(
            (s.free, s.in_use, s.allocations),
            (5 << 20, 5 << 20, 3),
            "{s:?}"
        );
        drop(held);
        assert!(pool.reserve(1 << 20, usize::MAX).is_err(), "no overflow");
        assert_eq!(pool.stats().free, 10 << 20);
    }

    #[test]
    fn buffers_are_reused_after_warm_up() {
        let pool = StagingPool::new(1 << 20, false);
        for _ in 0..10 {
            let mut a = pool.acquire(1000);
            a.as_mut_slice().fill(7);
            let b = pool.acquire(5000);
            let fa = a.freeze();
            assert_eq!(&fa[..3], &[7, 7, 7]);
            drop((fa, b));
        }
        let s = pool.stats();
        assert_eq!(s.allocations, 2, "{s:?}");
        assert_eq!(s.in_use, 0);
        assert_eq!(s.reuses, 18);
    }

    #[test]
    fn budget_bounds_what_is_handed_out() {
        let pool = StagingPool::new(1000, false);
        let a = pool.acquire(600);
        assert!(pool.try_acquire(600).is_none());
        let p2 = pool.clone();
        let t = std::thread::spawn(move || p2.acquire(600).len());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.is_finished());
        drop(a);
        assert_eq!(t.join().unwrap(), 600);
        // One buffer larger than the whole budget is allowed alone.
        assert_eq!(pool.acquire(5000).len(), 5000);
    }
}
