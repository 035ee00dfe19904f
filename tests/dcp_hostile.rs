//! Hostile sharded (DCP) checkpoints: whatever a directory holds, `DcpReader::open`,
//! `read_all`, `read_chunk` and `read_value` end in a typed `ckptio::Error` (the variant is
//! matched here), never in a panic, and never allocate more than the files can back.
//!
//! Every case starts from a real checkpoint: one written by PyTorch
//! (`tests/python/dcp_save.py`, two gloo ranks) and one by ckptio (`DcpCheckpointIo`,
//! `Rank::single()`), both made once per test binary. A case copies one into its own temporary
//! directory, then either replaces its `.metadata` with a hostile variant (made by Python's
//! `pickle`: load, mutate, dump; all variants in one Python process, see [`MUTATE`]) or
//! corrupts its data files in place. Hand-made pickles (bombs, deep nesting) are built here.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ckptio::dcp::{Chunk, DcpCheckpointIo, DcpReader, Entry, Item, Rank, ShardedTensor, METADATA};
use ckptio::{CheckpointIo, Dict, Error, HostTensor, SaveOptions, Value};
use common::{run_python, run_python_code};

// ---------------------------------------------------------------------------------------------
// Per-thread heap accounting: every read below runs on the test's own thread.

#[path = "common/heap.rs"]
mod heap;
use heap::peak_of as measure;

/// Heap one reader call may use on these checkpoints (the largest, ckptio's, holds 1.2 MB).
const MEM_CAP: usize = 32 << 20;

/// Runs `f` (a reader call, named `what` in failures), asserting that it neither panics nor
/// uses more than [`MEM_CAP`] of heap on this thread.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let (r, peak) = measure(|| catch_unwind(AssertUnwindSafe(f)));
    let r = r.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{what} panicked: {msg}")
    });
    assert!(peak < MEM_CAP, "{what} used {peak} bytes of heap");
    r
}

/// The error of `$r`, which must be `Err($pat)`.
macro_rules! assert_err {
    ($r:expr, $pat:pat) => {
        match $r {
            Err(e @ $pat) => e,
            Err(e) => panic!("expected {}, got {e:?}", stringify!($pat)),
            Ok(_) => panic!("expected {}, got Ok", stringify!($pat)),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The real checkpoints, and their hostile `.metadata` variants.

/// Which real checkpoint a case starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Base {
    /// Written by PyTorch: `dcp_save.py --world 2` (`dcp_state.full_state(0)`).
    Torch,
    /// Written by ckptio with one rank ([`ckptio_state`]).
    Ckptio,
}

const BASES: [Base; 2] = [Base::Torch, Base::Ckptio];

impl Base {
    fn tag(self) -> &'static str {
        match self {
            Base::Torch => "torch",
            Base::Ckptio => "ckptio",
        }
    }

    /// A tensor saved in two chunks split along dimension 0: the target of most mutations.
    fn rows(self) -> &'static str {
        match self {
            Base::Torch => "model.w0",
            Base::Ckptio => "w",
        }
    }

    /// A tensor saved in two chunks split along dimension 1.
    fn cols(self) -> &'static str {
        match self {
            Base::Torch => "model.w1",
            Base::Ckptio => "cols",
        }
    }

    /// A plain value (a bytes item).
    fn value(self) -> &'static str {
        match self {
            Base::Torch => "epoch",
            Base::Ckptio => "step",
        }
    }
}

struct Fixture {
    root: PathBuf,
    /// Where the hostile `.metadata` files are: `{tag}.{variant}.metadata`.
    variants: PathBuf,
    /// The file the code-running variants would create if anything ran them.
    marker: PathBuf,
}

impl Fixture {
    fn base(&self, base: Base) -> PathBuf {
        self.root.join(base.tag())
    }
}

/// The fixture, made once per test binary and removed when the process exits.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = tempfile::Builder::new()
            .prefix("dcp_hostile")
            .tempdir()
            .unwrap()
            .keep();
        remove_at_exit(&root);
        let out = run_python(
            "dcp_save.py",
            &[
                root.join("torch").as_os_str(),
                "--world".as_ref(),
                "2".as_ref(),
            ],
        );
        assert!(out.contains("\"ok\": true"), "{out}");
        let io = DcpCheckpointIo::new(Rank::single()).run_id("hostile");
        io.save_checkpoint(
            &ckptio_state(),
            &root.join("ckptio"),
            &SaveOptions::default(),
        )
        .unwrap();
        let variants = root.join("variants");
        std::fs::create_dir(&variants).unwrap();
        let marker = root.join("code-ran");
        let mut args = vec![variants.as_os_str(), marker.as_os_str()];
        let bases: Vec<String> = BASES
            .iter()
            .map(|b| {
                format!(
                    "{}={},{},{},{}",
                    b.tag(),
                    root.join(b.tag()).display(),
                    b.rows(),
                    b.cols(),
                    b.value()
                )
            })
            .collect();
        args.extend(bases.iter().map(std::ffi::OsStr::new));
        run_python_code(MUTATE, &args);
        Fixture {
            root,
            variants,
            marker,
        }
    })
}

