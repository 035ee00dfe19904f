//! Page-aligned host buffers: the staging pool's memory and the direct-I/O write buffer.
//!
//! Direct I/O (`O_DIRECT`) needs the memory it writes from to start on a block boundary; a
//! buffer that starts on a page (4096 bytes) satisfies every block size in use. Staging buffers
//! are page-aligned so that the storages copied into them can go to the disk with no second copy.

/// The alignment of every [`AlignedBuf`], and the granule of direct I/O.
pub(crate) const PAGE: usize = 4096;

/// Buffers at least this large start on a 2 MiB boundary and, on Linux, ask for transparent
/// huge pages: copying into them and writing them with direct I/O then walks 512 times fewer
/// page-table entries. (Only whole 2 MiB extents can be huge; the rest of the buffer, and all
/// of it where the kernel has no huge page to give, uses ordinary pages.)
pub(crate) const HUGE_MIN: usize = 4 << 20;
use crate::huge::HUGE;

/// Nothing, aligned like a page: the address of an empty [`AlignedBuf`].
#[repr(align(4096))]
struct PageAligned;

/// A heap buffer of `len` bytes whose first byte is page-aligned (2 MiB-aligned, with huge
/// pages asked for, from [`HUGE_MIN`] bytes). Every page is written when it is created, so its
/// first use does not pay page faults.
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// `None` for an empty buffer, which allocates nothing, and for a mapped one.
    layout: Option<std::alloc::Layout>,
    /// A buffer made by [`AlignedBuf::zeroed_lazy`]: the mapping's start and length.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    mapped: Option<(usize, usize)>,
}

