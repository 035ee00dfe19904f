//! Every way to save writes a file that PyTorch loads with `torch.load(weights_only=True)` and
//! that holds exactly the state of the moment the save took its snapshot: a synchronous save
//! of host tensors and of live tensors, Eager saves that copy and that write-protect, a
//! Deferred save, a save that is not durable, and a save through `CheckpointManager`.
//!
//! Each save writes the same checkpoint: tch tensors of a `VarStore` and loose ones, saved live
//! (`ckptio::tch::live_state_dict`, `ckptio::tch::live`, one of them twice); `HostTensor`s of
//! several dtypes with views sharing one storage; a nested optimizer-like dict with int keys,
//! a tuple and a list; ints, floats, strings, a bool and `None`. The live tensors are
//! overwritten right after `save` returns (Deferred: right after the snapshot is staged), so a
//! snapshot taken at any other moment shows in the file. One Python process then loads every
//! file, and each loaded tree is compared with the state at the snapshot: values, dtypes,
//! shapes, storage sharing, flags and container types, with and without `mmap=True`.
#![cfg(feature = "tch")]

use std::path::{Path, PathBuf};

use ckptio::manager::{CheckpointManager, ManagerConfig};
use ckptio::runtime::Builder;
use ckptio::state::Stateful;
use ckptio::{
    AsyncCheckpointIo, CheckpointIo, DType, Dict, HostTensor, LoadOptions, SaveOptions,
    SnapshotMode, TorchCheckpointIo, Value,
};
use serde_json::{json, Value as Json};
use tch::{Device, Kind, Tensor};

mod common;
use common::{first_difference, flags, kinds, pick, sharing_groups, skip, SkipKind};

/// The tch tensors saved live: a model's variables and loose tensors.
struct Live {
    vs: tch::nn::VarStore,
    bf16: Tensor,
    ids: Tensor,
    mask: Tensor,
}

impl Live {
    /// The same values every time. `fc.weight` is 4 MiB, large enough to be write-protected.
    fn new() -> Live {
        let cpu = Device::Cpu;
        let vs = tch::nn::VarStore::new(cpu);
        let root = vs.root();
        let fc = &root / "fc";
        let ramp = |n: i64, kind: Kind| Tensor::arange(n, (kind, cpu));
        let _ = fc.var_copy(
            "weight",
            &(ramp(1 << 20, Kind::Float).sin().reshape([1024, 1024])),
        );
        let _ = fc.var_copy("bias", &(ramp(1024, Kind::Float) / 7.0));
        let _ = (&root / "head").var_copy(
            "weight",
            &(ramp(16 * 64, Kind::Double).cos().reshape([16, 64])),
        );
        Live {
            vs,
            bf16: ramp(4096, Kind::Float).cos().to_kind(Kind::BFloat16),
            ids: ramp(1000, Kind::Int64) * 3,
            mask: ramp(300, Kind::Int64).remainder(3).eq(0),
        }
    }

    /// The optimizer step: every live tensor overwritten in place.
    fn overwrite(&mut self) {
        tch::no_grad(|| {
            for (_, mut v) in self.vs.variables() {
                let _ = v.fill_(-1.0);
            }
        });
        let _ = self.bf16.fill_(-2.0);
        let _ = self.ids.fill_(-3);
        let _ = self.mask.fill_(0);
    }

    /// The checkpoint, its tch tensors live.
    fn tree(&self) -> Value {
        let mut d = Dict::new();
        d.insert("model", ckptio::tch::live_state_dict(&self.vs).unwrap());
        let mut loose = Dict::ordered();
        let bf16 = ckptio::tch::live(&self.bf16).unwrap();
        loose.insert("bf16", bf16.clone());
        loose.insert("ids", ckptio::tch::live(&self.ids).unwrap());
        loose.insert("mask", ckptio::tch::live(&self.mask).unwrap());
        loose.insert("bf16_again", bf16); // one source twice: one storage in the file
        d.insert("live", loose);
        d.insert("host", host_tensors());
        d.insert("optim", optimizer_state());
        d.insert("step", 1234i64);
        d.insert("loss", 0.1f64);
        d.insert("run", "every way to save \u{2713}");
        d.insert("finished", false);
        d.insert("note", Value::None);
        Value::Dict(d)
    }
}

