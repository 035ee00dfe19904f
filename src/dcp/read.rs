//! Reading a DCP checkpoint at any world size: [`DcpReader`].
//!
//! A rank asks for the boxes of each tensor it needs; the reader intersects them with the
//! saved chunks and reads from each saved chunk's storage only the byte ranges it needs
//! (PyTorch's reader loads every overlapping saved chunk whole). A saved chunk's location
//! inside its archive comes from the archive's first and last bytes (its zip directory and
//! `data.pkl`), so a partial read never touches the rest of it.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::aligned::PageVec;
use crate::dcp::commit::METADATA;
use crate::dcp::flatten::{flatten, set_path, Leaf};
use crate::dcp::metadata::{Entry, Item, Metadata, TensorEntry};
use crate::dcp::shard::{Chunk, ShardedTensor};
use crate::error::{Error, Result};
use crate::io::LoadOptions;
use crate::tensor::{checked_numel, contiguous_strides, DType, HostTensor, Storage, MAX_SNAPSHOT};
use crate::torch::pickle::reader::{read_pickle, Limits, StorageSource};
use crate::torch::zip::{read_directory, Window, ZipEntry};
use crate::value::{Dict, Value};

/// Items up to this size are read whole to find their layout.
const SMALL_ITEM: u64 = 16 << 10;
/// Bytes read from the start and the end of a larger item to find its layout: first a few
/// KiB (a `torch.save` of one tensor keeps its small records and the storage record's header
/// in the first ones, its zip directory in the last ones), then more when that is not enough.
const WINDOWS: [(u64, u64); 2] = [(8 << 10, 8 << 10), (64 << 10, 128 << 10)];
/// List slots a whole-checkpoint read may add beyond one per entry: DCP pads a list with
/// `None` up to an index (an optimizer state keyed by the indices of some parameters only).
const EXTRA_LIST_SLOTS: usize = 1 << 16;

/// Where a saved chunk's elements lie in its data file.
#[derive(Clone, Debug)]
struct Layout {
    /// File offset of the storage record's first byte.
    data_start: u64,
    /// Bytes in the storage record.
    storage_len: u64,
    /// The saved tensor's view of its storage, in elements.
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
    /// CRC-32 of the storage record.
    crc: u32,
}

/// Reads a committed DCP checkpoint directory.
#[derive(Debug)]
pub struct DcpReader {
    dir: PathBuf,
    meta: Metadata,
    files: Mutex<HashMap<String, std::sync::Arc<File>>>,
    layouts: Mutex<HashMap<(String, Vec<usize>), Layout>>,
    /// Each item's place in `meta.items`, by key and chunk offsets (`None` for a value).
    index: HashMap<(String, Option<Vec<usize>>), usize>,
    bytes_read: AtomicU64,
    verify_crc: bool,
    /// How values (not tensors) are unpickled.
    weights_only: bool,
}

