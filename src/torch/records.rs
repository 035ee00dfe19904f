//! A `torch.save` archive as records (`data.pkl`, `data/0`, ...), for callers that unpickle
//! `data.pkl` themselves: ckptio's Python package rebuilds objects with PyTorch's own
//! unpicklers and hands each storage to torch straight from the bytes read here.
//!
//! [`Records`] reads a file into memory the caller owns (on two threads, each hashing what it
//! read) or indexes an archive already in memory (a map), and then locates each record and
//! checks it against its CRC-32 on request; [`Records::read_records_into`] reads chosen
//! records straight into buffers the caller allocated, one per record.
//!
//! ```no_run
//! use ckptio::torch::Records;
//! # fn main() -> ckptio::Result<()> {
//! let path = std::path::Path::new("model.pt");
//! let mut data = vec![0u8; Records::file_len(path)?];
//! let records = Records::read_into(path, &mut data, true)?;
//! let pickle = records.record(&data, "data.pkl")?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::archive::{archive_folder, no_data_pkl};
use super::read::{file_len, read_error, read_into, BlockCrcs};
use super::zip::{read_directory, ZipEntry};
use crate::error::{Error, Result};

/// Where a record lies in its archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordSpan {
    /// Offset of the record's local zip header.
    pub header_offset: u64,
    /// Offset of the record's first byte.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// How a record's CRC-32 is checked.
#[derive(Debug)]
enum Check {
    /// Not at all (a memory map, whose pages a check would read).
    Off,
    /// From the block CRCs computed while the file was read.
    Blocks(BlockCrcs),
    /// By hashing the record when it is asked for.
    Hash,
}

/// The records of one `torch.save` archive: names, places and CRC-32s, checked against the
/// archive's length. It holds no bytes: each method that reads takes the archive's bytes, which
/// must be the ones it was made from.
#[derive(Debug)]
pub struct Records {
    path: PathBuf,
    len: usize,
    prefix: String,
    entries: HashMap<String, ZipEntry>,
    names: Vec<String>,
    check: Check,
}

