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
}