impl DcpReader {
    /// Opens the checkpoint in `dir`: reads and checks its `.metadata` (a directory without
    /// one is [`Error::Incomplete`]) and the length of every data file it names.
    pub fn open(dir: impl AsRef<Path>) -> Result<DcpReader> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(METADATA);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(if dir.is_dir() {
                    Error::Incomplete { path: dir }
                } else {
                    Error::io("open", &dir, e)
                })
            }
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        let meta = Metadata::from_pickle(&data, &path)?;
        let index = meta
            .items
            .iter()
            .enumerate()
            .map(|(i, it)| ((it.fqn.clone(), it.offsets.clone()), i))
            .collect();
        let reader = DcpReader {
            dir,
            meta,
            files: Mutex::default(),
            layouts: Mutex::default(),
            index,
            bytes_read: AtomicU64::new(0),
            verify_crc: true,
            weights_only: true,
        };
        reader.check_items()?;
        Ok(reader)
    }

    /// Sets how values (everything but tensors, saved as `torch.save` bytes) are unpickled:
    /// accepting only what PyTorch's weights-only unpickler accepts (`true`, the default), or
    /// keeping unknown Python objects as inert [`Object`](crate::Object)s (`false`; nothing is
    /// executed either way).
    pub fn weights_only(mut self, weights_only: bool) -> Self {
        self.weights_only = weights_only;
        self
    }

    /// Sets whether a saved chunk read whole is checked against its CRC-32 (default `true`;
    /// partial reads of a chunk cannot be checked).
    pub fn verify_crc(mut self, verify: bool) -> Self {
        self.verify_crc = verify;
        self
    }

    /// The checkpoint's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes read from the data files so far (storage bytes and the archive headers that
    /// locate them).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Every item must lie inside its file, and every chunk's elements fit in its item: so no
    /// read below allocates more than the files hold.
    fn check_items(&self) -> Result<()> {
        let mut lens: HashMap<&str, u64> = HashMap::new();
        for it in &self.meta.items {
            let len = match lens.get(it.file.as_str()) {
                Some(l) => *l,
                None => {
                    let p = self.dir.join(&it.file);
                    let l = std::fs::metadata(&p)
                        .map_err(|e| Error::io("open data file", &p, e))?
                        .len();
                    lens.insert(&it.file, l);
                    l
                }
            };
            if it.offset + it.length > len {
                return Err(Error::format(
                    self.dir.join(&it.file),
                    format!(
                        "{}: item at {}+{} lies beyond the end of the {len}-byte file",
                        it.fqn, it.offset, it.length
                    ),
                ));
            }
        }
        for (fqn, e) in &self.meta.entries {
            let Entry::Tensor(t) = e else { continue };
            for c in &t.chunks {
                let bytes = c.numel().and_then(|n| n.checked_mul(t.dtype.size()));
                let item = self.item(fqn, Some(&c.offsets));
                if bytes.is_none_or(|b| item.is_none_or(|i| b as u64 > i.length)) {
                    return Err(Error::format(
                        self.dir.join(METADATA),
                        format!(
                            "{fqn}: the chunk at {:?} holds more bytes than its item",
                            c.offsets
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The item of `fqn`'s chunk at `offsets` (or of its value, for `None`): as
    /// [`Metadata::item`], without a scan of every item.
    fn item(&self, fqn: &str, offsets: Option<&[usize]>) -> Option<&Item> {
        let key = (fqn.to_owned(), offsets.map(<[usize]>::to_vec));
        self.index.get(&key).map(|&i| &self.meta.items[i])
    }

    fn tensor_entry(&self, fqn: &str) -> Result<&TensorEntry> {
        match self.meta.entries.get(fqn) {
            Some(Entry::Tensor(t)) => Ok(t),
            Some(Entry::Bytes) => Err(self.missing(fqn, "is a value, not a tensor")),
            None => Err(self.missing(fqn, "is not in the checkpoint")),
        }
    }

    fn missing(&self, fqn: &str, why: &str) -> Error {
        Error::KeyMismatch {
            path: self.dir.clone(),
            missing: vec![format!("{fqn} ({why})")],
            unexpected: vec![],
        }
    }

    /// The box `want` of the tensor `fqn`, read from the saved chunks it meets.
    pub fn read_chunk(&self, fqn: &str, want: &Chunk) -> Result<HostTensor> {
        let (t, nbytes) = self.wanted(fqn, want)?;
        let mut out = PageVec::zeroed(nbytes);
        self.fill_chunk(fqn, t, want, out.as_mut_slice())?;
        let tensor = HostTensor::from_bytes(t.dtype, &want.sizes, out.into_bytes())?;
        Ok(tensor.with_requires_grad(t.requires_grad))
    }

    /// [`read_chunk`](Self::read_chunk) into memory the caller owns: `out` receives the box's
    /// elements, row-major and little-endian, and must be exactly that long (for example the
    /// memory of a CPU tensor being restored; see `ckptio::tch::read_chunk_into`).
    pub fn read_chunk_into(&self, fqn: &str, want: &Chunk, out: &mut [u8]) -> Result<()> {
        let (t, nbytes) = self.wanted(fqn, want)?;
        if out.len() != nbytes {
            return Err(Error::Argument {
                name: "out",
                reason: format!(
                    "{fqn}: the box {:?} of {} takes {nbytes} bytes, not {}",
                    want.sizes,
                    t.dtype,
                    out.len()
                ),
            });
        }
        self.fill_chunk(fqn, t, want, out)
    }

    /// The tensor entry of `fqn` and the bytes the box `want` of it takes, checked.
    fn wanted(&self, fqn: &str, want: &Chunk) -> Result<(&TensorEntry, usize)> {
        let t = self.tensor_entry(fqn)?;
        want.check_inside(&t.shape)
            .map_err(|r| self.missing(fqn, &format!("cannot hold the asked box: {r}")))?;
        let nbytes = want
            .numel()
            .and_then(|n| n.checked_mul(t.dtype.size()))
            .filter(|&n| n <= MAX_SNAPSHOT)
            .ok_or_else(|| self.missing(fqn, "asked for more than memory can hold"))?;
        Ok((t, nbytes))
    }

    /// Fills `out` (the box `want`, row-major) from every saved chunk it meets.
    fn fill_chunk(&self, fqn: &str, t: &TensorEntry, want: &Chunk, out: &mut [u8]) -> Result<()> {
        for c in &t.chunks {
            let Some(overlap) = c.intersect(want) else {
                continue;
            };
            let item = self
                .item(fqn, Some(&c.offsets))
                .ok_or_else(|| self.missing(fqn, "has a chunk without data"))?;
            let layout = self.layout(item, t, c)?;
            self.copy_box(item, &layout, t.dtype, c, want, &overlap, out)?;
        }
        Ok(())
    }

    /// The value saved under `fqn` (not a tensor).
    pub fn read_value(&self, fqn: &str) -> Result<Value> {
        match self.meta.entries.get(fqn) {
            Some(Entry::Bytes) => {}
            Some(Entry::Tensor(_)) => return Err(self.missing(fqn, "is a tensor, not a value")),
            None => return Err(self.missing(fqn, "is not in the checkpoint")),
        }
        let item = self
            .item(fqn, None)
            .ok_or_else(|| self.missing(fqn, "has no data"))?;
        let data = self.read_at(item, 0, item.length)?;
        let name = format!("{} ({fqn})", self.dir.join(&item.file).display());
        let options = LoadOptions::default().weights_only(self.weights_only);
        crate::torch::load_from_bytes(data.into(), &name, &options)
    }

    /// The whole checkpoint in one process: every tensor whole, every value, nested as saved.
    pub fn read_all(&self) -> Result<Value> {
        let mut root = Dict::new();
        let mut slots = self.meta.entries.len().saturating_add(EXTRA_LIST_SLOTS);
        // In the order of the saved key paths (the state dict's own order), then any entry
        // without one.
        let mut order: Vec<&String> = self
            .meta
            .paths
            .keys()
            .filter(|k| self.meta.entries.contains_key(*k))
            .collect();
        order.extend(
            self.meta
                .entries
                .keys()
                .filter(|k| !self.meta.paths.contains_key(*k)),
        );
        for fqn in order {
            let Some(e) = self.meta.entries.get(fqn) else {
                continue;
            };
            let v = match e {
                Entry::Tensor(t) => Value::Tensor(self.read_chunk(fqn, &Chunk::whole(&t.shape))?),
                Entry::Bytes => self.read_value(fqn)?,
            };
            let path = self.path_of(fqn);
            set_path(&mut root, &path, v, &mut slots).map_err(|e| self.bad_paths(e))?;
        }
        Ok(Value::Dict(root))
    }

    /// Loads what `template` asks for: a state dict whose [`ShardedTensor`] leaves give the
    /// boxes this rank needs (their local tensors are replaced by ones read from the
    /// checkpoint), whose whole tensors are read whole, and whose other values are read as
    /// saved. Keys of the checkpoint that the template lacks are not read; a key the
    /// checkpoint lacks is an error.
    pub fn read_into(&self, template: &Value) -> Result<Value> {
        let mut root = Dict::new();
        // The key paths are the template's, not the file's.
        let mut slots = usize::MAX;
        for f in flatten(template)? {
            let v = match f.leaf {
                Leaf::Sharded(s) => Value::Sharded(self.read_sharded(&f.fqn, s)?),
                Leaf::Tensor(_) => {
                    let t = self.tensor_entry(&f.fqn)?;
                    Value::Tensor(self.read_chunk(&f.fqn, &Chunk::whole(&t.shape))?)
                }
                Leaf::Value(_) => self.read_value(&f.fqn)?,
            };
            set_path(&mut root, &f.path, v, &mut slots).map_err(|e| self.bad_paths(e))?;
        }
        Ok(Value::Dict(root))
    }

    fn read_sharded(&self, fqn: &str, s: &ShardedTensor) -> Result<ShardedTensor> {
        let t = self.tensor_entry(fqn)?;
        if t.shape != s.shape() || t.dtype != s.dtype() {
            return Err(self.missing(
                fqn,
                &format!(
                    "was saved as {} {:?}, asked for as {} {:?}",
                    t.dtype,
                    t.shape,
                    s.dtype(),
                    s.shape()
                ),
            ));
        }
        let mut out =
            ShardedTensor::new(t.shape.clone(), t.dtype).with_requires_grad(t.requires_grad);
        for shard in s.shards() {
            let local = self.read_chunk(fqn, &shard.chunk)?;
            out = out.with_shard(shard.chunk.offsets.clone(), local)?;
        }
        Ok(out)
    }

    fn path_of(&self, fqn: &str) -> Vec<crate::Key> {
        self.meta
            .paths
            .get(fqn)
            .cloned()
            .unwrap_or_else(|| vec![crate::Key::Str(fqn.to_owned())])
    }

    fn bad_paths(&self, e: Error) -> Error {
        Error::format(self.dir.join(METADATA), e.to_string())
    }

    fn file(&self, name: &str) -> Result<std::sync::Arc<File>> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get(name) {
            return Ok(f.clone());
        }
        let p = self.dir.join(name);
        let f = std::sync::Arc::new(File::open(&p).map_err(|e| Error::io("open", &p, e))?);
        files.insert(name.to_owned(), f.clone());
        Ok(f)
    }

    /// `len` bytes at `at` within `item`.
    fn read_at(&self, item: &Item, at: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.read_exact(item, at, &mut buf)?;
        Ok(buf)
    }

    /// Fills `buf` from `at` within `item` (inside it: checked by the caller).
    fn read_exact(&self, item: &Item, at: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.file(&item.file)?;
        let p = self.dir.join(&item.file);
        f.read_exact_at(buf, item.offset + at)
            .map_err(|e| crate::torch::read::read_error(&p, e))?;
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Where the saved chunk `c` of tensor `t` lies in `item`: found once, from the item's
    /// zip directory and `data.pkl`.
    fn layout(&self, item: &Item, t: &TensorEntry, c: &Chunk) -> Result<Layout> {
        let key = (item.fqn.clone(), c.offsets.clone());
        if let Some(l) = self
            .layouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(l.clone());
        }
        let name = self.item_name(item);
        let bad = |reason: String| Error::format(&name, reason);
        let (entries, head) = self.item_directory(item, &name)?;
        let prefix = crate::torch::archive::archive_folder(&entries, &name)?;
        let by_name: HashMap<&str, &ZipEntry> =
            entries.iter().map(|e| (e.name.as_str(), e)).collect();
        let pkl_entry = by_name
            .get(format!("{prefix}/data.pkl").as_str())
            .ok_or_else(|| bad("no data.pkl record".into()))?;
        let pkl = match head
            .get(pkl_entry.data_offset as usize..(pkl_entry.data_offset + pkl_entry.size) as usize)
        {
            Some(b) => b.to_vec(),
            None if pkl_entry.size <= SMALL_ITEM => {
                self.read_at(item, pkl_entry.data_offset, pkl_entry.size)?
            }
            None => return Err(bad("data.pkl is too large for one tensor".into())),
        };
        let mut src = LayoutSource {
            prefix: &prefix,
            by_name: &by_name,
            found: Vec::new(),
        };
        let v = read_pickle(&pkl, true, &Limits::default(), &mut src).map_err(|e| e.at(&name))?;
        let Value::Tensor(saved) = v else {
            return Err(bad(format!("holds a {}, not a tensor", v.type_name())));
        };
        if saved.dtype() != t.dtype || saved.shape() != c.sizes.as_slice() {
            return Err(bad(format!(
                "holds a {} {:?} tensor where the metadata says {} {:?}",
                saved.dtype(),
                saved.shape(),
                t.dtype,
                c.sizes
            )));
        }
        let entry = src
            .found
            .iter()
            .find(|(s, _)| s.ptr_eq(saved.storage()))
            .map(|(_, e)| *e)
            .ok_or_else(|| bad("the tensor's storage has no record".into()))?;
        let layout = Layout {
            data_start: item.offset + entry.data_offset,
            storage_len: entry.size,
            shape: saved.shape().to_vec(),
            strides: saved.strides().to_vec(),
            offset: saved.storage_offset(),
            crc: entry.crc,
        };
        self.layouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, layout.clone());
        Ok(layout)
    }

    fn item_name(&self, item: &Item) -> PathBuf {
        let mut n = self.dir.join(&item.file).into_os_string();
        n.push(format!(" ({} at {})", item.fqn, item.offset));
        n.into()
    }

    /// The item's zip directory, and its first bytes (the whole item when small): a window of
    /// its first and last bytes when large, or all of it when the window cannot tell.
    fn item_directory(&self, item: &Item, name: &Path) -> Result<(Vec<ZipEntry>, Vec<u8>)> {
        let len = item.length;
        let whole = |this: &Self| -> Result<(Vec<ZipEntry>, Vec<u8>)> {
            let data = this.read_at(item, 0, len)?;
            let entries = read_directory(&data[..]).map_err(|r| Error::format(name, r))?;
            Ok((entries, data))
        };
        if len <= SMALL_ITEM {
            return whole(self);
        }
        for (head_len, tail_len) in WINDOWS {
            if head_len + tail_len >= len {
                break;
            }
            let head = self.read_at(item, 0, head_len)?;
            let tail = self.read_at(item, len - tail_len, tail_len)?;
            let window = Window {
                head: &head,
                tail: &tail,
                len: len as usize,
            };
            if let Ok(entries) = read_directory(&window) {
                return Ok((entries, head));
            }
        }
        whole(self)
    }

    /// Copies the part `overlap` of saved chunk `c` (laid out as `l` in `item`) into `out`,
    /// the row-major bytes of the box `want`.
    #[allow(clippy::too_many_arguments)]
    fn copy_box(
        &self,
        item: &Item,
        l: &Layout,
        dtype: DType,
        c: &Chunk,
        want: &Chunk,
        overlap: &Chunk,
        out: &mut [u8],
    ) -> Result<()> {
        let esize = dtype.size();
        let n = &overlap.sizes;
        let src_start: Vec<usize> = (0..n.len())
            .map(|d| overlap.offsets[d] - c.offsets[d])
            .collect();
        let dst_start: Vec<usize> = (0..n.len())
            .map(|d| overlap.offsets[d] - want.offsets[d])
            .collect();
        let dst_strides = contiguous_strides(&want.sizes);
        let contiguous = l.strides == contiguous_strides(&l.shape);
        if !contiguous {
            return self.copy_strided(item, l, esize, &src_start, &dst_start, n, &dst_strides, out);
        }
        let plan = RunPlan::new(l, want, n, src_start, dst_start, dst_strides, esize);
        if plan.run_bytes == 0 || plan.runs == 0 {
            return Ok(());
        }
        let (first, end) = plan.span();
        if end > l.storage_len {
            return Err(Error::format(
                self.item_name(item),
                "chunk elements lie beyond its storage record",
            ));
        }
        let needed = plan.runs as u64 * plan.run_bytes;
        // The runs tile the whole storage record: the chunk is read whole, so its CRC can be
        // checked, whatever rows it lands in.
        let whole = first == 0 && end == needed && needed == l.storage_len;
        let mut crc = (whole && self.verify_crc).then(crc32fast::Hasher::new);
        let base = l.data_start - item.offset;
        let mut block = Block::default();
        let dense = (end - first).saturating_sub(needed) <= needed / 32;
        let mut idx = Odometer::new(&n[..plan.d0]);
        while let Some(i) = idx.next() {
            let (src, dst) = plan.run_at(i);
            let dst = &mut out[dst..dst + plan.run_bytes as usize];
            if dense {
                block.copy(self, item, base, src, end, dst)?;
            } else {
                self.read_exact(item, base + src, dst)?;
            }
            if let Some(h) = crc.as_mut() {
                h.update(dst);
            }
        }
        if crc.is_some_and(|h| h.finalize() != l.crc) {
            return Err(Error::tensor(
                self.item_name(item),
                "storage",
                "fails its CRC-32 check (corrupt file)",
            ));
        }
        Ok(())
    }

    /// The slow path for a saved tensor that is not row-major: reads the storage span it
    /// covers and gathers element by element.
    #[allow(clippy::too_many_arguments)]
    fn copy_strided(
        &self,
        item: &Item,
        l: &Layout,
        esize: usize,
        src_start: &[usize],
        dst_start: &[usize],
        n: &[usize],
        dst_strides: &[usize],
        out: &mut [u8],
    ) -> Result<()> {
        let last: usize = l.offset
            + l.shape
                .iter()
                .zip(&l.strides)
                .map(|(&s, &st)| s.saturating_sub(1) * st)
                .sum::<usize>();
        let span = ((last + 1) * esize) as u64;
        if span > l.storage_len {
            return Err(Error::format(
                self.item_name(item),
                "chunk elements lie beyond its storage record",
            ));
        }
        let data = self.read_at(item, l.data_start - item.offset, span)?;
        if self.verify_crc && span == l.storage_len && crc32fast::hash(&data) != l.crc {
            return Err(Error::tensor(
                self.item_name(item),
                "storage",
                "fails its CRC-32 check (corrupt file)",
            ));
        }
        let mut idx = Odometer::new(n);
        while let Some(i) = idx.next() {
            let s: usize = l.offset
                + (0..n.len())
                    .map(|d| (src_start[d] + i[d]) * l.strides[d])
                    .sum::<usize>();
            let d: usize = (0..n.len())
                .map(|d| (dst_start[d] + i[d]) * dst_strides[d])
                .sum();
            out[d * esize..(d + 1) * esize].copy_from_slice(&data[s * esize..(s + 1) * esize]);
        }
        Ok(())
    }
}

/// Bytes of a storage record read at once when its runs lie close together.
const BLOCK: u64 = 8 << 20;

/// The last block of a storage record read for closely packed runs.
#[derive(Default)]
struct Block {
    start: u64,
    buf: Vec<u8>,
}

impl Block {
    /// Fills `dst` with the record's bytes at `src` (record offset `base` in the item, runs
    /// ending by `end`): from the block, refilled forward as needed; a run of a block's
    /// size or more is read straight into `dst`.
    fn copy(
        &mut self,
        r: &DcpReader,
        item: &Item,
        base: u64,
        src: u64,
        end: u64,
        dst: &mut [u8],
    ) -> Result<()> {
        if dst.len() as u64 >= BLOCK {
            return r.read_exact(item, base + src, dst);
        }
        let mut done = 0;
        while done < dst.len() {
            let at = src + done as u64;
            if at < self.start || at >= self.start + self.buf.len() as u64 {
                let len = (end - at).min(BLOCK) as usize;
                self.buf.resize(len, 0);
                r.read_exact(item, base + at, &mut self.buf)?;
                self.start = at;
            }
            let off = (at - self.start) as usize;
            let take = (dst.len() - done).min(self.buf.len() - off);
            dst[done..done + take].copy_from_slice(&self.buf[off..off + take]);
            done += take;
        }
        Ok(())
    }
}

/// Every index of a box of sizes `n`, in row-major order, without collecting them; one empty
/// index for a box of no dimensions, none for an empty box.
struct Odometer {
    n: Vec<usize>,
    idx: Vec<usize>,
    state: Count,
}

/// Where an [`Odometer`] is.
#[derive(PartialEq)]
enum Count {
    Start,
    Running,
    Done,
}

impl Odometer {
    fn new(n: &[usize]) -> Odometer {
        let empty = n.contains(&0);
        Odometer {
            n: n.to_vec(),
            idx: vec![0; n.len()],
            state: if empty { Count::Done } else { Count::Start },
        }
    }

    fn next(&mut self) -> Option<&[usize]> {
        match self.state {
            Count::Done => return None,
            Count::Start => self.state = Count::Running,
            Count::Running => {
                let mut d = self.n.len();
                loop {
                    if d == 0 {
                        self.state = Count::Done;
                        return None;
                    }
                    d -= 1;
                    self.idx[d] += 1;
                    if self.idx[d] < self.n[d] {
                        break;
                    }
                    self.idx[d] = 0;
                }
            }
        }
        Some(&self.idx)
    }
}

/// How a box of a row-major saved chunk is copied: the inner dimensions it spans whole, in the
/// chunk and in the output, merge into one run of bytes with the first dimension it does not
/// (`d0`); the outer dimensions before `d0` count the runs.
struct RunPlan<'a> {
    l: &'a Layout,
    n: &'a [usize],
    src_start: Vec<usize>,
    dst_start: Vec<usize>,
    dst_strides: Vec<usize>,
    esize: usize,
    d0: usize,
    run_bytes: u64,
    runs: usize,
}

impl<'a> RunPlan<'a> {
    fn new(
        l: &'a Layout,
        want: &Chunk,
        n: &'a [usize],
        src_start: Vec<usize>,
        dst_start: Vec<usize>,
        dst_strides: Vec<usize>,
        esize: usize,
    ) -> Self {
        let full = |d: usize| n[d] == l.shape[d] && n[d] == want.sizes[d];
        let mut d0 = n.len().saturating_sub(1);
        while d0 > 0 && full(d0) {
            d0 -= 1;
        }
        RunPlan {
            l,
            n,
            src_start,
            dst_start,
            dst_strides,
            esize,
            d0,
            run_bytes: (checked_numel(&n[d0..]).unwrap_or(0) * esize) as u64,
            runs: checked_numel(&n[..d0]).unwrap_or(0),
        }
    }

    /// Where the run at `idx` (an index of the outer dimensions) starts in the storage and in
    /// the output; runs come in storage order as `idx` counts up.
    fn run_at(&self, idx: &[usize]) -> (u64, usize) {
        let at = |d: usize| if d < self.d0 { idx[d] } else { 0 };
        let src: usize = self.l.offset
            + (0..self.n.len())
                .map(|d| (self.src_start[d] + at(d)) * self.l.strides[d])
                .sum::<usize>();
        let dst: usize = (0..self.n.len())
            .map(|d| (self.dst_start[d] + at(d)) * self.dst_strides[d])
            .sum();
        (src as u64 * self.esize as u64, dst * self.esize)
    }

    /// Where the first run starts and the last one ends in the storage (some runs exist).
    fn span(&self) -> (u64, u64) {
        let first = self.run_at(&vec![0; self.d0]).0;
        let last: Vec<usize> = self.n[..self.d0].iter().map(|&x| x - 1).collect();
        (first, self.run_at(&last).0 + self.run_bytes)
    }
}

/// Hands the pickle reader storages that know their length but hold no bytes, noting which
/// record each came from: the layout of a saved chunk without reading its data.
struct LayoutSource<'a> {
    prefix: &'a str,
    by_name: &'a HashMap<&'a str, &'a ZipEntry>,
    found: Vec<(Storage, &'a ZipEntry)>,
}

impl StorageSource for LayoutSource<'_> {
    fn storage(
        &mut self,
        key: &str,
        location: &str,
        nbytes: u64,
    ) -> std::result::Result<Storage, String> {
        let name = format!("{}/data/{key}", self.prefix);
        let e = *self
            .by_name
            .get(name.as_str())
            .ok_or_else(|| format!("no record {name}"))?;
        if e.size < nbytes {
            return Err(format!(
                "declares {nbytes} bytes but its record holds {}",
                e.size
            ));
        }
        let len = usize::try_from(e.size).map_err(|_| "record too large".to_owned())?;
        // Never filled: only its length and identity are used.
        let (s, _filler) = Storage::pending(len, location);
        self.found.push((s.clone(), e));
        Ok(s)
    }
}
