//! Committing a sharded checkpoint: every rank hands the record of its part to the
//! coordinator (rank 0), which merges them into `.metadata` and writes it last, atomically.
//!
//! A directory without `.metadata` is incomplete. By default the ranks meet through the file
//! system, with no collective library ([`FileCollective`]): each writes its record into the
//! checkpoint directory once its data file is durable, and rank 0 waits for all of them (up
//! to a timeout), merges them, writes `.metadata` (temporary name, fsync, rename, directory
//! fsync), then removes the records and any data file the new metadata does not name.
//! A program that has a process group can supply its own [`Collective`] instead.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::atomic::{sync_dir, write_atomic};
use crate::dcp::metadata::{pickle_value, unpickle, Entry, Metadata};
use crate::dcp::write::Record;
use crate::dcp::Rank;
use crate::error::{Error, Result};
use crate::value::{Dict, Value};

/// The name of a DCP checkpoint's metadata file.
pub const METADATA: &str = ".metadata";

/// Suffix of the record a rank leaves for the coordinator (`.rank-3.ckptio-record`).
const RECORD_SUFFIX: &str = ".ckptio-record";

/// How the ranks of a job meet to commit a sharded checkpoint: gather each rank's record on
/// rank 0, and (for collectives that can) wait until rank 0 has committed.
///
/// [`FileCollective`] does it through the checkpoint directory. A program that already has a
/// process group implements this with its gather and barrier; it is called on the writer
/// thread of [`AsyncCheckpointIo`](crate::AsyncCheckpointIo), so use a group that no other
/// thread runs collectives on at the same time.
pub trait Collective: Send + Sync + fmt::Debug {
    /// Hands this rank's `record` (opaque bytes) for the save `save_id` of `dir` to rank 0.
    /// On rank 0 returns every rank's record, indexed by rank, once all have arrived; on the
    /// others returns `None` (at once, or after the gather completed).
    fn gather(
        &self,
        dir: &Path,
        save_id: &str,
        rank: Rank,
        record: Vec<u8>,
    ) -> Result<Option<Vec<Vec<u8>>>>;

    /// Called on every rank after rank 0 has committed (or failed to): a collective barrier
    /// makes every rank's save resolve only once the checkpoint is committed. Default: returns
    /// at once (ranks other than 0 then resolve when their part is durable).
    fn barrier(&self, _dir: &Path, _save_id: &str, _rank: Rank) -> Result<()> {
        Ok(())
    }
}

/// A [`Collective`] through the file system: each rank writes its record into the
/// checkpoint directory (atomically, durably); rank 0 polls for all of them until `timeout`.
#[derive(Clone, Debug)]
pub struct FileCollective {
    timeout: Duration,
}

impl Default for FileCollective {
    fn default() -> Self {
        FileCollective {
            timeout: Duration::from_secs(600),
        }
    }
}

impl FileCollective {
    /// Waits up to `timeout` (default 10 minutes) for every rank's record.
    pub fn new(timeout: Duration) -> Self {
        FileCollective { timeout }
    }
}

fn record_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!(".rank-{rank}{RECORD_SUFFIX}"))
}

impl Collective for FileCollective {
    fn gather(
        &self,
        dir: &Path,
        save_id: &str,
        rank: Rank,
        record: Vec<u8>,
    ) -> Result<Option<Vec<Vec<u8>>>> {
        let path = record_path(dir, rank.rank);
        write_atomic(&path, true, |w| {
            std::io::Write::write_all(w, &record).map_err(|e| Error::io("write", &path, e))
        })?;
        if rank.rank != 0 {
            return Ok(None);
        }
        let mut got: Vec<Option<Vec<u8>>> = vec![None; rank.world_size];
        got[0] = Some(record);
        let mut seen = vec![None; rank.world_size];
        poll(dir, self.timeout, || {
            for (r, slot) in got.iter_mut().enumerate().filter(|(_, s)| s.is_none()) {
                *slot = read_record_of(dir, r, save_id, &mut seen[r])?;
            }
            let missing: Vec<usize> = (0..got.len()).filter(|&r| got[r].is_none()).collect();
            if missing.is_empty() {
                return Ok(Ok(Some(
                    std::mem::take(&mut got).into_iter().flatten().collect(),
                )));
            }
            Ok(Err(missing))
        })
    }
}

