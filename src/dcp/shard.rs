//! Sharded tensors in the checkpoint tree, and the geometry of their chunks.
//!
//! A [`ShardedTensor`] is one tensor split over ranks: its global shape and dtype, and the
//! chunks this rank holds, each a box of the global tensor (`offsets`, `sizes`) with the local
//! tensor that fills it (a [`HostTensor`](crate::HostTensor) or a
//! [`LiveTensor`](crate::LiveTensor)). It is what a DTensor or an FSDP parameter is to PyTorch's
//! Distributed Checkpoint.

use crate::error::{Error, Result};
use crate::tensor::{checked_numel, DType};
use crate::value::Value;

/// A box of a tensor: where it starts in every dimension and how far it reaches
/// (`ChunkStorageMetadata` in PyTorch's DCP).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Chunk {
    /// The index of its first element in every dimension.
    pub offsets: Vec<usize>,
    /// Its length in every dimension.
    pub sizes: Vec<usize>,
}

impl Chunk {
    /// The box starting at `offsets` with `sizes`.
    pub fn new(offsets: Vec<usize>, sizes: Vec<usize>) -> Chunk {
        Chunk { offsets, sizes }
    }

    /// The whole of a tensor of `shape`.
    pub fn whole(shape: &[usize]) -> Chunk {
        Chunk {
            offsets: vec![0; shape.len()],
            sizes: shape.to_vec(),
        }
    }

    /// Elements in the box (`None` on overflow).
    pub fn numel(&self) -> Option<usize> {
        checked_numel(&self.sizes)
    }

    /// The part both boxes cover, or `None` when they do not meet (or one is empty).
    pub fn intersect(&self, other: &Chunk) -> Option<Chunk> {
        if self.offsets.len() != other.offsets.len() {
            return None;
        }
        let mut offsets = Vec::with_capacity(self.offsets.len());
        let mut sizes = Vec::with_capacity(self.offsets.len());
        for d in 0..self.offsets.len() {
            let start = self.offsets[d].max(other.offsets[d]);
            let end = (self.offsets[d] + self.sizes[d]).min(other.offsets[d] + other.sizes[d]);
            if end <= start {
                return None;
            }
            offsets.push(start);
            sizes.push(end - start);
        }
        Some(Chunk { offsets, sizes })
    }

    /// Checks that the box lies inside a tensor of `shape`; the reason when it does not.
    pub(crate) fn check_inside(&self, shape: &[usize]) -> std::result::Result<(), String> {
        if self.offsets.len() != shape.len() || self.sizes.len() != shape.len() {
            return Err(format!(
                "chunk at {:?} of sizes {:?} has another rank than the tensor's shape {:?}",
                self.offsets, self.sizes, shape
            ));
        }
        for d in 0..shape.len() {
            let end = self.offsets[d].checked_add(self.sizes[d]);
            if end.is_none_or(|e| e > shape[d]) {
                return Err(format!(
                    "chunk at {:?} of sizes {:?} reaches beyond the shape {:?} in dimension {d}",
                    self.offsets, self.sizes, shape
                ));
            }
        }
        Ok(())
    }
}

/// Checks that `chunks` of a tensor of `shape` lie inside it, do not overlap and together cover
/// it exactly; the reason when they do not.
pub(crate) fn check_cover(shape: &[usize], chunks: &[Chunk]) -> std::result::Result<(), String> {
    let total = checked_numel(shape).ok_or("element count overflows")?;
    let mut sum = 0usize;
    for c in chunks {
        c.check_inside(shape)?;
        sum = sum
            .checked_add(c.numel().ok_or("element count overflows")?)
            .ok_or("element count overflows")?;
    }
    check_disjoint(shape, chunks)?;
    if sum != total {
        return Err(format!(
            "chunks cover {sum} of the {total} elements of shape {shape:?}: some are missing"
        ));
    }
    Ok(())
}

/// Finds two chunks (inside `shape`) that overlap, sweeping along the dimension where they
/// start at the most distinct offsets and comparing each chunk only with those still open
/// there: near-linear for the grids ranks save, where testing every pair is quadratic in
/// the chunks a file may declare. Empty chunks meet nothing and are left out.
fn check_disjoint(shape: &[usize], chunks: &[Chunk]) -> std::result::Result<(), String> {
    let overlap =
        |a: &Chunk, b: &Chunk| format!("chunks at {:?} and {:?} overlap", a.offsets, b.offsets);
    let mut live: Vec<&Chunk> = chunks.iter().filter(|c| c.numel() != Some(0)).collect();
    if shape.is_empty() {
        // Every 0-dim chunk is the whole (one-element) tensor.
        return match live[..] {
            [a, b, ..] => Err(overlap(a, b)),
            _ => Ok(()),
        };
    }
    let distinct = |d: usize| {
        let mut starts: Vec<usize> = live.iter().map(|c| c.offsets[d]).collect();
        starts.sort_unstable();
        starts.dedup();
        starts.len()
    };
    let dim = (0..shape.len()).max_by_key(|&d| distinct(d)).unwrap_or(0);
    live.sort_by_key(|c| c.offsets[dim]);
    let mut open: Vec<&Chunk> = Vec::new();
    for c in live {
        open.retain(|o| o.offsets[dim] + o.sizes[dim] > c.offsets[dim]);
        if let Some(o) = open.iter().find(|o| o.intersect(c).is_some()) {
            return Err(overlap(o, c));
        }
        open.push(c);
    }
    Ok(())
}

/// One chunk a rank holds: the box and the local tensor that fills it.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    /// Where the local tensor lies in the global tensor.
    pub chunk: Chunk,
    /// The local tensor: a [`Value::Tensor`] or a [`Value::Live`]; its shape is
    /// `chunk.sizes`.
    pub tensor: Value,
}

