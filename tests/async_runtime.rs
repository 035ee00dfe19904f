//! The contract of `AsyncCheckpointIo`: snapshots, ordering, errors, backpressure, shutdown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckptio::runtime::{Builder, WriteStart};
use ckptio::{
    AsyncCheckpointIo, Backpressure, CheckpointIo, DType, Dict, Error, HostTensor, LiveTensor,
    LoadOptions, Restore, SaveOptions, SnapshotMode, TensorSource, TorchCheckpointIo, Value,
};

/// A mutable f32 tensor the test owns, like a parameter the optimizer updates in place.
#[derive(Clone)]
struct Param(Arc<Mutex<Vec<f32>>>);

impl Param {
    fn new(n: usize, x: f32) -> Param {
        Param(Arc::new(Mutex::new(vec![x; n])))
    }
    fn fill(&self, x: f32) {
        self.0.lock().unwrap().iter_mut().for_each(|v| *v = x);
    }
    fn host(&self) -> HostTensor {
        let v = self.0.lock().unwrap().clone();
        let n = v.len();
        HostTensor::from_slice(&v, &[n]).unwrap()
    }
}

impl TensorSource for Param {
    fn dtype(&self) -> DType {
        DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        vec![self.0.lock().unwrap().len()]
    }
    fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
        for (c, v) in dst.chunks_exact_mut(4).zip(self.0.lock().unwrap().iter()) {
            c.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }
}

fn tree_of(p: &Param, step: i64) -> Value {
    let mut d = Dict::new();
    d.insert("w", LiveTensor::new(p.clone()));
    d.insert("step", step);
    Value::Dict(d)
}

/// Two tensors and a step.
fn tree_of_two(a: &Param, b: &Param, step: i64) -> Value {
    let mut d = Dict::new();
    d.insert("a", LiveTensor::new(a.clone()));
    d.insert("b", LiveTensor::new(b.clone()));
    d.insert("step", step);
    Value::Dict(d)
}

/// A backend that keeps checkpoints in memory, with optional delay, failures and panics.
#[derive(Default)]
struct MemIo {
    files: Mutex<HashMap<PathBuf, Value>>,
    delay_ms: AtomicUsize,
    fail_next: AtomicUsize,
    panic_next: AtomicUsize,
    panic_teardown: AtomicUsize,
    teardowns: AtomicUsize,
}

impl CheckpointIo for MemIo {
    fn save_checkpoint(&self, c: &Value, p: &Path, _o: &SaveOptions) -> ckptio::Result<()> {
        std::thread::sleep(Duration::from_millis(
            self.delay_ms.load(Ordering::SeqCst) as u64
        ));
        if self.panic_next.load(Ordering::SeqCst) > 0 {
            self.panic_next.fetch_sub(1, Ordering::SeqCst);
            panic!("backend exploded on {}", p.display());
        }
        if self.fail_next.load(Ordering::SeqCst) > 0 {
            self.fail_next.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Io {
                op: "test",
                path: std::path::PathBuf::new(),
                source: std::io::Error::other(format!("disk full writing {}", p.display())),
            });
        }
        // Store a deep copy so later buffer reuse could never change it.
        let copy = c.replace_live(&mut |l| l.to_host()).unwrap();
        let mut copy = copy;
        copy.for_each_tensor_mut(&mut |t| *t = t.to_contiguous());
        self.files.lock().unwrap().insert(p.to_path_buf(), copy);
        Ok(())
    }
    fn load_checkpoint(
        &self,
        p: &Path,
        o: &LoadOptions,
        s: Option<&mut dyn Restore>,
    ) -> ckptio::Result<Option<Value>> {
        let v = self
            .files
            .lock()
            .unwrap()
            .get(p)
            .cloned()
            .ok_or_else(|| Error::Io {
                op: "test",
                path: std::path::PathBuf::new(),
                source: std::io::Error::other(format!("no checkpoint at {}", p.display())),
            })?;
        ckptio::finish_load(v, o, s)
    }
    fn remove_checkpoint(&self, p: &Path) -> ckptio::Result<()> {
        std::thread::sleep(Duration::from_millis(
            self.delay_ms.load(Ordering::SeqCst) as u64 / 2,
        ));
        self.files.lock().unwrap().remove(p);
        Ok(())
    }
    fn teardown(&self) -> ckptio::Result<()> {
        self.teardowns.fetch_add(1, Ordering::SeqCst);
        if self.panic_teardown.load(Ordering::SeqCst) > 0 {
            self.panic_teardown.fetch_sub(1, Ordering::SeqCst);
            panic!("backend teardown exploded");
        }
        Ok(())
    }
}

fn slow_mem(ms: usize) -> MemIo {
    let m = MemIo::default();
    m.delay_ms.store(ms, Ordering::SeqCst);
    m
}

fn stored_w(io: &AsyncCheckpointIo<MemIo>, p: &str) -> HostTensor {
    io.inner().files.lock().unwrap()[Path::new(p)]
        .get("w")
        .unwrap()
        .as_tensor()
        .unwrap()
        .clone()
}

#[test]
fn mutating_after_eager_save_returns_never_changes_what_is_written() {
    let io = Builder::default().build(slow_mem(50));
    let p = Param::new(1000, 1.0);
    let before = p.host();
    let h = io.save(&tree_of(&p, 1), "a").unwrap();
    p.fill(99.0); // the optimizer step, right after save returns
    h.wait().unwrap();
    assert!(stored_w(&io, "a").data_eq(&before));
}