/// Calls `check` until it gives `Ok(Ok(value))`, pausing between calls (1 ms, doubling up to
/// 20 ms); while it gives `Ok(Err(missing))` (the ranks still awaited) for longer than
/// `timeout`, fails with [`Error::CommitTimeout`] about `path`. Errors of `check` end it.
pub(crate) fn poll<T>(
    path: &Path,
    timeout: Duration,
    mut check: impl FnMut() -> Result<std::result::Result<T, Vec<usize>>>,
) -> Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let missing = match check()? {
            Ok(v) => return Ok(v),
            Err(missing) => missing,
        };
        if start.elapsed() >= timeout {
            return Err(Error::CommitTimeout {
                path: path.to_path_buf(),
                missing,
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// One version of a file: its inode, length and modification time. The files polled here
/// (records, `.metadata`) are only ever replaced by a rename, never rewritten in place, so a
/// version read once need not be read again.
type Stamp = (u64, u64, std::time::SystemTime);

/// The version of the file at `path`, or `None` when there is none.
fn stamp(path: &Path) -> Result<Option<Stamp>> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let modified = m.modified().map_err(|e| Error::io("stat", path, e))?;
            Ok(Some((m.ino(), m.len(), modified)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("stat", path, e)),
    }
}

/// Whether the file at `path` is there in a version other than `seen`, which becomes it.
fn is_new(path: &Path, seen: &mut Option<Stamp>) -> Result<bool> {
    let now = stamp(path)?;
    let new = now.is_some() && now != *seen;
    *seen = now;
    Ok(new)
}

/// Rank `r`'s record for `save_id` in `dir`, when it is there (a record of another save is
/// not). `seen` is the version read last time, which is not read again.
fn read_record_of(
    dir: &Path,
    r: usize,
    save_id: &str,
    seen: &mut Option<Stamp>,
) -> Result<Option<Vec<u8>>> {
    let path = record_path(dir, r);
    if !is_new(&path, seen)? {
        return Ok(None);
    }
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let rec = decode_record(&data, &path)?;
    Ok((rec.save_id == save_id).then_some(data))
}

/// The bytes of a record (a pickle, like the metadata it carries).
pub(crate) fn encode_record(r: &Record) -> Result<Vec<u8>> {
    let mut d = Dict::new();
    d.insert("format", "ckptio-dcp-rank-record/1");
    d.insert("save_id", r.save_id.as_str());
    d.insert("rank", r.rank.rank as i64);
    d.insert("world_size", r.rank.world_size as i64);
    d.insert(
        "declared",
        Value::List(r.declared.iter().map(|s| s.as_str().into()).collect()),
    );
    d.insert("metadata", r.part.to_value());
    pickle_value(&Value::Dict(d))
}

/// Reads a record written by [`encode_record`].
pub(crate) fn decode_record(data: &[u8], path: &Path) -> Result<Record> {
    let v = unpickle(data, path)?;
    let bad = |what: &str| Error::format(path, format!("rank record: bad {what}"));
    if v.get("format").and_then(Value::as_str) != Some("ckptio-dcp-rank-record/1") {
        return Err(bad("format"));
    }
    let int = |k: &str| {
        v.get(k)
            .and_then(Value::as_int)
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| bad(k))
    };
    let rank = Rank::new(int("rank")?, int("world_size")?).map_err(|_| bad("rank"))?;
    let declared = v
        .get("declared")
        .and_then(Value::as_seq)
        .ok_or_else(|| bad("declared"))?
        .iter()
        .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| bad("declared")))
        .collect::<Result<Vec<_>>>()?;
    let part = Metadata::from_value(v.get("metadata").ok_or_else(|| bad("metadata"))?, path)?;
    Ok(Record {
        save_id: v
            .get("save_id")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("save_id"))?
            .to_owned(),
        rank,
        declared,
        part,
    })
}

