//! AsyncCheckpointIo with real tch tensors: what lands on disk is the state at save time.
#![cfg(feature = "tch")]

use ckptio::runtime::Builder;
use ckptio::{Dict, LoadOptions, SnapshotMode, TorchCheckpointIo, Value};
use tch::{Device, Kind, Tensor};

mod common;
use common::{skip, SkipKind};

fn run(mode: SnapshotMode) {
    run_on(mode, Device::Cpu, 256);
}

fn run_on(mode: SnapshotMode, device: Device, rows: i64) {
    let dir = tempfile::tempdir().unwrap();
    let io = Builder::default()
        .snapshot_mode(mode)
        .write_protect(true)
        .build(TorchCheckpointIo::new());
    let mut w = Tensor::randn([rows, 300], (Kind::Float, device));
    let mut b = Tensor::arange(1000, (Kind::Int64, device));
    let before_w = ckptio::tch::to_host(&w).unwrap();
    let before_b = ckptio::tch::to_host(&b).unwrap();
    let mut d = Dict::ordered();
    d.insert("w", ckptio::tch::live(&w).unwrap());
    d.insert("b", ckptio::tch::live(&b).unwrap());
    let path = dir.path().join("m.pt");
    let h = io.save(&Value::Dict(d), &path).unwrap();
    if mode == SnapshotMode::Deferred {
        h.wait_staged().unwrap();
    }
    // The optimizer step, in place, right after the snapshot.
    let _ = w.fill_(7.0);
    let _ = b.fill_(-1);
    h.wait().unwrap();
    let back = ckptio::torch::load(&path, &LoadOptions::default()).unwrap();
    assert!(
        back.get("w")
            .unwrap()
            .as_tensor()
            .unwrap()
            .data_eq(&before_w),
        "{mode:?}"
    );
    assert!(
        back.get("b")
            .unwrap()
            .as_tensor()
            .unwrap()
            .data_eq(&before_b),
        "{mode:?}"
    );
    let want = ckptio::tch::location_of(device);
    assert_eq!(
        back.get("w")
            .unwrap()
            .as_tensor()
            .unwrap()
            .storage()
            .location(),
        want
    );
    // Staging memory is page-locked exactly when CUDA is there to use it.
    assert_eq!(io.status().pool.pinned, tch::Cuda::is_available());
    assert_eq!(io.status().pool.pinned_fallbacks, 0, "pinning worked");
    io.teardown().unwrap();
}

#[test]
fn eager_snapshot_of_tch_tensors_is_the_state_at_save_time() {
    run(SnapshotMode::Eager);
}

#[test]
fn deferred_snapshot_of_tch_tensors_is_the_state_at_staged_time() {
    run(SnapshotMode::Deferred);
}

#[test]
fn large_tensors_written_piece_by_piece_as_their_copy_advances_are_saved_exactly() {
    // 46 MiB: copied in 8 MiB pieces (Deferred) or write-protected and copied chunk by chunk
    // (Eager), the writer writing each piece as it comes.
    for mode in [SnapshotMode::Deferred, SnapshotMode::Eager] {
        run_on(mode, Device::Cpu, 40_000);
    }
    if let Err(e) = ckptio::runtime::write_protect_available() {
        skip(
            "large_tensors_written_piece_by_piece_as_their_copy_advances_are_saved_exactly",
            SkipKind::Userfaultfd,
            &format!("write protection not available ({e}): the Eager save copied instead"),
        );
    }
}

/// CUDA tensors: the device-to-host copy goes into pinned staging memory (on the staging thread
/// in Deferred mode) and what lands on disk is the state at save / `staged()` time. Runs only
/// where CUDA is available (elsewhere it reports a skip of kind `cuda`).
#[test]
fn cuda_snapshots_are_the_state_at_save_and_staged_time() {
    if !tch::Cuda::is_available() {
        skip(
            "cuda_snapshots_are_the_state_at_save_and_staged_time",
            SkipKind::Cuda,
            "CUDA is not available on this machine",
        );
        return;
    }
    for mode in [SnapshotMode::Eager, SnapshotMode::Deferred] {
        // 256 x 300 floats (small) and 20 000 x 300 (24 MiB: the parallel copy path).
        run_on(mode, Device::Cuda(0), 256);
        run_on(mode, Device::Cuda(0), 20_000);
    }
}