#[test]
fn mutating_after_deferred_staged_never_changes_what_is_written() {
    let io = Builder::default()
        .snapshot_mode(SnapshotMode::Deferred)
        .build(slow_mem(50));
    let p = Param::new(1000, 1.0);
    let before = p.host();
    let h = io.save(&tree_of(&p, 1), "a").unwrap();
    h.wait_staged().unwrap();
    p.fill(99.0);
    h.wait().unwrap();
    assert!(stored_w(&io, "a").data_eq(&before));
}

#[test]
fn eager_save_to_torch_file_matches_the_state_at_save_time() {
    let dir = tempfile::tempdir().unwrap();
    let io = AsyncCheckpointIo::new(TorchCheckpointIo::new());
    let p = Param::new(4096, 3.0);
    let before = p.host();
    let path = dir.path().join("x.pt");
    let h = io.save(&tree_of(&p, 7), &path).unwrap();
    p.fill(-1.0);
    let rep = h.wait().unwrap();
    assert_eq!(rep.bytes, 4096 * 4);
    // Too small to be write-protected: copied by `save`, which was its whole staging.
    assert_eq!(rep.copied, rep.stage, "{rep:?}");
    let back = ckptio::torch::load(&path, &LoadOptions::default()).unwrap();
    assert!(back.get("w").unwrap().as_tensor().unwrap().data_eq(&before));
    assert_eq!(back.get("step").and_then(Value::as_int), Some(7));
    io.teardown().unwrap();
}

#[test]
fn a_failed_write_reaches_its_handle_and_is_reported_once() {
    let io = Builder::default().build(MemIo::default());
    io.inner().fail_next.store(1, Ordering::SeqCst);
    let p = Param::new(4, 0.0);
    let h = io.save(&tree_of(&p, 1), "bad").unwrap();
    let err = h.wait().unwrap_err();
    assert!(err.to_string().contains("disk full writing bad"), "{err}");
    // Already reported through the handle: the next call does not raise it again.
    io.save(&tree_of(&p, 2), "good").unwrap().wait().unwrap();
    io.teardown().unwrap();
}

#[test]
fn an_unawaited_error_is_returned_by_the_next_call_then_never_again() {
    let io = Builder::default().build(MemIo::default());
    io.inner().fail_next.store(1, Ordering::SeqCst);
    let p = Param::new(4, 0.0);
    drop(io.save(&tree_of(&p, 1), "bad").unwrap());
    io.flush().unwrap_err();
    // Reported once: the writer survived and later calls succeed.
    io.save(&tree_of(&p, 2), "good").unwrap().wait().unwrap();
    io.flush().unwrap();
    io.teardown().unwrap();
}

#[test]
fn several_unawaited_errors_are_all_reported_by_teardown() {
    let io = Builder::default().build(MemIo::default());
    io.inner().fail_next.store(2, Ordering::SeqCst);
    let p = Param::new(4, 0.0);
    let h1 = io.save(&tree_of(&p, 1), "a").unwrap();
    h1.wait().unwrap_err(); // reported via the handle
    io.inner().fail_next.store(2, Ordering::SeqCst);
    // Drop the handles: nobody awaits these two.
    drop(io.save(&tree_of(&p, 2), "b").unwrap());
    std::thread::sleep(Duration::from_millis(20));
    let r = io.inner().files.lock().unwrap().len();
    assert_eq!(r, 0);
    let c = io.save(&tree_of(&p, 3), "c");
    // Either the save call reported b's failure, or teardown reports both b and c.
    let err = match c {
        Err(e) => {
            assert!(e.to_string().contains("writing b"), "{e}");
            io.teardown().unwrap();
            return;
        }
        Ok(h) => {
            drop(h);
            io.teardown().unwrap_err()
        }
    };
    match err {
        Error::Multiple { errors } => assert_eq!(errors.len(), 2, "{errors:?}"),
        other => panic!("expected two errors, got {other}"),
    }
    assert_eq!(io.inner().teardowns.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panic_in_the_backend_becomes_an_error_and_the_writer_survives() {
    let io = Builder::default().build(MemIo::default());
    io.inner().panic_next.store(1, Ordering::SeqCst);
    let p = Param::new(4, 0.0);
    let err = io.save(&tree_of(&p, 1), "a").unwrap().wait().unwrap_err();
    assert!(
        matches!(&err, Error::Background { source, .. } if matches!(**source, Error::Panic { .. })),
        "{err}"
    );
    io.save(&tree_of(&p, 2), "a").unwrap().wait().unwrap();
    assert_eq!(io.inner().files.lock().unwrap().len(), 1);
    io.teardown().unwrap();
}

#[test]
fn remove_waits_for_pending_save_of_the_same_path() {
    let io = Builder::default().capacity(4).build(slow_mem(40));
    let p = Param::new(4, 0.0);
    let _h = io.save(&tree_of(&p, 1), "ckpt").unwrap();
    io.remove_checkpoint(Path::new("ckpt")).unwrap();
    io.flush().unwrap();
    assert!(
        io.inner().files.lock().unwrap().is_empty(),
        "removed before the save landed"
    );
}

#[test]
fn load_reads_your_own_pending_write() {
    let io = Builder::default().capacity(4).build(slow_mem(40));
    let p = Param::new(4, 5.0);
    let _h = io.save(&tree_of(&p, 42), "ckpt").unwrap();
    let v = io
        .load_checkpoint(Path::new("ckpt"), &LoadOptions::default(), None)
        .unwrap()
        .unwrap();
    assert_eq!(v.get("step").and_then(Value::as_int), Some(42));
}

#[test]
fn save_remove_load_order_matches_a_synchronous_reference() {
    for (mode, writers, seed) in [
        (SnapshotMode::Eager, 1, 1u64),
        (SnapshotMode::Deferred, 1, 2),
        (SnapshotMode::Eager, 3, 3),
        (SnapshotMode::Deferred, 2, 4),
    ] {
        let io = Builder::default()
            .snapshot_mode(mode)
            .writers(writers)
            .capacity(3)
            .build(slow_mem(1));
        let reference = MemIo::default();
        let p = Param::new(8, 0.0);
        let mut x = seed;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..120i64 {
            let path = format!("p{}", next() % 3);
            let path = Path::new(&path);
            match next() % 5 {
                0..=2 => {
                    p.fill(step as f32);
                    let t = tree_of(&p, step);
                    let h = io.save(&t, path).unwrap();
                    h.wait_staged().unwrap();
                    reference
                        .save_checkpoint(&t, path, &SaveOptions::default())
                        .unwrap();
                }
                3 => {
                    io.remove_checkpoint(path).unwrap();
                    reference.remove_checkpoint(path).unwrap();
                }
                _ => {
                    let got = io.load_checkpoint(path, &LoadOptions::default(), None);
                    let want = reference.load_checkpoint(path, &LoadOptions::default(), None);
                    match (got, want) {
                        (Ok(g), Ok(w)) => assert_eq!(g, w, "{mode:?} step {step}"),
                        (Err(_), Err(_)) => {}
                        (g, w) => panic!("{mode:?} step {step}: {g:?} vs {w:?}"),
                    }
                }
            }
        }
        io.teardown().unwrap();
        let got = io.inner().files.lock().unwrap().clone();
        let want = reference.files.lock().unwrap().clone();
        assert_eq!(got, want, "{mode:?} final state");
    }
}

#[test]
fn drop_without_teardown_flushes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("c{i}.pt")))
        .collect();
    {
        let io = Builder::default()
            .capacity(3)
            .build(TorchCheckpointIo::new());
        let p = Param::new(100_000, 1.0);
        for path in &paths {
            drop(io.save(&tree_of(&p, 1), path).unwrap());
        }
    }
    for path in &paths {
        ckptio::torch::load(path, &LoadOptions::default()).unwrap();
    }
}

