//! The zip container of `torch.save`: stored (uncompressed) entries whose data starts on a
//! 64-byte boundary, written in the exact shape PyTorch's `PyTorchStreamWriter` (miniz) uses:
//! local headers with general-purpose flags `0x0808` (data descriptor, UTF-8 names), an `FB`
//! padding extra field, a data descriptor after each entry, zip64 records when a size or an
//! offset reaches 4 GiB.
//!
//! The writer streams: entry data goes straight from the caller's buffers to the sink, with the
//! CRC-32 computed on the way; nothing is staged in memory. A sink that can write data with no
//! copy when it sits at a given offset (a [`FileSink`] with direct I/O) gets large entries
//! placed there: their `FB` padding grows (up to 4 KiB, still a multiple of 64 bytes), which
//! every zip reader, `torch.load` included, skips as it skips the usual padding.
//! The reader validates every size and offset against the archive length before use.

use std::io::{self, Write};

use crate::sink::{FileSink, PLACEMENT_MIN};

/// Alignment of entry data, as `torch.save` writes it (`.storage_alignment`).
pub(crate) const ALIGNMENT: u64 = 64;
const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const FLAGS: u16 = 0x0808;
const U32_MAX: u64 = 0xffff_ffff;
/// Entries at least this large get their CRC-32 computed on a second thread while written.
const PARALLEL_CRC_MIN: u64 = 8 << 20;

/// Where a [`ZipWriter`]'s bytes go: any [`Write`], and sinks that can write large entries
/// with no copy when their data is placed as they ask.
pub(crate) trait ZipSink: Write {
    /// `(granule, residue)`: `len` bytes of data at address `addr` are best written at a file
    /// offset equal to `residue` modulo `granule` (a multiple of 64); `None` for the usual
    /// 64-byte alignment.
    fn placement(&self, _addr: usize, _len: usize) -> Option<(u64, u64)> {
        None
    }
    /// Writes entry data.
    fn write_in_place(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data)
    }
}

impl ZipSink for &mut FileSink {
    fn placement(&self, addr: usize, len: usize) -> Option<(u64, u64)> {
        FileSink::placement_at(self, addr, len)
    }
    fn write_in_place(&mut self, data: &[u8]) -> io::Result<()> {
        FileSink::write_in_place(self, data)
    }
}

/// Any writer, with the usual 64-byte alignment.
pub(crate) struct Plain<W>(pub(crate) W);

impl<W: Write> Write for Plain<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> ZipSink for Plain<W> {}

struct CentralEntry {
    name: String,
    crc: u32,
    size: u64,
    offset: u64,
}

/// A streaming writer of a stored, 64-byte-aligned zip.
pub(crate) struct ZipWriter<W: ZipSink> {
    sink: W,
    pos: u64,
    entries: Vec<CentralEntry>,
    /// Sizes and offsets at or above this use zip64 fields (4 GiB; lowered only by tests).
    zip64_threshold: u64,
}

impl<W: ZipSink> ZipWriter<W> {
    pub(crate) fn new(sink: W) -> Self {
        ZipWriter {
            sink,
            pos: 0,
            entries: Vec::new(),
            zip64_threshold: U32_MAX,
        }
    }