/// Registers the removal of `dir` when the test process exits (statics are never dropped).
fn remove_at_exit(dir: &Path) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    extern "C" fn remove() {
        if let Some(d) = DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    DIR.set(dir.to_path_buf()).unwrap();
    // SAFETY: `remove` is a plain `extern "C" fn` that touches only a static set before.
    let rc = unsafe { libc::atexit(remove) };
    assert_eq!(rc, 0, "atexit");
}

/// Rows of ckptio's `flags`, a `uint8 [FLAG_ROWS, 2]` tensor saved as its two columns.
const FLAG_ROWS: usize = 1 << 16;

/// What ckptio saves: a tensor in two chunks along rows (uneven), one in two chunks along
/// columns, one in two chunks larger than the reader's whole-read threshold (256 KiB each),
/// a byte tensor saved as its two columns, a whole tensor and plain values.
fn ckptio_state() -> Value {
    fn t(rows: usize, cols: usize, seed: f32) -> HostTensor {
        let v: Vec<f32> = (0..rows * cols).map(|i| seed + i as f32).collect();
        HostTensor::from_slice(&v, &[rows, cols]).unwrap()
    }
    let sharded = |shape: Vec<usize>, parts: Vec<(Vec<usize>, HostTensor)>| {
        let mut s = ShardedTensor::new(shape, parts[0].1.dtype());
        for (at, local) in parts {
            s = s.with_shard(at, local).unwrap();
        }
        Value::Sharded(s)
    };
    let mut d = Dict::new();
    d.insert(
        "w",
        sharded(
            vec![8, 4],
            vec![(vec![0, 0], t(5, 4, 0.0)), (vec![5, 0], t(3, 4, 100.0))],
        ),
    );
    d.insert(
        "cols",
        sharded(
            vec![4, 6],
            vec![(vec![0, 0], t(4, 3, 0.5)), (vec![0, 3], t(4, 3, 50.5))],
        ),
    );
    d.insert(
        "big",
        sharded(
            vec![576, 256],
            vec![
                (vec![0, 0], t(288, 256, 1.0)),
                (vec![288, 0], t(288, 256, 2.0)),
            ],
        ),
    );
    let column = |seed: u8| {
        let v: Vec<u8> = (0..FLAG_ROWS)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect();
        HostTensor::from_slice(&v, &[FLAG_ROWS, 1]).unwrap()
    };
    d.insert(
        "flags",
        sharded(
            vec![FLAG_ROWS, 2],
            vec![(vec![0, 0], column(3)), (vec![0, 1], column(7))],
        ),
    );
    d.insert(
        "ids",
        HostTensor::from_slice(&[1i64, 2, 3, 4, 5, 6], &[2, 3]).unwrap(),
    );
    d.insert("step", 7i64);
    d.insert("names", Value::List(vec!["a".into(), "b".into()]));
    Value::Dict(d)
}

/// Writes `{tag}.{variant}.metadata` into `argv[1]` for every base `tag=dir,rows,cols,value`
/// (`argv[3:]`): the base's `.metadata` loaded with `pickle`, changed as the variant says,
/// dumped again. `argv[2]` is the file the code-running variants would create.
const MUTATE: &str = r#"
import dataclasses, os, pickle, subprocess, sys
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

out, marker = sys.argv[1], sys.argv[2]

class Replace:
    """A variant that replaces the whole metadata object."""
    def __init__(self, obj):
        self.obj = obj

class Call:
    """Pickles as a call of fn(*args), as a hostile .metadata would carry it."""
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args
    def __reduce__(self):
        return (self.fn, self.args)

def key(md, fqn, offsets):
    return next(k for k in md.storage_data if k.fqn == fqn and k.offset == offsets)

def chunk(md, fqn, i):
    return md.state_dict_metadata[fqn].chunks[i]

def set_info(md, fqn, i, **kw):
    k = key(md, fqn, chunk(md, fqn, i).offsets)
    md.storage_data[k] = dataclasses.replace(md.storage_data[k], **kw)

def info(md, fqn, i):
    return md.storage_data[key(md, fqn, chunk(md, fqn, i).offsets)]

def move(md, fqn, i, offsets=None, sizes=None):
    """Moves chunk i (and its item) to other offsets, or gives it other sizes."""
    c = chunk(md, fqn, i)
    k = key(md, fqn, c.offsets)
    v = md.storage_data.pop(k)
    if offsets is not None:
        c.offsets = torch.Size(offsets)
    if sizes is not None:
        c.sizes = torch.Size(sizes)
    md.storage_data[MetadataIndex(fqn, c.offsets, k.index)] = v

