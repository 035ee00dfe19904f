//! Any bytes as a DCP checkpoint's `.metadata`: `Metadata::from_pickle` returns metadata or a
//! typed error, never panics, hangs or allocates far beyond the input; metadata it returns is
//! consistent (it validates again, and the chunk geometry the reader relies on holds). No file
//! is read: this is the part of `DcpReader::open` that comes before any data file.
//!
//! Seeds: `.metadata` files that PyTorch (`tests/python/dcp_save.py`) and ckptio wrote. This
//! binary writes ckptio's when started with `CKPTIO_FUZZ_WRITE_SEEDS=DIR` (see `fuzz/run.sh`).
#![no_main]
use std::path::{Path, PathBuf};

use ckptio::dcp::{Chunk, DcpCheckpointIo, Entry, Metadata, Rank, ShardedTensor, METADATA};
use ckptio::{CheckpointIo, DType, Dict, HostTensor, SaveOptions, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("CKPTIO_FUZZ_WRITE_SEEDS") {
            write_seeds(Path::new(&dir));
            std::process::exit(0);
        }
    },
    |data: &[u8]| {
        let path = Path::new(".metadata");
        if let Ok(m) = Metadata::from_pickle(data, path) {
            check(&m, path);
        }
    }
);

/// What `validate` promises, and the reader relies on, checked on metadata that parsed.
fn check(m: &Metadata, path: &Path) {
    m.validate(path)
        .expect("metadata from_pickle returned must validate again");
    for it in &m.items {
        assert!(it.offset.checked_add(it.length).is_some(), "{it:?}");
        assert!(
            !it.file.is_empty() && !it.file.contains('/') && it.file != "..",
            "{it:?}"
        );
    }
    for (fqn, e) in &m.entries {
        let Entry::Tensor(t) = e else {
            assert!(m.item(fqn, None).is_some(), "{fqn}: a value without item");
            continue;
        };
        let whole = Chunk::whole(&t.shape);
        let total = whole.numel().expect("validated: the element count fits");
        let mut sum = 0usize;
        for c in &t.chunks {
            assert!(m.item(fqn, Some(&c.offsets)).is_some(), "{fqn}: {c:?}");
            let n = c.numel().expect("validated: a chunk's element count fits");
            sum = sum
                .checked_add(n)
                .expect("validated: the chunks sum to the shape");
            // A chunk lies inside its tensor: meeting the whole box gives the chunk back.
            if n > 0 {
                assert_eq!(c.intersect(&whole).as_ref(), Some(c), "{fqn}");
            }
        }
        assert_eq!(sum, total, "{fqn}: chunks must cover the tensor exactly");
        // Pairwise disjoint (validate checks it too; only for few chunks, to stay fast).
        if t.chunks.len() <= 64 {
            for (i, a) in t.chunks.iter().enumerate() {
                for b in &t.chunks[..i] {
                    assert!(a.intersect(b).is_none(), "{fqn}: {a:?} meets {b:?}");
                }
            }
        }
    }
}

/// Writes the `.metadata` of a few checkpoints ckptio saves (one rank) into `out`, each named
/// `ckptio-{name}.metadata`.
fn write_seeds(out: &Path) {
    std::fs::create_dir_all(out).expect("create the seed directory");
    let work = out.join(".ckptio-seed-work");
    for (name, state) in seed_states() {
        let dir = work.join(name);
        let io = DcpCheckpointIo::new(Rank::single()).run_id("fuzz-seed");
        io.save_checkpoint(&state, &dir, &SaveOptions::default())
            .expect("ckptio saves the seed checkpoint");
        let target: PathBuf = out.join(format!("ckptio-{name}.metadata"));
        std::fs::copy(dir.join(METADATA), target).expect("copy the seed .metadata");
    }
    std::fs::remove_dir_all(&work).expect("remove the seed checkpoints");
}

fn seed_states() -> Vec<(&'static str, Value)> {
    let t = |rows: usize, cols: usize| {
        let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        HostTensor::from_slice(&v, &[rows, cols]).expect("a small tensor")
    };
    // One tensor in three chunks along both dimensions, one whole, one 0-dim, values.
    let sharded = ShardedTensor::new(vec![6, 4], DType::Float32)
        .with_shard(vec![0, 0], t(3, 4))
        .and_then(|s| s.with_shard(vec![3, 0], t(3, 2)))
        .and_then(|s| s.with_shard(vec![3, 2], t(3, 2)))
        .expect("shards that cover [6, 4]");
    let mut model = Dict::new();
    model.insert("w", sharded);
    model.insert("b", t(1, 5));
    model.insert(
        "blocks",
        Value::List(vec![Value::Tensor(t(2, 2)), Value::Tensor(t(0, 3))]),
    );
    model.insert(
        "scale",
        HostTensor::from_slice(&[2.0f64], &[]).expect("a 0-dim tensor"),
    );
    let mut full = Dict::new();
    full.insert("model", model);
    full.insert("step", 7i64);
    full.insert("names", Value::List(vec!["a".into(), "b".into()]));
    let mut small = Dict::new();
    small.insert("x", HostTensor::from_slice(&[1i64, 2, 3], &[3]).expect("x"));
    vec![("full", Value::Dict(full)), ("small", Value::Dict(small))]
}