    #[cfg(test)]
    pub(crate) fn with_zip64_threshold(mut self, t: u64) -> Self {
        self.zip64_threshold = t;
        self
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.sink.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn put_data(&mut self, b: &[u8]) -> io::Result<()> {
        self.sink.write_in_place(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Writes one entry whose data is the concatenation of `parts` (`size` bytes in all).
    pub(crate) fn entry<'b>(
        &mut self,
        name: &str,
        size: u64,
        parts: impl IntoIterator<Item = &'b [u8]>,
    ) -> io::Result<()> {
        let parts: Vec<&[u8]> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        let given: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if given != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("entry {name}: declared {size} bytes, given {given}"),
            ));
        }
        let place = parts.first().map(|p| (p.as_ptr() as usize, p.len()));
        // Where each part starts in the entry.
        let starts: Vec<usize> = parts
            .iter()
            .scan(0, |at, p| {
                let start = *at;
                *at += p.len();
                Some(start)
            })
            .collect();
        self.write_entry(
            name,
            size,
            place,
            |at| {
                // `at` is inside the entry, so some part starts at or before it.
                let i = starts.partition_point(|&s| s <= at) - 1;
                Ok(&parts[i][at - starts[i]..])
            },
            |e| e,
        )
    }

    /// Writes one entry of `size` bytes that will be at address `addr` and are still being
    /// filled front to back: `ready(at)` waits until some bytes from offset `at` on are in and
    /// returns them (at least one byte while `at < size`). Each piece is written, and hashed
    /// (on a second thread for a large entry), as soon as it is in. Errors of `ready` are
    /// returned as they are; the sink's go through `io_err`.
    pub(crate) fn entry_streamed<'b, E: Send>(
        &mut self,
        name: &str,
        size: u64,
        addr: usize,
        ready: impl Fn(usize) -> Result<&'b [u8], E> + Sync,
        io_err: impl Fn(io::Error) -> E + Sync,
    ) -> Result<(), E> {
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        self.write_entry(name, size, Some((addr, len)), ready, io_err)
    }

    /// Writes an entry: its header (data placed for `place`, the address and length of its
    /// first piece, when the sink asks), every piece `ready` gives from offset 0 to `size` as
    /// it comes, its CRC-32 (computed on a second thread while a large entry is written: the
    /// data descriptor that carries it comes after the data), and its data descriptor.
    fn write_entry<'b, E: Send>(
        &mut self,
        name: &str,
        size: u64,
        place: Option<(usize, usize)>,
        ready: impl Fn(usize) -> Result<&'b [u8], E> + Sync,
        io_err: impl Fn(io::Error) -> E + Sync,
    ) -> Result<(), E> {
        let size_usize = usize::try_from(size).map_err(|_| {
            io_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("entry {name}: {size} bytes do not fit in memory"),
            ))
        })?;
        let start = self.begin(name, size, place).map_err(&io_err)?;
        // Set when the write fails, so the hashing thread stops at its next piece.
        let failed = std::sync::atomic::AtomicBool::new(false);
        // Every piece from offset 0 to `size`, as it comes.
        let each = |f: &mut dyn FnMut(&[u8]) -> Result<(), E>| -> Result<(), E> {
            let mut at = 0;
            while at < size_usize {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                let piece = ready(at)?;
                if piece.is_empty() {
                    return Err(io_err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("entry {name}: no bytes at offset {at} of {size}"),
                    )));
                }
                let piece = &piece[..piece.len().min(size_usize - at)];
                f(piece)?;
                at += piece.len();
            }
            Ok(())
        };
        let crc = if size >= PARALLEL_CRC_MIN {
            std::thread::scope(|scope| -> Result<crc32fast::Hasher, E> {
                let hasher = scope.spawn(|| {
                    let mut h = crc32fast::Hasher::new();
                    each(&mut |p| {
                        h.update(p);
                        Ok(())
                    })
                    .map(|()| h)
                });
                let wrote = each(&mut |p| self.put_data(p).map_err(&io_err));
                if wrote.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                let h = hasher
                    .join()
                    .map_err(|_| io_err(io::Error::other("CRC thread panicked")))?;
                wrote?;
                h
            })?
        } else {
            let mut h = crc32fast::Hasher::new();
            each(&mut |p| {
                h.update(p);
                self.put_data(p).map_err(&io_err)
            })?;
            h
        };
        self.end(name, size, start, crc.finalize()).map_err(io_err)
    }

    /// Writes an entry's local header, its data placed for `place` (the address and length of
    /// its first piece) when the sink asks; returns the entry's offset.
    fn begin(&mut self, name: &str, size: u64, place: Option<(usize, usize)>) -> io::Result<u64> {
        let offset = self.pos;
        let big_size = size >= self.zip64_threshold;
        let big_offset = offset >= self.zip64_threshold;
        let mut zip64 = Vec::new();
        if big_size || big_offset {
            let mut payload = Vec::new();
            if big_size {
                payload.extend_from_slice(&size.to_le_bytes());
                payload.extend_from_slice(&size.to_le_bytes());
            }
            if big_offset {
                payload.extend_from_slice(&offset.to_le_bytes());
            }
            zip64.extend_from_slice(&1u16.to_le_bytes());
            zip64.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            zip64.extend_from_slice(&payload);
        }
        let start = offset + 30 + name.len() as u64 + zip64.len() as u64 + 4;
        let (granule, residue) = match place {
            Some((addr, len)) if size >= PLACEMENT_MIN as u64 => self
                .sink
                .placement(addr, len)
                .filter(|&(g, r)| g % ALIGNMENT == 0 && r % ALIGNMENT == 0 && r < g)
                .unwrap_or((ALIGNMENT, 0)),
            _ => (ALIGNMENT, 0),
        };
        let pad = (residue + granule - start % granule) % granule;
        let mut h = Vec::with_capacity(30 + name.len() + zip64.len() + 4 + pad as usize);
        h.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes()); // version needed (as torch writes it)
        h.extend_from_slice(&FLAGS.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes()); // stored
        h.extend_from_slice(&0u32.to_le_bytes()); // dos time + date
        h.extend_from_slice(&0u32.to_le_bytes()); // crc: in the data descriptor
        let local_size = if big_size { U32_MAX as u32 } else { 0 };
        h.extend_from_slice(&local_size.to_le_bytes());
        h.extend_from_slice(&local_size.to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&((zip64.len() as u64 + 4 + pad) as u16).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&zip64);
        h.extend_from_slice(b"FB");
        h.extend_from_slice(&(pad as u16).to_le_bytes());
        h.resize(h.len() + pad as usize, b'Z');
        self.put(&h)?;
        debug_assert_eq!(self.pos % ALIGNMENT, 0);
        Ok(offset)
    }

    /// Writes the data descriptor of the entry begun at `offset`, and records it.
    fn end(&mut self, name: &str, size: u64, offset: u64, crc: u32) -> io::Result<()> {
        let big_size = size >= self.zip64_threshold;
        let mut d = Vec::with_capacity(24);
        d.extend_from_slice(&DESCRIPTOR_SIG.to_le_bytes());
        d.extend_from_slice(&crc.to_le_bytes());
        if big_size {
            d.extend_from_slice(&size.to_le_bytes());
            d.extend_from_slice(&size.to_le_bytes());
        } else {
            d.extend_from_slice(&(size as u32).to_le_bytes());
            d.extend_from_slice(&(size as u32).to_le_bytes());
        }
        self.put(&d)?;
        self.entries.push(CentralEntry {
            name: name.to_owned(),
            crc,
            size,
            offset,
        });
        Ok(())
    }

    /// Writes the central directory and end records; returns the sink.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        let cd_start = self.pos;
        let entries = std::mem::take(&mut self.entries);
        for e in &entries {
            let big_size = e.size >= self.zip64_threshold;
            let big_offset = e.offset >= self.zip64_threshold;
            let mut extra = Vec::new();
            if big_size || big_offset {
                let mut payload = Vec::new();
                if big_size {
                    payload.extend_from_slice(&e.size.to_le_bytes());
                    payload.extend_from_slice(&e.size.to_le_bytes());
                }
                if big_offset {
                    payload.extend_from_slice(&e.offset.to_le_bytes());
                }
                extra.extend_from_slice(&1u16.to_le_bytes());
                extra.extend_from_slice(&(payload.len() as u16).to_le_bytes());
                extra.extend_from_slice(&payload);
            }
            let size32 = if big_size {
                U32_MAX as u32
            } else {
                e.size as u32
            };
            let off32 = if big_offset {
                U32_MAX as u32
            } else {
                e.offset as u32
            };
            let mut h = Vec::with_capacity(46 + e.name.len() + extra.len());
            h.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            let version = if extra.is_empty() { 0u16 } else { 45 };
            h.extend_from_slice(&version.to_le_bytes()); // made by
            h.extend_from_slice(&version.to_le_bytes()); // needed
            h.extend_from_slice(&FLAGS.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(&e.crc.to_le_bytes());
            h.extend_from_slice(&size32.to_le_bytes());
            h.extend_from_slice(&size32.to_le_bytes());
            h.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // comment
            h.extend_from_slice(&0u16.to_le_bytes()); // disk
            h.extend_from_slice(&0u16.to_le_bytes()); // internal attrs
            h.extend_from_slice(&0u32.to_le_bytes()); // external attrs
            h.extend_from_slice(&off32.to_le_bytes());
            h.extend_from_slice(e.name.as_bytes());
            h.extend_from_slice(&extra);
            self.put(&h)?;
        }
        let cd_size = self.pos - cd_start;
        let n = entries.len() as u64;
        let need64 = cd_start >= self.zip64_threshold
            || cd_size >= self.zip64_threshold
            || n >= 0xffff
            || entries
                .iter()
                .any(|e| e.size >= self.zip64_threshold || e.offset >= self.zip64_threshold);
        if need64 {
            let eocd64_at = self.pos;
            let mut r = Vec::with_capacity(56 + 20);
            r.extend_from_slice(&EOCD64_SIG.to_le_bytes());
            r.extend_from_slice(&44u64.to_le_bytes());
            r.extend_from_slice(&45u16.to_le_bytes());
            r.extend_from_slice(&45u16.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&n.to_le_bytes());
            r.extend_from_slice(&n.to_le_bytes());
            r.extend_from_slice(&cd_size.to_le_bytes());
            r.extend_from_slice(&cd_start.to_le_bytes());
            r.extend_from_slice(&EOCD64_LOCATOR_SIG.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&eocd64_at.to_le_bytes());
            r.extend_from_slice(&1u32.to_le_bytes());
            self.put(&r)?;
        }
        let mut r = Vec::with_capacity(22);
        r.extend_from_slice(&EOCD_SIG.to_le_bytes());
        r.extend_from_slice(&0u16.to_le_bytes());
        r.extend_from_slice(&0u16.to_le_bytes());
        let n16 = if need64 { 0xffff } else { n as u16 };
        r.extend_from_slice(&n16.to_le_bytes());
        r.extend_from_slice(&n16.to_le_bytes());
        let cs = if need64 {
            U32_MAX as u32
        } else {
            cd_size as u32
        };
        let co = if need64 {
            U32_MAX as u32
        } else {
            cd_start as u32
        };
        r.extend_from_slice(&cs.to_le_bytes());
        r.extend_from_slice(&co.to_le_bytes());
        r.extend_from_slice(&0u16.to_le_bytes());
        self.put(&r)?;
        self.sink.flush()?;
        Ok(self.sink)
    }
}