/// CUDA, harder: kernels that write the tensors are still queued when `save` is called (no
/// synchronization), the state includes a transposed view and a half-precision tensor, two saves
/// go through one wrapper (its staging buffer reused), and what was saved loads back on the CPU
/// and on the GPU. The file must hold the state the queued kernels leave, not the writes made
/// right after `save` (Eager) or `staged()` (Deferred). Runs only where CUDA is available.
#[test]
fn cuda_saves_behind_queued_kernels_hold_the_state_those_kernels_leave() {
    if !tch::Cuda::is_available() {
        skip(
            "cuda_saves_behind_queued_kernels_hold_the_state_those_kernels_leave",
            SkipKind::Cuda,
            "CUDA is not available on this machine",
        );
        return;
    }
    use ckptio::{MapLocation, Value};
    let dev = Device::Cuda(0);
    let dir = tempfile::tempdir().unwrap();
    for mode in [SnapshotMode::Eager, SnapshotMode::Deferred] {
        let io = Builder::default()
            .snapshot_mode(mode)
            .build(TorchCheckpointIo::new());
        let a = Tensor::randn([2048, 2048], (Kind::Float, dev)) / 64.0;
        let mut w = Tensor::zeros([2048, 2048], (Kind::Float, dev));
        let mut h = Tensor::zeros([512, 300], (Kind::Half, dev));
        for round in 0..2i64 {
            // Queued, not waited for: a chain of matmuls ends by writing `w` and `h`.
            let mut t = a.shallow_clone();
            for _ in 0..16 {
                t = t.matmul(&a);
            }
            w.copy_(&t);
            h.copy_(&t.narrow(0, 0, 512).narrow(1, 0, 300).to_kind(Kind::Half));
            // What the file must hold, taken on the GPU in stream order.
            let (want_w, want_h) = (w.copy(), h.copy());
            let mut d = ckptio::Dict::ordered();
            d.insert("w_t", ckptio::tch::live(&w.transpose(0, 1)).unwrap());
            d.insert("h", ckptio::tch::live(&h).unwrap());
            let path = dir.path().join(format!("{mode:?}-{round}.pt"));
            let handle = io.save(&Value::Dict(d), &path).unwrap();
            if mode == SnapshotMode::Deferred {
                handle.wait_staged().unwrap();
            }
            let _ = w.fill_(-1.0);
            let _ = h.fill_(-1.0);
            handle.wait().unwrap();
            let back = ckptio::torch::load(&path, &LoadOptions::default()).unwrap();
            let tensor = |k: &str| back.get(k).unwrap().as_tensor().unwrap().clone();
            let on_cpu = LoadOptions::default().map_location(MapLocation::Cpu);
            for (k, want) in [("w_t", want_w.transpose(0, 1)), ("h", want_h)] {
                let host = tensor(k);
                assert_eq!(host.storage().location(), "cuda:0", "{mode:?} {k}");
                let cpu = ckptio::tch::to_tch_mapped(&host, &on_cpu).unwrap();
                assert_eq!(cpu.device(), Device::Cpu);
                assert!(
                    cpu.equal(&want.to_device(Device::Cpu)),
                    "{mode:?} {round} {k}"
                );
                let gpu = ckptio::tch::to_tch_mapped(&host, &LoadOptions::default()).unwrap();
                assert_eq!(gpu.device(), dev);
                assert!(gpu.equal(&want), "{mode:?} {round} {k} on the GPU");
            }
        }
        let st = io.status();
        assert!(st.pool.pinned && st.pool.pinned_fallbacks == 0, "{st:?}");
        assert_eq!(
            st.pool.allocations, 1,
            "the second save reused the buffer: {st:?}"
        );
        io.teardown().unwrap();
    }
}

#[test]
fn varstore_round_trips_through_the_async_wrapper_and_restore() {
    use ckptio::tch::{live_state_dict, StateDictRestore};
    use ckptio::CheckpointIo;
    let dir = tempfile::tempdir().unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _l = tch::nn::linear(vs.root() / "fc", 8, 4, Default::default());
    let io = ckptio::AsyncCheckpointIo::new(TorchCheckpointIo::new());
    let mut ck = Dict::new();
    ck.insert("state_dict", live_state_dict(&vs).unwrap());
    ck.insert("epoch", 3i64);
    let path = dir.path().join("vs.ckpt");
    drop(io.save(&Value::Dict(ck), &path).unwrap());
    let mut vs2 = tch::nn::VarStore::new(Device::Cpu);
    let _l2 = tch::nn::linear(vs2.root() / "fc", 8, 4, Default::default());
    let mut target = StateDictRestore::new(&mut vs2)
        .key("state_dict")
        .strict(true);
    // load waits for the pending write of this path (read your own writes).
    let rest = io
        .load_checkpoint(&path, &LoadOptions::default(), Some(&mut target))
        .unwrap();
    assert_eq!(rest.unwrap().get("epoch").and_then(Value::as_int), Some(3));
    let (a, b) = (vs.variables(), vs2.variables());
    for (k, v) in a {
        assert!(v.equal(&b[&k]), "{k}");
    }
}

