//! One rank's part of a sharded save: its data file (`__{rank}_{n}.distcp`, every item a
//! `torch.save` archive placed back to back) and the record of what it holds.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::atomic::write_atomic;
use crate::dcp::flatten::{flatten, Flat, Leaf};
use crate::dcp::metadata::{Entry, Item, Metadata, TensorEntry};
use crate::dcp::shard::Chunk;
use crate::dcp::Rank;
use crate::error::{Error, Result};
use crate::sink::{FileSink, PLACEMENT_MIN};
use crate::tensor::HostTensor;
use crate::value::Value;

/// What one rank wrote and holds, handed to the rank that commits.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Record {
    pub(crate) save_id: String,
    pub(crate) rank: Rank,
    /// Keys this rank holds whole (replicated) but another rank writes.
    pub(crate) declared: Vec<String>,
    /// Its entries (its own chunks only), key paths and items.
    pub(crate) part: Metadata,
}

/// Bytes and fsync time of one rank's write.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Written {
    pub(crate) bytes: u64,
    pub(crate) fsync: std::time::Duration,
}

/// Which rank writes each replicated item: the largest first, each to the rank with the least
/// assigned so far (every rank computes the same from the same items).
pub(crate) fn assign_replicated(items: &[(&str, u64)], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[b].1.cmp(&items[a].1).then(items[a].0.cmp(items[b].0)));
    let mut load = vec![0u64; world.max(1)];
    let mut owner = vec![0usize; items.len()];
    for i in order {
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        load[r] += items[i].1.max(1);
        owner[i] = r;
    }
    owner
}

/// One thing this rank writes.
enum Job<'a> {
    /// A chunk of a tensor (a whole replicated tensor is one chunk).
    Chunk {
        fqn: &'a str,
        offsets: Vec<usize>,
        tensor: &'a Value,
    },
    /// A value, as `torch.save` bytes.
    Bytes { fqn: &'a str, value: &'a Value },
}

/// Size a replicated leaf counts for when spreading them over ranks.
fn leaf_bytes(leaf: &Leaf<'_>) -> u64 {
    match leaf {
        Leaf::Tensor(Value::Tensor(t)) => t.nbytes() as u64,
        Leaf::Tensor(Value::Live(l)) => l.nbytes() as u64,
        _ => 4096,
    }
}

/// Plans this rank's part: the record (without items yet) and what to write.
fn plan<'a>(flat: &'a [Flat<'a>], rank: Rank, save_id: &str) -> Result<(Record, Vec<Job<'a>>)> {
    let replicated: Vec<(&str, u64)> = flat
        .iter()
        .filter(|f| !matches!(f.leaf, Leaf::Sharded(_)))
        .map(|f| (f.fqn.as_str(), leaf_bytes(&f.leaf)))
        .collect();
    let owners = assign_replicated(&replicated, rank.world_size);
    let mut owner_of = owners.into_iter();
    let mut part = Metadata::default();
    let mut declared = Vec::new();
    let mut jobs = Vec::new();
    for f in flat {
        if part.paths.insert(f.fqn.clone(), f.path.clone()).is_some() {
            return Err(Error::Argument {
                name: "checkpoint",
                reason: format!("two values flatten to the key {:?}", f.fqn),
            });
        }
        let mine = match f.leaf {
            Leaf::Sharded(_) => true,
            _ => owner_of.next() == Some(rank.rank),
        };
        if !mine {
            declared.push(f.fqn.clone());
            continue;
        }
        let (entry, mut more) = leaf_jobs(f)?;
        part.entries.insert(f.fqn.clone(), entry);
        jobs.append(&mut more);
    }
    let record = Record {
        save_id: save_id.to_owned(),
        rank,
        declared,
        part,
    };
    Ok((record, jobs))
}

/// The entry and the jobs of one leaf this rank writes.
fn leaf_jobs<'a>(f: &'a Flat<'a>) -> Result<(Entry, Vec<Job<'a>>)> {
    let fqn = f.fqn.as_str();
    match f.leaf {
        Leaf::Value(value) => Ok((Entry::Bytes, vec![Job::Bytes { fqn, value }])),
        Leaf::Tensor(tensor) => {
            let Value::Tensor(t) = tensor else {
                return Err(live_error(fqn));
            };
            let entry = Entry::Tensor(TensorEntry {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                requires_grad: t.requires_grad(),
                chunks: vec![Chunk::whole(t.shape())],
            });
            let job = Job::Chunk {
                fqn,
                offsets: vec![0; t.shape().len()],
                tensor,
            };
            Ok((entry, vec![job]))
        }
        Leaf::Sharded(s) => {
            // Empty chunks (a rank's share of a dimension split unevenly) hold nothing to
            // write, and several ranks may hold one at the same offsets.
            let held = || s.shards().iter().filter(|c| c.chunk.numel() != Some(0));
            let chunks = held().map(|c| c.chunk.clone()).collect();
            let jobs = held()
                .map(|c| Job::Chunk {
                    fqn,
                    offsets: c.chunk.offsets.clone(),
                    tensor: &c.tensor,
                })
                .collect();
            let entry = Entry::Tensor(TensorEntry {
                dtype: s.dtype(),
                shape: s.shape().to_vec(),
                requires_grad: s.requires_grad(),
                chunks,
            });
            Ok((entry, jobs))
        }
    }
}