#[test]
fn teardown_forwards_and_the_wrapper_works_again_afterwards() {
    let io = Builder::default().build(MemIo::default());
    let p = Param::new(4, 0.0);
    io.save(&tree_of(&p, 1), "a").unwrap().wait().unwrap();
    io.teardown().unwrap();
    assert_eq!(io.inner().teardowns.load(Ordering::SeqCst), 1);
    io.save(&tree_of(&p, 2), "b").unwrap().wait().unwrap(); // a second fit
    io.teardown().unwrap();
    assert_eq!(io.inner().teardowns.load(Ordering::SeqCst), 2);
    assert_eq!(io.inner().files.lock().unwrap().len(), 2);
    // Dropping after an explicit teardown does not tear the inner backend down again.
    let inner = Arc::new(MemIo::default());
    {
        let io = Builder::default().build(inner.clone());
        drop(io.save(&tree_of(&p, 3), "c").unwrap());
        io.teardown().unwrap();
    }
    assert_eq!(inner.teardowns.load(Ordering::SeqCst), 1);
}

#[test]
fn teardown_timeout_reports_what_is_pending_instead_of_hanging() {
    within_20s(|| {
        let (held, started, release) = Held::new();
        let io = Builder::default().capacity(2).build(held);
        let p = Param::new(4, 0.0);
        let _a = io.save(&tree_of(&p, 1), "slow-a").unwrap();
        started.recv_timeout(Duration::from_secs(20)).unwrap(); // held until released
        let _b = io.save(&tree_of(&p, 2), "slow-b").unwrap();
        match io.teardown_timeout(Duration::from_millis(20)) {
            Err(Error::TeardownTimeout { pending }) => assert!(!pending.is_empty()),
            other => panic!("expected a timeout, got {other:?}"),
        }
        for _ in 0..2 {
            release.send(()).unwrap();
        }
        io.teardown().unwrap();
    });
}

#[test]
fn teardown_timeout_keeps_its_deadline_when_the_queue_before_a_hung_backend_is_full() {
    for mode in [SnapshotMode::Eager, SnapshotMode::Deferred] {
        // Default capacity: one save in the hung write, one filling the queue behind it.
        let (held, started, release) = Held::new();
        let io = Builder::default().snapshot_mode(mode).build(held);
        let p = Param::new(4, 0.0);
        let a = io.save(&tree_of(&p, 1), "hung-a").unwrap();
        started.recv_timeout(Duration::from_secs(20)).unwrap();
        let b = io.save(&tree_of(&p, 2), "hung-b").unwrap();
        let (io, r) = within_20s(move || {
            let r = io.teardown_timeout(Duration::from_millis(50));
            (io, r)
        });
        // It returned while both writes were still held: it did not wait for them.
        assert!(!a.is_finished() && !b.is_finished(), "{mode:?}");
        match r {
            Err(Error::TeardownTimeout { pending }) => {
                assert!(pending.iter().any(|p| p == Path::new("hung-a")), "{mode:?}");
                assert!(pending.iter().any(|p| p == Path::new("hung-b")), "{mode:?}");
            }
            other => panic!("{mode:?}: expected a timeout, got {other:?}"),
        }
        // Still usable: let both writes end, and nothing is lost.
        release.send(()).unwrap();
        release.send(()).unwrap();
        a.wait().unwrap();
        b.wait().unwrap();
        io.teardown().unwrap();
    }
}