/// One entry of an archive being read.
#[derive(Clone, Debug)]
pub(crate) struct ZipEntry {
    pub(crate) name: String,
    /// Offset of the entry's local header in the archive.
    pub(crate) header_offset: u64,
    /// Offset of the data in the archive.
    pub(crate) data_offset: u64,
    pub(crate) size: u64,
    pub(crate) crc: u32,
}

/// Bytes of an archive that a directory parse may look at: all of it in memory, or a
/// [`Window`] of its first and last bytes.
pub(crate) trait ZipBytes {
    /// The archive's length.
    fn total_len(&self) -> usize;
    /// `n` bytes from `at`, or `None` when they are past the end (or outside the window).
    fn at(&self, at: usize, n: usize) -> Option<&[u8]>;
}

impl ZipBytes for [u8] {
    fn total_len(&self) -> usize {
        self.len()
    }
    fn at(&self, at: usize, n: usize) -> Option<&[u8]> {
        self.get(at..at.checked_add(n)?)
    }
}

/// The first and the last bytes of an archive of `len` bytes: enough to parse the directory of
/// an archive whose records, but for the last ones, are small (one `torch.save`d tensor), with
/// no read of its large storage record.
pub(crate) struct Window<'a> {
    pub(crate) head: &'a [u8],
    pub(crate) tail: &'a [u8],
    pub(crate) len: usize,
}