def one_chunk(md, fqn, shape):
    """Declares `fqn` of `shape` in one chunk, whose item is its first chunk's."""
    e = md.state_dict_metadata[fqn]
    v = info(md, fqn, 0)
    for c in e.chunks:
        md.storage_data.pop(key(md, fqn, c.offsets))
    c = e.chunks[0]
    c.offsets, c.sizes = torch.Size([0] * len(shape)), torch.Size(shape)
    e.chunks = [c]
    e.size = torch.Size(shape)
    md.storage_data[MetadataIndex(fqn, c.offsets, 0)] = v

def value_key(md, fqn):
    return next(k for k in md.storage_data if k.fqn == fqn)

def variants(base, R, C, V):
    def size_of(fqn, i):
        return os.path.getsize(os.path.join(base, info(md, fqn, i).relative_path))
    def other():
        """Another tensor whose first chunk differs from R's in shape or dtype."""
        r = md.state_dict_metadata[R]
        for f, e in md.state_dict_metadata.items():
            if f != R and hasattr(e, "chunks") and e.chunks and (
                e.chunks[0].sizes != r.chunks[0].sizes
                or e.properties.dtype != r.properties.dtype
            ):
                return f
    def planner(**paths):
        md.planner_data = dict(md.planner_data or {}, **paths)
    v = {}
    v["item_beyond_end"] = lambda: set_info(md, R, 1, offset=size_of(R, 1) - 10, length=100)
    v["length_beyond_end"] = lambda: set_info(md, R, 1, length=size_of(R, 1) + 1)
    v["near_u64_max"] = lambda: set_info(md, R, 0, offset=2**63 - 1, length=2**63 - 1)
    v["over_i64"] = lambda: set_info(md, R, 0, offset=2**63)
    v["over_u64"] = lambda: set_info(md, R, 0, length=2**64 + 7)
    v["negative"] = lambda: set_info(md, R, 0, offset=-1)
    v["shifted_item"] = lambda: set_info(md, R, 0, offset=info(md, R, 0).offset + 1)
    v["short_item"] = lambda: set_info(md, R, 0, length=info(md, R, 0).length - 30)
    v["value_shifted"] = lambda: md.storage_data.__setitem__(
        value_key(md, V),
        dataclasses.replace(md.storage_data[value_key(md, V)],
                            offset=md.storage_data[value_key(md, V)].offset + 1))
    v["overlap"] = lambda: move(md, R, 1, offsets=[1] + list(chunk(md, R, 0).offsets[1:]))
    def missing_chunk():
        e = md.state_dict_metadata[R]
        md.storage_data.pop(key(md, R, e.chunks[1].offsets))
        del e.chunks[1]
    v["missing_chunk"] = missing_chunk
    v["chunk_without_item"] = lambda: md.storage_data.pop(key(md, R, chunk(md, R, 1).offsets))
    v["item_without_chunk"] = lambda: md.storage_data.__setitem__(
        MetadataIndex(R, [3] * len(chunk(md, R, 0).offsets), 7), info(md, R, 0))
    v["beyond_shape"] = lambda: move(
        md, R, 1, sizes=[chunk(md, R, 1).sizes[0] + 1] + list(chunk(md, R, 1).sizes[1:]))
    v["offset_beyond_shape"] = lambda: move(
        md, R, 1, offsets=[md.state_dict_metadata[R].size[0] + 5] + list(chunk(md, R, 1).offsets[1:]))
    v["chunk_rank"] = lambda: move(
        md, R, 1, offsets=list(chunk(md, R, 1).offsets) + [0], sizes=list(chunk(md, R, 1).sizes) + [1])
    v["swapped_archive"] = lambda: set_info(md, R, 0, **dataclasses.asdict(info(md, other(), 0)))
    v["swapped_chunks"] = lambda: (lambda a, b: (set_info(md, R, 0, **b), set_info(md, R, 1, **a)))(
        dataclasses.asdict(info(md, R, 0)), dataclasses.asdict(info(md, R, 1)))
    def wrong_dtype():
        p = md.state_dict_metadata[R].properties
        md.state_dict_metadata[R].properties = dataclasses.replace(p, dtype=torch.int32)
    v["wrong_dtype"] = wrong_dtype
    def quint8():
        p = md.state_dict_metadata[R].properties
        md.state_dict_metadata[R].properties = dataclasses.replace(p, dtype=torch.quint8)
    v["quint8"] = quint8
    def sparse():
        p = md.state_dict_metadata[R].properties
        md.state_dict_metadata[R].properties = dataclasses.replace(p, layout=torch.sparse_coo)
    v["sparse"] = sparse
    v["transform"] = lambda: set_info(md, R, 0, transform_descriptors=["zstd"])
    for name, path in [("dotdot_x", "../x"), ("etc_passwd", "/etc/passwd"), ("dotdot", ".."),
                       ("empty_path", ""), ("sub_dir", "sub/x"), ("backslash", "..\\x"),
                       ("nul", "x\0y")]:
        v["path_" + name] = (lambda p: lambda: set_info(md, R, 0, relative_path=p))(path)
    v["os_system"] = lambda: setattr(md, "version", Call(os.system, "touch " + marker))
    v["eval"] = lambda: setattr(md, "storage_meta", Call(eval, "open(%r, 'w')" % marker))
    v["popen"] = lambda: planner(**{R: Call(subprocess.Popen, ["touch", marker])})
    v["hidden_in_chunk"] = lambda: setattr(chunk(md, R, 1), "sizes", Call(os.system, "touch " + marker))
    v["huge_shape_overflow"] = lambda: one_chunk(md, R, [2**40, 2**40])
    v["huge_shape_bytes"] = lambda: one_chunk(md, R, [2**62])
    v["huge_shape_4tib"] = lambda: one_chunk(md, R, [2**20, 2**20])
    v["list_index_huge"] = lambda: planner(**{R: ("huge", 2**40)})
    v["list_index_16m"] = lambda: planner(**{R: ("huge", 2**24 - 1)})
    v["path_conflict"] = lambda: planner(**{V: tuple(md.planner_data[R]) + ("x",)})
    v["path_empty"] = lambda: planner(**{R: ()})
    v["path_negative"] = lambda: planner(**{R: ("x", -1)})
    v["not_metadata"] = lambda: Replace({"state_dict_metadata": {}})
    v["no_storage_data"] = lambda: md.__dict__.pop("storage_data")
    v["sizes_are_strings"] = lambda: setattr(chunk(md, R, 1), "sizes", ["a", "b"])
    v["non_string_key"] = lambda: md.state_dict_metadata.__setitem__(
        5, md.state_dict_metadata.pop(R))
    v["cols_wrong_dtype"] = lambda: setattr(
        md.state_dict_metadata[C], "properties",
        dataclasses.replace(md.state_dict_metadata[C].properties, dtype=torch.int16))
    return v

