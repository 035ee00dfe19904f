//! Criterion micro-benchmarks of what an [`AsyncCheckpointIo`] save costs the training thread,
//! with no disk: a 64 MiB state of 16 live tensors saved through a backend that writes nothing,
//! so that only the runtime is measured (snapshot, staging pool, queue, handle).
//!
//! - `stall, 64 MiB`: how long `save` keeps the training thread: an Eager save that copies
//!   on the calling thread (`eager, copying`), one that write-protects the tensors instead
//!   (`eager, write-protected`, where the process may use `userfaultfd`; skipped elsewhere),
//!   and a Deferred save (`deferred`; the copy runs on the staging thread).
//! - `copy, 64 MiB`: until the copy is complete, beside a memcpy of as many bytes into a warm
//!   buffer (`memcpy (M0)`): each Eager save through to its handle's report (the backend waits
//!   for the copy), and a Deferred save until its `staged()` resolves.
//!
//! Waits for the background work of a save happen outside the timed part, so each stall is
//! measured with the runtime idle, as a loop that saves every few steps finds it (criterion's
//! warm-up covers the first saves, after which the write-protect copier has moved the tensors
//! into huge pages and has nothing left to do between saves).
//!
//! ```text
//! ./dev.sh cargo bench --bench staging
//! ```
//!
//! The end-to-end figures with a real disk and `TorchCheckpointIo` are
//! `examples/async_bench.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckptio::runtime::{AsyncCheckpointIo, Builder};
use ckptio::{
    CheckpointIo, DType, Dict, Error, LiveTensor, LoadOptions, Restore, SaveOptions, SnapshotMode,
    TensorSource, Value,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const MIB: usize = 1 << 20;
const TENSORS: usize = 16;
const TENSOR_BYTES: usize = 4 * MIB;

/// A backend that writes nothing: what remains is the runtime's own cost.
struct Null;

impl CheckpointIo for Null {
    fn save_checkpoint(&self, c: &Value, _: &Path, _: &SaveOptions) -> ckptio::Result<()> {
        // Reads one byte of each storage, so the snapshot cannot be skipped.
        let mut x = 0u8;
        for t in c.tensors() {
            x ^= t.storage().bytes().first().copied().unwrap_or(0);
        }
        std::hint::black_box(x);
        Ok(())
    }
    fn load_checkpoint(
        &self,
        p: &Path,
        _: &LoadOptions,
        _: Option<&mut dyn Restore>,
    ) -> ckptio::Result<Option<Value>> {
        Err(Error::Io {
            op: "test",
            path: std::path::PathBuf::new(),
            source: std::io::Error::other(format!(
                "{}: the null backend keeps nothing",
                p.display()
            )),
        })
    }
    fn remove_checkpoint(&self, _: &Path) -> ckptio::Result<()> {
        Ok(())
    }
}

/// The owner of one tensor's bytes: kept alive by every `Bytes` handed out for it.
struct Owned(Arc<Vec<u8>>);

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A float32 CPU tensor in ordinary heap memory, which the benchmark never writes.
struct Weights(Arc<Vec<u8>>);

impl TensorSource for Weights {
    fn dtype(&self) -> DType {
        DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        vec![self.0.len() / 4]
    }
    fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
        dst.copy_from_slice(&self.0);
        Ok(())
    }
    fn host_memory(&self) -> Option<&dyn ckptio::HostMemory> {
        Some(self)
    }
}

// SAFETY: the bytes own a reference to the vector, so its memory stays where it is for as long
// as they live, and only this process's CPU threads could write it (none does).
#[allow(unsafe_code)]
unsafe impl ckptio::HostMemory for Weights {
    // Not borrowed: without write protection, a save copies it with `copy_to`.
    unsafe fn borrow_bytes(&self) -> Option<Bytes> {
        None
    }
    unsafe fn protectable_bytes(&self) -> Option<Bytes> {
        Some(Bytes::from_owner(Owned(Arc::clone(&self.0))))
    }
}