impl ZipBytes for Window<'_> {
    fn total_len(&self) -> usize {
        self.len
    }
    fn at(&self, at: usize, n: usize) -> Option<&[u8]> {
        let end = at.checked_add(n)?;
        let tail_start = self.len - self.tail.len();
        if end <= self.head.len() {
            self.head.get(at..end)
        } else if at >= tail_start && end <= self.len {
            self.tail.get(at - tail_start..end - tail_start)
        } else {
            None
        }
    }
}

/// Parses the central directory of `data`; every entry must be stored (uncompressed) and lie
/// inside the archive.
pub(crate) fn read_directory(data: &(impl ZipBytes + ?Sized)) -> Result<Vec<ZipEntry>, String> {
    let total = data.total_len();
    let len = total as u64;
    if len < 22 {
        return Err(format!("{len} bytes is too short for a zip archive"));
    }
    let magic = data.at(0, 4).ok_or("no archive start")?;
    if magic != b"PK\x03\x04" {
        let start = data.at(0, 2).unwrap_or(&[]);
        if start == b"PK" {
            return Err("zip archive with no local header at the start".into());
        }
        if start.len() == 2 && start[0] == 0x80 && start[1] <= 5 {
            return Err(
                "this is a legacy (pre-PyTorch 1.6) non-zip torch.save file, which ckptio does \
                 not read; re-save it with a recent torch.save"
                    .into(),
            );
        }
        return Err("not a zip archive (wrong magic number)".into());
    }
    // The end-of-central-directory record is in the last 64 KiB + 22 bytes.
    let search_from = total.saturating_sub(22 + 0xffff);
    let eocd = (search_from..=total - 22)
        .rev()
        .find(|&i| data.at(i, 4) == Some(&EOCD_SIG.to_le_bytes()[..]))
        .ok_or("no end-of-central-directory record (truncated file?)")?;
    let r = |at: usize, n: usize| -> Result<u64, String> {
        let b = data
            .at(at, n)
            .ok_or("record runs past the end of the file")?;
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    };
    let mut count = r(eocd + 10, 2)?;
    let mut cd_size = r(eocd + 12, 4)?;
    let mut cd_offset = r(eocd + 16, 4)?;
    if (count == 0xffff || cd_size == U32_MAX || cd_offset == U32_MAX) && eocd >= 20 {
        let loc = eocd - 20;
        if r(loc, 4)? == EOCD64_LOCATOR_SIG as u64 {
            let at = r(loc + 8, 8)?;
            let at = usize::try_from(at).map_err(|_| "zip64 record offset overflows")?;
            if r(at, 4)? != EOCD64_SIG as u64 {
                return Err("zip64 end record missing where the locator points".into());
            }
            count = r(at + 32, 8)?;
            cd_size = r(at + 40, 8)?;
            cd_offset = r(at + 48, 8)?;
        }
    }
    let cd_end = cd_offset
        .checked_add(cd_size)
        .ok_or("central directory size overflows")?;
    if cd_end > len {
        return Err(format!(
            "central directory at {cd_offset}+{cd_size} lies beyond the end of the {len}-byte file"
        ));
    }
    // Each central entry takes at least 46 bytes: the count cannot exceed what fits.
    if count > cd_size / 46 + 1 {
        return Err(format!(
            "{count} entries cannot fit a {cd_size}-byte central directory"
        ));
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut p = cd_offset as usize;
    for i in 0..count {
        if r(p, 4)? != CENTRAL_SIG as u64 {
            return Err(format!("central directory entry {i} has a bad signature"));
        }
        let method = r(p + 10, 2)?;
        let crc = r(p + 16, 4)? as u32;
        let mut csize = r(p + 20, 4)?;
        let mut usize_ = r(p + 24, 4)?;
        let name_len = r(p + 28, 2)? as usize;
        let extra_len = r(p + 30, 2)? as usize;
        let comment_len = r(p + 32, 2)? as usize;
        let mut local = r(p + 42, 4)?;
        let name_bytes = data.at(p + 46, name_len).ok_or("entry name past the end")?;
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| format!("entry {i} name is not UTF-8"))?;
        let extra = data
            .at(p + 46 + name_len, extra_len)
            .ok_or("entry extra field past the end")?;
        // zip64 extended information: only the fields that overflowed, in order.
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = u16::from_le_bytes([extra[e], extra[e + 1]]);
            let n = u16::from_le_bytes([extra[e + 2], extra[e + 3]]) as usize;
            let body = extra
                .get(e + 4..e + 4 + n)
                .ok_or("extra field runs past its entry")?;
            if id == 1 {
                let mut q = 0;
                let mut next = |cur: &mut u64| -> Result<(), String> {
                    if *cur == U32_MAX {
                        let b = body.get(q..q + 8).ok_or("zip64 field too short")?;
                        let mut a = [0u8; 8];
                        a.copy_from_slice(b);
                        *cur = u64::from_le_bytes(a);
                        q += 8;
                    }
                    Ok(())
                };
                next(&mut usize_)?;
                next(&mut csize)?;
                next(&mut local)?;
            }
            e += 4 + n;
        }
        if method != 0 {
            return Err(format!(
                "entry {name} is compressed (method {method}); torch.save archives are stored"
            ));
        }
        if csize != usize_ {
            return Err(format!(
                "entry {name}: stored sizes disagree ({csize} vs {usize_})"
            ));
        }
        let lp = usize::try_from(local).map_err(|_| "local header offset overflows")?;
        if r(lp, 4)? != LOCAL_SIG as u64 {
            return Err(format!("entry {name}: no local header at offset {local}"));
        }
        let lname = r(
            lp.checked_add(26).ok_or("local header offset overflows")?,
            2,
        )?;
        let lextra = r(lp + 28, 2)?;
        let data_offset = local + 30 + lname + lextra;
        let end = data_offset
            .checked_add(usize_)
            .ok_or("entry size overflows")?;
        if end > len {
            return Err(format!(
                "entry {name}: {usize_} bytes at offset {data_offset} run past the end of the \
                 {len}-byte file (truncated?)"
            ));
        }
        entries.push(ZipEntry {
            name,
            header_offset: local,
            data_offset,
            size: usize_,
            crc,
        });
        p += 46 + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(threshold: u64) -> Vec<u8> {
        let mut w = ZipWriter::new(Plain(Vec::new())).with_zip64_threshold(threshold);
        w.entry("a/data.pkl", 3, [&b"abc"[..]]).unwrap();
        w.entry("a/data/0", 7, [&b"xyz"[..], &b"1234"[..]]).unwrap();
        w.finish().unwrap().0
    }

    #[test]
    fn entries_are_aligned_and_read_back() {
        for threshold in [U32_MAX, 0] {
            let z = build(threshold);
            let d = read_directory(&z[..]).unwrap();
            assert_eq!(d.len(), 2);
            for e in &d {
                assert_eq!(e.data_offset % ALIGNMENT, 0, "{threshold}");
            }
            let e = &d[1];
            assert_eq!(&z[e.data_offset as usize..][..7], b"xyz1234");
            assert_eq!(e.crc, crc32fast::hash(b"xyz1234"));
        }
    }

    /// Test bytes: `len` of them, not all alike, `shift` bytes into a page-aligned buffer (64-byte
    /// aligned but not page-aligned, like a tensor inside an allocation).
    fn shifted(len: usize, shift: usize) -> crate::aligned::AlignedBuf {
        let mut mem = crate::aligned::AlignedBuf::filled(len + shift, 0);
        for (i, b) in mem.as_mut_slice()[shift..].iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        mem
    }

    #[test]
    fn an_entry_written_piece_by_piece_as_it_comes_reads_back_exactly_with_and_without_zip64() {
        use crate::aligned::PAGE;
        // Hashed on the second thread, with a ragged end.
        let size = PARALLEL_CRC_MIN as usize + 3 * PAGE + 77;
        let shift = 192;
        let mem = shifted(size, shift);
        let data = &mem.as_slice()[shift..];
        let base = data.as_ptr() as usize;
        for threshold in [U32_MAX, 0] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("z.zip");
            let mut sink = FileSink::create(&p, true).unwrap();
            let mut w = ZipWriter::new(&mut sink).with_zip64_threshold(threshold);
            w.entry("a/data.pkl", 3, [&b"abc"[..]]).unwrap();
            // Pieces as a copy in progress hands them out: the first up to a page boundary of
            // memory, then one to five whole pages at a time, then the ragged end.
            w.entry_streamed(
                "a/data/0",
                size as u64,
                base,
                |at| -> Result<&[u8], io::Error> {
                    let pages = 1 + (at / PAGE) % 5;
                    let end = ((base + at) / PAGE + pages) * PAGE - base;
                    Ok(&data[at..end.min(size)])
                },
                |e| e,
            )
            .unwrap();
            w.entry("a/version", 1, [&b"3"[..]]).unwrap();
            w.finish().unwrap();
            let (_, stats) = sink.finish().unwrap();
            let z = std::fs::read(&p).unwrap();
            let d = read_directory(&z[..]).unwrap();
            let names: Vec<&str> = d.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(
                names,
                ["a/data.pkl", "a/data/0", "a/version"],
                "{threshold}"
            );
            let e = &d[1];
            assert_eq!(e.size, size as u64, "{threshold}");
            assert_eq!(e.crc, crc32fast::hash(data), "{threshold}");
            assert_eq!(e.data_offset % ALIGNMENT, 0, "{threshold}");
            assert!(&z[e.data_offset as usize..][..size] == data, "{threshold}");
            assert_eq!(&z[d[2].data_offset as usize..][..1], b"3", "{threshold}");
            if stats.direct {
                // Placed by its address: all but the partial pages at both ends went to the
                // disk from its own memory.
                assert_eq!(e.data_offset % PAGE as u64, (base % PAGE) as u64);
                assert!(
                    stats.direct_in_place >= (size - 2 * PAGE) as u64,
                    "{threshold}: {stats:?}"
                );
            }
        }
    }

    #[test]
    fn a_streamed_entry_whose_bytes_fail_midway_returns_that_error() {
        let size = PARALLEL_CRC_MIN as usize * 2;
        let mem = shifted(size, 0);
        let data = mem.as_slice();
        let mut w = ZipWriter::new(Plain(Vec::new()));
        let got = w.entry_streamed(
            "a/data/0",
            size as u64,
            data.as_ptr() as usize,
            |at| {
                if at >= size / 2 {
                    return Err("the copy failed".to_string());
                }
                Ok(&data[at..(at + (1 << 20)).min(size)])
            },
            |e| e.to_string(),
        );
        assert_eq!(got, Err("the copy failed".to_string()));
    }

    #[test]
    fn truncated_and_garbage_are_refused() {
        let z = build(U32_MAX);
        for cut in [0, 10, 100, z.len() - 1] {
            assert!(read_directory(&z[..cut]).is_err(), "cut at {cut}");
        }
        assert!(read_directory(&b"hello world, this is not a zip file"[..]).is_err());
    }
}
