//! Write-protected Eager snapshots: what is saved is the state when `save` returned, whoever
//! writes the tensors afterwards (the training thread, another thread, the kernel), and
//! however soon.
//!
//! Where this process may not use `userfaultfd`, saves copy instead: the tests then still check
//! what is saved, and report a skip of kind `userfaultfd` ([`common::skip`]) for the protected
//! path they could not exercise.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

mod common;

use bytes::Bytes;
use ckptio::runtime::{write_protect_available, Builder};
use ckptio::{
    AsyncCheckpointIo, CheckpointIo, DType, Dict, LiveTensor, LoadOptions, SnapshotMode,
    TensorSource, TorchCheckpointIo, Value,
};

/// Parameter memory written in place without locks, as an optimizer kernel writes it: heap
/// memory, or a shared mapping (`MAP_SHARED`).
struct Buf {
    ptr: *mut f32,
    len: usize,
    shared: bool,
}

// SAFETY (test): threads write disjoint elements or are ordered by joins; the saved state is
// read through the protected snapshot.
unsafe impl Send for Buf {}
// SAFETY: as above.
unsafe impl Sync for Buf {}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.shared {
            // SAFETY: mapped in `shared`, unmapped once.
            unsafe { libc::munmap(self.ptr.cast(), self.len * 4) };
        } else {
            // SAFETY: made by `Box::into_raw` in `new`, dropped once.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
        }
    }
}

impl Buf {
    fn new(v: Vec<f32>) -> Arc<Buf> {
        let len = v.len();
        let ptr = Box::into_raw(v.into_boxed_slice()).cast::<f32>();
        Arc::new(Buf {
            ptr,
            len,
            shared: false,
        })
    }
    /// `len` elements of `x` in a fresh shared anonymous mapping.
    fn shared(len: usize, x: f32) -> Arc<Buf> {
        // SAFETY: a fresh mapping, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 4,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let b = Arc::new(Buf {
            ptr: p.cast(),
            len,
            shared: true,
        });
        b.fill_backwards(x);
        b
    }
    fn ptr(&self) -> *mut f32 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn values(&self) -> Vec<f32> {
        // SAFETY: in bounds; callers read after every writer was joined.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len).to_vec() }
    }
    /// Writes `x` to every element, last first: the copier copies first to last, so these
    /// writes reach pages it has not copied yet.
    fn fill_backwards(&self, x: f32) {
        let p = self.ptr();
        for i in (0..self.len()).rev() {
            // SAFETY: in bounds.
            unsafe { p.add(i).write_volatile(x) };
        }
    }
    /// The bytes of the first `n` elements.
    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&self, n: usize) -> &mut [u8] {
        assert!(n <= self.len());
        // SAFETY: the buffer's own bytes, in bounds.
        unsafe { std::slice::from_raw_parts_mut(self.ptr().cast::<u8>(), n * 4) }
    }
}

struct Owner(Arc<Buf>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes_mut(self.0.len())
    }
}

#[derive(Clone)]
struct Param(Arc<Buf>);

impl TensorSource for Param {
    fn dtype(&self) -> DType {
        DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        vec![self.0.len()]
    }
    fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
        dst.copy_from_slice(self.0.bytes_mut(self.0.len()));
        Ok(())
    }
    fn host_memory(&self) -> Option<&dyn ckptio::HostMemory> {
        Some(self)
    }
}

// SAFETY: the bytes are the buffer's elements, and the owner keeps the buffer at its address
// while they are held; only this process's threads write it, through the test's own calls.
unsafe impl ckptio::HostMemory for Param {
    unsafe fn borrow_bytes(&self) -> Option<Bytes> {
        Some(Bytes::from_owner(Owner(self.0.clone())))
    }
    unsafe fn protectable_bytes(&self) -> Option<Bytes> {
        Some(Bytes::from_owner(Owner(self.0.clone())))
    }
}

fn tree(params: &[(&str, &Param)]) -> Value {
    let mut d = Dict::new();
    for (k, p) in params {
        d.insert(*k, LiveTensor::new((*p).clone()));
    }
    Value::Dict(d)
}