/// A tensor split over ranks: the global shape and dtype, and the chunks this rank holds.
///
/// ```
/// use ckptio::dcp::{Chunk, ShardedTensor};
/// use ckptio::HostTensor;
/// // Rows 4..7 of an [8, 2] tensor live on this rank.
/// let local = HostTensor::from_slice(&[0f32; 6], &[3, 2]).unwrap();
/// let t = ShardedTensor::new(vec![8, 2], ckptio::DType::Float32)
///     .with_shard(vec![4, 0], local)
///     .unwrap();
/// assert_eq!(t.shards()[0].chunk, Chunk::new(vec![4, 0], vec![3, 2]));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ShardedTensor {
    shape: Vec<usize>,
    dtype: DType,
    requires_grad: bool,
    shards: Vec<Shard>,
}

impl ShardedTensor {
    /// A sharded tensor of global `shape` and `dtype` of which this rank holds nothing yet.
    pub fn new(shape: Vec<usize>, dtype: DType) -> ShardedTensor {
        ShardedTensor {
            shape,
            dtype,
            requires_grad: false,
            shards: Vec::new(),
        }
    }

    /// Adds a chunk this rank holds: `tensor` (a host or live tensor, or anything that converts
    /// to a [`Value`] holding one) placed at `offsets`. Refused when its dtype differs, when it
    /// does not fit inside the global shape, or when it overlaps a chunk added before.
    pub fn with_shard(mut self, offsets: Vec<usize>, tensor: impl Into<Value>) -> Result<Self> {
        let tensor = tensor.into();
        let (dtype, sizes) = match &tensor {
            Value::Tensor(t) => (t.dtype(), t.shape().to_vec()),
            Value::Live(l) => (l.source().dtype(), l.source().shape()),
            other => {
                return Err(shard_error(format!(
                    "a shard must be a tensor, not a {}",
                    other.type_name()
                )))
            }
        };
        if dtype != self.dtype {
            return Err(shard_error(format!(
                "a {dtype} shard in a {} tensor",
                self.dtype
            )));
        }
        let chunk = Chunk::new(offsets, sizes);
        chunk.check_inside(&self.shape).map_err(shard_error)?;
        if let Some(o) = self
            .shards
            .iter()
            .find(|s| s.chunk.intersect(&chunk).is_some())
        {
            return Err(shard_error(format!(
                "the shard at {:?} overlaps the one at {:?}",
                chunk.offsets, o.chunk.offsets
            )));
        }
        self.shards.push(Shard { chunk, tensor });
        Ok(self)
    }

    /// Sets whether the tensor requires grad (recorded in the checkpoint's metadata).
    pub fn with_requires_grad(mut self, requires_grad: bool) -> Self {
        self.requires_grad = requires_grad;
        self
    }

    /// The global shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether it requires grad.
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }

    /// The chunks this rank holds.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The chunks, mutably (the runtime replaces live tensors with their snapshots).
    pub(crate) fn shards_mut(&mut self) -> &mut [Shard] {
        &mut self.shards
    }
}

fn shard_error(reason: String) -> Error {
    Error::Argument {
        name: "shard",
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostTensor;

    fn c(o: &[usize], s: &[usize]) -> Chunk {
        Chunk::new(o.to_vec(), s.to_vec())
    }

    #[test]
    fn boxes_intersect_along_every_dimension() {
        assert_eq!(
            c(&[0, 0], &[4, 5]).intersect(&c(&[2, 3], &[4, 4])),
            Some(c(&[2, 3], &[2, 2]))
        );
        assert_eq!(c(&[0], &[4]).intersect(&c(&[4], &[2])), None);
        assert_eq!(c(&[0, 0], &[4, 5]).intersect(&c(&[1, 5], &[1, 1])), None);
        assert_eq!(c(&[], &[]).intersect(&c(&[], &[])), Some(c(&[], &[])));
    }

    #[test]
    fn a_cover_must_be_exact() {
        let shape = [7, 5];
        assert!(check_cover(&shape, &[c(&[0, 0], &[4, 5]), c(&[4, 0], &[3, 5])]).is_ok());
        let gap = check_cover(&shape, &[c(&[0, 0], &[4, 5]), c(&[5, 0], &[2, 5])]);
        assert!(gap.unwrap_err().contains("missing"));
        let overlap = check_cover(&shape, &[c(&[0, 0], &[4, 5]), c(&[3, 0], &[4, 5])]);
        assert!(overlap.unwrap_err().contains("overlap"));
        let beyond = check_cover(&shape, &[c(&[0, 0], &[8, 5])]);
        assert!(beyond.unwrap_err().contains("beyond"));
        let huge = check_cover(&shape, &[c(&[usize::MAX, 0], &[2, 5])]);
        assert!(huge.unwrap_err().contains("beyond"));
        assert!(check_cover(&[], &[c(&[], &[])]).is_ok());
    }

    #[test]
    fn shards_are_checked_as_they_are_added() {
        let t = |rows: usize| HostTensor::from_slice(&vec![0f32; rows * 2], &[rows, 2]).unwrap();
        let s = ShardedTensor::new(vec![8, 2], DType::Float32);
        let s = s.with_shard(vec![0, 0], t(4)).unwrap();
        assert!(s.clone().with_shard(vec![3, 0], t(2)).is_err(), "overlap");
        assert!(s.clone().with_shard(vec![6, 0], t(4)).is_err(), "beyond");
        let wrong = HostTensor::from_slice(&[0i64; 2], &[1, 2]).unwrap();
        assert!(s.clone().with_shard(vec![4, 0], wrong).is_err(), "dtype");
        let s = s.with_shard(vec![4, 0], t(4)).unwrap();
        assert_eq!(s.shards().len(), 2);
    }
}