/// Host tensors of several dtypes; three views share one storage.
fn host_tensors() -> Value {
    let base = HostTensor::from_slice(
        &(0..24).map(|i| i as f32 * 0.5).collect::<Vec<_>>(),
        &[4, 6],
    )
    .unwrap();
    let mut d = Dict::ordered();
    d.insert("base", base.clone());
    d.insert("transposed", base.transpose(0, 1).unwrap());
    d.insert("rows", base.narrow(0, 1, 2).unwrap());
    d.insert(
        "f64",
        HostTensor::from_slice(&[1.5f64, -2.25, 1e300], &[3]).unwrap(),
    );
    d.insert(
        "i32",
        HostTensor::from_slice(&[i32::MIN, 0, 7, i32::MAX], &[2, 2]).unwrap(),
    );
    d.insert(
        "u8",
        HostTensor::from_slice(&(0..=255u8).collect::<Vec<_>>(), &[256]).unwrap(),
    );
    // float16 1.0, -2.0, 0.5 and +inf, little-endian.
    let half: Vec<u8> = [0x3c00u16, 0xc000, 0x3800, 0x7c00]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    d.insert(
        "f16",
        HostTensor::from_bytes(DType::Float16, &[4], half).unwrap(),
    );
    d.insert("scalar", HostTensor::scalar(42i64));
    Value::from(d)
}

/// A nested dict shaped like an optimizer's state dict: int keys, a tuple, a list.
fn optimizer_state() -> Value {
    let mut per_param = Dict::new();
    per_param.insert("step", 3i64);
    per_param.insert(
        "exp_avg",
        HostTensor::from_slice(&[0.25f32; 8], &[8]).unwrap(),
    );
    let mut state = Dict::new();
    state.insert(0i64, per_param);
    let mut group = Dict::new();
    group.insert("lr", 1e-3f64);
    group.insert("betas", Value::Tuple(vec![0.9f64.into(), 0.999f64.into()]));
    group.insert("params", Value::List(vec![0i64.into(), 1i64.into()]));
    group.insert("name", "all");
    let mut d = Dict::new();
    d.insert("state", state);
    d.insert("param_groups", Value::List(vec![group.into()]));
    Value::from(d)
}

/// The ways to save a checkpoint.
#[derive(Clone, Copy, Debug)]
enum Way {
    SyncHostTensors,
    SyncLiveTensors,
    EagerCopying,
    EagerWriteProtected,
    Deferred,
    NotDurable,
    Manager,
}

const WAYS: [Way; 7] = [
    Way::SyncHostTensors,
    Way::SyncLiveTensors,
    Way::EagerCopying,
    Way::EagerWriteProtected,
    Way::Deferred,
    Way::NotDurable,
    Way::Manager,
];

/// A file one way wrote, the state it must hold, and the top-level entries that state covers
/// (`None`: all of the file).
struct Saved {
    way: Way,
    path: PathBuf,
    want: Value,
    subtrees: Option<Vec<String>>,
}

fn async_io(mode: SnapshotMode, protect: bool) -> AsyncCheckpointIo<TorchCheckpointIo> {
    Builder::default()
        .snapshot_mode(mode)
        .write_protect(protect)
        .build(TorchCheckpointIo::new())
}

/// Saves a fresh copy of the checkpoint `way`'s way into `dir`, overwriting the live tensors as
/// soon as the snapshot is taken.
fn save(way: Way, dir: &Path) -> Saved {
    const TEST: &str = "every_way_to_save_writes_what_pytorch_loads_as_the_snapshot";
    let mut live = Live::new();
    let tree = live.tree();
    let want = tree.replace_live(&mut |l| l.to_host()).unwrap();
    let mut path = dir.join(format!("{way:?}.pt"));
    let mut subtrees = None;
    match way {
        Way::SyncHostTensors => {
            TorchCheckpointIo::new()
                .save_checkpoint(&want, &path, &SaveOptions::default())
                .unwrap();
        }
        Way::SyncLiveTensors => {
            TorchCheckpointIo::new()
                .save_checkpoint(&tree, &path, &SaveOptions::default())
                .unwrap();
            live.overwrite();
        }
        Way::EagerCopying => {
            let io = async_io(SnapshotMode::Eager, false);
            let h = io.save(&tree, &path).unwrap();
            live.overwrite();
            h.wait().unwrap();
            assert_eq!(io.status().write_protected, 0, "{:?}", io.status());
            io.teardown().unwrap();
        }
        Way::EagerWriteProtected => {
            let io = async_io(SnapshotMode::Eager, true);
            let h = io.save(&tree, &path).unwrap();
            live.overwrite();
            h.wait().unwrap();
            let status = io.status();
            if ckptio::runtime::cuda_available() {
                skip(
                    TEST,
                    SkipKind::Cuda,
                    "CUDA is available here, so tch CPU tensors are copied, not write-protected",
                );
            } else if let Err(e) = ckptio::runtime::write_protect_available() {
                skip(
                    TEST,
                    SkipKind::Userfaultfd,
                    &format!("write protection not available ({e}): the Eager save copied"),
                );
            } else {
                assert!(status.write_protected > 0, "nothing protected: {status:?}");
            }
            io.teardown().unwrap();
        }
        Way::Deferred => {
            let io = async_io(SnapshotMode::Deferred, false);
            let h = io.save(&tree, &path).unwrap();
            h.wait_staged().unwrap();
            live.overwrite();
            h.wait().unwrap();
            io.teardown().unwrap();
        }
        Way::NotDurable => {
            let io = async_io(SnapshotMode::Eager, false);
            let mut options = SaveOptions::default();
            options.durable = false;
            let h = io.save_with_options(&tree, &path, &options).unwrap();
            live.overwrite();
            let report = h.wait().unwrap();
            assert!(!report.durable, "{report:?}");
            assert_eq!(report.fsync, Some(std::time::Duration::ZERO), "{report:?}");
            io.teardown().unwrap();
        }
        Way::Manager => {
            let Value::Dict(entries) = &tree else {
                unreachable!("the checkpoint is a dict")
            };
            let names: Vec<String> = entries.iter().map(|(k, _)| k.to_string()).collect();
            let values: Vec<Value> = entries.iter().map(|(_, v)| v.clone()).collect();
            let state: Vec<(&str, &dyn Stateful)> = names
                .iter()
                .zip(&values)
                .map(|(k, v)| (k.as_str(), v as &dyn Stateful))
                .collect();
            let cfg = ManagerConfig::new(dir.join("manager"))
                .every_n_steps(1)
                .filename("step={step}.ckpt");
            let mut mgr =
                CheckpointManager::new(AsyncCheckpointIo::new(TorchCheckpointIo::new()), cfg);
            let written = mgr
                .step(1, 0, None, &state)
                .unwrap()
                .expect("due every step");
            live.overwrite();
            mgr.finish().unwrap();
            path = written;
            // The manager adds its own bookkeeping entries beside the state.
            subtrees = Some(names);
        }
    }
    Saved {
        way,
        path,
        want,
        subtrees,
    }
}