fn load_f32(path: &Path, key: &str) -> Vec<f32> {
    let v = TorchCheckpointIo::new()
        .load_checkpoint(path, &LoadOptions::default(), None)
        .unwrap()
        .unwrap();
    let t = v.get(key).unwrap().as_tensor().unwrap().to_contiguous();
    t.storage()
        .bytes()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// An Eager wrapper that write-protects; reports a skip when the protected path cannot run here.
fn eager_io() -> AsyncCheckpointIo<TorchCheckpointIo> {
    protected_here();
    Builder::default()
        .snapshot_mode(SnapshotMode::Eager)
        .write_protect(true)
        .build(TorchCheckpointIo::new())
}

/// Whether the protected path runs here; reports a skip of the running test when it does not.
fn protected_here() -> bool {
    match write_protect_available() {
        Ok(()) => true,
        Err(e) => {
            common::skip(
                &common::this_test(),
                common::SkipKind::Userfaultfd,
                &format!("write protection not available ({e}): only the copying path is checked"),
            );
            false
        }
    }
}

const N: usize = 64 << 20; // 256 MiB of f32

/// Aborts the whole test process if the test it guards runs past two minutes: a write held
/// forever by a protection never lifted must fail the run, not hang it.
struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

fn watchdog(test: &'static str) -> Watchdog {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            rx.recv_timeout(std::time::Duration::from_secs(120))
        {
            eprintln!("{test}: still running after 120 s, a write is held forever: aborting");
            std::process::abort();
        }
    });
    Watchdog(Some(tx))
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[test]
fn writes_right_after_an_eager_save_wait_for_the_copy_and_never_reach_the_file() {
    let _w =
        watchdog("writes_right_after_an_eager_save_wait_for_the_copy_and_never_reach_the_file");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.pt");
    let buf = Buf::new((0..N).map(|i| i as f32).collect());
    let io = eager_io();
    let h = io
        .save(&tree(&[("w", &Param(buf.clone()))]), &path)
        .unwrap();
    buf.fill_backwards(-1.0); // the optimizer step, at once
    let rep = h.wait().unwrap();
    let saved = load_f32(&path, "w");
    assert!(saved.iter().enumerate().all(|(i, &x)| x == i as f32));
    let s = io.status();
    if protected_here() {
        assert!(s.write_protected >= (N as u64 * 4) - 8192, "{s:?}");
        assert!(s.write_protect_waits > 0, "{s:?}");
        // The report tells the background copy apart from the stall.
        assert!(rep.copied > rep.stage, "{rep:?}");
    } else {
        assert_eq!(rep.copied, rep.stage, "{rep:?}");
    }
    io.teardown().unwrap();
}

#[test]
fn writes_from_other_threads_and_from_the_kernel_are_held_too() {
    let _w = watchdog("writes_from_other_threads_and_from_the_kernel_are_held_too");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.pt");
    let src = dir.path().join("sevens");
    std::fs::write(&src, 7.0f32.to_le_bytes().repeat(N / 2)).unwrap();
    let buf = Buf::new(vec![3.0; N]);
    let io = eager_io();
    let h = io
        .save(&tree(&[("w", &Param(buf.clone()))]), &path)
        .unwrap();
    let b = buf.clone();
    let other = std::thread::spawn(move || {
        // The upper half, by another thread.
        let p = b.ptr();
        for i in (N / 2..N).rev() {
            // SAFETY: in bounds; this thread alone writes the upper half.
            unsafe { p.add(i).write_volatile(5.0) };
        }
    });
    // The lower half, by the kernel: a read() straight into the protected memory must succeed.
    let lower = buf.bytes_mut(N / 2);
    std::fs::File::open(&src)
        .unwrap()
        .read_exact(lower)
        .unwrap();
    other.join().unwrap();
    h.wait().unwrap();
    assert!(load_f32(&path, "w").iter().all(|&x| x == 3.0));
    let now = buf.values();
    assert!(now[..N / 2].iter().all(|&x| x == 7.0) && now[N / 2..].iter().all(|&x| x == 5.0));
    io.teardown().unwrap();
}