fn live_error(fqn: &str) -> Error {
    Error::Argument {
        name: "checkpoint",
        reason: format!("{fqn}: live tensors must be snapshotted before the write"),
    }
}

/// The first data file name of `rank` that does not exist in `dir`: a save never overwrites
/// a file a committed checkpoint may name.
fn data_file_name(dir: &Path, rank: usize) -> String {
    (0..)
        .map(|n| format!("__{rank}_{n}.distcp"))
        .find(|name| !dir.join(name).exists())
        .unwrap_or_else(|| format!("__{rank}_x.distcp"))
}

/// Writes this rank's data file into `dir` (atomically; durably with `durable`) and returns
/// its record. `tree` holds no live tensors.
pub(crate) fn write_rank(
    tree: &Value,
    dir: &Path,
    rank: Rank,
    save_id: &str,
    durable: bool,
) -> Result<(Record, Written)> {
    let flat = flatten(tree)?;
    let (mut record, jobs) = plan(&flat, rank, save_id)?;
    if jobs.is_empty() {
        return Ok((record, Written::default()));
    }
    let file = data_file_name(dir, rank.rank);
    let path: PathBuf = dir.join(&file);
    let mut items = Vec::with_capacity(jobs.len());
    // Small values first, as DCP's writer puts them.
    let (bytes_jobs, chunk_jobs): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .partition(|j| matches!(j, Job::Bytes { .. }));
    let stats = write_atomic(&path, durable, |sink| {
        for job in bytes_jobs.iter().chain(&chunk_jobs) {
            items.push(write_job(sink, job, &file, &path)?);
        }
        Ok(())
    })?;
    record.part.items = items;
    Ok((
        record,
        Written {
            bytes: stats.bytes,
            fsync: stats.fsync,
        },
    ))
}

/// Writes one item at the sink's position (a large chunk first moves to a 4 KiB boundary, so
/// direct I/O can write its storage in place) and returns where it lies.
fn write_job(sink: &mut FileSink, job: &Job<'_>, file: &str, path: &Path) -> Result<Item> {
    let io = |e| Error::io("write", path, e);
    match job {
        Job::Bytes { fqn, value } => {
            let start = sink.pos();
            let bytes = crate::torch::save_to_writer(value, "archive", Vec::new())?;
            sink.write_all(&bytes).map_err(io)?;
            Ok(item(fqn, None, file, start, sink.pos()))
        }
        Job::Chunk {
            fqn,
            offsets,
            tensor,
        } => {
            let Value::Tensor(t) = tensor else {
                return Err(live_error(fqn));
            };
            let t = compact(t);
            if t.nbytes() >= PLACEMENT_MIN {
                let pad = (4096 - sink.pos() % 4096) % 4096;
                sink.write_all(&vec![0u8; pad as usize]).map_err(io)?;
            }
            let start = sink.pos();
            crate::torch::archive::write_archive(&Value::Tensor(t), "archive", &mut *sink, path)?;
            Ok(item(fqn, Some(offsets.clone()), file, start, sink.pos()))
        }
    }
}

fn item(fqn: &str, offsets: Option<Vec<usize>>, file: &str, start: u64, end: u64) -> Item {
    Item {
        fqn: fqn.to_owned(),
        offsets,
        file: file.to_owned(),
        offset: start,
        length: end - start,
    }
}

/// The chunk as a tensor over exactly its own elements, as `torch.save` of a DCP chunk holds
/// it (a view into a larger storage would save all of that storage).
fn compact(t: &HostTensor) -> HostTensor {
    if t.is_contiguous() && t.storage_offset() == 0 && t.storage().len() == t.nbytes() {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicated_items_spread_over_ranks_by_size() {
        let items = [("a", 100), ("b", 60), ("c", 50), ("d", 10)];
        assert_eq!(assign_replicated(&items, 2), [0, 1, 1, 0]);
        assert_eq!(assign_replicated(&items, 1), [0, 0, 0, 0]);
        assert_eq!(assign_replicated(&items, 4), [0, 1, 2, 3]);
    }
}
