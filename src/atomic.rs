//! Atomic, durable file replacement: temporary file in the same directory, fsync, rename,
//! fsync of the directory. A crash leaves either the old file or the new one at the final path,
//! never a torn one; a failure removes the temporary file and leaves the old file untouched.
//!
//! Freeing a large file's blocks is not free: on ext4 mounted with `discard` (common on cloud
//! disks) unlinking a file takes time in proportion to its size, and a rename over an old
//! checkpoint pays it too. So when a save replaces (or [`remove_path`] removes) a file of 32 MiB or more, ckptio
//! keeps the old file open across the rename or unlink and lets a background thread close it:
//! the new checkpoint is durable without waiting for the old one's blocks to be freed. The name
//! is gone at once either way; only the space comes back a moment later.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::sink::{FileSink, SinkStats};

/// Marker in the names of temporary files, so stray ones can be recognised and cleaned.
pub(crate) const TEMP_MARKER: &str = ".ckptio-tmp-";

/// The temporary path used while writing `path`.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| Error::Path {
        path: path.to_path_buf(),
        reason: "it has no file name".into(),
    })?;
    let tmp = format!(
        ".{}{}{}-{:08x}",
        name.to_string_lossy(),
        TEMP_MARKER,
        std::process::id(),
        rand::random::<u32>()
    );
    Ok(path.with_file_name(tmp))
}

/// Whether the file name `name` is one of ckptio's temporary files.
///
/// A save writes a checkpoint into a temporary file in the same directory (a hidden name
/// holding `.ckptio-tmp-`) and renames it into place once it is whole, so a crash never leaves
/// a torn file at the checkpoint's path; it may leave the temporary file, which this
/// recognises. [`clean_temp_files`] removes them.
pub fn is_temp_file(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARKER)
}

/// Removes ckptio's temporary files left in `dir` by a crash (see [`is_temp_file`]); returns
/// how many were removed. Call it when a run starts, before any save into `dir` is in flight
/// (a temporary file of a running save would be removed too). Final paths are never touched.
pub fn clean_temp_files(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in list_dir(dir)? {
        if is_temp_file(&e.file_name().to_string_lossy()) {
            remove_path(&e.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// The entries of `dir`; none when it does not exist.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io("list directory", dir, e)),
    };
    entries
        .map(|e| e.map_err(|e| Error::io("list directory", dir, e)))
        .collect()
}

/// Writes `path` atomically with `write`, creating parent directories, and returns what was
/// written.
///
/// With `durable`, the file and its directory are fsynced before this returns (traced as the
/// span `ckptio_fsync`, timed in [`SinkStats::fsync`]), and the file is written with direct
/// I/O where the file system allows it (see [`FileSink`]).
pub(crate) fn write_atomic<F>(path: &Path, durable: bool, write: F) -> Result<SinkStats>
where
    F: FnOnce(&mut FileSink) -> Result<()>,
{
    if path.as_os_str().is_empty() {
        return Err(Error::Path {
            path: path.to_path_buf(),
            reason: "it is empty".into(),
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_dirs(&dir, durable)?;
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
    // Removes the temporary file if `write` panics (an error removes it below); disarmed once
    // the closure below has returned.
    struct RemoveOnUnwind<'a>(&'a Path, bool);
    impl Drop for RemoveOnUnwind<'_> {
        fn drop(&mut self) {
            if self.1 {
                let _ = fs::remove_file(self.0);
            }
        }
    }
    let mut guard = RemoveOnUnwind(&tmp, true);
    let result = (|| {
        let mut sink = FileSink::create(&tmp, durable)
            .map_err(|e| Error::io("create temporary file", &tmp, e))?;
        write(&mut sink)?;
        let (file, mut stats) = sink.finish().map_err(|e| Error::io("write", &tmp, e))?;
        if durable {
            let _span = tracing::debug_span!(
                "ckptio_fsync",
                path = %path.display(),
                target = "file",
                bytes = stats.bytes
            )
            .entered();
            let t = Instant::now();
            file.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
            stats.fsync = t.elapsed();
        }
        drop(file);
        let replaced = hold_large_file(path);
        fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
        Ok((stats, replaced))
    })();
    guard.1 = false;
    let (mut stats, replaced) = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let synced = if durable {
        let _span =
            tracing::debug_span!("ckptio_fsync", path = %path.display(), target = "directory")
                .entered();
        let t = Instant::now();
        let r = sync_dir(&dir);
        stats.fsync += t.elapsed();
        r
    } else {
        Ok(())
    };
    if let Some(old) = replaced {
        release_later(old);
    }
    synced.map(|()| stats)
}

/// Creates `dir` and its missing ancestors. With `durable`, each directory that holds a new one
/// is fsynced, so the new entries survive a crash as the file saved in them does (`dir` itself
/// is fsynced after the rename).
pub(crate) fn create_dirs(dir: &Path, durable: bool) -> Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d.to_path_buf());
        at = d.parent();
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    if durable {
        for d in missing.iter().rev() {
            let parent = match d.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            match sync_dir(parent) {
                // A directory the process may write into but not read (mode -wx) cannot be
                // opened to fsync it: the save goes on, as it did before parents were synced.
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    tracing::warn!(
                        dir = %parent.display(),
                        "ckptio: cannot open a directory to fsync it; a crash may lose the new \
                         directory in it"
                    );
                }
                r => r?,
            }
        }
    }
    Ok(())
}