#[test]
fn pages_never_touched_before_the_save_are_snapshotted_as_zeros() {
    let _w = watchdog("pages_never_touched_before_the_save_are_snapshotted_as_zeros");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.pt");
    // A zeroed allocation this large comes straight from the kernel: no page is touched yet.
    let buf = Buf::new(vec![0.0; N]);
    let io = eager_io();
    let h = io
        .save(&tree(&[("w", &Param(buf.clone()))]), &path)
        .unwrap();
    buf.fill_backwards(9.0);
    h.wait().unwrap();
    assert!(load_f32(&path, "w").iter().all(|&x| x == 0.0));
    io.teardown().unwrap();
}

#[test]
fn a_tensor_dropped_right_after_save_is_still_saved_whole() {
    let _w = watchdog("a_tensor_dropped_right_after_save_is_still_saved_whole");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.pt");
    let io = eager_io();
    let h = {
        let buf = Buf::new(vec![4.0; N / 4]);
        io.save(&tree(&[("w", &Param(buf))]), &path).unwrap()
        // The caller's last handle to the memory goes here.
    };
    h.wait().unwrap();
    assert!(load_f32(&path, "w").iter().all(|&x| x == 4.0));
    io.teardown().unwrap();
}

#[test]
fn back_to_back_saves_each_hold_the_state_of_their_own_moment() {
    let _w = watchdog("back_to_back_saves_each_hold_the_state_of_their_own_moment");
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("1.pt"),
        dir.path().join("2.pt"),
        dir.path().join("3.pt"),
    );
    let w = Buf::new(vec![1.0; N / 4]);
    let m = Buf::new(vec![10.0; N / 8]);
    let t = tree(&[("w", &Param(w.clone())), ("m", &Param(m.clone()))]);
    protected_here();
    let io = Builder::default()
        .capacity(4)
        .write_protect(true)
        .build(TorchCheckpointIo::new());
    let h1 = io.save(&t, &a).unwrap();
    w.fill_backwards(2.0);
    m.fill_backwards(20.0);
    let h2 = io.save(&t, &b).unwrap();
    w.fill_backwards(3.0);
    let h3 = io.save(&t, &c).unwrap();
    m.fill_backwards(30.0);
    for h in [h1, h2, h3] {
        h.wait().unwrap();
    }
    for (p, x, y) in [(&a, 1.0, 10.0), (&b, 2.0, 20.0), (&c, 3.0, 20.0)] {
        assert!(load_f32(p, "w").iter().all(|&v| v == x), "{}", p.display());
        assert!(load_f32(p, "m").iter().all(|&v| v == y), "{}", p.display());
    }
    io.teardown().unwrap();
}

#[test]
fn small_or_unprotectable_tensors_are_copied_and_the_switch_turns_it_off() {
    let _w = watchdog("small_or_unprotectable_tensors_are_copied_and_the_switch_turns_it_off");
    let dir = tempfile::tempdir().unwrap();
    let small = Buf::new(vec![6.0; 1000]);
    let big = Buf::new(vec![8.0; N / 16]);
    for (protect, path) in [(true, "on.pt"), (false, "off.pt")] {
        let path = dir.path().join(path);
        let io = Builder::default()
            .write_protect(protect)
            .build(TorchCheckpointIo::new());
        let h = io
            .save(
                &tree(&[("s", &Param(small.clone())), ("b", &Param(big.clone()))]),
                &path,
            )
            .unwrap();
        h.wait().unwrap();
        assert!(load_f32(&path, "s").iter().all(|&v| v == 6.0));
        assert!(load_f32(&path, "b").iter().all(|&v| v == 8.0));
        let s = io.status();
        if !protect {
            assert_eq!(s.write_protected, 0);
        } else if protected_here() {
            // The big one only, less its partial end pages.
            assert!(s.write_protected > 0 && s.write_protected <= (N as u64 / 16) * 4);
        }
        io.teardown().unwrap();
    }
}