for spec in sys.argv[3:]:
    tag, rest = spec.split("=", 1)
    base, R, C, V = rest.split(",")
    raw = open(os.path.join(base, ".metadata"), "rb").read()
    md = pickle.loads(raw)
    names = list(variants(base, R, C, V))
    for name in names:
        md = pickle.loads(raw)
        replaced = variants(base, R, C, V)[name]()
        obj = replaced.obj if isinstance(replaced, Replace) else md
        with open(os.path.join(out, f"{tag}.{name}.metadata"), "wb") as f:
            pickle.dump(obj, f, protocol=2)
"#;

/// A copy of the `base` checkpoint at `{tmp}/ck`, with its `.metadata` replaced by the
/// hostile variant `variant` when one is named.
fn copy_of(base: Base, variant: Option<&str>) -> (tempfile::TempDir, PathBuf) {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    for e in std::fs::read_dir(f.base(base)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    if let Some(v) = variant {
        let src = f.variants.join(format!("{}.{v}.metadata", base.tag()));
        std::fs::copy(&src, ck.join(METADATA)).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    }
    (tmp, ck)
}

/// The names of the data files in `dir`.
fn data_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".distcp"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "{}: no data file", dir.display());
    names
}

fn open(dir: &Path) -> ckptio::Result<DcpReader> {
    guarded(&format!("open {}", dir.display()), || DcpReader::open(dir))
}

fn read_all(r: &DcpReader) -> ckptio::Result<Value> {
    guarded("read_all", || r.read_all())
}

fn read_chunk(r: &DcpReader, fqn: &str, want: &Chunk) -> ckptio::Result<HostTensor> {
    guarded(&format!("read_chunk {fqn} {want:?}"), || {
        r.read_chunk(fqn, want)
    })
}

/// The error `DcpReader::open` gives for the variant `variant` of `base`.
fn open_error(base: Base, variant: &str) -> Error {
    let (_tmp, ck) = copy_of(base, Some(variant));
    match open(&ck) {
        Err(e) => e,
        Ok(_) => panic!("{base:?} {variant}: open accepted it"),
    }
}

/// Opens the variant (which must open), then reads everything it declares: returns the
/// first error of `read_all`, after checking that every saved chunk, every whole tensor and
/// every value reads to a value or a typed error.
fn read_error(base: Base, variant: &str) -> Error {
    let (_tmp, ck) = copy_of(base, Some(variant));
    let r = open(&ck).unwrap_or_else(|e| panic!("{base:?} {variant}: open refused it: {e}"));
    read_everything(&r);
    match read_all(&r) {
        Err(e) => e,
        Ok(_) => panic!("{base:?} {variant}: read_all accepted it"),
    }
}