/// What should be loaded from `s`: canonical JSON, sharing groups, flags, container kinds.
fn expected(s: &Saved) -> [Json; 4] {
    let tree = pick(&s.want, s.subtrees.as_deref());
    [
        common::canon(&tree),
        sharing_groups(&tree),
        flags(&tree),
        kinds(&tree),
    ]
}

/// Differences between what ckptio's own reader loads from `s` and the snapshot.
fn check_with_ckptio(s: &Saved, failures: &mut Vec<String>) {
    let back = match ckptio::torch::load(&s.path, &LoadOptions::default()) {
        Ok(v) => pick(&v, s.subtrees.as_deref()),
        Err(e) => return failures.push(format!("{:?}: ckptio cannot read it: {e}", s.way)),
    };
    let got = [
        common::canon(&back),
        sharing_groups(&back),
        flags(&back),
        kinds(&back),
    ];
    for (what, (g, w)) in ["values", "storage sharing", "flags", "container types"]
        .iter()
        .zip(got.iter().zip(&expected(s)))
    {
        if let Some(d) = first_difference(g, w) {
            failures.push(format!("{:?}: ckptio reads other {what} {d}", s.way));
        }
    }
}

/// Differences between what `torch.load` made of `s` (one result of `load_check.py`) and the
/// snapshot.
fn check_with_torch(s: &Saved, r: &Json, failures: &mut Vec<String>) {
    let way = s.way;
    if r["ok"] != Json::Bool(true) {
        return failures.push(format!(
            "{way:?}: torch.load(weights_only=True) fails: {}",
            r["error"].as_str().unwrap_or("?")
        ));
    }
    let [values, groups, flag_list, kind_list] = expected(s);
    let mut check = |what: &str, got: &Json, want: &Json| {
        if let Some(d) = first_difference(got, want) {
            failures.push(format!("{way:?}: torch loads other {what} {d}"));
        }
    };
    check("values", &r["json"], &values);
    check("storage sharing", &r["groups"], &groups);
    check("flags", &r["flags"], &flag_list);
    check("container types", &r["kinds"], &kind_list);
    let m = &r["mmap"];
    if m["ok"] != Json::Bool(true) {
        return failures.push(format!(
            "{way:?}: torch.load(mmap=True, weights_only=True) fails: {}",
            m["error"].as_str().unwrap_or("?")
        ));
    }
    check("values with mmap=True", &m["json"], &values);
    check("storage sharing with mmap=True", &m["groups"], &groups);
}

#[test]
fn every_way_to_save_writes_what_pytorch_loads_as_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let saved: Vec<Saved> = WAYS.iter().map(|&w| save(w, dir.path())).collect();
    let mut failures = Vec::new();
    for s in &saved {
        check_with_ckptio(s, &mut failures);
    }
    let jobs: Vec<Json> = saved
        .iter()
        .map(|s| json!({"file": s.path, "weights_only": true, "subtrees": s.subtrees}))
        .collect();
    let results = common::load_check(dir.path(), jobs);
    assert_eq!(results.len(), saved.len(), "one result per file");
    for (s, r) in saved.iter().zip(&results) {
        check_with_torch(s, r, &mut failures);
    }
    assert!(
        failures.is_empty(),
        "{} difference(s) from the snapshot:\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}