// SAFETY: an `AlignedBuf` owns its allocation alone (like a `Vec<u8>`), and hands out slices
// under the usual borrow rules.
#[allow(unsafe_code)]
unsafe impl Send for AlignedBuf {}
// SAFETY: as above: shared access only reads.
#[allow(unsafe_code)]
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// The layout of a buffer of `len` (non-zero) bytes: whole pages, 2 MiB-aligned from
    /// [`HUGE_MIN`] bytes (and whether it is that large). Like `Vec`, a length no allocation
    /// can hold is a panic (the callers ask for the sizes of tensors in memory).
    fn layout(len: usize) -> (std::alloc::Layout, bool) {
        let huge = len >= HUGE_MIN;
        let align = if huge { HUGE } else { PAGE };
        let layout = len
            .div_ceil(PAGE)
            .checked_mul(PAGE)
            .and_then(|size| std::alloc::Layout::from_size_align(size, align).ok())
            .unwrap_or_else(|| panic!("a buffer of {len} bytes cannot be allocated"));
        (layout, huge)
    }

    /// `len` bytes, each set to `fill`.
    #[allow(unsafe_code)]
    pub(crate) fn filled(len: usize, fill: u8) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf {
                // A page-aligned address that is never read or written (the slices are empty).
                ptr: std::ptr::NonNull::<PageAligned>::dangling().cast(),
                len: 0,
                layout: None,
                mapped: None,
            };
        }
        let (layout, huge) = Self::layout(len);
        let size = layout.size();
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        #[cfg(target_os = "linux")]
        if huge {
            // SAFETY: advice on the allocation just made, whose `size` bytes are ours; it
            // changes how the kernel backs the memory, never its contents.
            unsafe { libc::madvise(raw.cast(), size, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: the allocation is `size` bytes, writable, and ours alone.
        unsafe { std::ptr::write_bytes(raw, fill, size) };
        AlignedBuf {
            ptr,
            len,
            layout: Some(layout),
            mapped: None,
        }
    }

    /// `len` zero bytes whose pages the kernel maps only when they are first written (on
    /// Linux; elsewhere, as [`AlignedBuf::filled`]): for a buffer that another thread fills,
    /// so that the page faults are that thread's time. Aligned like `filled`'s, with huge
    /// pages asked for likewise.
    #[allow(unsafe_code)]
    pub(crate) fn zeroed_lazy(len: usize) -> AlignedBuf {
        #[cfg(target_os = "linux")]
        if len > 0 {
            let (layout, huge) = Self::layout(len);
            let (size, align) = (layout.size(), layout.align());
            let map_len = size
                .checked_add(align - PAGE)
                .unwrap_or_else(|| panic!("a buffer of {len} bytes cannot be allocated"));
            // SAFETY: a new private anonymous mapping; no address is asked for.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                std::alloc::handle_alloc_error(layout);
            }
            // The first `align`-aligned address in the mapping: `size` bytes from it still lie
            // inside (the mapping is `align - PAGE` longer, and starts on a page).
            let skip = (base as usize).next_multiple_of(align) - base as usize;
            let start = base.cast::<u8>().wrapping_add(skip);
            let Some(ptr) = std::ptr::NonNull::new(start) else {
                std::alloc::handle_alloc_error(layout);
            };
            if huge {
                // SAFETY: advice on the mapping just made, whose `size` bytes from `start`
                // are ours; it changes how the kernel backs the memory, never its contents.
                unsafe { libc::madvise(start.cast(), size, libc::MADV_HUGEPAGE) };
            }
            return AlignedBuf {
                ptr,
                len,
                layout: None,
                mapped: Some((base as usize, map_len)),
            };
        }
        AlignedBuf::filled(len, 0)
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The bytes.
    #[allow(unsafe_code)]
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation holds `layout.size() >= len` initialised bytes (written in
        // `filled`; a mapping made by `zeroed_lazy` reads as zeros until written) and lives as
        // long as `self`, which the slice borrows; an empty buffer's pointer is dangling but
        // aligned and non-null, which an empty slice allows.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    #[allow(unsafe_code)]
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees the slice is the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            // SAFETY: allocated in `filled` with this very layout, and freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
        #[cfg(target_os = "linux")]
        if let Some((base, len)) = self.mapped {
            // SAFETY: the mapping `zeroed_lazy` made, unmapped once; nothing borrows it now.
            unsafe { libc::munmap(base as *mut libc::c_void, len) };
        }
    }
}

/// Buffers at least this large start on a page when ckptio allocates them for tensor bytes, so a
/// durable save can write them in place with direct I/O (the sink places storages of
/// [`PLACEMENT_MIN`](crate::sink::PLACEMENT_MIN) bytes or more).
const PAGE_START_MIN: usize = 1 << 20;

/// A zero-filled byte vector whose `len` bytes start on a page when `len` is large (up to
/// one page more is allocated, and the bytes start inside it). Like `vec![0; n]`, which it is,
/// the kernel maps its pages when first written, so allocating it costs no pass over the memory.
/// [`PageVec::into_bytes`] hands the bytes on without a copy.
pub(crate) struct PageVec {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageVec {
    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> PageVec {
        if len < PAGE_START_MIN {
            return PageVec {
                vec: vec![0; len],
                start: 0,
                len,
            };
        }
        let vec = vec![0u8; len + PAGE - 1];
        let start = (PAGE - vec.as_ptr() as usize % PAGE) % PAGE;
        PageVec { vec, start, len }
    }

    /// The bytes, mutably.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }

    /// The bytes, as [`Bytes`] over the same memory.
    pub(crate) fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from(self.vec).slice(self.start..self.start + self.len)
    }
}

/// A vector with room for `cap` bytes, holding the padding after which bytes pushed next start on a
/// page when `cap` is large; pass the padding length to `Bytes::slice` once filled.
pub(crate) fn page_start_vec(cap: usize) -> (Vec<u8>, usize) {
    if cap < PAGE_START_MIN {
        return (Vec::with_capacity(cap), 0);
    }
    let mut v = Vec::with_capacity(cap + PAGE - 1);
    let pad = (PAGE - v.as_ptr() as usize % PAGE) % PAGE;
    v.resize(pad, 0);
    (v, pad)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_page_and_hold_their_length() {
        for len in [0, 1, 4095, 4096, 4097, 3 << 20, HUGE_MIN, HUGE_MIN + 4097] {
            let mut b = AlignedBuf::filled(len, 9);
            if len >= HUGE_MIN {
                assert_eq!(b.as_slice().as_ptr() as usize % HUGE, 0, "{len}");
            }
            assert_eq!(b.len(), len);
            assert_eq!(b.as_slice().len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 9));
            if len > 0 {
                assert_eq!(b.as_slice().as_ptr() as usize % PAGE, 0);
                b.as_mut_slice()[len - 1] = 1;
                assert_eq!(b.as_slice()[len - 1], 1);
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    #[allow(unsafe_code)]
    fn a_lazy_buffer_takes_memory_only_as_it_is_written_and_reads_as_zeros() {
        // SAFETY: sysconf has no preconditions.
        let system_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        for len in [2 * system_page + 1, 3 << 20, HUGE_MIN + 4097] {
            let mut b = AlignedBuf::zeroed_lazy(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % PAGE, 0);
            if len >= HUGE_MIN {
                assert_eq!(b.as_slice().as_ptr() as usize % HUGE, 0, "{len}");
            }
            assert_eq!(
                resident(b.as_slice()),
                0,
                "nothing in memory before it is written"
            );
            b.as_mut_slice()[..PAGE].fill(7);
            b.as_mut_slice()[len - 1] = 8;
            assert!(resident(b.as_slice()) >= 2, "written pages are in memory");
            assert!(b.as_slice()[PAGE..len - 1].iter().all(|&x| x == 0));
            assert!(b.as_slice()[..PAGE].iter().all(|&x| x == 7));
        }
        assert_eq!(AlignedBuf::zeroed_lazy(0).len(), 0);
    }

    /// Pages of `b` in memory, by `mincore`.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    pub(crate) fn resident(b: &[u8]) -> usize {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut vec = vec![0u8; b.len().div_ceil(page)];
        // SAFETY: the slice's own pages (its start must be page-aligned), one byte per page.
        let r =
            unsafe { libc::mincore(b.as_ptr() as *mut libc::c_void, b.len(), vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&v| v & 1 == 1).count()
    }

    #[test]
    fn large_tensor_bytes_start_on_a_page_without_a_copy() {
        for len in [0, 100, PAGE_START_MIN, 3 * PAGE_START_MIN + 17] {
            let mut v = PageVec::zeroed(len);
            assert!(v.as_mut_slice().iter().all(|&x| x == 0));
            if len > 0 {
                v.as_mut_slice()[len - 1] = 5;
            }
            let p = v.as_mut_slice().as_ptr() as usize;
            let b = v.into_bytes();
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize, p, "no copy");
            if len >= PAGE_START_MIN {
                assert_eq!(p % PAGE, 0);
                assert_eq!(b[len - 1], 5);
            }
        }
        let (mut v, pad) = page_start_vec(PAGE_START_MIN);
        let base = v.as_ptr() as usize;
        v.extend(std::iter::repeat_n(1u8, PAGE_START_MIN));
        assert_eq!(v.as_ptr() as usize, base, "no reallocation");
        assert_eq!((base + pad) % PAGE, 0);
    }
}
