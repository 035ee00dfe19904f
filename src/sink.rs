//! How a checkpoint's bytes reach its file.
//!
//! A [`FileSink`] writes a file front to back with positioned writes, in one of two ways:
//!
//! - **Direct I/O** (Linux `O_DIRECT`; durable saves, the default): the bytes go from memory to
//!   the disk with no copy into the page cache. Large storages are written straight from the
//!   tensor's (or staging buffer's) memory: the zip writer asks [`FileSink::placement_at`] where
//!   the data should start and pads the entry's header so the file offset and the memory address
//!   fall on the same place within a 4096-byte block. Headers, small storages and the ragged
//!   ends of large ones gather in a page-aligned 256 KiB buffer that is written block by block; the
//!   last block is padded and the file then truncated to its length. Large data whose memory is
//!   not 64-byte aligned cannot be placed; when it comes, the rest of the file is written
//!   buffered. Compared with buffered
//!   writes this saves the kernel's copy of every byte (the CPU a training loop would otherwise
//!   lose to it), keeps a checkpoint's pages from pushing the training data out of the page
//!   cache, and makes the final fsync cheap.
//! - **Buffered** (non-durable saves, file systems that refuse `O_DIRECT`, other systems, or
//!   `CKPTIO_DIRECT_IO=0`): ordinary writes through the same 256 KiB buffer; durable ones ask
//!   the kernel to start writing back every 32 MiB (`sync_file_range`, see
//!   `CKPTIO_WRITEBACK_MIB`), so the final fsync has little left to do.
//!
//! A direct write the file system rejects as invalid (`EINVAL`) switches the file to buffered
//! writes and is retried, so direct I/O never turns into an error of its own.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use crate::aligned::{AlignedBuf, PAGE};

/// Size of the buffer that gathers small writes.
const BUFFER: usize = 256 << 10;

/// Data at least this large is placed for a write with no copy (smaller data is copied through
/// the buffer; the up to 4 KiB of extra padding placement costs stays under 0.4% of the data).
pub(crate) const PLACEMENT_MIN: usize = 1 << 20;

/// Whether durable saves use direct I/O: yes, unless `CKPTIO_DIRECT_IO=0` (read once).
fn direct_io_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("CKPTIO_DIRECT_IO").map_or(true, |v| v.trim() != "0"))
}

/// Bytes written between two writeback requests in buffered durable mode: 32 MiB, or
/// `CKPTIO_WRITEBACK_MIB` from the environment (0 turns early writeback off; read once).
fn writeback_every() -> u64 {
    static EVERY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *EVERY.get_or_init(|| {
        std::env::var("CKPTIO_WRITEBACK_MIB")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(32)
            << 20
    })
}

/// What a [`FileSink`] wrote, and how.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SinkStats {
    /// Bytes in the file.
    pub(crate) bytes: u64,
    /// Bytes written straight from the caller's memory with direct I/O (no copy at all).
    pub(crate) direct_in_place: u64,
    /// Whether the file was written with direct I/O to the end.
    pub(crate) direct: bool,
    /// Time spent making it durable: fsync of the file, then of its directory after the
    /// rename ([`write_atomic`](crate::atomic::write_atomic) with `durable`; zero otherwise, and
    /// from [`FileSink::finish`], which does not sync).
    pub(crate) fsync: std::time::Duration,
}

/// A file written front to back; see the [module docs](self).
pub(crate) struct FileSink {
    file: File,
    direct: bool,
    buf: AlignedBuf,
    /// Bytes of `buf` in use.
    filled: usize,
    /// Bytes already in the file (the file offset where `buf` starts).
    flushed: u64,
    /// Buffered durable mode: start writeback as the file grows.
    writeback: bool,
    writeback_requested: u64,
    direct_in_place: u64,
    /// The last direct block was padded past the end: the file needs truncating.
    padded: bool,
}

