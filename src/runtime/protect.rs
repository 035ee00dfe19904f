//! Write-protected Eager snapshots: an Eager save without the copy on the training thread.
//!
//! # How
//! An Eager save must capture the tensors as they are when `save` returns, because the caller
//! may write them at once. Copying them costs the training thread one memcpy of the whole
//! checkpoint. Instead, on Linux, the save asks the kernel (through `userfaultfd`) to
//! write-protect the pages of each large CPU tensor, which takes a small fraction of a copy
//! (page-table updates only), and returns. A background thread, the *copier*, then copies the
//! protected pages into the staging buffer chunk by chunk, in write order, and lifts the
//! protection of each chunk once it is copied. A thread (training code, another library, or the
//! kernel on behalf of a system call) that writes a page still protected is held by the kernel
//! until the copier has copied that page's chunk first; then its write goes ahead. Either way
//! the staging buffer holds the tensors exactly as they were when `save` returned.
//!
//! The copier starts on each tensor as soon as it is protected, while `save` protects the
//! next. Until `save` is done protecting, the copier keeps the protection of what it has
//! copied (lifting it takes the process's memory-map lock, which `save`'s next registration
//! would then wait for, on the caller's time) and lifts it all at once afterwards; a write
//! that reaches such a chunk meanwhile has its protection lifted at once. Meanwhile the
//! copier is also kept off the caller's CPU (where the scheduler tends to wake it, and where
//! the two would take turns) when another CPU is allowed to it.
//!
//! Protection costs page-table work per page. Between saves, the copier asks the kernel to
//! back the tensors that two saves in a row protected at the same address with 2 MiB huge
//! pages (`MADV_COLLAPSE`; see `Collapse`), so later saves change one entry per 2 MiB instead
//! of 512. Chunks are aligned to their size in the address space, so lifting a chunk's
//! protection never splits a huge page.
//!
//! # When it applies
//! Only to tensors of at least [`PROTECT_MIN`] bytes whose source offers
//! [`HostMemory::protectable_bytes`](crate::HostMemory::protectable_bytes) (tch CPU tensors
//! do, in a process without CUDA, so never CUDA-pinned memory) and whose pages are private
//! anonymous memory (the heap and `malloc`'s mappings, checked in `/proc/self/maps`): a
//! protection holds this process's page tables only, so shared memory, which another mapping
//! or process could write, is copied.
//! Everything else, and the partial pages at both ends of a protected tensor, is copied on the
//! calling thread, first, before any protection is set. Nothing changes where `userfaultfd` is
//! not available (another OS, a kernel older than 6.4, or a process that may not use it: it
//! needs `CAP_SYS_PTRACE`, `vm.unprivileged_userfaultfd = 1`, or access to
//! `/dev/userfaultfd`), nor in a forked child. A protection that only covers faults from user
//! space is never used, since a system call writing the pages would then fail.
//!
//! # Limits
//! - Most system calls that write a protected page wait like a thread does (`read`,
//!   `process_vm_writev`, direct I/O reads into it). A few kernel paths that cannot wait fail
//!   instead (`EFAULT`): a futex living in tensor memory, for one.
//! - A device's DMA into host memory is not seen at all. CUDA-pinned memory is never
//!   protected (where CUDA is available, tch CPU tensors are copied), but ckptio cannot tell
//!   other memory a device writes from ordinary memory: buffers registered for RDMA (ibverbs,
//!   as gloo over InfiniBand uses), io_uring fixed buffers, VFIO. If a device writes CPU
//!   tensors you save while their snapshot may still be copied, turn write protection off
//!   ([`Builder::write_protect`](super::Builder::write_protect)`(false)`): such a write would
//!   land in the checkpoint.
//! - The source keeps the memory allocated until it is copied, but an in-place operation that
//!   replaces a storage's memory (growing a tch tensor with `resize_`) frees it under the
//!   copier: the process may then crash, or the checkpoint hold zeros or allocator data there.
//!   Do not do that to a tensor in the copy window just after `save` (or turn write protection
//!   off where the loop does).
//!
//! # Costs
//! Write-protecting costs page-table work per page: a fraction of a memcpy of the same memory
//! in 4 KiB pages, much less in huge pages (`docs/benchmarks.md` has both). A write to a page
//! not yet copied waits for one chunk's copy (8 MiB) and two context switches; during a
//! process's first save, whose new staging buffer the copier faults in as it copies, that copy
//! includes mapping the chunk's staging pages (in huge pages, which the kernel may have to
//! compact memory for). Only one protected snapshot is in flight at a time: a save that comes
//! while the previous one is still being copied waits for that copy first (with `Skip` or
//! `Error` backpressure, it copies instead of waiting). The copier keeps the tensors' memory alive
//! until it has copied them.

#![allow(unsafe_code)]

/// Tensors smaller than this are copied on the calling thread: protecting them would not save
/// time.
pub(crate) const PROTECT_MIN: usize = 1 << 20;

/// What the copier counts, for [`Status`](super::Status).
#[derive(Default)]
pub(crate) struct ProtectCounters {
    /// Writes that waited for their chunk's copy.
    pub(crate) waits: std::sync::atomic::AtomicU64,
    /// 2 MiB blocks the kernel moved into huge pages at the copier's request.
    pub(crate) huge_collapsed: std::sync::atomic::AtomicU64,
    /// Requests for a block the kernel refused.
    pub(crate) huge_refused: std::sync::atomic::AtomicU64,
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod imp {
    use std::collections::VecDeque;
    use std::fs::OpenOptions;
    use std::io;
    use std::ops::Range;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};
    use std::thread::JoinHandle;

    use super::PROTECT_MIN;

    /// The unit the copier copies and unprotects: a write waits for at most one chunk's copy.
    pub(crate) const CHUNK: usize = 8 << 20;

    /// A destination pointer the copier writes through.
    pub(crate) struct Dst(pub(crate) *mut u8);

    // SAFETY: the pointer designates a region of a staging buffer that only the copier writes
    // (see `Arming::push`), and the buffer is kept alive by the item's `on_copied` closure.
    unsafe impl Send for Dst {}

    /// One protected range and where its bytes go.
    pub(crate) struct Item {
        range: Range<usize>,
        /// The range's start rounded down to a [`CHUNK`] boundary: chunks are aligned to
        /// `CHUNK` in the address space (so lifting a chunk's protection never splits a huge
        /// page), the first and last ones cut to the range.
        base: usize,
        dst: Dst,
        copied: Vec<bool>,
        left: usize,
        /// Chunks copied from the start of the range, without a gap.
        prefix: usize,
        /// Told how many bytes from the start of the range are copied, as that grows.
        on_progress: Box<dyn Fn(usize) + Send>,
        on_copied: Option<Box<dyn FnOnce() + Send>>,
        /// Keeps the protected memory mapped until the copy is done.
        _keep: Box<dyn Send>,
    }

    impl Item {
        fn chunk(&self, c: usize) -> Range<usize> {
            let start = (self.base + c * CHUNK).max(self.range.start);
            start..(self.base + (c + 1) * CHUNK).min(self.range.end)
        }