impl Records {
    /// The length of the file at `path`: the size of the buffer [`read_into`](Self::read_into)
    /// takes.
    pub fn file_len(path: &Path) -> Result<usize> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        file_len(&file, path)
    }

    /// Reads the file at `path` into `dst`, which must be exactly as long as the file, and
    /// indexes it. With `verify_crc`, the CRC-32s are computed on the way, and
    /// [`record`](Self::record) checks each record against them.
    pub fn read_into(path: &Path, dst: &mut [u8], verify_crc: bool) -> Result<Records> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let len = file_len(&file, path)?;
        if len != dst.len() {
            return Err(Error::format(
                path,
                format!(
                    "the file is {len} bytes, not the {} expected (it changed?)",
                    dst.len()
                ),
            ));
        }
        let crcs = read_into(&file, path, dst, verify_crc)?;
        let check = if verify_crc {
            Check::Blocks(crcs)
        } else {
            Check::Off
        };
        Self::new(dst, path, check)
    }

    /// Memory-maps the file at `path` (read-only, as `LoadOptions::mmap` does) and indexes
    /// it; returns the records and the map.
    pub fn map(path: &Path, verify_crc: bool) -> Result<(Records, Bytes)> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let data = super::map_file(&file, path)?;
        Ok((Self::index(&data, path, verify_crc)?, data))
    }

    /// Indexes an archive already in memory. With `verify_crc`, [`record`](Self::record)
    /// hashes each record it returns and checks it.
    pub fn index(data: &[u8], path: &Path, verify_crc: bool) -> Result<Records> {
        Self::new(
            data,
            path,
            if verify_crc { Check::Hash } else { Check::Off },
        )
    }

    fn new(data: &[u8], path: &Path, check: Check) -> Result<Records> {
        let entries = read_directory(data).map_err(|r| Error::format(path, r))?;
        let prefix = archive_folder(&entries, path)?;
        let mut names = Vec::with_capacity(entries.len());
        let mut by_name = HashMap::with_capacity(entries.len());
        for e in entries {
            let Some(name) = e.name.strip_prefix(&format!("{prefix}/")) else {
                return Err(Error::format(
                    path,
                    format!(
                        "entry {:?} is outside the archive folder {prefix:?}",
                        e.name
                    ),
                ));
            };
            names.push(name.to_owned());
            by_name.insert(name.to_owned(), e);
        }
        if !by_name.contains_key("data.pkl") {
            let why = no_data_pkl(&prefix, |n| by_name.contains_key(n));
            return Err(Error::format(path, why));
        }
        Ok(Records {
            path: path.to_path_buf(),
            len: data.len(),
            prefix,
            entries: by_name,
            names,
            check,
        })
    }

    /// The archive's folder (`"archive"` for `archive/data.pkl`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every record's name, without the folder, in the archive's order.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Whether the archive has a record `name` (without the folder).
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Where record `name` lies; an error names the file when there is no such record.
    pub fn span(&self, name: &str) -> Result<RecordSpan> {
        let e = self.entries.get(name).ok_or_else(|| {
            Error::format(&self.path, format!("no record {}/{name}", self.prefix))
        })?;
        Ok(RecordSpan {
            header_offset: e.header_offset,
            offset: e.data_offset,
            len: e.size,
        })
    }

    /// Record `name`'s bytes in `data` (the archive these records were made from), checked
    /// against its CRC-32 unless checks are off.
    pub fn record<'a>(&self, data: &'a [u8], name: &str) -> Result<&'a [u8]> {
        if data.len() != self.len {
            return Err(Error::Argument {
                name: "data",
                reason: format!(
                    "{} bytes, but {} indexed {} bytes",
                    data.len(),
                    self.path.display(),
                    self.len
                ),
            });
        }
        let span = self.span(name)?;
        // `read_directory` checked that every record lies inside the archive.
        let start = span.offset as usize;
        let b = &data[start..start + span.len as usize];
        let crc = match &self.check {
            Check::Off => return Ok(b),
            Check::Blocks(blocks) => blocks.crc(data, start, b.len()),
            Check::Hash => crc32fast::hash(b),
        };
        if crc != self.entries[name].crc {
            return Err(Error::format(
                &self.path,
                format!(
                    "record {}/{name} fails its CRC-32 check (corrupt file)",
                    self.prefix
                ),
            ));
        }
        Ok(b)
    }
}

/// How much of a record is read (and hashed) at a time: hashing it while it is still in the
/// cache makes the check nearly free.
const CHUNK: usize = 4 << 20;

impl Records {
    /// Reads each `(name, dst)` record from the file these records were made from (opened
    /// again at its path) into `dst`, which must be exactly the record's length, on two
    /// threads, checking each against its CRC-32 unless checks are off. The caller owns the
    /// memory (a PyTorch storage, say): nothing is copied twice.
    pub fn read_records_into(&self, targets: Vec<(&str, &mut [u8])>) -> Result<()> {
        let file = File::open(&self.path).map_err(|e| Error::io("open", &self.path, e))?;
        let mut jobs = Vec::with_capacity(targets.len());
        for (name, dst) in targets {
            let span = self.span(name)?;
            if span.len != dst.len() as u64 {
                return Err(Error::Argument {
                    name: "targets",
                    reason: format!("record {name} is {} bytes, not {}", span.len, dst.len()),
                });
            }
            jobs.push((name, span.offset, dst));
        }
        // Two threads, each about half of the bytes.
        let total: usize = jobs.iter().map(|j| j.2.len()).sum();
        let mut second = Vec::new();
        let mut first_bytes = 0;
        let mut first = Vec::new();
        for job in jobs {
            if first_bytes < total / 2 {
                first_bytes += job.2.len();
                first.push(job);
            } else {
                second.push(job);
            }
        }
        let file = &file;
        let (a, b) = std::thread::scope(|scope| {
            let b = scope.spawn(move || self.read_jobs(file, second));
            (self.read_jobs(file, first), b.join())
        });
        a?;
        b.map_err(|_| Error::format(&self.path, "reader thread panicked"))?
    }

