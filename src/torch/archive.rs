//! A checkpoint tree <-> a `torch.save` archive (`data.pkl` + one record per storage).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;

use super::pickle::reader::{read_pickle, Limits, StorageSource};
use super::pickle::writer::{PickleWriter, StorageTable};
use super::zip::{read_directory, ZipEntry, ZipSink, ZipWriter};
use crate::error::{Error, Result};
use crate::io::MapLocation;
use crate::tensor::Storage;
use crate::value::Value;

/// The archive prefix `torch.save` uses for a path: the file name up to its last dot
/// (`"model.pt"` -> `"model"`), or `"archive"` when that is empty.
pub fn archive_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = match name.rfind('.') {
        Some(i) => &name[..i],
        None => &name[..],
    };
    if stem.is_empty() {
        "archive".to_owned()
    } else {
        stem.to_owned()
    }
}

/// Writes `value` as a `torch.save` archive with entries under `prefix/` to `sink`.
///
/// Storage bytes go from the tensors' buffers straight into `sink`.
pub(crate) fn write_archive<W: ZipSink>(
    value: &Value,
    prefix: &str,
    sink: W,
    path: &Path,
) -> Result<W> {
    let (pkl, storages) = pickle_and_storages(value, path)?;
    let io = |e| Error::io("write", path, e);
    let mut z = ZipWriter::new(sink);
    z.entry(&format!("{prefix}/data.pkl"), pkl.len() as u64, [&pkl[..]])
        .map_err(io)?;
    z.entry(&format!("{prefix}/.format_version"), 1, [&b"1"[..]])
        .map_err(io)?;
    z.entry(&format!("{prefix}/.storage_alignment"), 2, [&b"64"[..]])
        .map_err(io)?;
    z.entry(&format!("{prefix}/byteorder"), 6, [&b"little"[..]])
        .map_err(io)?;
    for (i, s) in storages.iter().enumerate() {
        let storage_err = |e| match e {
            Error::Tensor { reason, .. } => Error::tensor(path, format!("storage {i}"), reason),
            other => other,
        };
        let name = format!("{prefix}/data/{i}");
        if let Some(addr) = s.filling_at() {
            // A large snapshot storage being copied front to back: written piece by piece as
            // the copy advances.
            z.entry_streamed(
                &name,
                s.len() as u64,
                addr,
                |at| s.try_prefix(at + 1).map(|b| &b[at..]).map_err(storage_err),
                io,
            )?;
            continue;
        }
        // A snapshot's storage may still be being copied: this waits for its bytes only, so
        // the write of the first storages overlaps the copy of the last ones.
        let b: &[u8] = s.try_bytes().map_err(storage_err)?;
        z.entry(&name, b.len() as u64, [b]).map_err(io)?;
    }
    z.entry(&format!("{prefix}/version"), 2, [&b"3\n"[..]])
        .map_err(io)?;
    let id = serialization_id();
    z.entry(
        &format!("{prefix}/.data/serialization_id"),
        id.len() as u64,
        [id.as_bytes()],
    )
    .map_err(io)?;
    z.finish().map_err(io)
}

/// The `data.pkl` stream and the storages it refers to, in key order: pickled here from the
/// tree, or handed over finished ([`super::pickled`]).
fn pickle_and_storages<'v>(value: &'v Value, path: &Path) -> Result<(Cow<'v, [u8]>, Vec<Storage>)> {
    if let Some(parts) = super::pickled::parts(value) {
        let (pkl, storages) = parts.map_err(|e| match e {
            Error::Argument { reason, .. } => Error::unsupported(path, reason),
            other => other,
        })?;
        return Ok((Cow::Borrowed(&pkl[..]), storages));
    }
    let mut table = StorageTable::default();
    let pkl = PickleWriter::new(&mut table)
        .finish(value)
        .map_err(|reason| Error::unsupported(path, reason))?;
    Ok((Cow::Owned(pkl), table.storages))
}

/// 40 decimal digits, as PyTorch writes to `.data/serialization_id`.
fn serialization_id() -> String {
    let a: u64 = rand::random::<u64>() % 10u64.pow(19);
    let b: u64 = rand::random::<u64>() % 10u64.pow(19);
    let c: u8 = rand::random::<u8>() % 100;
    format!("{a:019}{b:019}{c:02}")
}