thread_local! {
    /// The write buffer of the last file this thread finished, for its next: a thread that
    /// writes checkpoint after checkpoint (a writer thread) allocates it once.
    static SPARE: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

fn take_buffer() -> AlignedBuf {
    SPARE
        .try_with(|s| s.borrow_mut().take())
        .ok()
        .flatten()
        .unwrap_or_else(|| AlignedBuf::filled(BUFFER, 0))
}

fn give_back_buffer(buf: AlignedBuf) {
    if buf.len() == BUFFER {
        let _ = SPARE.try_with(|s| *s.borrow_mut() = Some(buf));
    }
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("direct", &self.direct)
            .field("pos", &self.pos())
            .finish()
    }
}

impl FileSink {
    /// Creates (or truncates) `path` for writing. `durable` saves use direct I/O where the
    /// system and the file system allow it.
    pub(crate) fn create(path: &Path, durable: bool) -> io::Result<FileSink> {
        let (file, direct) = open(path, durable && direct_io_enabled())?;
        Ok(FileSink {
            file,
            direct,
            buf: take_buffer(),
            filled: 0,
            flushed: 0,
            writeback: durable,
            writeback_requested: 0,
            direct_in_place: 0,
            padded: false,
        })
    }

    /// Bytes written so far.
    pub(crate) fn pos(&self) -> u64 {
        self.flushed + self.filled as u64
    }

    /// Whether writes currently go through direct I/O.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    /// [`FileSink::placement_at`] for `data`.
    #[cfg(test)]
    pub(crate) fn placement(&self, data: &[u8]) -> Option<(u64, u64)> {
        self.placement_at(data.as_ptr() as usize, data.len())
    }

    /// Where `len` bytes at address `addr` (about to be written with
    /// [`FileSink::write_in_place`], at once or piece by piece as they come) should start in the
    /// file so they can go to the disk with no copy: `(granule, residue)` asks for a file offset
    /// equal to `residue` modulo `granule`. `None` when it would not help (buffered writes,
    /// small data, or memory not 64-byte aligned): the caller's usual alignment is right then.
    pub(crate) fn placement_at(&self, addr: usize, len: usize) -> Option<(u64, u64)> {
        (self.direct && len >= PLACEMENT_MIN && addr % 64 == 0)
            .then_some((PAGE as u64, (addr % PAGE) as u64))
    }

    /// Writes `data`, straight from its memory where it is placed as
    /// [`FileSink::placement_at`] asked (copied through the buffer otherwise).
    pub(crate) fn write_in_place(&mut self, data: &[u8]) -> io::Result<()> {
        if !self.direct {
            self.flush_buf(false)?;
            self.write_file(data)?;
            return Ok(());
        }
        let pos = self.pos() as usize;
        let head = ((PAGE - pos % PAGE) % PAGE).min(data.len());
        let aligned_memory = (data.as_ptr() as usize + head) % PAGE == 0;
        let middle = (data.len() - head) / PAGE * PAGE;
        if !aligned_memory || middle == 0 {
            if data.len() >= PLACEMENT_MIN {
                // Large data that cannot go in place (not placed where `placement` asks, e.g.
                // memory not 64-byte aligned): copying it through the buffer in small direct
                // requests is slower than the page cache, so the rest of the file is buffered.
                self.flush_buf(false)?;
                self.go_buffered()?;
                return self.write_in_place(data);
            }
            return self.write_all(data);
        }
        self.write_all(&data[..head])?;
        // The file position is now on a block boundary, so the buffer holds whole blocks.
        self.flush_buf(false)?;
        debug_assert_eq!(self.filled, 0);
        self.write_file(&data[head..head + middle])?;
        if self.direct {
            self.direct_in_place += middle as u64;
        }
        self.write_all(&data[head + middle..])
    }

    /// Writes what is buffered, trims the padding of the last direct block, and returns the
    /// file (not yet fsynced) with what was written.
    pub(crate) fn finish(mut self) -> io::Result<(File, SinkStats)> {
        let len = self.pos();
        self.flush_buf(true)?;
        give_back_buffer(std::mem::replace(&mut self.buf, AlignedBuf::filled(0, 0)));
        if self.padded {
            self.file.set_len(len)?;
        }
        let stats = SinkStats {
            bytes: len,
            direct_in_place: self.direct_in_place,
            direct: self.direct,
            fsync: std::time::Duration::ZERO,
        };
        Ok((self.file, stats))
    }