/// Merges every rank's record into the checkpoint's metadata; errors name what disagrees.
pub(crate) fn merge(dir: &Path, save_id: &str, records: &[Record]) -> Result<Metadata> {
    let bad = |reason: String| Error::Commit {
        path: dir.to_path_buf(),
        reason,
    };
    let world = records.len();
    let mut seen = std::collections::HashSet::new();
    let mut m = Metadata {
        save_id: Some(save_id.to_owned()),
        ..Metadata::default()
    };
    for (i, r) in records.iter().enumerate() {
        if r.rank.rank != i || r.rank.world_size != world || r.save_id != save_id {
            return Err(bad(format!(
                "rank {i}'s record is from rank {} of {} (save {:?})",
                r.rank.rank, r.rank.world_size, r.save_id
            )));
        }
        for (fqn, p) in &r.part.paths {
            match m.paths.get(fqn) {
                Some(q) if q != p => {
                    return Err(bad(format!("ranks disagree on the key path of {fqn}")))
                }
                _ => {
                    m.paths.insert(fqn.clone(), p.clone());
                }
            }
        }
        for (fqn, e) in &r.part.entries {
            merge_entry(&mut m, fqn, e).map_err(|why| bad(format!("{fqn}: rank {i} {why}")))?;
        }
        // A chunk several ranks hold (a replicated shard) is taken from the first of them.
        for it in &r.part.items {
            if seen.insert((it.fqn.clone(), it.offsets.clone())) {
                m.items.push(it.clone());
            }
        }
    }
    for r in records {
        if let Some(fqn) = r.declared.iter().find(|f| !m.entries.contains_key(*f)) {
            return Err(bad(format!(
                "rank {} holds {fqn}, which no rank wrote (the ranks' states hold different \
                 keys)",
                r.rank.rank
            )));
        }
    }
    m.validate(dir).map_err(|e| match e {
        Error::Format { reason, .. } => bad(reason),
        other => other,
    })?;
    Ok(m)
}

fn merge_entry(m: &mut Metadata, fqn: &str, e: &Entry) -> std::result::Result<(), String> {
    let Some(have) = m.entries.get_mut(fqn) else {
        m.entries.insert(fqn.to_owned(), e.clone());
        return Ok(());
    };
    match (have, e) {
        (Entry::Tensor(a), Entry::Tensor(b)) => {
            if a.dtype != b.dtype || a.shape != b.shape {
                return Err(format!(
                    "saves a {} {:?} tensor where another rank saved {} {:?}",
                    b.dtype, b.shape, a.dtype, a.shape
                ));
            }
            for c in &b.chunks {
                if !a.chunks.contains(c) {
                    a.chunks.push(c.clone());
                }
            }
            Ok(())
        }
        (Entry::Bytes, Entry::Bytes) => Err("writes a value another rank wrote too".into()),
        _ => Err("saves a tensor where another rank saved a value, or the reverse".into()),
    }
}

/// Writes `.metadata` into `dir` atomically and durably, then removes the rank records and the
/// data files it does not name.
pub(crate) fn commit(dir: &Path, m: &Metadata) -> Result<std::time::Duration> {
    let pickle = m.to_pickle()?;
    let path = dir.join(METADATA);
    let stats = write_atomic(&path, true, |w| {
        std::io::Write::write_all(w, &pickle).map_err(|e| Error::io("write", &path, e))
    })?;
    let named: std::collections::HashSet<&str> = m.items.iter().map(|i| i.file.as_str()).collect();
    for e in crate::atomic::list_dir(dir)? {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale_data = is_data_file(&name) && !named.contains(name.as_str());
        if stale_data || name.ends_with(RECORD_SUFFIX) {
            crate::atomic::remove_path(&e.path())?;
        }
    }
    sync_dir(dir)?;
    Ok(stats.fsync)
}

