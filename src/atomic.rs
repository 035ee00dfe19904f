//! Atomic, durable file replacement: temporary file in the same directory, fsync, rename,
//! fsync of the directory. A crash leaves either the old file or the new one at the final path,
//! never a torn one; a failure removes the temporary file and leaves the old file untouched.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Marker in the names of temporary files, so stray ones can be recognised and cleaned.
pub const TEMP_MARKER: &str = ".ckptio-tmp-";

/// Size of the write buffer in front of the file: small writes (headers) are batched, large
/// ones (storages) bypass it and go straight from the tensor's buffer to the kernel.
const WRITE_BUFFER: usize = 1 << 20;

/// The temporary path used while writing `path`.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} has no file name", path.display())))?;
    let tmp = format!(
        ".{}{}{}-{:08x}",
        name.to_string_lossy(),
        TEMP_MARKER,
        std::process::id(),
        rand::random::<u32>()
    );
    Ok(path.with_file_name(tmp))
}

/// Whether `name` is one of ckptio's temporary files (left behind by a crash).
pub fn is_temp_file(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARKER)
}

/// Removes ckptio's temporary files left in `dir` by a crash (see [`is_temp_file`]); returns
/// how many were removed. Call it when a run starts, before any save into `dir` is in flight
/// (a temporary file of a running save would be removed too). Final paths are never touched.
pub fn clean_temp_files(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("list directory", dir, e)),
    };
    let mut n = 0;
    for e in entries {
        let e = e.map_err(|e| Error::io("list directory", dir, e))?;
        if is_temp_file(&e.file_name().to_string_lossy()) {
            remove_path(&e.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Writes `path` atomically with `write`, creating parent directories.
///
/// With `durable`, the file and its directory are fsynced before this returns.
pub fn write_atomic<F>(path: &Path, durable: bool, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<WritebackFile>) -> Result<()>,
{
    if path.as_os_str().is_empty() {
        return Err(Error::InvalidArgument("empty checkpoint path".into()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
    if path.is_dir() {
        return Err(Error::io(
            "save",
            path,
            std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "a directory is in the way",
            ),
        ));
    }
    let tmp = temp_path(path)?;
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| Error::io("create temporary file", &tmp, e))?;
        let mut w = BufWriter::with_capacity(WRITE_BUFFER, WritebackFile::new(file, durable));
        write(&mut w)?;
        let file = w.into_inner().map(WritebackFile::into_inner).map_err(|e| {
            Error::io(
                "write",
                &tmp,
                std::io::Error::new(e.error().kind(), e.error().to_string()),
            )
        })?;
        if durable {
            file.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        }
        drop(file);
        fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if durable {
        sync_dir(&dir)?;
    }
    Ok(())
}

/// Bytes written between two writeback requests: 32 MiB, or `CKPTIO_WRITEBACK_MIB` from the
/// environment (0 turns early writeback off; read once per process).
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

/// A file that, when the save is durable, asks the kernel to start writing back each
/// 32 MiB (see `CKPTIO_WRITEBACK_MIB`) as soon as they are written (`sync_file_range`, Linux), so the
/// disk works while the rest is still being written and the final fsync has little left to do.
pub struct WritebackFile {
    file: File,
    written: u64,
    requested: u64,
    enabled: bool,
}

impl WritebackFile {
    fn new(file: File, enabled: bool) -> Self {
        WritebackFile {
            file,
            written: 0,
            requested: 0,
            enabled,
        }
    }

    fn into_inner(self) -> File {
        self.file
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        let len = self.written - self.requested;
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is owned by
        // `self.file` and open for the duration of the call. A failure is harmless (the final
        // fsync still makes everything durable), so its result is ignored.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.requested as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.requested = self.written;
    }

    #[cfg(not(target_os = "linux"))]
    fn start_writeback(&mut self) {
        self.requested = self.written;
    }
}

impl Write for WritebackFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.enabled && self.written - self.requested >= writeback_every() {
            self.start_writeback();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// fsyncs a directory so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| Error::io("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Removes a file or a directory tree; quiet when it is absent.
pub fn remove_path(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", path, e)),
    };
    let r = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_keeps_the_old_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/c.pt");
        write_atomic(&p, true, |w| {
            w.write_all(b"old").map_err(|e| Error::io("write", "x", e))
        })
        .unwrap();
        let r = write_atomic(&p, true, |w| {
            w.write_all(b"partial").unwrap();
            Err(Error::InvalidArgument("boom".into()))
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c.pt")]);
    }

    #[test]
    fn remove_is_quiet_when_absent_and_removes_dirs() {
        let dir = tempfile::tempdir().unwrap();
        remove_path(&dir.path().join("nope")).unwrap();
        let d = dir.path().join("ckpt");
        fs::create_dir_all(d.join("x")).unwrap();
        fs::write(d.join("x/y"), b"1").unwrap();
        remove_path(&d).unwrap();
        assert!(!d.exists());
    }
}