#[test]
fn a_panic_in_the_backend_teardown_is_an_error_and_drop_survives_it() {
    let io = Builder::default().build(MemIo::default());
    let p = Param::new(4, 1.0);
    io.inner().panic_teardown.store(1, Ordering::SeqCst);
    io.save(&tree_of(&p, 1), "t").unwrap().wait().unwrap();
    match io.teardown() {
        Err(Error::Panic { message, .. }) => assert!(message.contains("exploded"), "{message}"),
        other => panic!("expected a panic error, got {other:?}"),
    }
    // Used again, then dropped with the teardown panicking again: logged, not a panic.
    io.save(&tree_of(&p, 2), "t").unwrap().wait().unwrap();
    io.inner().panic_teardown.store(1, Ordering::SeqCst);
    assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(io))).is_ok());
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A backend over real files whose saves take a while (removals do not).
struct SlowFiles;

impl CheckpointIo for SlowFiles {
    fn save_checkpoint(&self, _c: &Value, p: &Path, _o: &SaveOptions) -> ckptio::Result<()> {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(p, b"checkpoint").map_err(|e| io_err("write", p, e))
    }
    fn load_checkpoint(
        &self,
        p: &Path,
        _o: &LoadOptions,
        _s: Option<&mut dyn Restore>,
    ) -> ckptio::Result<Option<Value>> {
        let bytes = std::fs::read(p).map_err(|e| io_err("read", p, e))?;
        Ok(Some(Value::Int(bytes.len() as i64)))
    }
    fn remove_checkpoint(&self, p: &Path) -> ckptio::Result<()> {
        match std::fs::remove_file(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", p, e)),
            _ => Ok(()),
        }
    }
}

#[test]
fn with_several_writers_a_path_spelled_another_way_still_waits_for_its_saves() {
    // A relative path (from the working directory, where cargo runs tests) and its absolute
    // spelling name one file: a removal or a load of one waits for a save of the other.
    let base = std::env::current_dir().unwrap().join("target");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let rel = dir
        .path()
        .strip_prefix(std::env::current_dir().unwrap())
        .unwrap()
        .to_path_buf();
    let io = Builder::default().writers(8).capacity(8).build(SlowFiles);
    let p = Param::new(4, 1.0);
    for i in 0..8 {
        let name = format!("c{i}.pt");
        let (abs, rel) = (dir.path().join(&name), rel.join(".").join(&name));
        drop(io.save(&tree_of(&p, i), &abs).unwrap());
        if i % 2 == 0 {
            io.remove_checkpoint(&rel).unwrap();
        } else {
            let got = io
                .load_checkpoint(&rel, &LoadOptions::default(), None)
                .unwrap();
            assert_eq!(got, Some(Value::Int(10)), "{}", rel.display());
        }
    }
    io.flush().unwrap();
    for i in 0..8 {
        let f = dir.path().join(format!("c{i}.pt"));
        assert_eq!(f.exists(), i % 2 == 1, "{}", f.display());
    }
    io.teardown().unwrap();
}

#[test]
fn skip_policy_skips_and_counts_when_the_queue_is_full() {
    within_20s(|| {
        let (held, started, release) = Held::new();
        let io = Builder::default()
            .backpressure(Backpressure::Skip)
            .capacity(1)
            .build(held);
        let p = Param::new(4, 0.0);
        let first = io.save(&tree_of(&p, 0), "s0").unwrap();
        // The writer holds "s0"; "s1" fills the queue; the four after it find it full.
        started.recv_timeout(Duration::from_secs(20)).unwrap();
        let handles: Vec<_> = (1..6)
            .map(|i| io.save(&tree_of(&p, i), format!("s{i}")).unwrap())
            .collect();
        for _ in 0..2 {
            release.send(()).unwrap();
        }
        assert!(!first.wait().unwrap().skipped);
        let skipped: Vec<bool> = handles.iter().map(|h| h.wait().unwrap().skipped).collect();
        assert_eq!(skipped, [false, true, true, true, true]);
        assert_eq!(io.status().skips, 4);
        io.teardown().unwrap();
    });
}

#[test]
fn error_policy_refuses_when_the_queue_is_full() {
    within_20s(|| {
        let (held, started, release) = Held::new();
        let io = Builder::default()
            .backpressure(Backpressure::Error)
            .capacity(1)
            .build(held);
        let p = Param::new(4, 0.0);
        let first = io.save(&tree_of(&p, 0), "e0").unwrap();
        started.recv_timeout(Duration::from_secs(20)).unwrap(); // the writer holds "e0"
        let queued = io.save(&tree_of(&p, 1), "e1").unwrap(); // fills the queue
        for i in 2..6 {
            match io.save(&tree_of(&p, i), format!("e{i}")) {
                Err(Error::QueueFull { .. }) => {}
                other => panic!("e{i}: expected QueueFull, got {other:?}"),
            }
        }
        for _ in 0..2 {
            release.send(()).unwrap();
        }
        first.wait().unwrap();
        queued.wait().unwrap();
        io.teardown().unwrap();
    });
}

#[test]
fn staging_buffers_are_reused_after_warm_up() {
    let io = Builder::default().build(MemIo::default());
    let a = Param::new(10_000, 1.0);
    let b = Param::new(3_000, 2.0);
    let tree = |s: i64| tree_of_two(&a, &b, s);
    io.save(&tree(0), "w").unwrap().wait().unwrap();
    let warm = io.status().pool.allocations;
    for s in 1..50 {
        io.save(&tree(s), "w").unwrap().wait().unwrap();
    }
    let st = io.status();
    assert_eq!(st.pool.allocations, warm, "{st:?}");
    assert_eq!(st.pool.in_use, 0);
    assert_eq!(st.saves, 50);
    assert_eq!(st.bytes_in_flight, 0);
}

