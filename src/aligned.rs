//! Page-aligned host buffers: the staging pool's memory and the direct-I/O write buffer.
//!
//! Direct I/O (`O_DIRECT`) needs the memory it writes from to start on a block boundary; a
//! buffer that starts on a page (4096 bytes) satisfies every block size in use. Staging buffers
//! are page-aligned so that the storages copied into them can go to the disk with no second copy.

/// The alignment of every [`AlignedBuf`], and the granule of direct I/O.
pub(crate) const PAGE: usize = 4096;

/// One page; the unit an [`AlignedBuf`] is allocated in.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; PAGE]);

/// A heap buffer of `len` bytes whose first byte is page-aligned. Every page is written when it
/// is created, so its first use does not pay page faults.
pub(crate) struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl AlignedBuf {
    /// `len` bytes, each set to `fill`.
    pub(crate) fn filled(len: usize, fill: u8) -> AlignedBuf {
        AlignedBuf {
            pages: vec![Page([fill; PAGE]); len.div_ceil(PAGE)],
            len,
        }
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The bytes.
    #[allow(unsafe_code)]
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `Page` is `repr(C)` over a byte array with no padding (its size equals its
        // alignment), so the vector is `pages.len() * PAGE` initialised, contiguous bytes, and
        // `len <= pages.len() * PAGE`. The slice borrows `self`, which owns the vector.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len) }
    }

    /// The bytes, mutably.
    #[allow(unsafe_code)]
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees the slice is the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
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
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_page_and_hold_their_length() {
        for len in [0, 1, 4095, 4096, 4097, 3 << 20] {
            let mut b = AlignedBuf::filled(len, 9);
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