#[test]
fn a_synchronous_save_writes_live_tensors_exactly_in_place_or_copied() {
    use ckptio::CheckpointIo;
    let dir = tempfile::tempdir().unwrap();
    let big = Tensor::randn([1024, 700], (Kind::Float, Device::Cpu)); // 2.8 MB: placed
    let cases: Vec<(&str, Tensor)> = vec![
        ("contiguous", big.shallow_clone()),
        ("transposed", big.transpose(0, 1)), // not contiguous: copied
        ("row_view", big.narrow(0, 3, 500)), // contiguous view at an offset: borrowed
        ("ints", Tensor::arange(300_000, (Kind::Int64, Device::Cpu))),
        (
            "flags",
            Tensor::randn([5000], (Kind::Float, Device::Cpu)).gt(0.0),
        ),
        ("half", Tensor::randn([400_000], (Kind::Half, Device::Cpu))),
        ("empty", Tensor::zeros([0, 4], (Kind::Float, Device::Cpu))),
    ];
    let mut d = Dict::ordered();
    for (k, t) in &cases {
        d.insert(*k, ckptio::tch::live(t).unwrap());
    }
    let path = dir.path().join("sync.pt");
    TorchCheckpointIo::new()
        .save_checkpoint(&Value::Dict(d), &path, &ckptio::SaveOptions::default())
        .unwrap();
    let back = ckptio::torch::load(&path, &LoadOptions::default()).unwrap();
    for (k, t) in &cases {
        let want = ckptio::tch::to_host(t).unwrap();
        let got = back.get(k).unwrap().as_tensor().unwrap();
        assert!(got.data_eq(&want), "{k}");
        assert_eq!(got.shape(), want.shape(), "{k}");
    }
}

#[test]
fn large_tensors_written_by_kernels_or_repointed_right_after_an_eager_save_are_saved_as_they_were()
{
    let dir = tempfile::tempdir().unwrap();
    let io = Builder::default()
        .write_protect(true)
        .build(TorchCheckpointIo::new());
    // Large enough to be write-protected instead of copied, where the kernel allows it.
    let mut w = Tensor::randn([4096, 1024], (Kind::Float, Device::Cpu));
    let mut m = Tensor::randn([2048, 1024], (Kind::Float, Device::Cpu));
    let before_w = ckptio::tch::to_host(&w).unwrap();
    let before_m = ckptio::tch::to_host(&m).unwrap();
    let mut d = Dict::ordered();
    d.insert("w", ckptio::tch::live(&w).unwrap());
    d.insert("m", ckptio::tch::live(&m).unwrap());
    let path = dir.path().join("big.pt");
    let h = io.save(&Value::Dict(d), &path).unwrap();
    // At once: `w` pointed at new memory (its old memory, first in line, is still being
    // snapshotted and must stay alive), then an in-place libtorch kernel over all of `m` (its
    // own threads write it).
    let _ = w.set_source_tensor_(&Tensor::zeros([4096, 1024], (Kind::Float, Device::Cpu)));
    let _ = w.fill_(1.0);
    let _ = m.g_mul_scalar_(3.0);
    h.wait().unwrap();
    let back = ckptio::torch::load(&path, &LoadOptions::default()).unwrap();
    let got = |k: &str| back.get(k).unwrap().as_tensor().unwrap().clone();
    assert!(got("w").data_eq(&before_w));
    assert!(got("m").data_eq(&before_m));
    // tch tensors are write-protected only in a process without CUDA (see
    // `HostMemory::protectable_bytes` of `ckptio::tch`); with CUDA they are copied.
    if ckptio::runtime::cuda_available() {
        assert_eq!(io.status().write_protected, 0, "{:?}", io.status());
    } else if let Err(e) = ckptio::runtime::write_protect_available() {
        skip(
            "large_tensors_written_by_kernels_or_repointed_right_after_an_eager_save_are_saved_as_they_were",
            SkipKind::Userfaultfd,
            &format!("write protection not available ({e}): the Eager save copied instead"),
        );
    } else {
        assert!(
            io.status().write_protected > (20 << 20),
            "{:?}",
            io.status()
        );
    }
    io.teardown().unwrap();
}