#[test]
fn after_reserve_no_save_allocates_even_the_first_ones() {
    within_20s(reserve_then_save_in_pairs);
}

fn reserve_then_save_in_pairs() {
    // Saves in pairs: the second is queued while the backend holds the first, so two staging
    // buffers are in use at once.
    let (held, started, release) = Held::new();
    let io = Builder::default().capacity(1).build(held);
    let a = Param::new(10_000, 1.0);
    let b = Param::new(3_000, 2.0);
    let tree = |s: i64| tree_of_two(&a, &b, s);
    let reserved = io.reserve(&tree(0), 2).unwrap();
    let st = io.status().pool;
    assert_eq!(st.allocations, 2, "{st:?}");
    assert_eq!(reserved, st.free, "{st:?}");
    // Each buffer holds the 52 000 bytes of the two tensors, each region rounded up a little.
    assert!(
        (2 * 52_000..2 * (52_000 + 2 * 4096)).contains(&reserved),
        "{reserved}"
    );
    assert_eq!(io.reserve(&tree(0), 2).unwrap(), 0, "already ready");
    for pair in 0..3 {
        let h1 = io.save(&tree(2 * pair), format!("r{pair}a")).unwrap();
        started.recv_timeout(Duration::from_secs(20)).unwrap(); // held by the backend
        let h2 = io.save(&tree(2 * pair + 1), format!("r{pair}b")).unwrap(); // queued
        let st = io.status().pool;
        assert_eq!(st.in_use, reserved, "pair {pair}: two in flight: {st:?}");
        release.send(()).unwrap();
        release.send(()).unwrap();
        h1.wait().unwrap();
        h2.wait().unwrap();
        started.recv_timeout(Duration::from_secs(20)).unwrap(); // the second's start
    }
    let st = io.status().pool;
    assert_eq!(st.allocations, 2, "{st:?}");
    assert_eq!(st.reuses, 6, "{st:?}");
    io.teardown().unwrap();
}

/// A tensor that claims more bytes than any allocation can hold (or than `usize` counts).
struct Enormous(Vec<usize>);

impl TensorSource for Enormous {
    fn dtype(&self) -> DType {
        DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        self.0.clone()
    }
    fn copy_to(&self, _dst: &mut [u8]) -> ckptio::Result<()> {
        unreachable!("never asked to copy")
    }
}

#[test]
fn a_snapshot_too_large_to_allocate_is_refused_and_the_pool_still_serves() {
    let io = Builder::default().build(MemIo::default());
    // 2^62 bytes (a size no machine can map: allocating it would abort); 2^63 bytes; 2^64
    // bytes (the element count fits `usize`, the byte count does not); 2^65 elements.
    for shape in [
        vec![1 << 60],
        vec![1 << 61],
        vec![1 << 62],
        vec![1 << 62, 8],
    ] {
        let mut d = Dict::new();
        d.insert("w", LiveTensor::new(Enormous(shape.clone())));
        let tree = Value::Dict(d);
        for r in [
            io.save(&tree, "e").map(drop),
            io.reserve(&tree, 1).map(drop),
        ] {
            // Refused with a typed error that says why (never a panic).
            match r {
                Err(e @ (Error::Snapshot { .. } | Error::Tensor { .. })) => {
                    assert!(e.to_string().contains("overflow"), "{shape:?}: {e}")
                }
                other => panic!("{shape:?}: expected a refusal, got {other:?}"),
            }
        }
    }
    // A copy of its own is refused too, before any allocation.
    for shape in [vec![1 << 60], vec![1 << 62]] {
        let huge = LiveTensor::new(Enormous(shape));
        assert!(matches!(huge.to_host(), Err(Error::Tensor { .. })));
    }
    let p = Param::new(1000, 1.0);
    within_20s(move || {
        io.save(&tree_of(&p, 1), "ok").unwrap().wait().unwrap();
        io.teardown().unwrap();
    });
}