/// Whether `name` is a file of a sharded checkpoint's parts: a data file
/// (`__{rank}_{n}.distcp`) or a rank's record for the commit. A directory holding such files
/// but no [`METADATA`] is an incomplete checkpoint.
pub fn is_part_file(name: &str) -> bool {
    is_data_file(name) || name.ends_with(RECORD_SUFFIX)
}

/// Whether `name` is a DCP data file name (`__{rank}_{n}.distcp`).
pub(crate) fn is_data_file(name: &str) -> bool {
    name.starts_with("__") && name.ends_with(".distcp")
}

/// The save id of the checkpoint committed in `dir`, when there is one.
pub fn committed_save_id(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(METADATA);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    Ok(Metadata::from_pickle(&data, &path)?.save_id)
}

/// Waits until `dir` holds the checkpoint of save `save_id` committed, up to `timeout`.
pub(crate) fn wait_committed(dir: &Path, save_id: &str, timeout: Duration) -> Result<()> {
    let mut seen = None;
    poll(dir, timeout, || {
        // A half-written `.metadata` cannot be seen (it is renamed into place), so a read error
        // other than absence is real; a version already read is not parsed again.
        let committed = is_new(&dir.join(METADATA), &mut seen)?
            && committed_save_id(dir)?.as_deref() == Some(save_id);
        Ok(if committed { Ok(()) } else { Err(vec![0]) })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcp::metadata::{Item, TensorEntry};
    use crate::dcp::shard::Chunk;
    use crate::tensor::DType;

    /// Rank `r`'s record holding rows `rows` of a [4, 2] tensor `w`.
    fn record(r: usize, rows: std::ops::Range<usize>) -> Record {
        let mut part = Metadata::default();
        let chunk = Chunk::new(vec![rows.start, 0], vec![rows.len(), 2]);
        part.entries.insert(
            "w".into(),
            Entry::Tensor(TensorEntry {
                dtype: DType::Float32,
                shape: vec![4, 2],
                requires_grad: false,
                chunks: vec![chunk.clone()],
            }),
        );
        part.paths.insert("w".into(), vec!["w".into()]);
        part.items.push(Item {
            fqn: "w".into(),
            offsets: Some(chunk.offsets),
            file: format!("__{r}_0.distcp"),
            offset: 0,
            length: 1000,
        });
        Record {
            save_id: "s".into(),
            rank: Rank::new(r, 3).unwrap(),
            declared: vec![],
            part,
        }
    }

    #[test]
    fn a_chunk_several_ranks_hold_is_taken_once_and_overlaps_are_refused() {
        let dir = Path::new("ck");
        // Ranks 1 and 2 hold the same rows (a replicated shard).
        let m = merge(
            dir,
            "s",
            &[record(0, 0..2), record(1, 2..4), record(2, 2..4)],
        )
        .unwrap();
        let Some(Entry::Tensor(t)) = m.entries.get("w") else {
            panic!("no w")
        };
        assert_eq!(t.chunks.len(), 2);
        assert_eq!(m.items.len(), 2);
        assert_eq!(m.item("w", Some(&[2, 0])).unwrap().file, "__1_0.distcp");
        // Overlapping but different boxes cannot be committed.
        let e = merge(
            dir,
            "s",
            &[record(0, 0..3), record(1, 2..4), record(2, 2..4)],
        )
        .unwrap_err();
        assert!(matches!(e, Error::Commit { .. }), "{e}");
        // Missing rows neither.
        let e = merge(
            dir,
            "s",
            &[record(0, 0..1), record(1, 2..4), record(2, 2..4)],
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