    /// Writes the buffer to the file. In direct mode only whole blocks go (the rest moves to
    /// the front of the buffer) unless `last`, when the final block is padded with zeros.
    fn flush_buf(&mut self, last: bool) -> io::Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let n = if !self.direct {
            self.filled
        } else if last {
            let n = self.filled.div_ceil(PAGE) * PAGE;
            self.buf.as_mut_slice()[self.filled..n].fill(0);
            self.padded |= n > self.filled;
            n
        } else {
            self.filled / PAGE * PAGE
        };
        if n == 0 {
            return Ok(());
        }
        let buf = std::mem::replace(&mut self.buf, AlignedBuf::filled(0, 0));
        let wrote = self.write_file(&buf.as_slice()[..n]);
        self.buf = buf;
        wrote?;
        // A padded last block counts only its real bytes: the file is truncated after.
        let real = n.min(self.filled);
        self.flushed -= (n - real) as u64;
        self.buf.as_mut_slice().copy_within(real..self.filled, 0);
        self.filled -= real;
        Ok(())
    }

    /// Writes `data` at the end of what is in the file, switching to buffered writes if the
    /// file system rejects a direct one.
    fn write_file(&mut self, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            match write_at(&self.file, &data[done..], self.flushed) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    done += n;
                    self.flushed += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(error = %e, "direct write refused; writing buffered");
                    self.go_buffered()?;
                }
                Err(e) => return Err(e),
            }
            // A short direct write can leave the position off a block boundary.
            if self.direct && self.flushed % PAGE as u64 != 0 {
                self.go_buffered()?;
            }
        }
        if self.writeback && !self.direct {
            self.start_writeback();
        }
        Ok(())
    }

    /// Writes the rest of the file buffered (turns `O_DIRECT` off).
    fn go_buffered(&mut self) -> io::Result<()> {
        clear_direct(&self.file)?;
        self.direct = false;
        Ok(())
    }

    /// Asks the kernel to start writing back what was written since the last request, once it
    /// reaches the threshold (buffered durable mode only).
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        let every = writeback_every();
        let len = self.flushed - self.writeback_requested;
        if every == 0 || len < every {
            return;
        }
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is owned by
        // `self.file` and open for the duration of the call. A failure is harmless (the final
        // fsync still makes everything durable), so its result is ignored.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.writeback_requested as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.writeback_requested = self.flushed;
    }

    #[cfg(not(target_os = "linux"))]
    fn start_writeback(&mut self) {
        let _ = writeback_every;
        self.writeback_requested = self.flushed;
    }
}

impl Write for FileSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let cap = self.buf.len();
        if self.filled == cap {
            self.flush_buf(false)?;
        }
        if self.filled == 0 && data.len() >= cap && !self.direct {
            // Large buffered writes skip the copy into the buffer.
            self.write_file(data)?;
            return Ok(data.len());
        }
        let n = data.len().min(cap - self.filled);
        self.buf.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
        self.filled += n;
        Ok(n)
    }

    /// Writes out whole blocks; the ragged end stays buffered until [`FileSink::finish`].
    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf(false)
    }
}

/// Opens `path` for writing, with `O_DIRECT` when asked and accepted.
#[cfg(target_os = "linux")]
fn open(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if direct {
        match o.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((o.open(path)?, false))
}

#[cfg(not(target_os = "linux"))]
fn open(path: &Path, _direct: bool) -> io::Result<(File, bool)> {
    Ok((
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?,
        false,
    ))
}

/// Turns `O_DIRECT` off for an open file.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn clear_direct(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl with F_GETFL/F_SETFL only reads and sets the status flags of a descriptor
    // that `file` owns and keeps open for the duration of both calls.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn clear_direct(_file: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn write_at(file: &File, data: &[u8], at: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::write_at(file, data, at)
}