        /// Copies chunk `c`, which must still be protected, into the destination and marks it
        /// copied.
        fn copy_chunk(&mut self, c: usize) {
            let r = self.chunk(c);
            // SAFETY: `r` lies inside the item's range, which is mapped (kept alive by the
            // item) and still write-protected, so nobody changes it while it is read; the
            // destination is the item's own region of the staging buffer (as long as the
            // range), written by the copier thread alone.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    r.start as *const u8,
                    self.dst.0.add(r.start - self.range.start),
                    r.end - r.start,
                );
            }
            self.copied[c] = true;
            self.left -= 1;
            if c == self.prefix {
                while self.copied.get(self.prefix) == Some(&true) {
                    self.prefix += 1;
                }
                let end = (self.base + self.prefix * CHUNK).min(self.range.end);
                (self.on_progress)(end - self.range.start);
            }
        }

        /// Once every chunk is copied: forgets the range and publishes the copy.
        /// Does nothing the second time.
        fn finish(&mut self, inner: &Inner) {
            let Some(f) = self.on_copied.take() else {
                return;
            };
            inner.unregister(&self.range);
            f();
        }

        /// Copies what is left of the range on this thread (while it is still protected),
        /// then forgets it and publishes the copy: for a range nobody else will copy.
        fn copy_here(mut self, inner: &Inner) {
            for c in 0..self.copied.len() {
                if !self.copied[c] {
                    self.copy_chunk(c);
                }
            }
            self.finish(inner);
        }
    }

    // From <linux/userfaultfd.h>; the ioctl numbers are the same on x86_64 and aarch64.
    const UFFD_API: u64 = 0xaa;
    const UFFDIO_API: u64 = 0xc018_aa3f;
    const UFFDIO_REGISTER: u64 = 0xc020_aa00;
    const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
    const UFFDIO_WAKE: u64 = 0x8010_aa02;
    const UFFDIO_WRITEPROTECT: u64 = 0xc018_aa06;
    const USERFAULTFD_IOC_NEW: u64 = 0xaa00;
    const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// Protects pages never touched too (Linux 6.4): without it a first write to such a page
    /// would not be seen.
    const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    const REGISTER_MODE_WP: u64 = 1 << 1;
    const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
    /// Bit of `UFFDIO_WRITEPROTECT` in a register answer's `ioctls`.
    const IOCTL_WRITEPROTECT: u64 = 1 << 6;
    const EVENT_PAGEFAULT: u8 = 0x12;

    #[repr(C)]
    struct UffdioApi {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct UffdioRange {
        start: u64,
        len: u64,
    }
    #[repr(C)]
    struct UffdioRegister {
        range: UffdioRange,
        mode: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct UffdioWriteprotect {
        range: UffdioRange,
        mode: u64,
    }
    /// `struct procmap_query` (104 bytes, <linux/fs.h>, Linux 6.11).
    #[repr(C)]
    #[derive(Default)]
    struct ProcmapQuery {
        size: u64,
        query_flags: u64,
        query_addr: u64,
        vma_start: u64,
        vma_end: u64,
        vma_flags: u64,
        vma_page_size: u64,
        vma_offset: u64,
        inode: u64,
        dev_major: u32,
        dev_minor: u32,
        vma_name_size: u32,
        build_id_size: u32,
        vma_name_addr: u64,
        build_id_addr: u64,
    }
    const _: () = assert!(std::mem::size_of::<ProcmapQuery>() == 104);
    /// `_IOWR('f', 17, struct procmap_query)`.
    const PROCMAP_QUERY: u64 = 0xc068_6611;
    const QUERY_WRITABLE: u64 = 0x02;
    const QUERY_SHARED: u64 = 0x08;

    /// `struct uffd_msg` (32 bytes) as a page fault fills it.
    #[repr(C)]
    #[derive(Default)]
    struct UffdMsg {
        event: u8,
        _reserved: [u8; 7],
        _flags: u64,
        address: u64,
        _ptid: u64,
    }

    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
    }

    fn ioctl<T>(fd: &OwnedFd, request: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: `arg` is the `repr(C)` struct that `request` reads and writes, valid for the
        // whole call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn range(r: &Range<usize>) -> UffdioRange {
        UffdioRange {
            start: r.start as u64,
            len: (r.end - r.start) as u64,
        }
    }

    /// A userfaultfd that serves write-protect faults from user space and from the kernel.
    fn open_uffd() -> io::Result<OwnedFd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes one int of flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if fd >= 0 {
            fd as i32
        } else {
            let err = io::Error::last_os_error();
            // Whoever may open /dev/userfaultfd gets the same without privileges.
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/userfaultfd")
                .map_err(|_| err)?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new fd or -1.
            let fd = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    USERFAULTFD_IOC_NEW as _,
                    flags as libc::c_int,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            fd
        };
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_API, &mut api)?;
        Ok(fd)
    }

    /// What runs on the copier thread once a save's ranges are all copied.
    type OnDone = Box<dyn FnOnce() + Send>;

    /// Where the copier and the one save it serves at a time stand.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Phase {
        /// No save is protecting or being copied: a save may arm.
        Idle,
        /// A save is protecting ranges and handing them over (the copier may be copying those
        /// it has); it has not sealed its job yet.
        Arming,
        /// The save has handed over its last range; the copier copies what is left of it.
        Copying,
        /// The copier is gone: nothing is protected any more, and saves copy.
        Dead,
    }

    struct State {
        phase: Phase,
        /// Ranges a save has protected and handed over, not yet taken by the copier.
        incoming: Vec<Item>,
        /// The save being armed has handed over its last range: `on_done` (`None` for a save
        /// given up half way), not yet taken by the copier.
        sealed: Option<Option<OnDone>>,
        /// The wrapper is being dropped: the copier exits once it holds no job.
        stop_requested: bool,
    }

    struct Inner {
        uffd: OwnedFd,
        /// An eventfd that wakes the copier for a new job or to stop.
        event: OwnedFd,
        page: usize,
        /// The process that made the userfaultfd: a forked child must not use it (it acts on
        /// the parent's memory).
        pid: u32,
        /// `/proc/self/maps`, for `PROCMAP_QUERY`.
        maps: Option<std::fs::File>,
        /// Faults that waited for a copy.
        counters: Arc<super::ProtectCounters>,
        /// The copier thread's id (0 until it has started, and again once it is exiting).
        /// Its CPUs are changed only under this lock, so never those of a thread that has
        /// taken the id of an exited copier.
        copier_tid: Mutex<i32>,
        /// Whether the copier asks for huge pages between saves (see [`Collapse`]).
        huge_pages: bool,
        state: Mutex<State>,
        idle: Condvar,
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    impl Inner {
        fn register_protect(&self, r: &Range<usize>) -> io::Result<()> {
            let mut reg = UffdioRegister {
                range: range(r),
                mode: REGISTER_MODE_WP,
                ioctls: 0,
            };
            ioctl(&self.uffd, UFFDIO_REGISTER, &mut reg)?;
            if reg.ioctls & IOCTL_WRITEPROTECT == 0 {
                self.unregister(r);
                return Err(io::Error::from(io::ErrorKind::Unsupported));
            }
            let mut wp = UffdioWriteprotect {
                range: range(r),
                mode: WRITEPROTECT_MODE_WP,
            };
            if let Err(e) = ioctl(&self.uffd, UFFDIO_WRITEPROTECT, &mut wp) {
                self.unregister(r);
                return Err(e);
            }
            Ok(())
        }

        /// Lifts the protection of `r` and wakes the threads waiting on it.
        fn unprotect(&self, r: &Range<usize>) -> io::Result<()> {
            let mut wp = UffdioWriteprotect {
                range: range(r),
                mode: 0,
            };
            ioctl(&self.uffd, UFFDIO_WRITEPROTECT, &mut wp)
        }

        /// Forgets `r`: lifts what protection is left, then wakes the threads waiting on it
        /// (unregistering a write-protect range wakes nobody by itself).
        fn unregister(&self, r: &Range<usize>) {
            let mut rg = range(r);
            if let Err(e) = ioctl(&self.uffd, UFFDIO_UNREGISTER, &mut rg) {
                tracing::error!(error = %e, start = r.start, len = r.end - r.start,
                    "ckptio: cannot lift a write protection");
            }
            let mut rg = range(r);
            let _ = ioctl(&self.uffd, UFFDIO_WAKE, &mut rg);
        }

        /// Lifts any protection left on the page at `addr` and wakes its writers.
        fn release_page(&self, addr: usize) {
            let start = addr & !(self.page - 1);
            let _ = self.unprotect(&(start..start + self.page));
            self.wake(addr);
        }

        fn wake(&self, addr: usize) {
            let start = addr & !(self.page - 1);
            let mut rg = range(&(start..start + self.page));
            let _ = ioctl(&self.uffd, UFFDIO_WAKE, &mut rg);
        }

        /// The address of the next page fault, if one is waiting.
        fn next_fault(&self) -> Option<usize> {
            loop {
                let mut msg = UffdMsg::default();
                let n = std::mem::size_of::<UffdMsg>();
                // SAFETY: `msg` is a plain struct of `n` bytes, valid for the write.
                let r = unsafe {
                    libc::read(
                        self.uffd.as_raw_fd(),
                        (&mut msg as *mut UffdMsg).cast::<libc::c_void>(),
                        n,
                    )
                };
                if r != n as isize {
                    return None;
                }
                if msg.event == EVENT_PAGEFAULT {
                    return Some(msg.address as usize);
                }
            }
        }

        fn notify(&self) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to the eventfd.
            let _ = unsafe {
                libc::write(
                    self.event.as_raw_fd(),
                    (&one as *const u64).cast::<libc::c_void>(),
                    8,
                )
            };
        }

        /// Sleeps until a page fault or a notification.
        fn sleep(&self) {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.event.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the call.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            let mut v: u64 = 0;
            // SAFETY: reads at most 8 bytes into a valid u64 (non-blocking eventfd).
            let _ = unsafe {
                libc::read(
                    self.event.as_raw_fd(),
                    (&mut v as *mut u64).cast::<libc::c_void>(),
                    8,
                )
            };
        }
    }

    /// The copies of one save's protected ranges, which arrive one by one while the save
    /// protects the next (so the copy, and the write behind it, start before `save` returns).
    pub(crate) struct Job {
        inner: Arc<Inner>,
        items: Vec<Item>,
        /// Item indices by address, for faults.
        by_addr: Vec<usize>,
        /// Next chunk to copy in order: (item, chunk).
        cursor: (usize, usize),
        /// While the save still protects ranges, copied chunks keep their protection (and
        /// items copied whole stay registered) until it is done: lifting a protection takes
        /// the process's memory-map lock, which the save's next registration then waits for,
        /// and that wait is the caller's. Here are those chunks, as (item, chunk).
        held: Vec<(usize, usize)>,
        /// Set while the save is protecting ranges: chunks copied then are held.
        hold: bool,
        /// Every range has arrived.
        sealed: bool,
        on_done: Option<OnDone>,
    }

    impl Job {
        fn new(inner: Arc<Inner>) -> Job {
            Job {
                inner,
                items: Vec::new(),
                by_addr: Vec::new(),
                cursor: (0, 0),
                held: Vec::new(),
                hold: false,
                sealed: false,
                on_done: None,
            }
        }

        /// Takes ranges handed over since the last call.
        fn add(&mut self, items: Vec<Item>) {
            if items.is_empty() {
                return;
            }
            for item in items {
                let start = item.range.start;
                let i = self.items.len();
                self.items.push(item);
                let at = self
                    .by_addr
                    .partition_point(|&k| self.items[k].range.start < start);
                self.by_addr.insert(at, i);
            }
        }

        /// Copies chunk `c` of item `i` unless done, then lifts its protection (or, unless a
        /// writer waits for it, holds it while the save still protects ranges: see `held`).
        fn copy(&mut self, i: usize, c: usize, waited: bool) {
            let item = &mut self.items[i];
            if item.copied[c] {
                return;
            }
            item.copy_chunk(c);
            if self.hold && !waited {
                self.held.push((i, c));
                return;
            }
            self.release(i, c);
        }

        /// Lifts the protection of chunk `c` of item `i`, copied; forgets the item once it is
        /// copied whole.
        fn release(&mut self, i: usize, c: usize) {
            let item = &mut self.items[i];
            if item.left == 0 {
                // Unregistering lifts the protection of the whole range at once.
                item.finish(&self.inner);
                return;
            }
            if let Err(e) = self.inner.unprotect(&item.chunk(c)) {
                tracing::error!(error = %e, "ckptio: cannot unprotect a copied chunk");
                // Copy the rest while it is still protected, then lift everything.
                for k in 0..item.copied.len() {
                    if !item.copied[k] {
                        item.copy_chunk(k);
                    }
                }
            }
            if item.left == 0 {
                item.finish(&self.inner);
            }
        }

        /// Sets whether copied chunks are held (while the save protects ranges); when that
        /// ends, lifts the protection of those held: one call per run of adjacent chunks, and
        /// one per item copied whole.
        fn set_hold(&mut self, hold: bool) {
            self.hold = hold;
            if hold || self.held.is_empty() {
                return;
            }
            let mut held = std::mem::take(&mut self.held);
            held.sort_unstable();
            let mut k = 0;
            while k < held.len() {
                let (i, c) = held[k];
                let mut end = c + 1;
                k += 1;
                while k < held.len() && held[k] == (i, end) {
                    end += 1;
                    k += 1;
                }
                let item = &mut self.items[i];
                if item.left == 0 {
                    // Every other held chunk of the item goes with it.
                    while k < held.len() && held[k].0 == i {
                        k += 1;
                    }
                    item.finish(&self.inner);
                    continue;
                }
                let r = item.chunk(c).start..item.chunk(end - 1).end;
                if let Err(e) = self.inner.unprotect(&r) {
                    tracing::error!(error = %e, "ckptio: cannot unprotect a copied chunk");
                    for x in 0..item.copied.len() {
                        if !item.copied[x] {
                            item.copy_chunk(x);
                        }
                    }
                    item.finish(&self.inner);
                    while k < held.len() && held[k].0 == i {
                        k += 1;
                    }
                }
            }
        }

        /// Serves a fault at `addr`: false when it is not in this job.
        fn fault(&mut self, addr: usize) -> bool {
            let k = self
                .by_addr
                .partition_point(|&i| self.items[i].range.start <= addr);
            let Some(&i) = k.checked_sub(1).and_then(|k| self.by_addr.get(k)) else {
                return false;
            };
            let item = &self.items[i];
            if addr >= item.range.end {
                return false;
            }
            let c = (addr - item.base) / CHUNK;
            if let Some(h) = self.held.iter().position(|&x| x == (i, c)) {
                // Copied and held: the writer waits no longer.
                self.held.swap_remove(h);
                self.inner.counters.waits.fetch_add(1, Ordering::Relaxed);
                self.release(i, c);
            } else if item.copied[c] {
                // A fault reported after its chunk was released, or on a page whose protection
                // a failed lift left behind: lift it (if any) and wake the writer, which would
                // otherwise fault again at once.
                self.inner.release_page(addr);
            } else {
                self.inner.counters.waits.fetch_add(1, Ordering::Relaxed);
                self.copy(i, c, true);
            }
            true
        }

        /// Copies the next chunk in order; false when everything is copied.
        fn step(&mut self) -> bool {
            while let Some(item) = self.items.get(self.cursor.0) {
                if self.cursor.1 < item.copied.len() {
                    let (i, c) = self.cursor;
                    self.cursor.1 += 1;
                    if !self.items[i].copied[c] {
                        self.copy(i, c, false);
                        return true;
                    }
                } else {
                    self.cursor = (self.cursor.0 + 1, 0);
                }
            }
            false
        }
    }

    impl Drop for Job {
        fn drop(&mut self) {
            // Whatever happens (a panic, an abandoned job), no range stays protected; a range
            // copied whole but held is published.
            for item in &mut self.items {
                if item.left > 0 {
                    self.inner.unregister(&item.range);
                } else {
                    item.finish(&self.inner);
                }
            }
        }
    }

    /// The copier of one [`AsyncCheckpointIo`](crate::AsyncCheckpointIo).
    pub(crate) struct Protector {
        inner: Arc<Inner>,
        thread: Option<JoinHandle<()>>,
    }

    impl Protector {
        /// Starts the copier, or says why write protection is not available here.
        /// With `huge_pages`, the copier asks the kernel between saves to back the tensors
        /// that stay in place from one save to the next with huge pages (see [`Collapse`]).
        pub(crate) fn start(
            counters: Arc<super::ProtectCounters>,
            huge_pages: bool,
        ) -> io::Result<Protector> {
            let uffd = open_uffd()?;
            // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
            let ev = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if ev < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `ev` is a new descriptor that nothing else owns.
            let event = unsafe { OwnedFd::from_raw_fd(ev) };
            let inner = Arc::new(Inner {
                uffd,
                event,
                page: page_size(),
                pid: std::process::id(),
                maps: std::fs::File::open("/proc/self/maps").ok(),
                counters,
                copier_tid: Mutex::new(0),
                huge_pages,
                state: Mutex::new(State {
                    phase: Phase::Idle,
                    incoming: Vec::new(),
                    sealed: None,
                    stop_requested: false,
                }),
                idle: Condvar::new(),
            });
            let i = inner.clone();
            let thread = std::thread::Builder::new()
                .name("ckptio-protect".into())
                .spawn(move || copier(i))?;
            Ok(Protector {
                inner,
                thread: Some(thread),
            })
        }

        /// Waits until the previous protected snapshot is copied (or, without `block`, gives up
        /// if it is not), then starts a new one; `None` when it gave up, when the copier is
        /// gone, or in a forked child: copy instead.
        pub(crate) fn arm(&self, block: bool) -> Option<Arming<'_>> {
            if std::process::id() != self.inner.pid {
                return None;
            }
            let mut st = lock(&self.inner.state);
            loop {
                match st.phase {
                    Phase::Idle => break,
                    Phase::Dead => return None,
                    Phase::Arming | Phase::Copying if !block => return None,
                    Phase::Arming | Phase::Copying => {
                        st = self.inner.idle.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
            st.phase = Phase::Arming;
            drop(st);
            let step_aside = StepAside::new(self.inner.clone());
            Some(Arming {
                p: self,
                maps: None,
                protected: Vec::new(),
                unpushed: Vec::new(),
                pushed: false,
                submitted: false,
                step_aside,
            })
        }
    }

    impl Drop for Protector {
        fn drop(&mut self) {
            if std::process::id() != self.inner.pid {
                // A forked child has no copier thread to stop.
                return;
            }
            lock(&self.inner.state).stop_requested = true;
            self.inner.notify();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// One save's protection, being set up on the calling thread. Each range goes to the
    /// copier as soon as it is protected ([`Arming::push`]). Dropped without
    /// [`Arming::submit`], it lifts the protections it has not handed over; the copier copies
    /// those it has.
    pub(crate) struct Arming<'a> {
        p: &'a Protector,
        /// The private anonymous mappings, read at the first `protect`.
        maps: Option<Vec<Range<usize>>>,
        /// Every range protected so far, in order.
        protected: Vec<Range<usize>>,
        /// Ranges protected and not yet handed to the copier.
        unpushed: Vec<Range<usize>>,
        /// Some range was handed to the copier.
        pushed: bool,
        submitted: bool,
        /// The copier's CPUs before `arm` took the caller's away, to give back at the seal.
        step_aside: Option<StepAside>,
    }

    /// Keeps the copier off the CPU of the thread that is protecting ranges, until dropped.
    ///
    /// The copier starts on each range as soon as it is handed over, while the save protects
    /// the next. Woken by the save, the scheduler tends to place it on the save's own CPU, where
    /// the two then take turns and the caller waits for the copy after all (a scheduler trace
    /// shows the caller off its CPU for much of the save). Other CPUs are left to it
    /// while the save protects; its CPUs are given back as they were when the save is done.
    struct StepAside {
        inner: Arc<Inner>,
        tid: i32,
        saved: libc::cpu_set_t,
    }

    impl StepAside {
        /// `None` when the copier is not running (yet, or any more), the caller's CPU is
        /// unknown, or no other CPU is allowed to it.
        fn new(inner: Arc<Inner>) -> Option<StepAside> {
            let guard = lock(&inner.copier_tid);
            let tid = *guard;
            if tid <= 0 {
                return None;
            }
            // SAFETY: sched_getcpu has no preconditions.
            let cpu = unsafe { libc::sched_getcpu() };
            let cpu = usize::try_from(cpu).ok()?;
            if cpu >= libc::CPU_SETSIZE as usize {
                return None;
            }
            let size = std::mem::size_of::<libc::cpu_set_t>();
            // SAFETY: cpu_set_t is a plain bit array, valid when zeroed.
            let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `saved` is a cpu_set_t of `size` bytes, written by the call.
            if unsafe { libc::sched_getaffinity(tid, size, &mut saved) } != 0 {
                return None;
            }
            let mut away = saved;
            // SAFETY: `cpu` is below CPU_SETSIZE (checked above), `away` a valid set.
            unsafe { libc::CPU_CLR(cpu, &mut away) };
            // SAFETY: as above, read only.
            if unsafe { libc::CPU_COUNT(&away) } == 0 {
                return None;
            }
            // SAFETY: `away` is a valid cpu_set_t of `size` bytes for the call.
            if unsafe { libc::sched_setaffinity(tid, size, &away) } != 0 {
                return None;
            }
            drop(guard);
            Some(StepAside { inner, tid, saved })
        }
    }

    impl Drop for StepAside {
        fn drop(&mut self) {
            // A copier exiting clears the id under this lock before its thread ends, so while
            // the lock is held and the id is the same, the id is still the copier's.
            let guard = lock(&self.inner.copier_tid);
            if *guard != self.tid {
                return;
            }
            let size = std::mem::size_of::<libc::cpu_set_t>();
            // SAFETY: `saved` is the valid cpu_set_t read in `new`.
            unsafe { libc::sched_setaffinity(self.tid, size, &self.saved) };
        }
    }

    impl Arming<'_> {
        /// Write-protects the whole pages inside `addr..addr + len`, and returns them; `None`
        /// (nothing protected) when they are fewer than [`PROTECT_MIN`] bytes, overlap a range
        /// of this save, or the kernel refuses (memory that is not anonymous, say).
        pub(crate) fn protect(&mut self, addr: usize, len: usize) -> Option<Range<usize>> {
            let page = self.p.inner.page;
            let start = addr.checked_add(page - 1)? & !(page - 1);
            let end = addr.checked_add(len)? & !(page - 1);
            if end <= start || end - start < PROTECT_MIN {
                return None;
            }
            let r = start..end;
            if self
                .protected
                .iter()
                .any(|p| p.start < r.end && r.start < p.end)
            {
                return None;
            }
            if !self.private_anonymous(&r) {
                return None;
            }
            match self.p.inner.register_protect(&r) {
                Ok(()) => {
                    self.protected.push(r.clone());
                    self.unpushed.push(r.clone());
                    Some(r)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "ckptio: cannot write-protect a tensor; copying it");
                    None
                }
            }
        }

        /// Whether `r` lies in private anonymous mappings only: the protection is per process
        /// page table, so shared memory (memfd, `/dev/shm`, `MAP_SHARED`) could still be
        /// written through another mapping or by another process, and file mappings cannot be
        /// protected. Asked of the kernel mapping by mapping (`PROCMAP_QUERY`, Linux 6.11), or
        /// else read from `/proc/self/maps` once per save.
        fn private_anonymous(&mut self, r: &Range<usize>) -> bool {
            if let Some(answer) = self
                .p
                .inner
                .maps
                .as_ref()
                .and_then(|m| query_private_anonymous(m, r))
            {
                return answer;
            }
            if self.maps.is_none() {
                self.maps = Some(read_private_anonymous_maps());
            }
            let maps = self.maps.as_deref().unwrap_or(&[]);
            let mut at = r.start;
            // Sorted by start: walk the mappings that cover `r`, which must be contiguous.
            let i = maps.partition_point(|m| m.end <= at);
            for m in &maps[i..] {
                if m.start > at {
                    return false;
                }
                at = m.end;
                if at >= r.end {
                    return true;
                }
            }
            false
        }

        /// Hands the copy of `range` (from [`Arming::protect`]) to the copier, which starts
        /// on it at once: its bytes go to `dst` (exactly as long), `on_progress` hears how many
        /// bytes from its start are copied as that grows, then `on_copied` runs on the copier
        /// thread. `keep` keeps the range mapped until then. (If the copier is gone, the copy
        /// is made here, before this returns.)
        ///
        /// # Safety
        /// `dst` must be valid for writes of the range's length until `on_copied` has run (or
        /// been dropped), and nothing else may access it meanwhile.
        pub(crate) unsafe fn push(
            &mut self,
            range: Range<usize>,
            dst: *mut u8,
            keep: Box<dyn Send>,
            on_progress: Box<dyn Fn(usize) + Send>,
            on_copied: Box<dyn FnOnce() + Send>,
        ) {
            let Some(at) = self.unpushed.iter().position(|r| *r == range) else {
                // Not a range this save protected: nothing to copy from safely.
                debug_assert!(false, "push of a range that was not protected");
                return;
            };
            self.unpushed.swap_remove(at);
            let base = range.start & !(CHUNK - 1);
            let chunks = (range.end - base).div_ceil(CHUNK);
            let item = Item {
                range,
                base,
                dst: Dst(dst),
                copied: vec![false; chunks],
                left: chunks,
                prefix: 0,
                on_progress,
                on_copied: Some(on_copied),
                _keep: keep,
            };
            let inner = &self.p.inner;
            let mut st = lock(&inner.state);
            if st.phase == Phase::Dead {
                drop(st);
                item.copy_here(inner);
                return;
            }
            st.incoming.push(item);
            self.pushed = true;
            drop(st);
            inner.notify();
        }

        /// Says every range has been handed over; `on_done` runs on the copier thread once
        /// they are all copied.
        pub(crate) fn submit(mut self, on_done: Box<dyn FnOnce() + Send>) {
            self.seal(Some(on_done));
        }

        /// Lifts the protections not handed over and ends the save's job.
        fn seal(&mut self, on_done: Option<OnDone>) {
            if self.submitted {
                return;
            }
            self.submitted = true;
            // The copier may use every CPU again.
            self.step_aside = None;
            for r in std::mem::take(&mut self.unpushed) {
                self.p.inner.unregister(&r);
            }
            let inner = &self.p.inner;
            let mut st = lock(&inner.state);
            if st.phase == Phase::Dead || !self.pushed {
                if st.phase == Phase::Arming {
                    st.phase = Phase::Idle;
                }
                // Nothing for the copier: nothing was handed over (ranges pushed once the
                // copier was gone were copied on this thread), or the copier died and dropped
                // what was (lifting its protection; those storages fail as abandoned, and the
                // write with them). Either way the snapshot is as done as it will be.
                drop(st);
                inner.idle.notify_all();
                inner.notify();
                if let Some(f) = on_done {
                    f();
                }
                return;
            }
            st.phase = Phase::Copying;
            st.sealed = Some(on_done);
            drop(st);
            inner.idle.notify_all();
            inner.notify();
        }
    }

    impl Drop for Arming<'_> {
        fn drop(&mut self) {
            self.seal(None);
        }
    }

    /// Whether `r` lies in private anonymous mappings only, by `PROCMAP_QUERY`; `None`
    /// where the kernel does not answer that query.
    fn query_private_anonymous(maps: &std::fs::File, r: &Range<usize>) -> Option<bool> {
        let mut at = r.start;
        while at < r.end {
            let mut q = ProcmapQuery {
                size: std::mem::size_of::<ProcmapQuery>() as u64,
                query_addr: at as u64,
                ..ProcmapQuery::default()
            };
            // SAFETY: `q` is the `repr(C)` struct PROCMAP_QUERY reads and writes, with its
            // size set and no name or build-id buffers asked for.
            let rc = unsafe {
                libc::ioctl(
                    maps.as_raw_fd(),
                    PROCMAP_QUERY as _,
                    &mut q as *mut ProcmapQuery,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    // No mapping there.
                    Some(libc::ENOENT) => Some(false),
                    _ => None,
                };
            }
            let private_rw = q.vma_flags & (QUERY_WRITABLE | QUERY_SHARED) == QUERY_WRITABLE;
            if !private_rw || q.inode != 0 || q.vma_start > at as u64 || q.vma_end <= at as u64 {
                return Some(false);
            }
            at = q.vma_end as usize;
        }
        Some(true)
    }

    /// The process's private anonymous mappings (`rw-p`, no file; the heap and `malloc`'s
    /// mappings), sorted by address; empty when `/proc/self/maps` cannot be read.
    fn read_private_anonymous_maps() -> Vec<Range<usize>> {
        let Ok(text) = std::fs::read_to_string("/proc/self/maps") else {
            return Vec::new();
        };
        let mut out: Vec<Range<usize>> = Vec::new();
        for line in text.lines() {
            let mut f = line.split_ascii_whitespace();
            let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            let name = f.next().unwrap_or("");
            let anonymous =
                inode == "0" && (name.is_empty() || name == "[heap]" || name.starts_with("[anon:"));
            if !anonymous || !perms.starts_with("rw") || perms.as_bytes().get(3) != Some(&b'p') {
                continue;
            }
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                out.push(a..b);
            }
        }
        out.sort_by_key(|r| r.start);
        out
    }

    /// Marks the copier dead if it unwinds, so saves copy instead of waiting for it.
    struct DeadOnExit(Arc<Inner>);

    impl Drop for DeadOnExit {
        fn drop(&mut self) {
            // Its thread id may soon be another thread's.
            *lock(&self.0.copier_tid) = 0;
            let mut st = lock(&self.0.state);
            st.phase = Phase::Dead;
            // Ranges handed over but never taken: dropping them in a job lifts their
            // protection.
            let mut job = Job::new(self.0.clone());
            job.add(std::mem::take(&mut st.incoming));
            let sealed = st.sealed.take();
            drop(st);
            drop(job);
            drop(sealed);
            self.0.idle.notify_all();
        }
    }

    use crate::huge::HUGE;
    /// Attempts on one huge page's worth of memory before giving up on it.
    const COLLAPSE_TRIES: u8 = 2;

    /// Between saves, asks the kernel to back the tensors the last two saves both protected
    /// (same range) with transparent huge pages, 2 MiB block by block (`MADV_COLLAPSE`):
    /// protecting memory costs page-table work per page, and a huge page is one entry where
    /// 4 KiB pages are 512 (`docs/benchmarks.md` has the protected stall with and without).
    /// Only blocks that lie wholly inside a tensor are asked for, so no
    /// memory outside the tensors is made resident (pages of a tensor never written, which
    /// read as zeros without taking memory, are); the contents never change, only how they
    /// are mapped.
    /// The work (a copy of each block, once) runs on the copier thread while no save is being
    /// protected or copied, one block at a time. A block is asked for once while it stays
    /// saved (memory freed and allocated again at the same address is not asked for again:
    /// a loop that makes new tensors for each save would pay the copy again and again).
    /// Blocks the kernel refuses twice (no huge page free, a mapping that may not have them,
    /// a kernel without `MADV_COLLAPSE`) are not asked for again either.
    struct Collapse {
        on: bool,
        counters: Arc<super::ProtectCounters>,
        /// The ranges of the last save copied.
        last: Vec<Range<usize>>,
        /// Blocks (their start) to ask for.
        todo: VecDeque<usize>,
        /// What became of blocks asked for, while they are saved: [`COLLAPSED`], or how many
        /// times the kernel refused.
        asked: std::collections::HashMap<usize, u8>,
    }

    /// A block the kernel has collapsed.
    const COLLAPSED: u8 = u8::MAX;

    /// A call that took longer than this (the kernel had to reclaim or compact memory to find
    /// a huge page) ends the requests until the next save: the copier serves no page fault
    /// meanwhile.
    const COLLAPSE_SLOW: std::time::Duration = std::time::Duration::from_millis(20);

    impl Collapse {
        fn new(on: bool, counters: Arc<super::ProtectCounters>) -> Collapse {
            Collapse {
                on: on && crate::huge::allowed(),
                counters,
                last: Vec::new(),
                todo: VecDeque::new(),
                asked: std::collections::HashMap::new(),
            }
        }

        /// A save that protected `ranges` is copied: queues the blocks of those it shares
        /// with the save before.
        fn saved(&mut self, ranges: Vec<Range<usize>>) {
            if !self.on {
                return;
            }
            self.todo.clear();
            let last: std::collections::HashSet<_> = self.last.iter().cloned().collect();
            for r in ranges.iter().filter(|r| last.contains(r)) {
                for b in crate::huge::blocks(r) {
                    if self.asked.get(&b).is_none_or(|&n| n < COLLAPSE_TRIES) {
                        self.todo.push_back(b);
                    }
                }
            }
            let mut sorted = ranges.clone();
            sorted.sort_unstable_by_key(|r| r.start);
            self.asked.retain(|&b, _| {
                let k = sorted.partition_point(|r| r.start <= b);
                k > 0 && b + HUGE <= sorted[k - 1].end
            });
            self.last = ranges;
        }

        /// Asks for one block; false when none is left.
        fn step(&mut self) -> bool {
            let Some(b) = self.todo.pop_front() else {
                return false;
            };
            let t = std::time::Instant::now();
            // On the copier thread only, never while the copier lifts part of a block's
            // protection (the kernel refuses to collapse a block any of whose pages is
            // write-protected; a protection lifted halfway through would defeat that).
            let r = crate::huge::collapse(b);
            let n = self.asked.entry(b).or_insert(0);
            match r {
                Ok(()) => {
                    *n = COLLAPSED;
                    self.counters.huge_collapsed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::trace!(error = %e, block = b, "ckptio: no huge page for a block");
                    *n += 1;
                    self.counters.huge_refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            if t.elapsed() > COLLAPSE_SLOW {
                // The rest waits for the next save, when memory may be freer.
                self.todo.clear();
            }
            true
        }
    }

    fn copier(inner: Arc<Inner>) {
        let _dead = DeadOnExit(inner.clone());
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        *lock(&inner.copier_tid) = tid;
        let mut job: Option<Job> = None;
        let mut collapse = Collapse::new(inner.huge_pages, inner.counters.clone());
        // Faults on ranges being set up, served once they are handed over.
        let mut early: VecDeque<usize> = VecDeque::new();
        loop {
            while let Some(addr) = inner.next_fault() {
                if !job.as_mut().is_some_and(|j| j.fault(addr)) {
                    early.push_back(addr);
                }
            }
            let Some(arming) = take_handed_over(&inner, &mut job) else {
                for addr in early.drain(..) {
                    inner.release_page(addr);
                }
                return;
            };
            if let Some(j) = job.as_mut() {
                j.set_hold(arming);
            }
            serve_early_faults(&inner, &mut job, &mut early);
            if let Some(j) = job.as_mut() {
                if j.step() {
                    continue;
                }
                if j.sealed {
                    let on_done = j.on_done.take();
                    let ranges: Vec<_> = j.items.iter().map(|i| i.range.clone()).collect();
                    job = None;
                    // Idle before telling anyone: whoever hears may save again at once.
                    let mut st = lock(&inner.state);
                    if st.phase == Phase::Copying {
                        st.phase = Phase::Idle;
                    }
                    drop(st);
                    inner.idle.notify_all();
                    if let Some(f) = on_done {
                        f();
                    }
                    collapse.saved(ranges);
                    continue;
                }
            } else if !arming && collapse.step() {
                continue;
            }
            inner.sleep();
        }
    }

    /// Moves the ranges a save has handed over (and its seal) into the copier's job; returns
    /// whether a save is still protecting ranges, or `None` when the copier should exit (it
    /// was asked to stop and holds no job).
    fn take_handed_over(inner: &Arc<Inner>, job: &mut Option<Job>) -> Option<bool> {
        let mut st = lock(&inner.state);
        let incoming = std::mem::take(&mut st.incoming);
        let sealed = st.sealed.take();
        if !incoming.is_empty() || sealed.is_some() {
            let j = job.get_or_insert_with(|| Job::new(inner.clone()));
            j.add(incoming);
            if let Some(on_done) = sealed {
                j.sealed = true;
                j.on_done = on_done;
            }
        } else if job.is_none() && st.stop_requested {
            return None;
        }
        Some(st.phase == Phase::Arming)
    }

    /// Serves the faults that came before their range was handed over; those on no range of
    /// the job are stale, and lifted once no save can be protecting them.
    fn serve_early_faults(inner: &Inner, job: &mut Option<Job>, early: &mut VecDeque<usize>) {
        if early.is_empty() {
            return;
        }
        let mut stale = Vec::new();
        for addr in std::mem::take(early) {
            if !job.as_mut().is_some_and(|j| j.fault(addr)) {
                stale.push(addr);
            }
        }
        if stale.is_empty() {
            return;
        }
        // Decided under the lock: a save that arms after the phase was read may protect these
        // pages again, and must not have them lifted; and ranges handed over since the job
        // took `incoming` are not in the job yet (they are served once it takes them, next
        // time round).
        let st = lock(&inner.state);
        if st.phase == Phase::Arming || !st.incoming.is_empty() {
            early.extend(stale);
        } else {
            // Stale: nothing of this copier's is protected there any more (every range handed
            // over is in the job), and no save can protect anything while the lock is held.
            // Lift whatever protection is left on the page (one a failed unregister left
            // behind), then wake the writer.
            for addr in stale {
                inner.release_page(addr);
            }
        }
    }

    pub(crate) fn check() -> io::Result<()> {
        open_uffd().map(drop)
    }

    const _: () = assert!(PROTECT_MIN >= 4096);

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::huge::{huge_kib, kernel_collapses};

        fn map(flags: libc::c_int) -> Range<usize> {
            map_len(flags, 4 << 20)
        }

        fn map_len(flags: libc::c_int, len: usize) -> Range<usize> {
            // SAFETY: a fresh anonymous mapping; never unmapped (a test).
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            p as usize..p as usize + len
        }

        #[test]
        fn only_private_anonymous_memory_passes_both_checks() {
            let private = map(libc::MAP_PRIVATE);
            let shared = map(libc::MAP_SHARED);
            let maps = read_private_anonymous_maps();
            let covered =
                |r: &Range<usize>| maps.iter().any(|m| m.start <= r.start && r.end <= m.end);
            assert!(covered(&private));
            assert!(!covered(&shared));
            let f = std::fs::File::open("/proc/self/maps").unwrap();
            match query_private_anonymous(&f, &private) {
                Some(ok) => {
                    assert!(ok);
                    assert_eq!(query_private_anonymous(&f, &shared), Some(false));
                    assert_eq!(query_private_anonymous(&f, &(8..4096)), Some(false));
                }
                None => eprintln!("PROCMAP_QUERY not available: /proc/self/maps is read instead"),
            }
        }

        fn affinity(tid: i32) -> libc::cpu_set_t {
            // SAFETY: a zeroed cpu_set_t is valid; the call writes at most its size.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::cpu_set_t>();
            // SAFETY: as above.
            assert_eq!(unsafe { libc::sched_getaffinity(tid, size, &mut set) }, 0);
            set
        }

        fn count(set: &libc::cpu_set_t) -> i32 {
            // SAFETY: a valid set, read only.
            unsafe { libc::CPU_COUNT(set) }
        }

        #[test]
        fn while_a_save_protects_ranges_the_copier_keeps_off_its_cpu_and_gets_it_back_after() {
            let Ok(p) = Protector::start(Arc::default(), true) else {
                crate::testing::skip(
                    "while_a_save_protects_ranges_the_copier_keeps_off_its_cpu_and_gets_it_back_after",
                    "userfaultfd",
                    "write protection is not available here",
                );
                return;
            };
            let tid = loop {
                let tid = *lock(&p.inner.copier_tid);
                if tid > 0 {
                    break tid;
                }
                std::thread::yield_now();
            };
            let before = affinity(tid);
            if count(&before) < 2 {
                eprintln!("one CPU: the copier has nowhere else to go");
                return;
            }
            let arming = p.arm(true).expect("no other save is arming");
            let during = affinity(tid);
            assert_eq!(
                count(&during),
                count(&before) - 1,
                "one CPU, the caller's, is taken"
            );
            drop(arming);
            let after = affinity(tid);
            // SAFETY: valid sets, read only.
            assert!(
                unsafe { libc::CPU_EQUAL(&before, &after) },
                "given back as it was"
            );
        }

        /// A send-able address, for the test threads.
        #[derive(Clone, Copy)]
        struct Addr(usize);

        #[test]
        fn a_write_to_a_range_copied_while_the_save_still_protects_others_goes_ahead_at_once() {
            let Ok(p) = Protector::start(Arc::default(), true) else {
                crate::testing::skip(
                    "a_write_to_a_range_copied_while_the_save_still_protects_others_goes_ahead_at_once",
                    "userfaultfd",
                    "write protection is not available here",
                );
                return;
            };
            let live = map(libc::MAP_PRIVATE);
            let len = live.end - live.start;
            // SAFETY: the fresh mapping of `len` bytes made above; no one else uses it yet.
            unsafe { std::ptr::write_bytes(live.start as *mut u8, 7, len) };
            let mut dst = vec![0u8; len];
            let (copied_tx, copied_rx) = std::sync::mpsc::channel();
            // SAFETY: `dst` outlives the copy: this test waits for it to be published before
            // reading or dropping `dst`.
            let (arming, published_rx) = unsafe {
                protect_and_push(
                    &p,
                    &live,
                    &mut dst,
                    Box::new(move |n| {
                        if n == len {
                            let _ = copied_tx.send(());
                        }
                    }),
                )
            };
            // The copier copies the range while the save is still arming (it could protect
            // more ranges): the copy is done, its protection may still be held.
            copied_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the copier copies a range as soon as it is handed over");
            let at = Addr(live.start + len / 2);
            let (wrote_tx, wrote_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let at = at;
                // SAFETY: inside the mapping, which stays mapped; the test reads it only
                // after this write is reported.
                unsafe { std::ptr::write_volatile(at.0 as *mut u8, 9) };
                let _ = wrote_tx.send(());
            });
            // The write must not wait for the save to finish arming.
            let went_ahead = wrote_rx.recv_timeout(std::time::Duration::from_secs(10));
            arming.submit(Box::new(|| {}));
            went_ahead.expect("a write to a copied range goes ahead while the save arms");
            published_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the copy is published");
            assert!(
                dst.iter().all(|&b| b == 7),
                "the copy holds the bytes before the write"
            );
            // SAFETY: the write above is over (reported), and nobody writes the mapping now.
            let now = unsafe { std::ptr::read_volatile(at.0 as *const u8) };
            assert_eq!(now, 9);
        }

        /// Starts a save that protects `live` (a mapping that is never unmapped) and hands it
        /// to the copier, which copies it into `dst`; the receiver hears when the copy is
        /// published.
        ///
        /// # Safety
        /// `dst` must outlive the copy: the caller waits for the receiver before it reads or
        /// drops `dst`.
        unsafe fn protect_and_push<'p>(
            p: &'p Protector,
            live: &Range<usize>,
            dst: &mut [u8],
            on_progress: Box<dyn Fn(usize) + Send>,
        ) -> (Arming<'p>, std::sync::mpsc::Receiver<()>) {
            assert_eq!(dst.len(), live.end - live.start);
            let mut arming = p.arm(true).expect("no other save is arming");
            let range = arming
                .protect(live.start, live.end - live.start)
                .expect("private memory is protected");
            assert_eq!(&range, live);
            let (published_tx, published_rx) = std::sync::mpsc::channel();
            // SAFETY: `dst` is as long as the range and outlives the copy (the caller's
            // promise); the mapping is never unmapped.
            unsafe {
                arming.push(
                    range,
                    dst.as_mut_ptr(),
                    Box::new(()),
                    on_progress,
                    Box::new(move || {
                        let _ = published_tx.send(());
                    }),
                );
            }
            (arming, published_rx)
        }

        /// One protected save of `live` into `dst`; `after` runs once `save` has returned
        /// (the range is protected), before the copy is waited for.
        fn save_once(p: &Protector, live: &Range<usize>, dst: &mut [u8], after: impl FnOnce()) {
            // SAFETY: this waits for the copy to be published before it returns.
            let (arming, published_rx) =
                unsafe { protect_and_push(p, live, dst, Box::new(|_| {})) };
            arming.submit(Box::new(|| {}));
            after();
            published_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the copy is published");
        }

        #[test]
        fn a_range_saved_twice_in_place_gets_huge_pages_and_later_saves_still_hold_their_bytes() {
            let counters: Arc<super::super::ProtectCounters> = Arc::default();
            let Ok(p) = Protector::start(counters.clone(), true) else {
                crate::testing::skip(
                    "a_range_saved_twice_in_place_gets_huge_pages_and_later_saves_still_hold_their_bytes",
                    "userfaultfd",
                    "write protection is not available here",
                );
                return;
            };
            // 16 MiB that start 1 MiB past a huge page boundary: huge pages do not line up with
            // the range's start, and chunks counted from it would not line up with them.
            let map = map_len(libc::MAP_PRIVATE, 20 << 20);
            let at = map.start.next_multiple_of(HUGE) + (1 << 20);
            let live = at..at + (16 << 20);
            let len = live.end - live.start;
            // SAFETY: inside the fresh mapping; nobody else uses it yet.
            unsafe { std::ptr::write_bytes(live.start as *mut u8, 7, len) };
            let huge_at_start = huge_kib(&map);
            let mut dst = vec![0u8; len];
            save_once(&p, &live, &mut dst, || {});
            save_once(&p, &live, &mut dst, || {});
            // Every 2 MiB block wholly inside the range, and nothing outside it.
            let blocks = (live.end / HUGE - live.start.div_ceil(HUGE)) as u64;
            let all = blocks * (HUGE as u64 / 1024);
            // The copier asks for huge pages, block by block, once it is idle after the second
            // save.
            let t = std::time::Instant::now();
            while huge_kib(&map) < all && t.elapsed().as_secs() < 10 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let huge = huge_kib(&map);
            let checked = huge_at_start == 0 && (huge > 0 || kernel_collapses());
            if huge_at_start > 0 {
                eprintln!("the kernel gave this mapping huge pages by itself: not checked");
            } else if !checked {
                // A kernel without MADV_COLLAPSE, THP turned off, or no huge page free:
                // allowed, but say so.
                eprintln!("no huge pages to be had here: only the copies are checked");
            } else {
                // Blocks wholly inside the range only; all of them unless memory ran short.
                assert!(
                    huge > 0,
                    "a kernel that gives huge pages was asked for none"
                );
                assert!(
                    huge <= all,
                    "only blocks inside the range: {huge} KiB > {all} KiB"
                );
                // Counted as the kernel did them, each block once (the count follows each
                // call's return, so it may trail what smaps shows for a moment).
                let seen = huge / (HUGE as u64 / 1024);
                let count = || counters.huge_collapsed.load(Ordering::Relaxed);
                let t = std::time::Instant::now();
                while count() < seen && t.elapsed().as_secs() < 2 {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                // (At least one: khugepaged may have collapsed some blocks by itself.)
                assert!(
                    (1..=blocks).contains(&count()),
                    "{} counted, {seen} seen, {blocks} blocks",
                    count()
                );
            }
            // A third save, now protecting huge pages: writes right after it, in the middle
            // of a huge page and at the range's ends, wait for their copy.
            for at in [live.start, live.start + len / 2 + 12345, live.end - 1] {
                let at = Addr(at);
                save_once(&p, &live, &mut dst, move || {
                    let at = at;
                    // SAFETY: inside the mapping, which stays mapped.
                    unsafe { std::ptr::write_volatile(at.0 as *mut u8, 9) };
                });
                assert!(
                    dst.iter().all(|&b| b == 7),
                    "the copy holds the bytes before the write"
                );
                // SAFETY: as above; the write is over.
                unsafe { std::ptr::write_volatile(at.0 as *mut u8, 7) };
            }
            if checked {
                // Chunks line up with huge pages: lifting their protection split none (khugepaged
                // may have collapsed more blocks meanwhile, never fewer).
                let now = huge_kib(&map);
                assert!(
                    now >= huge,
                    "the huge pages are still whole: {now} KiB, was {huge}"
                );
            }
        }
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod imp {
    use std::io;
    use std::ops::Range;
    use std::sync::Arc;

    /// Write protection needs Linux's userfaultfd: never available here.
    pub(crate) struct Protector(());

    impl Protector {
        pub(crate) fn start(
            _counters: Arc<super::ProtectCounters>,
            _huge_pages: bool,
        ) -> io::Result<Protector> {
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
        pub(crate) fn arm(&self, _block: bool) -> Option<Arming<'_>> {
            None
        }
    }

    pub(crate) struct Arming<'a>(&'a Protector);

    impl Arming<'_> {
        pub(crate) fn protect(&mut self, _addr: usize, _len: usize) -> Option<Range<usize>> {
            None
        }
        pub(crate) unsafe fn push(
            &mut self,
            _range: Range<usize>,
            _dst: *mut u8,
            _keep: Box<dyn Send>,
            _on_progress: Box<dyn Fn(usize) + Send>,
            _on_copied: Box<dyn FnOnce() + Send>,
        ) {
        }
        pub(crate) fn submit(self, _on_done: Box<dyn FnOnce() + Send>) {}
    }

    pub(crate) fn check() -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "write protection needs Linux's userfaultfd",
        ))
    }
}

pub(crate) use imp::{Arming, Protector};

/// Whether this process can take write-protected Eager snapshots
/// ([`Builder::write_protect`](super::Builder::write_protect)), or why not: another OS, a
/// kernel older than 6.4, or no permission to use `userfaultfd` (it needs `CAP_SYS_PTRACE`,
/// `vm.unprivileged_userfaultfd = 1`, or read-write access to `/dev/userfaultfd`).
pub fn write_protect_available() -> std::io::Result<()> {
    imp::check()
}