/// Files at least this large are freed by the release thread (see the module docs).
const RELEASE_LATER_MIN: u64 = 32 << 20;

/// An open handle on the file `path` names now, when it is a regular file of at least
/// [`RELEASE_LATER_MIN`] bytes: holding it keeps the file's blocks allocated after its name goes.
fn hold_large_file(path: &Path) -> Option<File> {
    let mut o = fs::OpenOptions::new();
    o.read(true);
    #[cfg(target_os = "linux")]
    {
        // A path-only handle: no read permission needed, and it holds the inode all the same.
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_PATH | libc::O_NOFOLLOW);
    }
    let f = o.open(path).ok()?;
    let m = f.metadata().ok()?;
    (m.is_file() && m.len() >= RELEASE_LATER_MIN).then_some(f)
}

/// Closes `file` (whose last name is gone) on the release thread, which frees its blocks there.
fn release_later(file: File) {
    static RELEASE: std::sync::OnceLock<Option<crossbeam_channel::Sender<File>>> =
        std::sync::OnceLock::new();
    let tx = RELEASE.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded::<File>();
        std::thread::Builder::new()
            .name("ckptio-release".into())
            .spawn(move || rx.iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = tx {
        // The thread never stops, so the send cannot fail; if it did, the file is closed here.
        let _ = tx.send(file);
    }
}

/// fsyncs a directory so a rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| Error::io("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Removes a file or a directory tree; quiet when it is absent.
pub(crate) fn remove_path(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", path, e)),
    };
    let held = if meta.is_dir() {
        None
    } else {
        hold_large_file(path)
    };
    let r = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    if let Some(f) = held {
        release_later(f);
    }
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
            Err(Error::io("write", "x", std::io::Error::other("boom")))
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
    fn new_directories_are_made_and_a_file_in_their_way_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("runs/7/step-1.pt");
        let stats = write_atomic(&p, true, |w| {
            w.write_all(b"ok").map_err(|e| Error::io("write", "x", e))
        })
        .unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"ok");
        assert!(stats.fsync > std::time::Duration::ZERO);
        let blocker = dir.path().join("blocker");
        fs::write(&blocker, b"x").unwrap();
        let e = write_atomic(&blocker.join("sub/c.pt"), true, |_| Ok(())).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        let m = e.to_string();
        assert!(
            m.contains("create directory") && m.contains("blocker/sub"),
            "{m}"
        );
        assert_eq!(fs::read(&blocker).unwrap(), b"x", "nothing written over it");
    }

    /// A durable save into a new directory whose parent the process may write into but not
    /// read (mode `-wx`): the parent cannot be opened to fsync it, so that fsync is skipped
    /// with a warning and the save succeeds. Root passes every permission check, so as root
    /// the check runs in a child of this test binary that drops to user `nobody` first.
    #[cfg(target_os = "linux")]
    #[test]
    #[allow(unsafe_code)]
    fn a_new_directory_under_a_parent_the_process_cannot_read_is_still_saved() {
        use std::os::unix::fs::PermissionsExt;
        const CHILD: &str = "CKPTIO_TEST_UNREADABLE_PARENT";
        const NAME: &str =
            "atomic::tests::a_new_directory_under_a_parent_the_process_cannot_read_is_still_saved";
        let mode = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m));
        let write_ok = |p: &Path| {
            write_atomic(p, true, |w| {
                w.write_all(b"ok").map_err(|e| Error::io("write", "x", e))
            })
        };
        if let Some(dir) = std::env::var_os(CHILD) {
            // The child: drop root (all groups, then the group, then the user), then save in
            // the directory the parent process made.
            // SAFETY: plain libc calls changing this (child) process's own credentials.
            unsafe {
                assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
                assert_eq!(libc::setgid(65534), 0);
                assert_eq!(libc::setuid(65534), 0);
            }
            let parent = Path::new(&dir).join("wx");
            assert!(
                fs::read_dir(&parent).is_err(),
                "the parent is unreadable here"
            );
            write_ok(&parent.join("new/c.pt")).unwrap();
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("wx");
        let p = parent.join("new/c.pt");
        fs::create_dir(&parent).unwrap();
        mode(&parent, 0o333).unwrap();
        // SAFETY: `geteuid` has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            mode(tmp.path(), 0o755).unwrap();
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD, tmp.path())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("1 passed"),
                "the child, as nobody, failed:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else if fs::read_dir(&parent).is_ok() {
            // Not root, yet allowed to read it (CAP_DAC_READ_SEARCH): the branch is out of reach.
            eprintln!("SKIPPED: this process may read a -wx directory");
            mode(&parent, 0o755).unwrap();
            return;
        } else {
            write_ok(&p).unwrap();
        }
        assert_eq!(fs::read(&p).unwrap(), b"ok");
        mode(&parent, 0o755).unwrap();
    }

    #[test]
    fn a_panic_while_writing_keeps_the_old_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.pt");
        fs::write(&p, b"old").unwrap();
        let r = std::panic::catch_unwind(|| {
            write_atomic(&p, true, |w| {
                w.write_all(b"partial").unwrap();
                panic!("backend bug");
            })
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path())
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