#[test]
fn shared_memory_is_copied_not_protected() {
    let _w = watchdog("shared_memory_is_copied_not_protected");
    // A write protection would hold only this process's writes through this mapping, not
    // another mapping's or another process's: it is copied instead.
    let buf = Buf::shared(N / 16, 42.0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.pt");
    let io = eager_io();
    io.save(&tree(&[("s", &Param(buf))]), &path)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(io.status().write_protected, 0);
    assert!(load_f32(&path, "s").iter().all(|&x| x == 42.0));
    io.teardown().unwrap();
}

/// A source over shared memory (so it is not protected but copied) whose copy fails.
#[derive(Clone)]
struct Unreadable(Arc<Buf>);

impl TensorSource for Unreadable {
    fn dtype(&self) -> DType {
        DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        vec![self.0.len()]
    }
    fn copy_to(&self, _dst: &mut [u8]) -> ckptio::Result<()> {
        Err(ckptio::Error::Io {
            op: "test",
            path: std::path::PathBuf::new(),
            source: std::io::Error::other("this tensor cannot be read"),
        })
    }
    fn host_memory(&self) -> Option<&dyn ckptio::HostMemory> {
        Some(self)
    }
}

// SAFETY: as for `Param`.
unsafe impl ckptio::HostMemory for Unreadable {
    // Not borrowed: a save that does not protect it copies it, and the copy fails.
    unsafe fn borrow_bytes(&self) -> Option<Bytes> {
        None
    }
    unsafe fn protectable_bytes(&self) -> Option<Bytes> {
        Some(Bytes::from_owner(Owner(self.0.clone())))
    }
}

#[test]
fn a_save_that_fails_after_protecting_a_tensor_lifts_it_and_the_next_save_works() {
    let _w =
        watchdog("a_save_that_fails_after_protecting_a_tensor_lifts_it_and_the_next_save_works");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.pt");
    let good = Buf::new(vec![1.0; N / 8]);
    let mut t = Dict::ordered();
    // The good tensor is protected (and handed to the copier) first; the other one is shared
    // memory, so it is copied after, and that copy fails.
    t.insert("good", LiveTensor::new(Param(good.clone())));
    t.insert("bad", LiveTensor::new(Unreadable(Buf::shared(N / 16, 0.0))));
    let io = eager_io();
    let err = io.save(&Value::Dict(t), &path).unwrap_err();
    assert!(err.to_string().contains("cannot be read"), "{err}");
    // Nothing stays protected (a write held forever trips the watchdog) ...
    good.fill_backwards(2.0);
    // ... nothing was written ...
    assert!(!path.exists());
    // ... and the next save protects and saves as usual.
    let h = io
        .save(&tree(&[("good", &Param(good.clone()))]), &path)
        .unwrap();
    good.fill_backwards(3.0);
    h.wait().unwrap();
    assert!(load_f32(&path, "good").iter().all(|&x| x == 2.0));
    if protected_here() {
        assert!(io.status().write_protected > 0);
    }
    io.teardown().unwrap();
}

#[test]
fn a_file_written_while_its_tensors_were_still_being_copied_loads_in_pytorch() {
    let _w = watchdog("a_file_written_while_its_tensors_were_still_being_copied_loads_in_pytorch");
    // The writer writes each protected tensor piece by piece as the copier's copy advances;
    // writes right after `save` make the copier copy the ends of the tensors first, out of
    // order. The file must still be exactly the state at `save`, for ckptio and for PyTorch.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamed.pt");
    let n = N / 4; // 16 Mi floats: every index is exact in f32
    let a = Buf::new((0..n).map(|i| i as f32).collect());
    let b = Buf::new((0..n).map(|i| -(i as f32)).collect());
    let mut t = Dict::ordered();
    t.insert("a", LiveTensor::new(Param(a.clone())));
    t.insert("b", LiveTensor::new(Param(b.clone())));
    let io = eager_io();
    let h = io.save(&Value::Dict(t), &path).unwrap();
    b.fill_backwards(7.0);
    a.fill_backwards(7.0);
    h.wait().unwrap();
    assert!(load_f32(&path, "a")
        .iter()
        .enumerate()
        .all(|(i, &x)| x == i as f32));
    assert!(load_f32(&path, "b")
        .iter()
        .enumerate()
        .all(|(i, &x)| x == -(i as f32)));
    if protected_here() {
        assert!(io.status().write_protected > 0);
    }
    io.teardown().unwrap();
    let script = format!(
        "import sys, torch\n\
         d = torch.load(sys.argv[1], weights_only=True)\n\
         r = torch.arange({n}, dtype=torch.float32)\n\
         assert torch.equal(d['a'], r), 'a differs'\n\
         assert torch.equal(d['b'], -r), 'b differs'\n\
         print('ok')"
    );
    let out = common::run_python_code(&script, &[path.as_os_str()]);
    assert_eq!(out.trim(), "ok");
}
