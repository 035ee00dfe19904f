//! Reading a checkpoint file into memory with its CRC-32s computed on the way.
//!
//! The file is read in fixed blocks by two threads, each hashing every block it reads right
//! after the read, while the block is still in the cache; an entry's CRC is then assembled from
//! the block CRCs (`crc32fast::Hasher::combine`) plus its partial first and last blocks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;

use crate::error::{Error, Result};

/// Size of a CRC block.
const BLOCK: usize = 4 << 20;

/// A file held in memory with the CRC-32 of each block of [`BLOCK`] bytes.
pub(crate) struct CheckedFile {
    pub(crate) data: Bytes,
    crcs: BlockCrcs,
}

/// The CRC-32 of each block of [`BLOCK`] bytes of a file, computed while it was read.
#[derive(Debug)]
pub(crate) struct BlockCrcs {
    blocks: Vec<crc32fast::Hasher>,
}

/// Reads `part` (block `first_block` onwards) into place, hashing each block right after its
/// read, while it is still in the cache, when `hash`.
fn read_part(
    file: &File,
    part: &mut [u8],
    first_block: usize,
    hash: bool,
) -> std::io::Result<Vec<crc32fast::Hasher>> {
    let mut out = Vec::with_capacity(part.len().div_ceil(BLOCK));
    for (k, chunk) in part.chunks_mut(BLOCK).enumerate() {
        file.read_exact_at(chunk, ((first_block + k) * BLOCK) as u64)?;
        let mut h = crc32fast::Hasher::new();
        if hash {
            h.update(chunk);
        }
        out.push(h);
    }
    Ok(out)
}

/// A failed read of the file at `path`: a file that ended early changed while it was read.
pub(crate) fn read_error(path: &Path, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            Error::format(path, "the file shrank while it was read")
        }
        _ => Error::io("read", path, e),
    }
}

/// The length of the file at `path`, as a `usize`.
pub(crate) fn file_len(file: &File, path: &Path) -> Result<usize> {
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    usize::try_from(len).map_err(|_| Error::format(path, "file is larger than the address space"))
}

/// Reads all of `file` into `buf` (exactly its length) on two threads, each hashing the blocks
/// it read when `hash`.
pub(crate) fn read_into(file: &File, path: &Path, buf: &mut [u8], hash: bool) -> Result<BlockCrcs> {
    let len = buf.len();
    let nblocks = len.div_ceil(BLOCK);
    // Two readers, each half of the file with positional reads: copying out of the page cache
    // is bound by one core's memcpy, and each block is hashed while it is still in the cache.
    let half = (nblocks.div_ceil(2) * BLOCK).min(len);
    let (a, b) = buf.split_at_mut(half);
    let (first, second) = std::thread::scope(|scope| {
        let second = scope.spawn(move || read_part(file, b, half / BLOCK, hash));
        let first = read_part(file, a, 0, hash);
        (first, second.join())
    });
    let second = second.map_err(|_| Error::format(path, "reader thread panicked"))?;
    let io = |e| read_error(path, e);
    let mut blocks = first.map_err(io)?;
    blocks.extend(second.map_err(io)?);
    Ok(BlockCrcs { blocks })
}

impl CheckedFile {
    /// Reads `path` on two threads, each hashing the blocks it reads when `hash`.
    pub(crate) fn read(path: &Path, hash: bool) -> Result<CheckedFile> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let len = file_len(&file, path)?;
        // Page-aligned, so the storages in it (64-byte aligned in the file) can be saved again
        // with direct I/O, in place.
        let mut page_vec = crate::aligned::PageVec::zeroed(len);
        let crcs = read_into(&file, path, page_vec.as_mut_slice(), hash)?;
        Ok(CheckedFile {
            data: page_vec.into_bytes(),
            crcs,
        })
    }

    /// The CRC-32 of `data[start..start + len]`.
    pub(crate) fn crc(&self, start: usize, len: usize) -> u32 {
        self.crcs.crc(&self.data, start, len)
    }
}

impl BlockCrcs {
    /// The CRC-32 of `data[start..start + len]`, where `data` is the file these blocks hashed.
    pub(crate) fn crc(&self, data: &[u8], start: usize, len: usize) -> u32 {
        let end = start + len;
        let mut h = crc32fast::Hasher::new();
        let mut pos = start;
        // Partial first block.
        let first_end = (start.div_ceil(BLOCK) * BLOCK).min(end);
        if pos < first_end {
            h.update(&data[pos..first_end]);
            pos = first_end;
        }
        // Whole blocks.
        while pos + BLOCK <= end {
            h.combine(&self.blocks[pos / BLOCK]);
            pos += BLOCK;
        }
        // Partial last block.
        if pos < end {
            h.update(&data[pos..end]);
        }
        h.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_block_crcs_equal_a_direct_crc() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..(3 * BLOCK + 12345))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let f = CheckedFile::read(&p, true).unwrap();
        assert_eq!(&f.data[..], &data[..]);
        for (s, l) in [
            (0, 0),
            (0, 10),
            (5, BLOCK),
            (BLOCK - 3, 2 * BLOCK + 9),
            (0, data.len()),
            (BLOCK, BLOCK),
        ] {
            assert_eq!(f.crc(s, l), crc32fast::hash(&data[s..s + l]), "{s} {l}");
        }
    }
}