#[test]
fn a_reserve_beyond_the_pool_budget_fails_and_allocates_nothing() {
    let p = Param::new(100_000, 1.0); // 400 kB of staging per save
    let io = Builder::default()
        .pool_budget(600_000)
        .build(MemIo::default());
    match io.reserve(&tree_of(&p, 0), 2) {
        Err(Error::StagingBudget { budget, .. }) => assert_eq!(budget, 600_000),
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(io.status().pool.allocations, 0);
    // One fits, and the save after it uses it.
    assert!(io.reserve(&tree_of(&p, 0), 1).unwrap() >= 400_000);
    io.save(&tree_of(&p, 1), "ok").unwrap().wait().unwrap();
    assert_eq!(io.status().pool.allocations, 1);
    // A tree with no live tensor takes no staging.
    let mut d = Dict::new();
    d.insert("step", 1i64);
    assert_eq!(io.reserve(&Value::Dict(d), 4).unwrap(), 0);
    io.teardown().unwrap();
}

#[test]
fn shared_live_tensor_is_snapshotted_once_and_stays_shared() {
    let dir = tempfile::tempdir().unwrap();
    let io = AsyncCheckpointIo::new(TorchCheckpointIo::new());
    let p = Param::new(64, 1.5);
    let l = LiveTensor::new(p.clone());
    let v = Value::List(vec![Value::Live(l.clone()), Value::Live(l)]);
    let path = dir.path().join("tied.pt");
    let rep = io.save(&v, &path).unwrap().wait().unwrap();
    assert_eq!(rep.bytes, 64 * 4);
    let back = ckptio::torch::load(&path, &LoadOptions::default()).unwrap();
    let items = back.as_seq().unwrap();
    let (a, b) = (items[0].as_tensor().unwrap(), items[1].as_tensor().unwrap());
    assert!(a.storage().ptr_eq(b.storage()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_save_can_be_awaited_under_tokio() {
    let dir = tempfile::tempdir().unwrap();
    let io = AsyncCheckpointIo::new(TorchCheckpointIo::new());
    let p = Param::new(16, 2.0);
    let h = io.save(&tree_of(&p, 3), dir.path().join("t.pt")).unwrap();
    h.staged().await.unwrap();
    let rep = h.await.unwrap();
    assert!(rep.durable);
    io.teardown().unwrap();
}

#[test]
fn a_save_can_be_awaited_from_a_plain_thread_and_futures_executor() {
    let io = Arc::new(Builder::default().build(slow_mem(5)));
    let p = Param::new(16, 2.0);
    let h = io.save(&tree_of(&p, 3), "x").unwrap();
    let t = std::thread::spawn(move || h.wait().map(|r| r.bytes));
    assert_eq!(t.join().unwrap().unwrap(), 64);
    let h2 = io.save(&tree_of(&p, 4), "y").unwrap();
    let r = futures::executor::block_on(h2).unwrap();
    assert_eq!(r.bytes, 64);
}

/// Implements `CheckpointIo` for a test backend that only saves, through its inherent
/// `save(&self, &Value)`: loads find nothing and removes do nothing.
macro_rules! save_only_backend {
    ($t:ty, pending: $pending:expr) => {
        impl CheckpointIo for $t {
            fn save_checkpoint(
                &self,
                c: &Value,
                _p: &Path,
                _o: &SaveOptions,
            ) -> ckptio::Result<()> {
                self.save(c)
            }
            fn load_checkpoint(
                &self,
                _p: &Path,
                _o: &LoadOptions,
                _s: Option<&mut dyn Restore>,
            ) -> ckptio::Result<Option<Value>> {
                Ok(None)
            }
            fn remove_checkpoint(&self, _p: &Path) -> ckptio::Result<()> {
                Ok(())
            }
            fn accepts_pending_storages(&self) -> bool {
                $pending
            }
        }
    };
}

/// A tensor whose copy waits (up to 5 s) for a signal, or fails, as the test directs.
struct Gated {
    n: usize,
    x: f32,
    open: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    fail_after_ms: Option<u64>,
}

impl TensorSource for Gated {
    fn dtype(&self) -> DType {
        DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        vec![self.n]
    }
    fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
        if let Some(ms) = self.fail_after_ms {
            std::thread::sleep(Duration::from_millis(ms));
            return Err(Error::Io {
                op: "test",
                path: std::path::PathBuf::new(),
                source: std::io::Error::other("sensor unplugged"),
            });
        }
        if let Some(rx) = self.open.lock().unwrap().take() {
            rx.recv_timeout(Duration::from_secs(5))
                .map_err(|_| Error::Io {
                    op: "test",
                    path: std::path::PathBuf::new(),
                    source: std::io::Error::other("the writer never read the first tensor"),
                })?;
        }
        for c in dst.chunks_exact_mut(4) {
            c.copy_from_slice(&self.x.to_le_bytes());
        }
        Ok(())
    }
}

/// A backend that reads tensor "a", then lets the copy of tensor "b" go on, then reads "b".
struct Pipelined {
    go: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    got: Mutex<Vec<f32>>,
}

impl Pipelined {
    fn save(&self, c: &Value) -> ckptio::Result<()> {
        let a = c.get("a").and_then(Value::as_tensor).unwrap();
        let b = c.get("b").and_then(Value::as_tensor).unwrap();
        assert!(
            !b.storage().is_ready(),
            "b cannot be copied before a is read"
        );
        a.storage().try_bytes()?;
        self.got.lock().unwrap().extend(a.to_vec::<f32>()?);
        if let Some(go) = self.go.lock().unwrap().take() {
            go.send(()).unwrap();
        }
        b.storage().try_bytes()?;
        self.got.lock().unwrap().extend(b.to_vec::<f32>()?);
        Ok(())
    }
}

save_only_backend!(Pipelined, pending: true);

#[test]
fn the_write_starts_on_the_first_tensors_while_the_last_are_still_being_copied() {
    for mode in [SnapshotMode::Eager, SnapshotMode::Deferred] {
        let (tx, rx) = std::sync::mpsc::channel();
        let io = Builder::default()
            .snapshot_mode(mode)
            .write_start(WriteStart::WhileProtecting)
            .build(Pipelined {
                go: Mutex::new(Some(tx)),
                got: Mutex::new(Vec::new()),
            });
        let mut d = Dict::new();
        let a = Gated {
            n: 3,
            x: 1.5,
            open: Mutex::new(None),
            fail_after_ms: None,
        };
        // The copy of "b" can only finish once the writer has read "a": without the overlap
        // this save fails after 5 s.
        let b = Gated {
            n: 2,
            x: -2.0,
            open: Mutex::new(Some(rx)),
            fail_after_ms: None,
        };
        d.insert("a", LiveTensor::new(a));
        d.insert("b", LiveTensor::new(b));
        let h = io.save(&Value::Dict(d), "p").unwrap();
        h.wait().unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_eq!(
            *io.inner().got.lock().unwrap(),
            vec![1.5, 1.5, 1.5, -2.0, -2.0]
        );
        io.teardown().unwrap();
    }
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_copy_that_fails_midway_fails_the_save_and_keeps_the_previous_checkpoint() {
    // Deferred saves go to the writer before their copy unless `WriteStart::AfterSnapshot`;
    // then a failed copy ends the save without it.
    for (mode, write_start) in [
        (SnapshotMode::Eager, WriteStart::WhileCopying),
        (SnapshotMode::Deferred, WriteStart::WhileCopying),
        (SnapshotMode::Deferred, WriteStart::AfterSnapshot),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.pt");
        let io = Builder::default()
            .snapshot_mode(mode)
            .write_start(write_start)
            .build(TorchCheckpointIo::new());
        let p = Param::new(1 << 16, 4.0);
        let good = p.host();
        io.save(&tree_of(&p, 1), &path).unwrap().wait().unwrap();

        let mut d = Dict::new();
        d.insert("w", LiveTensor::new(p.clone()));
        // Fails after the writer has had time to start the file with "w".
        let bad = Gated {
            n: 8,
            x: 0.0,
            open: Mutex::new(None),
            fail_after_ms: Some(200),
        };
        d.insert("z", LiveTensor::new(bad));
        match mode {
            SnapshotMode::Eager => {
                let err = io.save(&Value::Dict(d), &path).unwrap_err();
                assert!(err.to_string().contains("sensor unplugged"), "{err}");
            }
            _ => {
                let h = io.save(&Value::Dict(d), &path).unwrap();
                let err = h.wait().unwrap_err();
                assert!(err.to_string().contains("sensor unplugged"), "{err}");
                // Its staging buffer and bytes in flight went back before the handle heard.
                let st = io.status();
                assert_eq!((st.bytes_in_flight, st.pool.in_use), (0, 0), "{st:?}");
                let err = h_staged_error(&io, &path);
                assert!(err.is_none(), "reported twice: {err:?}");
            }
        }
        // Reported once (above); the writer survived; the previous checkpoint is intact and no
        // temporary file is left.
        io.flush().unwrap();
        let back = ckptio::torch::load(&path, &LoadOptions::default()).unwrap();
        assert!(
            back.get("w").unwrap().as_tensor().unwrap().data_eq(&good),
            "{mode:?}"
        );
        assert_eq!(back.get("step").and_then(Value::as_int), Some(1));
        assert_eq!(
            file_names(dir.path()),
            vec!["last.pt".to_owned()],
            "{mode:?}"
        );
        let st = io.status();
        assert_eq!(st.errors, 1, "{mode:?}");
        assert_eq!((st.bytes_in_flight, st.pool.in_use), (0, 0), "{st:?}");
        io.save(&tree_of(&p, 2), &path).unwrap().wait().unwrap();
        io.teardown().unwrap();
    }
}

/// Whatever error a later call would still raise for `path` (none when each was told once).
fn h_staged_error(io: &AsyncCheckpointIo<TorchCheckpointIo>, path: &Path) -> Option<Error> {
    io.wait_path(path).err()
}

/// A source whose copy panics.
struct Exploding;

impl TensorSource for Exploding {
    fn dtype(&self) -> DType {
        DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        vec![4]
    }
    fn copy_to(&self, _dst: &mut [u8]) -> ckptio::Result<()> {
        panic!("driver bug while copying");
    }
}

/// Runs `f` on a thread and fails the test if it has not returned within 20 s.
fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("hung: no result after 20 s")
}

#[test]
fn a_panic_while_copying_is_an_error_and_nothing_hangs() {
    within_20s(|| {
        for mode in [SnapshotMode::Eager, SnapshotMode::Deferred] {
            let io = Builder::default()
                .snapshot_mode(mode)
                .build(TorchCheckpointIo::new());
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("p.pt");
            let mut d = Dict::new();
            d.insert("w", LiveTensor::new(Param::new(16, 1.0)));
            d.insert("x", LiveTensor::new(Exploding));
            let err = match io.save(&Value::Dict(d), &path) {
                Err(e) => e,
                Ok(h) => h.wait().unwrap_err(),
            };
            assert!(
                err.to_string().contains("driver bug while copying"),
                "{mode:?}: {err}"
            );
            // Told once; the writer serves the next save; teardown does not hang.
            io.flush().unwrap();
            assert!(!path.exists(), "{mode:?}");
            let p = Param::new(4, 2.0);
            io.save(&tree_of(&p, 3), &path).unwrap().wait().unwrap();
            io.teardown().unwrap();
        }
    });
}

/// A backend whose saves wait until the test lets them go, and that says when one started.
struct Held {
    started: Mutex<std::sync::mpsc::Sender<()>>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Held {
    /// The backend, the receiver that hears each save start, and the sender that lets one end.
    fn new() -> (
        Held,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let held = Held {
            started: Mutex::new(started_tx),
            release: Mutex::new(release_rx),
        };
        (held, started, release)
    }

    fn save(&self, _c: &Value) -> ckptio::Result<()> {
        let _ = self.started.lock().unwrap().send(());
        self.release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| Error::Io {
                op: "test",
                path: std::path::PathBuf::new(),
                source: std::io::Error::other("never released"),
            })
    }
}

save_only_backend!(Held, pending: false);

#[test]
fn deferred_staged_does_not_wait_for_earlier_writes_when_the_queue_is_full() {
    within_20s(deferred_staged_with_a_full_queue);
}

fn deferred_staged_with_a_full_queue() {
    let (held, started, release) = Held::new();
    let io = Builder::default()
        .snapshot_mode(SnapshotMode::Deferred)
        .capacity(1)
        .build(held);
    let p = Param::new(64, 1.0);
    let a = io.save(&tree_of(&p, 1), "a").unwrap();
    started.recv_timeout(Duration::from_secs(20)).unwrap(); // the writer is busy with "a"
    let b = io.save(&tree_of(&p, 2), "b").unwrap(); // waits in the queue
    b.wait_staged().unwrap();
    // The queue is full: "c" must still be snapshotted, so the loop can step, while "a" is
    // being written.
    let c = io.save(&tree_of(&p, 3), "c").unwrap();
    let staged = c.wait_staged();
    for _ in 0..3 {
        release.send(()).unwrap();
    }
    staged.unwrap();
    for h in [a, b, c] {
        h.wait().unwrap();
    }
    io.teardown().unwrap();
}

/// Records, for each save, whether every storage was already copied when the backend got it.
#[derive(Default)]
struct SeesReady(Mutex<Vec<bool>>);

impl SeesReady {
    fn save(&self, c: &Value) -> ckptio::Result<()> {
        let ready = c.tensors().all(|t| t.storage().is_ready());
        self.0.lock().unwrap().push(ready);
        Ok(())
    }
}

save_only_backend!(SeesReady, pending: true);

#[test]
fn eager_copying_saves_reach_the_writer_before_their_copy_ends_unless_copy_first_is_asked_for() {
    // Small tensors are never write-protected: this save copies on the caller's thread.
    for (write_start, want_ready) in [
        (None, false),
        (Some(WriteStart::AfterSnapshot), true),
        (Some(WriteStart::WhileProtecting), false),
    ] {
        let b = Builder::default();
        let b = match write_start {
            Some(when) => b.write_start(when),
            None => b,
        };
        let seen = Arc::new(SeesReady::default());
        let io = b.build(seen.clone());
        let mut d = Dict::new();
        d.insert("w", LiveTensor::new(Param::new(8, 1.0)));
        // The copy of "z" ends once the backend has got the save (so a writer that gets it
        // first sees it pending), or after 2 s where the backend cannot get it before the copy
        // ends.
        let slow = Gated {
            n: 2,
            x: 0.0,
            open: Mutex::new(None),
            fail_after_ms: None,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        *slow.open.lock().unwrap() = Some(rx);
        std::thread::spawn(move || {
            for _ in 0..2000 {
                if !seen.0.lock().unwrap().is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = tx.send(());
        });
        d.insert("z", LiveTensor::new(slow));
        io.save(&Value::Dict(d), "p").unwrap().wait().unwrap();
        assert_eq!(
            *io.inner().0.lock().unwrap(),
            vec![want_ready],
            "{write_start:?}"
        );
        io.teardown().unwrap();
    }
}

#[test]
fn a_report_holds_the_fsync_time_and_the_file_size_the_backend_measured() {
    let dir = tempfile::tempdir().unwrap();
    let p = Param::new(1 << 16, 0.5);
    let io = Builder::default().build(TorchCheckpointIo::new());
    let path = dir.path().join("d.pt");
    let r = io.save(&tree_of(&p, 1), &path).unwrap().wait().unwrap();
    let fsync = r.fsync.expect("TorchCheckpointIo measures its fsyncs");
    assert!(
        fsync > std::time::Duration::ZERO && fsync <= r.write,
        "{r:?}"
    );
    assert_eq!(r.file_bytes, Some(std::fs::metadata(&path).unwrap().len()));
    assert!(
        r.file_bytes.unwrap() > r.bytes,
        "headers and pickle beside the storages"
    );
    // Not durable: no fsync at all.
    let quick = io
        .save_with_options(
            &tree_of(&p, 2),
            dir.path().join("q.pt"),
            &SaveOptions::default().durable(false),
        )
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(quick.fsync, Some(std::time::Duration::ZERO), "{quick:?}");
    assert!(!quick.durable);
    io.teardown().unwrap();
    // A backend that measures nothing reports nothing.
    let plain = Builder::default().build(Arc::new(NoMeasure(TorchCheckpointIo::new())));
    let r = plain
        .save(&tree_of(&p, 1), dir.path().join("p.pt"))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!((r.fsync, r.file_bytes), (None, None), "{r:?}");
    plain.teardown().unwrap();
    // One that measures, behind `Arc` and `Box<dyn CheckpointIo>`: its figures come through.
    let boxed: Box<dyn CheckpointIo> = Box::new(Arc::new(TorchCheckpointIo::new()));
    let wrapped = Builder::default().build(boxed);
    let r = wrapped
        .save(&tree_of(&p, 3), dir.path().join("w.pt"))
        .unwrap()
        .wait()
        .unwrap();
    assert!(r.fsync.is_some_and(|d| d > Duration::ZERO), "{r:?}");
    assert!(r.file_bytes.is_some(), "{r:?}");
    wrapped.teardown().unwrap();
}

/// Forwards `save_checkpoint` only, so `save_checkpoint_measured` is the trait's default.
struct NoMeasure(TorchCheckpointIo);

impl ckptio::CheckpointIo for NoMeasure {
    fn save_checkpoint(
        &self,
        c: &Value,
        p: &std::path::Path,
        o: &SaveOptions,
    ) -> ckptio::Result<()> {
        self.0.save_checkpoint(c, p, o)
    }
    fn load_checkpoint(
        &self,
        p: &std::path::Path,
        o: &ckptio::LoadOptions,
        s: Option<&mut dyn ckptio::Restore>,
    ) -> ckptio::Result<Option<Value>> {
        self.0.load_checkpoint(p, o, s)
    }
    fn remove_checkpoint(&self, p: &std::path::Path) -> ckptio::Result<()> {
        self.0.remove_checkpoint(p)
    }
}