/// What a reader needs besides the bytes.
pub(crate) struct ReadSettings<'a, F> {
    pub(crate) weights_only: bool,
    pub(crate) verify_crc: bool,
    pub(crate) map_location: &'a MapLocation,
    pub(crate) limits: &'a Limits,
    /// CRC-32 of `data[start..start + len]` when already computed (while reading the file).
    pub(crate) crc_of: Option<F>,
}

struct Records<'a, F> {
    data: &'a Bytes,
    prefix: String,
    by_name: HashMap<&'a str, &'a ZipEntry>,
    verify_crc: bool,
    map_location: &'a MapLocation,
    crc_of: Option<&'a F>,
}

impl<F: Fn(usize, usize) -> u32> Records<'_, F> {
    fn record(&self, name: &str) -> std::result::Result<Bytes, String> {
        let full = format!("{}/{}", self.prefix, name);
        let e = self
            .by_name
            .get(full.as_str())
            .ok_or_else(|| format!("no record {full}"))?;
        let start = e.data_offset as usize;
        let b = self.data.slice(start..start + e.size as usize);
        let crc = |b: &[u8]| match self.crc_of {
            Some(f) => f(start, b.len()),
            None => crc32fast::hash(b),
        };
        if self.verify_crc && crc(&b) != e.crc {
            return Err(format!(
                "record {full} fails its CRC-32 check (corrupt file)"
            ));
        }
        Ok(b)
    }
}

impl<F: Fn(usize, usize) -> u32> StorageSource for Records<'_, F> {
    fn storage(
        &mut self,
        key: &str,
        location: &str,
        nbytes: u64,
    ) -> std::result::Result<Storage, String> {
        let b = self.record(&format!("data/{key}"))?;
        if (b.len() as u64) < nbytes {
            return Err(format!(
                "declares {nbytes} bytes but its record holds {}",
                b.len()
            ));
        }
        Ok(Storage::with_location(b, self.map_location.map(location)))
    }
}

/// The folder every entry of an archive lies in (`"archive"` for `archive/data.pkl`), after
/// checking that no entry name appears twice.
pub(crate) fn archive_folder(entries: &[ZipEntry], path: &Path) -> Result<String> {
    let first = entries
        .first()
        .ok_or_else(|| Error::format(path, "empty archive"))?;
    let Some(i) = first.name.find('/') else {
        return Err(Error::format(
            path,
            format!("entry {:?} has no archive folder", first.name),
        ));
    };
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    for e in entries {
        if !seen.insert(e.name.as_str()) {
            return Err(Error::format(path, format!("duplicate entry {:?}", e.name)));
        }
    }
    Ok(first.name[..i].to_owned())
}

/// Why an archive without `data.pkl` cannot be read as a `torch.save` file.
pub(crate) fn no_data_pkl(prefix: &str, has: impl Fn(&str) -> bool) -> String {
    if has("constants.pkl") || has("code/__torch__.py") {
        "this is a TorchScript archive (torch.jit.save / tch's save_multi), not a torch.save file"
            .to_owned()
    } else {
        format!("no {prefix}/data.pkl record")
    }
}

/// Reads a `torch.save` archive held in `data` (read into memory or memory-mapped).
pub(crate) fn read_archive<F: Fn(usize, usize) -> u32>(
    data: &Bytes,
    path: &Path,
    s: &ReadSettings<'_, F>,
) -> Result<Value> {
    let entries = read_directory(&data[..]).map_err(|r| Error::format(path, r))?;
    let prefix = archive_folder(&entries, path)?;
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let records = Records {
        data,
        prefix: prefix.clone(),
        by_name,
        verify_crc: s.verify_crc,
        map_location: s.map_location,
        crc_of: s.crc_of.as_ref(),
    };
    let has = |n: &str| {
        records
            .by_name
            .contains_key(format!("{prefix}/{n}").as_str())
    };
    if !has("data.pkl") {
        return Err(Error::format(path, no_data_pkl(&prefix, has)));
    }
    if has("byteorder") {
        let bo = records
            .record("byteorder")
            .map_err(|r| Error::format(path, r))?;
        if &bo[..] != b"little" {
            return Err(Error::format(
                path,
                format!(
                    "byte order {:?} is not supported (only little-endian)",
                    String::from_utf8_lossy(&bo)
                ),
            ));
        }
    }
    let pkl = records
        .record("data.pkl")
        .map_err(|r| Error::format(path, r))?;
    let mut records = records;
    read_pickle(&pkl, s.weights_only, s.limits, &mut records).map_err(|e| e.at(path))
}