fn state() -> Value {
    let mut d = Dict::ordered();
    for i in 0..TENSORS {
        let fill = (i as u8).wrapping_mul(37);
        d.insert(
            format!("layers.{i}.weight"),
            LiveTensor::new(Weights(Arc::new(vec![fill; TENSOR_BYTES]))),
        );
    }
    Value::Dict(d)
}

fn runtime(mode: SnapshotMode, protect: bool) -> AsyncCheckpointIo<Null> {
    let io = Builder::default()
        .snapshot_mode(mode)
        .write_protect(protect)
        .build(Null);
    io.reserve(&state(), 1).expect("reserve the staging buffer");
    io
}

/// Until when a save is timed.
#[derive(Clone, Copy)]
enum Until {
    /// `save` returns: the stall.
    Returned,
    /// `staged()` resolves: the copy is taken.
    Staged,
    /// The handle resolves: the background copy has ended and the backend has been called.
    Done,
}

/// Times `iters` saves of `tree`, each until `until`; each save's background work ends before
/// the next one starts, outside the timed part.
fn timed(io: &AsyncCheckpointIo<Null>, tree: &Value, iters: u64, until: Until) -> Duration {
    let path = Path::new("never-written.pt");
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            let h = io.save(tree, path).expect("save");
            match until {
                Until::Returned => {}
                Until::Staged => h.wait_staged().expect("staged"),
                Until::Done => {
                    h.wait().expect("write");
                }
            }
            let took = t.elapsed();
            h.wait().expect("write");
            took
        })
        .sum()
}

fn bench(c: &mut Criterion) {
    let total = (TENSORS * TENSOR_BYTES) as u64;
    let tree = state();
    let copying = runtime(SnapshotMode::Eager, false);
    let deferred = runtime(SnapshotMode::Deferred, false);
    let protected = runtime(SnapshotMode::Eager, true);
    // One save tells whether this process may write-protect.
    timed(&protected, &tree, 1, Until::Done);
    let protected = (protected.status().write_protected > 0).then_some(protected);
    if protected.is_none() {
        eprintln!("eager, write-protected: skipped (this process may not use userfaultfd)");
    }

    // What the training thread waits for: no throughput, only times.
    let mut g = c.benchmark_group("stall, 64 MiB");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    let mut stall = |name: &str, io: &AsyncCheckpointIo<Null>| {
        g.bench_function(name, |b| {
            b.iter_custom(|n| timed(io, &tree, n, Until::Returned))
        });
    };
    stall("eager, copying", &copying);
    if let Some(p) = &protected {
        stall("eager, write-protected", p);
    }
    stall("deferred", &deferred);
    g.finish();

    // Until the copy is complete, beside a plain memcpy of as many bytes.
    let mut g = c.benchmark_group("copy, 64 MiB");
    g.throughput(Throughput::Bytes(total))
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    let src: Vec<u8> = vec![7; total as usize];
    let mut dst: Vec<u8> = vec![0; total as usize];
    g.bench_function("memcpy (M0)", |b| {
        b.iter(|| {
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
        })
    });
    g.bench_function("eager, copying, until done", |b| {
        b.iter_custom(|n| timed(&copying, &tree, n, Until::Done))
    });
    if let Some(p) = &protected {
        g.bench_function("eager, write-protected, until done", |b| {
            b.iter_custom(|n| timed(p, &tree, n, Until::Done))
        });
    }
    g.bench_function("deferred, until staged", |b| {
        b.iter_custom(|n| timed(&deferred, &tree, n, Until::Staged))
    });
    g.finish();

    for io in [Some(copying), Some(deferred), protected]
        .into_iter()
        .flatten()
    {
        // In steady state no save allocates: the one buffer reserved at the start served
        // them all.
        let pool = io.status().pool;
        assert_eq!(pool.allocations, 1, "{pool:?}");
        io.teardown().expect("teardown");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