/// Every read a loader might make: each saved chunk, each tensor whole, each value.
fn read_everything(r: &DcpReader) {
    for (fqn, e) in &r.metadata().entries {
        match e {
            Entry::Tensor(t) => {
                for c in t.chunks.iter().chain([&Chunk::whole(&t.shape)]) {
                    let _ = read_chunk(r, fqn, c);
                }
            }
            _ => {
                let _ = guarded(&format!("read_value {fqn}"), || r.read_value(fqn));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real checkpoints load (the baseline every case breaks).

#[test]
fn the_untouched_checkpoints_load_whole_and_by_chunk() {
    for base in BASES {
        let (_tmp, ck) = copy_of(base, None);
        let r = open(&ck).unwrap();
        read_all(&r).unwrap();
        for (fqn, e) in &r.metadata().entries {
            if let Entry::Tensor(t) = e {
                for c in &t.chunks {
                    read_chunk(&r, fqn, c).unwrap();
                }
            }
        }
        let v = guarded("read_value", || r.read_value(base.value())).unwrap();
        assert!(matches!(v, Value::Int(_)), "{base:?}: {v:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Incomplete and unreadable `.metadata`.

#[test]
fn a_directory_without_metadata_is_incomplete() {
    for base in BASES {
        let (_tmp, ck) = copy_of(base, None);
        std::fs::remove_file(ck.join(METADATA)).unwrap();
        assert_err!(open(&ck), Error::Incomplete { .. });
        let loaded = guarded("load_checkpoint", || {
            DcpCheckpointIo::new(Rank::single()).load_checkpoint(&ck, &Default::default(), None)
        });
        assert_err!(loaded, Error::Incomplete { .. });
    }
    let tmp = tempfile::tempdir().unwrap();
    assert_err!(open(&tmp.path().join("absent")), Error::Io { .. });
}

#[test]
fn a_metadata_that_is_not_a_pickle_is_a_pickle_error() {
    let (_tmp, ck) = copy_of(Base::Torch, None);
    let real = std::fs::read(ck.join(METADATA)).unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for (what, bytes) in [
        ("empty", Vec::new()),
        ("half", real[..real.len() / 2].to_vec()),
        ("garbage", garbage),
        ("no stop", real[..real.len() - 1].to_vec()),
    ] {
        std::fs::write(ck.join(METADATA), &bytes).unwrap();
        let e = assert_err!(open(&ck), Error::Pickle { .. });
        assert!(e.to_string().contains(".metadata"), "{what}: {e}");
    }
}

#[test]
fn a_metadata_of_another_shape_is_a_format_error() {
    for base in BASES {
        for v in [
            "not_metadata",
            "no_storage_data",
            "sizes_are_strings",
            "non_string_key",
            "path_negative",
        ] {
            let e = open_error(base, v);
            assert!(matches!(e, Error::Format { .. }), "{base:?} {v}: {e:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Globals: nothing in `.metadata` runs.

#[test]
fn a_global_outside_dcp_classes_is_refused_and_never_runs() {
    let f = fixture();
    for base in BASES {
        for v in ["os_system", "eval", "popen", "hidden_in_chunk"] {
            let raw = std::fs::read(f.variants.join(format!("{}.{v}.metadata", base.tag())));
            let raw = raw.unwrap();
            let named = ["system", "eval", "Popen"]
                .iter()
                .any(|g| raw.windows(g.len()).any(|w| w == g.as_bytes()));
            assert!(named, "{v}: the variant must name its callable");
            let e = open_error(base, v);
            assert!(matches!(e, Error::Unsafe { .. }), "{base:?} {v}: {e:?}");
        }
    }
    assert!(!f.marker.exists(), "a hostile .metadata ran code");
}

#[test]
fn unknown_dtypes_layouts_and_storage_transforms_are_refused() {
    for base in BASES {
        assert_err!(
            Err::<(), _>(open_error(base, "quint8")),
            Error::Unsafe { .. }
        );
        let e = assert_err!(
            Err::<(), _>(open_error(base, "sparse")),
            Error::Format { .. }
        );
        assert!(e.to_string().contains("strided"), "{e}");
        let e = assert_err!(
            Err::<(), _>(open_error(base, "transform")),
            Error::Format { .. }
        );
        assert!(e.to_string().contains("transforms"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Items that lie about where they are.

#[test]
fn an_item_beyond_its_file_end_is_refused_at_open() {
    for base in BASES {
        for v in ["item_beyond_end", "length_beyond_end", "near_u64_max"] {
            let e = open_error(base, v);
            assert!(matches!(e, Error::Format { .. }), "{base:?} {v}: {e:?}");
            assert!(e.to_string().contains("beyond the end"), "{v}: {e}");
        }
    }
}

#[test]
fn item_offsets_beyond_i64_or_u64_or_negative_are_refused_at_open() {
    for base in BASES {
        for v in ["over_i64", "over_u64", "negative"] {
            let e = open_error(base, v);
            assert!(
                matches!(e, Error::Format { .. } | Error::Pickle { .. }),
                "{base:?} {v}: {e:?}"
            );
        }
    }
}

#[test]
fn an_item_that_does_not_start_or_end_on_its_archive_is_a_format_error() {
    for base in BASES {
        for v in ["shifted_item", "short_item"] {
            let e = read_error(base, v);
            assert!(matches!(e, Error::Format { .. }), "{base:?} {v}: {e:?}");
        }
        let (_tmp, ck) = copy_of(base, Some("value_shifted"));
        let r = open(&ck).unwrap();
        let got = guarded("read_value", || r.read_value(base.value()));
        assert_err!(got, Error::Format { .. });
    }
}

#[test]
fn relative_paths_that_leave_the_directory_are_refused() {
    for base in BASES {
        for name in [
            "dotdot_x",
            "etc_passwd",
            "dotdot",
            "empty_path",
            "sub_dir",
            "backslash",
            "nul",
        ] {
            let v = format!("path_{name}");
            let (tmp, ck) = copy_of(base, Some(&v));
            // `../x` and `sub/x` exist and hold the real bytes: only the name is refused.
            let data = ck.join(data_files(&ck)[0].as_str());
            std::fs::copy(&data, tmp.path().join("x")).unwrap();
            std::fs::create_dir(ck.join("sub")).unwrap();
            std::fs::copy(&data, ck.join("sub/x")).unwrap();
            let e = assert_err!(open(&ck), Error::Format { .. });
            assert!(e.to_string().contains("plain file name"), "{v}: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chunks that do not tile their tensor.

#[test]
fn overlapping_missing_or_stray_chunks_are_refused_at_open() {
    for base in BASES {
        for (v, says) in [
            ("overlap", "overlap"),
            ("missing_chunk", "missing"),
            ("chunk_without_item", "no data item"),
            ("item_without_chunk", "matches no saved chunk"),
        ] {
            let e = open_error(base, v);
            assert!(matches!(e, Error::Format { .. }), "{base:?} {v}: {e:?}");
            assert!(e.to_string().contains(says), "{base:?} {v}: {e}");
        }
    }
}

#[test]
fn chunks_beyond_the_global_shape_are_refused_at_open() {
    for base in BASES {
        for v in ["beyond_shape", "offset_beyond_shape", "chunk_rank"] {
            let e = open_error(base, v);
            assert!(matches!(e, Error::Format { .. }), "{base:?} {v}: {e:?}");
        }
    }
}

#[test]
fn a_chunk_whose_archive_holds_another_shape_or_dtype_is_refused() {
    for base in BASES {
        for v in ["swapped_archive", "swapped_chunks", "wrong_dtype"] {
            let e = read_error(base, v);
            assert!(matches!(e, Error::Format { .. }), "{base:?} {v}: {e:?}");
            assert!(
                e.to_string().contains("where the metadata says"),
                "{v}: {e}"
            );
            // Reading only the lying chunk is refused the same way.
            let (_tmp, ck) = copy_of(base, Some(v));
            let r = open(&ck).unwrap();
            let c0 = match &r.metadata().entries[base.rows()] {
                Entry::Tensor(t) => t.chunks[0].clone(),
                other => panic!("{other:?}"),
            };
            assert_err!(read_chunk(&r, base.rows(), &c0), Error::Format { .. });
        }
    }
}

#[test]
fn huge_declared_shapes_are_refused_before_allocating() {
    for base in BASES {
        for v in ["huge_shape_overflow", "huge_shape_bytes", "huge_shape_4tib"] {
            // `open_error` fails the test if the open used more than MEM_CAP of heap.
            let e = open_error(base, v);
            assert!(matches!(e, Error::Format { .. }), "{base:?} {v}: {e:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Key paths (`planner_data`) that cannot rebuild the nesting.

#[test]
fn key_paths_that_clash_or_index_too_far_are_refused() {
    for base in BASES {
        for v in ["path_conflict", "path_empty", "list_index_huge"] {
            let e = read_error(base, v);
            assert!(matches!(e, Error::Format { .. }), "{base:?} {v}: {e:?}");
        }
    }
}

/// A key path may name list index 2^24 - 1 (just under the reader's cap) for a checkpoint of
/// a few entries: `read_all` must not build a list of 16 million slots for it.
#[test]
fn a_key_path_list_index_is_bounded_by_the_entries() {
    for base in BASES {
        let (_tmp, ck) = copy_of(base, Some("list_index_16m"));
        let r = open(&ck).unwrap();
        assert_err!(read_all(&r), Error::Format { .. });
    }
}

// ---------------------------------------------------------------------------------------------
// Data files: truncated, missing, corrupted.

/// The item of `fqn`'s chunk `i` (in the pristine metadata).
fn chunk_item(r: &DcpReader, fqn: &str, i: usize) -> (Chunk, Item) {
    let Entry::Tensor(t) = &r.metadata().entries[fqn] else {
        panic!("{fqn} is not a tensor")
    };
    let c = t.chunks[i].clone();
    let item = r.metadata().item(fqn, Some(&c.offsets)).unwrap().clone();
    (c, item)
}

/// The file offset of the storage bytes of `fqn`'s chunk `i`, found by its contents.
fn storage_at(r: &DcpReader, fqn: &str, i: usize) -> (Chunk, Item, u64, usize) {
    let (c, item) = chunk_item(r, fqn, i);
    let bytes = read_chunk(r, fqn, &c).unwrap().contiguous_bytes();
    let file = std::fs::read(r.dir().join(&item.file)).unwrap();
    let span = &file[item.offset as usize..(item.offset + item.length) as usize];
    let at = span
        .windows(bytes.len())
        .position(|w| w == &bytes[..])
        .unwrap_or_else(|| panic!("{fqn} chunk {i}: its bytes are not stored contiguously"));
    (c, item.clone(), item.offset + at as u64, bytes.len())
}

fn flip_byte(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

#[test]
fn a_flipped_storage_byte_fails_the_crc_of_a_whole_chunk_read() {
    for base in BASES {
        let fqns = match base {
            Base::Torch => vec![base.rows()],
            Base::Ckptio => vec![base.rows(), "big"],
        };
        for fqn in fqns {
            let (_tmp, ck) = copy_of(base, None);
            let r = open(&ck).unwrap();
            let (c, item, at, len) = storage_at(&r, fqn, 0);
            flip_byte(&ck.join(&item.file), at + len as u64 / 2);
            let r = open(&ck).unwrap();
            let e = assert_err!(read_chunk(&r, fqn, &c), Error::Tensor { .. });
            assert!(e.to_string().contains("CRC"), "{e}");
            let e = assert_err!(read_all(&r), Error::Tensor { .. });
            assert!(e.to_string().contains("CRC"), "{e}");
            // With the check off, the corrupt bytes read (the choice is the caller's).
            let r = open(&ck).unwrap().verify_crc(false);
            read_chunk(&r, fqn, &c).unwrap();
        }
    }
}

/// A chunk split along columns is read whole by `read_all` (all its bytes, row by row): the
/// CRC must be checked there too, not only when the chunk lands in one run.
#[test]
fn a_flipped_storage_byte_fails_the_crc_of_a_chunk_split_along_columns() {
    for base in BASES {
        let (_tmp, ck) = copy_of(base, None);
        let r = open(&ck).unwrap();
        let (_, item, at, len) = storage_at(&r, base.cols(), 0);
        flip_byte(&ck.join(&item.file), at + len as u64 / 2);
        let r = open(&ck).unwrap();
        let e = assert_err!(read_all(&r), Error::Tensor { .. });
        assert!(e.to_string().contains("CRC"), "{base:?}: {e}");
    }
}

/// A chunk that lands in the output row by row (a byte tensor saved as its columns) is read
/// with memory in proportion to its bytes: not 16 bytes of bookkeeping per row (16 times the
/// data for one-byte elements, so a hostile 1 GiB column would take 16 GiB).
#[test]
fn a_chunk_read_row_by_row_allocates_in_proportion_to_its_bytes() {
    let (_tmp, ck) = copy_of(Base::Ckptio, None);
    let r = open(&ck).unwrap();
    let nbytes = FLAG_ROWS * 2;
    let (t, peak) = measure(|| r.read_chunk("flags", &Chunk::whole(&[FLAG_ROWS, 2])));
    assert_eq!(t.unwrap().nbytes(), nbytes);
    // The output, one item's archive read whole (the layout), and some slack.
    assert!(
        peak < 3 * nbytes + (64 << 10),
        "{peak} bytes of heap to read a {nbytes}-byte tensor"
    );
}

#[test]
fn a_corrupt_archive_inside_an_item_is_a_typed_error() {
    for base in BASES {
        let fqns = match base {
            Base::Torch => vec![base.rows()],
            Base::Ckptio => vec![base.rows(), "big"],
        };
        for fqn in fqns {
            // The end-of-central-directory record zeroed: found neither in the window nor in
            // the whole item.
            let (_tmp, ck) = copy_of(base, None);
            let (_, item) = chunk_item(&open(&ck).unwrap(), fqn, 0);
            let f = OpenOptions::new()
                .write(true)
                .open(ck.join(&item.file))
                .unwrap();
            f.write_all_at(&[0; 22], item.offset + item.length - 22)
                .unwrap();
            let r = open(&ck).unwrap();
            assert_err!(read_all(&r), Error::Format { .. });
            // data.pkl (the archive's first record) made unreadable: an unknown protocol, then
            // an opcode no pickle has (refused as PyTorch's weights-only unpickler refuses it).
            for (patch, unknown_opcode) in [([0x80u8, 0xff], false), ([0xff, 0xff], true)] {
                let (_tmp, ck) = copy_of(base, None);
                let pkl = data_pkl_at(&ck, &item);
                let f = OpenOptions::new()
                    .write(true)
                    .open(ck.join(&item.file))
                    .unwrap();
                f.write_all_at(&patch, pkl).unwrap();
                let r = open(&ck).unwrap();
                if unknown_opcode {
                    let e = assert_err!(read_all(&r), Error::Unsafe { .. });
                    assert!(e.to_string().contains("opcode"), "{e}");
                } else {
                    assert_err!(read_all(&r), Error::Pickle { .. });
                }
            }
        }
    }
}

/// The file offset of the `data.pkl` record of the archive that is `item`.
fn data_pkl_at(ck: &Path, item: &Item) -> u64 {
    let file = std::fs::read(ck.join(&item.file)).unwrap();
    let h = item.offset as usize;
    assert_eq!(&file[h..h + 4], b"PK\x03\x04");
    let name_len = u16::from_le_bytes([file[h + 26], file[h + 27]]) as usize;
    let extra = u16::from_le_bytes([file[h + 28], file[h + 29]]) as usize;
    assert!(file[h + 30..h + 30 + name_len].ends_with(b"data.pkl"));
    (h + 30 + name_len + extra) as u64
}

#[test]
fn a_truncated_or_missing_data_file_is_refused_at_open() {
    for base in BASES {
        let (_tmp, ck) = copy_of(base, None);
        let r = open(&ck).unwrap();
        let last = r
            .metadata()
            .items
            .iter()
            .max_by_key(|i| i.offset + i.length)
            .unwrap()
            .clone();
        let path = ck.join(&last.file);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(last.offset + last.length - 1).unwrap();
        let e = assert_err!(open(&ck), Error::Format { .. });
        assert!(e.to_string().contains("beyond the end"), "{e}");
        std::fs::remove_file(&path).unwrap();
        assert_err!(open(&ck), Error::Io { .. });
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-made pickles: nesting and expansion bombs.

/// Writes `pickle` as the `.metadata` of a copy of the PyTorch checkpoint and opens it.
fn open_pickle(pickle: &[u8]) -> Error {
    let (_tmp, ck) = copy_of(Base::Torch, None);
    std::fs::write(ck.join(METADATA), pickle).unwrap();
    match open(&ck) {
        Err(e) => e,
        Ok(_) => panic!("a hand-made pickle opened"),
    }
}

#[test]
fn deep_nesting_in_metadata_is_refused() {
    // 100 000 nested lists: EMPTY_LIST * n, then APPEND * (n - 1).
    let n = 100_000;
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', n));
    p.extend(std::iter::repeat_n(b'a', n - 1));
    p.push(b'.');
    assert_err!(Err::<(), _>(open_pickle(&p)), Error::Pickle { .. });
    // The same depth of tuples and dicts, by MARK ... TUPLE and EMPTY_DICT / SETITEM.
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b'(', n));
    p.extend(std::iter::repeat_n(b't', n));
    p.push(b'.');
    assert_err!(Err::<(), _>(open_pickle(&p)), Error::Pickle { .. });
}

#[test]
fn pickle_bombs_in_metadata_are_refused_in_bounded_memory() {
    // Billion laughs: each level a list of 16 references to the level below (memo 0..30).
    let mut p = vec![0x80, 2, b']', b'q', 0];
    for level in 0..30u8 {
        p.push(b'(');
        p.extend(std::iter::repeat_n([b'h', level], 16).flatten());
        p.extend([b'l', b'q', level + 1]);
    }
    p.push(b'.');
    assert_err!(Err::<(), _>(open_pickle(&p)), Error::Pickle { .. });
    // Lengths that promise far more than the stream holds.
    for lying in [
        [&[0x80, 2, b'X'][..], &u32::MAX.to_le_bytes()].concat(), // BINUNICODE 4 GiB
        [&[0x80, 2, b'B'][..], &u32::MAX.to_le_bytes()].concat(), // BINBYTES 4 GiB
        [&[0x80, 2, 0x8b][..], &i32::MAX.to_le_bytes()].concat(), // LONG4 2 GiB
        [&[0x80, 4, 0x8d][..], &u64::MAX.to_le_bytes()].concat(), // BINUNICODE8
        [&[0x80, 4, 0x95][..], &u64::MAX.to_le_bytes()].concat(), // FRAME
    ] {
        assert_err!(Err::<(), _>(open_pickle(&lying)), Error::Pickle { .. });
    }
}