    fn read_jobs(&self, file: &File, jobs: Vec<(&str, u64, &mut [u8])>) -> Result<()> {
        for (name, offset, dst) in jobs {
            let mut h = crc32fast::Hasher::new();
            let mut at = offset;
            for chunk in dst.chunks_mut(CHUNK) {
                std::os::unix::fs::FileExt::read_exact_at(file, chunk, at)
                    .map_err(|e| read_error(&self.path, e))?;
                if !matches!(self.check, Check::Off) {
                    h.update(chunk);
                }
                at += chunk.len() as u64;
            }
            if !matches!(self.check, Check::Off) && h.finalize() != self.entries[name].crc {
                return Err(Error::format(
                    &self.path,
                    format!(
                        "record {}/{name} fails its CRC-32 check (corrupt file)",
                        self.prefix
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dict, HostTensor, Value};

    fn saved(dir: &Path) -> PathBuf {
        let p = dir.join("m.pt");
        let data: Vec<f32> = (0..2_000_000).map(|i| i as f32).collect();
        let mut d = Dict::new();
        d.insert("w", HostTensor::from_slice(&data, &[data.len()]).unwrap());
        super::super::save(&Value::Dict(d), &p).unwrap();
        p
    }

    #[test]
    fn records_are_read_located_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = saved(dir.path());
        let mut data = vec![0u8; Records::file_len(&p).unwrap()];
        let r = Records::read_into(&p, &mut data, true).unwrap();
        assert_eq!(r.prefix(), "m");
        assert!(r.contains("data/0") && r.contains("byteorder"));
        assert_eq!(r.names().next(), Some("data.pkl"));
        assert_eq!(r.record(&data, "byteorder").unwrap(), b"little");
        let w = r.record(&data, "data/0").unwrap();
        assert_eq!(w.len(), 8_000_000);
        assert_eq!(r.span("data/0").unwrap().offset % 64, 0);
        let mapped = Records::index(&data, &p, true).unwrap();
        assert_eq!(mapped.record(&data, "data/0").unwrap(), w);
        let mut storage = vec![0u8; w.len()];
        let mut pkl = vec![0u8; r.span("data.pkl").unwrap().len as usize];
        mapped
            .read_records_into(vec![
                ("data/0", &mut storage[..]),
                ("data.pkl", &mut pkl[..]),
            ])
            .unwrap();
        assert_eq!(storage, w);
        assert_eq!(pkl, r.record(&data, "data.pkl").unwrap());
    }

    #[test]
    fn a_corrupt_storage_fails_its_crc_and_a_missing_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = saved(dir.path());
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let mut data = vec![0u8; bytes.len()];
        let r = Records::read_into(&p, &mut data, true).unwrap();
        let err = r.record(&data, "data/0").unwrap_err();
        assert!(
            err.to_string().contains("m/data/0 fails its CRC-32"),
            "{err}"
        );
        let err = r.record(&data, "data/7").unwrap_err();
        assert!(err.to_string().contains("no record m/data/7"), "{err}");
        let mut storage = vec![0u8; 8_000_000];
        let err = Records::index(&data, &p, true)
            .unwrap()
            .read_records_into(vec![("data/0", &mut storage[..])])
            .unwrap_err();
        assert!(
            err.to_string().contains("m/data/0 fails its CRC-32"),
            "{err}"
        );
        let mut short = vec![0u8; bytes.len() - 1];
        let err = Records::read_into(&p, &mut short, true).unwrap_err();
        assert!(err.to_string().contains("not the"), "{err}");
    }
}