#[cfg(windows)]
fn write_at(file: &File, data: &[u8], at: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_write(file, data, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A page-aligned copy of `data` at byte `shift` of its buffer.
    fn at_shift(data: &[u8], shift: usize) -> AlignedBuf {
        let mut b = AlignedBuf::filled(shift + data.len(), 0);
        b.as_mut_slice()[shift..].copy_from_slice(data);
        b
    }

    fn check_mix(durable: bool, seed: u64) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut sink = FileSink::create(&p, durable).unwrap();
        let mut expect = Vec::new();
        for _ in 0..40 {
            let len = match rng.random_range(0..4) {
                0 => rng.random_range(0..100),
                1 => rng.random_range(0..70_000),
                _ => rng.random_range(PLACEMENT_MIN..3 * PLACEMENT_MIN),
            };
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let shift =
                64 * rng.random_range(0..64usize) + if rng.random_bool(0.2) { 3 } else { 0 };
            let src = at_shift(&data, shift);
            let src = &src.as_slice()[shift..];
            if rng.random_bool(0.5) {
                if let Some((g, r)) = sink.placement(src) {
                    // Pad the way the zip writer does, so the data lands where asked.
                    let pad = ((r + g - sink.pos() % g) % g) as usize;
                    let zeros = vec![0u8; pad];
                    sink.write_all(&zeros).unwrap();
                    expect.extend_from_slice(&zeros);
                }
                sink.write_in_place(src).unwrap();
            } else {
                sink.write_all(src).unwrap();
            }
            expect.extend_from_slice(src);
            assert_eq!(sink.pos(), expect.len() as u64);
        }
        let (f, stats) = sink.finish().unwrap();
        drop(f);
        assert_eq!(stats.bytes, expect.len() as u64);
        let got = std::fs::read(&p).unwrap();
        assert!(got == expect, "file differs from what was written");
        if durable && stats.direct {
            assert!(stats.direct_in_place > 0, "{stats:?}");
        }
    }

    #[test]
    fn any_mix_of_small_large_and_misaligned_writes_reads_back_exactly() {
        for seed in 0..4 {
            check_mix(true, seed);
            check_mix(false, seed);
        }
    }

    #[test]
    fn placed_data_is_written_from_its_own_memory_with_direct_io() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.bin");
        let mut sink = FileSink::create(&p, true).unwrap();
        if !sink.is_direct() {
            crate::testing::skip(
                "placed_data_is_written_from_its_own_memory_with_direct_io",
                "direct-io",
                "the temporary directory's file system refuses O_DIRECT",
            );
            return;
        }
        sink.write_all(b"header").unwrap();
        let data = at_shift(&vec![5u8; 3 << 20], 192);
        let data = &data.as_slice()[192..];
        let (g, r) = sink.placement(data).unwrap();
        assert_eq!((g, r), (4096, 192));
        let pad = ((r + g - sink.pos() % g) % g) as usize;
        sink.write_all(&vec![0u8; pad]).unwrap();
        sink.write_in_place(data).unwrap();
        let (_, stats) = sink.finish().unwrap();
        assert!(stats.direct, "{stats:?}");
        // All but the first partial block and the ragged end went with no copy.
        assert!(stats.direct_in_place >= (3 << 20) - 8192, "{stats:?}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), stats.bytes);
    }

    #[test]
    fn a_thread_writing_file_after_file_allocates_its_write_buffer_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = FileSink::create(&dir.path().join("a"), true).unwrap();
        let buf = first.buf.as_slice().as_ptr();
        first.write_all(&[7u8; 5000]).unwrap();
        first.finish().unwrap();
        let mut second = FileSink::create(&dir.path().join("b"), true).unwrap();
        assert_eq!(second.buf.as_slice().as_ptr(), buf, "the same buffer again");
        // What the first file left in it never reaches the second.
        second.write_all(b"short").unwrap();
        second.finish().unwrap();
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b"short");
    }

    #[test]
    fn small_files_are_trimmed_to_their_length() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0usize, 1, 4095, 4096, 4097, BUFFER + 5] {
            let p = dir.path().join(format!("s{n}"));
            let mut sink = FileSink::create(&p, true).unwrap();
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            sink.write_all(&data).unwrap();
            sink.finish().unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), data, "{n} bytes");
        }
    }
}
